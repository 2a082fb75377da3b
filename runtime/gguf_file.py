"""GGUF files, memory-mapped: metadata, tensor views and split files opened as one."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from .errors import ModelFormatError, ModelNotFoundError

SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<idx>\d{5})-of-(?P<n>\d{5})\.gguf$")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (rows last-dim-first), the reverse of ggml's ne
    data: np.ndarray  # read-only memmap view: float rows, or uint8 blocks for quantized types
    path: Path  # file that holds it
    offset: int  # byte offset of the data in that file

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def split_paths(path: Path) -> list[Path]:
    """All parts of a split GGUF given its first part; a single file is its own list."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    n = int(m["n"])
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise ModelNotFoundError(f"split GGUF {path.name} is missing part(s): {', '.join(missing)}")
    return parts


def _field_value(field) -> Any:
    vtype = field.types[0]
    if vtype == GGUFValueType.ARRAY:
        return field.contents()
    return field.contents()


class GGUFFile:
    """One model's GGUF (possibly split) as metadata plus memory-mapped tensors; nothing is copied."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise ModelNotFoundError(f"model file not found: {path}")
        if path.is_dir():
            raise ModelNotFoundError(f"{path} is a directory; give the path of a .gguf file")
        self.path = path
        self.paths = split_paths(path)
        self.readers = [self._open(p) for p in self.paths]
        self.meta: dict[str, Any] = {}
        for key, field in self.readers[0].fields.items():
            if key.startswith("GGUF."):
                continue
            self.meta[key] = _field_value(field)
        self.tensors: dict[str, TensorInfo] = {}
        for p, reader in zip(self.paths, self.readers):
            for t in reader.tensors:
                self.tensors[t.name] = TensorInfo(
                    name=t.name,
                    qtype=GGMLQuantizationType(t.tensor_type),
                    shape=tuple(int(d) for d in reversed(t.shape.tolist())),
                    data=t.data,
                    path=p,
                    offset=int(t.data_offset),
                )

    @staticmethod
    def _open(p: Path) -> GGUFReader:
        with open(p, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise ModelFormatError(f"{p} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        try:
            return GGUFReader(p)
        except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad files
            raise ModelFormatError(f"{p} is not a readable GGUF file (truncated or corrupt): {e}") from e

    @property
    def arch(self) -> str:
        arch = self.meta.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFormatError(f"{self.path} has no general.architecture key")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        """An architecture key (`block_count` means `{arch}.block_count`), or a full key."""
        full = key if "." in key and key.split(".")[0] in ("general", "tokenizer") else f"{self.arch}.{key}"
        return self.meta.get(full, default)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelFormatError(f"{self.path.name} lacks the metadata key {self.arch}.{key}")
        return value

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFormatError(f"{self.path.name} lacks the tensor {name}") from None

    @property
    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)

    def close(self) -> None:
        """Drop the maps. They are unmapped once the last view is gone: closing them by force would turn
        a view still held elsewhere (a tensor, a background copy) into a segfault."""
        self.readers = []
        self.tensors = {}
