"""Activation profiles: how often each routed expert was chosen, recorded by dsrun, read by the planner.

A profile is a JSON file:
    {"format": "dsrun-activation-profile", "version": 1, "model": "<file name>", "file_bytes": <int>,
     "counts": [[<tokens routed to expert 0 of layer 0>, ...], ..., []]}
with one list per layer (empty for a dense layer) of one count per routed expert.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DsrunError

FORMAT = "dsrun-activation-profile"
VERSION = 1


@dataclass(frozen=True)
class ActivationProfile:
    model: str  # file name of the GGUF it was recorded on
    file_bytes: int  # that file's size: tells a profile of another quant of the same model apart
    counts: tuple[tuple[int, ...], ...]  # per layer, per routed expert: tokens routed to it; () if dense

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "file_bytes": self.file_bytes,
            "counts": [list(layer) for layer in self.counts],
        }

    @classmethod
    def from_json(cls, obj, source: str = "activation profile") -> ActivationProfile:
        """Validate a decoded profile; `source` names it in errors (a path, usually)."""

        def bad(what: str) -> DsrunError:
            return DsrunError(f"{source} is not a valid dsrun activation profile: {what}")

        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise bad(f'expected an object with "format": "{FORMAT}"')
        if obj.get("version") != VERSION:
            raise bad(f"version {obj.get('version')!r} is not {VERSION}; record the profile again")
        model, file_bytes, counts = obj.get("model"), obj.get("file_bytes"), obj.get("counts")
        if not isinstance(model, str):
            raise bad('"model" must be the GGUF file name')
        if not _is_count(file_bytes):
            raise bad('"file_bytes" must be a non-negative integer')
        if not isinstance(counts, list) or not all(isinstance(layer, list) for layer in counts):
            raise bad('"counts" must be a list with one list of per-expert counts per layer')
        for i, layer in enumerate(counts):
            if not all(_is_count(c) for c in layer):
                raise bad(f"layer {i} has a count that is not a non-negative integer")
        return cls(model, file_bytes, tuple(tuple(layer) for layer in counts))


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_profile(path: str | Path) -> ActivationProfile:
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise DsrunError(f"activation profile not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DsrunError(f"cannot read the activation profile {path}: {e}") from e
    return ActivationProfile.from_json(obj, source=str(path))


def write_profile(profile: ActivationProfile, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile.to_json()) + "\n")
