"""The conversation and the sampling settings: plain data, saved as Markdown or JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

# The OpenAI fields every server takes; the others go on the wire only when changed from the default.
OPENAI_FIELDS = ("max_tokens", "temperature", "top_p", "seed", "stop")


@dataclass
class Sampling:
    max_tokens: int = 512
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def kwargs(self) -> dict:
        """Keyword arguments for `Engine.chat`."""
        return dataclasses.asdict(self)

    def request_fields(self) -> dict:
        """Fields for a `/v1/chat/completions` body."""
        default = Sampling()

        def wanted(k, v) -> bool:
            return v not in (None, ()) if k in OPENAI_FIELDS else v != getattr(default, k)

        return {k: v for k, v in self.kwargs().items() if wanted(k, v)}


@dataclass
class Conversation:
    system: str = ""
    turns: list[dict] = field(default_factory=list)  # {"role": "user" | "assistant", "content": str}

    def messages(self) -> list[dict]:
        """OpenAI-form messages, the system prompt first when there is one."""
        system = [{"role": "system", "content": self.system}] if self.system.strip() else []
        return system + self.turns

    def add(self, role: str, content: str) -> None:
        self.turns.append({"role": role, "content": content})

    def to_markdown(self, model: str) -> str:
        parts = [f"# Chat with {model}"]
        if self.system.strip():
            parts.append(f"**System:** {self.system}")
        for turn in self.turns:
            parts.append(f"## {turn['role'].capitalize()}\n\n{turn['content']}")
        return "\n\n".join(parts) + "\n"

    def to_json(self, model: str, sampling: Sampling) -> str:
        body = {"model": model, "sampling": sampling.kwargs(), "messages": self.messages()}
        return json.dumps(body, indent=2, ensure_ascii=False) + "\n"

    def save(self, path: Path, model: str, sampling: Sampling) -> None:
        """JSON when the name ends in .json, Markdown otherwise."""
        path = path.expanduser()
        text = self.to_json(model, sampling) if path.suffix == ".json" else self.to_markdown(model)
        path.write_text(text, encoding="utf-8")
