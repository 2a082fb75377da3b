"""The chat pane's widgets: the transcript, the prompt line with its history, the one-line status."""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Input, Markdown, Static
from textual.widgets.markdown import MarkdownStream

from .telemetry import Telemetry, human_bytes, human_rate


class Transcript(VerticalScroll):
    """The turns so far; stays scrolled to the newest text while a reply streams in."""

    async def add_turn(self, role: str, text: str = "") -> Markdown:
        turn = Markdown(text, classes=f"turn {role}")
        turn.border_title = "you" if role == "user" else role
        await self.mount(turn)
        self.anchor()
        return turn

    async def start_reply(self) -> MarkdownStream:
        return Markdown.get_stream(await self.add_turn("assistant"))

    def caption_last(self, text: str) -> None:
        """Put a line such as `42 tokens · 11 tok/s` on the bottom border of the newest turn."""
        self.query(".turn").last().border_subtitle = text

    async def add_error(self, text: str) -> None:
        await self.mount(Static(text, classes="error"))
        self.anchor()

    async def clear(self) -> None:
        await self.remove_children()


class PromptInput(Input):
    """A one-line prompt; up and down walk through what was sent before, like a shell."""

    BINDINGS = [
        Binding("up", "history(-1)", "Previous", show=False),
        Binding("down", "history(1)", "Next", show=False),
    ]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.history: list[str] = []
        self.position = 0  # index into history; len(history) is the fresh line being typed
        self.draft = ""  # what was typed before walking into the history

    def remember(self, text: str) -> None:
        if text and (not self.history or self.history[-1] != text):
            self.history.append(text)
        self.position, self.draft = len(self.history), ""

    def action_history(self, step: int) -> None:
        target = self.position + step
        if not 0 <= target <= len(self.history):
            return
        if self.position == len(self.history):
            self.draft = self.value
        self.position = target
        self.value = self.history[target] if target < len(self.history) else self.draft
        self.cursor_position = len(self.value)


class StatusLine(Static):
    """Speed and memory at a glance below the chat, so the other views are not needed while chatting."""

    def show(self, t: Telemetry) -> None:
        # most telling first: a narrow terminal cuts the end off
        parts = [f"decode {human_rate(t.decode_tps, 'tok/s')}", f"TTFT {human_rate(t.ttft_s, 's')}"]
        if t.hit_rate is not None:
            parts.append(f"hits {t.hit_rate:.0%}")
        parts += [f"{g.label} {human_bytes(g.used_bytes)}" for g in t.gpus]
        parts += [f"RSS {human_bytes(t.rss_bytes)}", f"prefill {human_rate(t.prefill_tps, 'tok/s')}"]
        self.update(" · ".join(parts))
