"""Modal dialogs: the settings (system prompt and sampling) and where to save the conversation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, TextArea

from .conversation import Sampling

# (Sampling field, label, Input type); an empty seed means a fresh random seed per reply
FIELDS = (
    ("temperature", "temperature", "number"),
    ("top_p", "top p", "number"),
    ("top_k", "top k", "integer"),
    ("min_p", "min p", "number"),
    ("repeat_penalty", "repeat penalty", "number"),
    ("max_tokens", "max tokens", "integer"),
    ("seed", "seed", "integer"),
)


class Dialog(ModalScreen):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def buttons(self, ok: str) -> Horizontal:
        return Horizontal(
            Button(ok, variant="primary", id="ok"), Button("Cancel", id="cancel"), classes="buttons"
        )

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ok":
            self.submit()
        else:
            self.dismiss(None)

    def submit(self) -> None:
        raise NotImplementedError


class SettingsScreen(Dialog):
    """Dismisses with (system prompt, Sampling), or None when cancelled."""

    def __init__(self, system: str, sampling: Sampling):
        super().__init__()
        self.system, self.sampling = system, sampling

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Settings", classes="dialog-title")
            yield Label("System prompt (applies to the next reply)")
            yield TextArea(self.system, id="system")
            with Grid(id="fields"):
                for name, label, kind in FIELDS:
                    value = getattr(self.sampling, name)
                    yield Label(label)
                    yield Input("" if value is None else str(value), type=kind, id=name, compact=True)
            yield self.buttons("Apply")

    def submit(self) -> None:
        try:
            parsed = {
                name: parse_field(label, kind, self.query_one(f"#{name}", Input).value.strip())
                for name, label, kind in FIELDS
            }
        except ValueError as e:
            self.notify(str(e), severity="error")
            return
        system = self.query_one("#system", TextArea).text
        self.dismiss((system, dataclasses.replace(self.sampling, **parsed)))


def parse_field(label: str, kind: str, text: str):
    if label == "seed" and not text:
        return None
    try:
        return int(text) if kind == "integer" else float(text)
    except ValueError:
        raise ValueError(
            f"{label}: '{text}' is not a{'n integer' if kind == 'integer' else ' number'}"
        ) from None


class SaveScreen(Dialog):
    """Dismisses with the Path to write, or None when cancelled."""

    def __init__(self, default: Path):
        super().__init__()
        self.default = default

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Save the conversation", classes="dialog-title")
            yield Label("File (.json for JSON, anything else for Markdown)")
            yield Input(str(self.default), id="path")
            yield self.buttons("Save")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.submit()

    def submit(self) -> None:
        text = self.query_one("#path", Input).value.strip()
        self.dismiss(Path(text).expanduser() if text else None)
