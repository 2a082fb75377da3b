"""`dsrun chat`: chat with a model and watch its memory and experts live.

The app owns the state (conversation, settings, the reply in flight); thread workers do the blocking
work (loading, generating, polling stats) and post messages; the widgets only render.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, TabbedContent, TabPane
from textual.widgets.markdown import MarkdownStream

from dsrun.errors import DsrunError

from .backends import Backend, EngineBackend, ServerBackend
from .chat import PromptInput, StatusLine, Transcript
from .conversation import Conversation, Sampling
from .experts import ExpertsView
from .memory import MemoryView
from .messages import BackendFailed, BackendReady, ReplyFailed, ReplyFinished, ReplyText, TelemetryUpdated
from .screens import SaveScreen, SettingsScreen
from .telemetry import History, Telemetry

STATS_HZ = 2.0
VIEW_FOCUS = {"chat": PromptInput, "memory": MemoryView, "experts": ExpertsView}  # tab id -> what takes keys


class DsrunApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "dsrun chat"
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+n", "new_chat", "New"),
        Binding("f1", "view('chat')", "Chat"),
        Binding("f2", "view('memory')", "Memory"),
        Binding("f3", "view('experts')", "Experts"),
        Binding("f4", "settings", "Settings"),
        Binding("ctrl+s", "save", "Save"),
    ]

    def __init__(self, backend: Backend, *, sampling: Sampling | None = None, system: str = ""):
        super().__init__()
        self.backend = backend
        self.sampling = sampling or Sampling()
        self.conversation = Conversation(system=system)
        self.history = History()
        self.telemetry = Telemetry()
        self.reply_id = 0  # id of the newest request; messages of older ones are dropped
        self.reply: MarkdownStream | None = None  # set while a reply streams in
        self.reply_text = ""
        self.polling = False  # a stats request is in flight: skip ticks rather than pile them up
        self.ready = False  # the backend is open; until then a question waits in the prompt

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(initial="chat"):
            with TabPane("Chat", id="chat"):
                yield Transcript()
                yield StatusLine("loading…")
                yield PromptInput(placeholder=f"loading {self.backend.name}…")
            with TabPane("Memory", id="memory"):
                yield MemoryView()
            with TabPane("Experts", id="experts"):
                yield ExpertsView()
        yield Footer(show_command_palette=False)  # ctrl+p still opens it; 80 columns need the room

    @property
    def main(self) -> Screen:
        """The screen with the views, under any dialog open on top of it."""
        return self.screen_stack[0]

    def on_mount(self) -> None:
        self.sub_title = self.backend.name
        self.main.query_one(PromptInput).focus()  # typing can start while the model loads
        self.open_backend()

    def on_unmount(self) -> None:
        self.backend.cancel()  # the generating thread must end for the process to exit

    # --- workers: blocking calls into the backend, answered by messages ---

    @work(thread=True, group="open")
    def open_backend(self) -> None:
        try:
            self.backend.open()
        except Exception as e:  # shown in the transcript: the app stays up to say what went wrong
            self.post_message(BackendFailed(error_text(e)))
            return
        self.post_message(BackendReady(self.backend.name))

    @work(thread=True, group="reply")
    def generate(self, reply_id: int, messages: list[dict], sampling: Sampling) -> None:
        t0 = time.perf_counter()
        finish, usage = "cancelled", None  # a stream cut short by cancel() ends without a reason
        try:
            for chunk in self.backend.chat(messages, sampling):
                if chunk.text:
                    self.post_message(ReplyText(reply_id, chunk.text))
                finish, usage = chunk.finish_reason or finish, chunk.usage or usage
        except Exception as e:  # whatever went wrong belongs in the transcript, not in a crash
            self.post_message(ReplyFailed(reply_id, error_text(e)))
            return
        self.post_message(ReplyFinished(reply_id, finish, usage, time.perf_counter() - t0))

    @work(thread=True, group="stats", exit_on_error=False)  # a failed poll only skips a frame
    def poll_stats(self) -> None:
        try:
            self.post_message(TelemetryUpdated(Telemetry.from_stats(self.backend.stats())))
        finally:
            self.polling = False

    def request_stats(self) -> None:
        if not self.polling:
            self.polling = True
            self.poll_stats()

    # --- messages from the workers ---

    def on_backend_ready(self, message: BackendReady) -> None:
        self.ready = True
        self.sub_title = message.name
        prompt = self.main.query_one(PromptInput)
        prompt.placeholder = "Ask something (Enter sends)"
        self.request_stats()
        self.set_interval(1 / STATS_HZ, self.request_stats)

    async def on_backend_failed(self, message: BackendFailed) -> None:
        self.main.query_one(PromptInput).placeholder = "no model: see the error above; ctrl+q quits"
        await self.main.query_one(Transcript).add_error(message.error)

    async def on_reply_text(self, message: ReplyText) -> None:
        if message.reply_id == self.reply_id and self.reply is not None:
            self.reply_text += message.text
            await self.reply.write(message.text)

    async def on_reply_finished(self, message: ReplyFinished) -> None:
        if message.reply_id != self.reply_id:
            return
        await self.end_reply()
        self.conversation.add("assistant", self.reply_text)
        self.main.query_one(Transcript).caption_last(reply_note(message, self.backend))

    async def on_reply_failed(self, message: ReplyFailed) -> None:
        if message.reply_id != self.reply_id:
            return
        await self.end_reply()
        self.conversation.turns.pop()  # the question that failed would make the next request fail too
        await self.main.query_one(Transcript).add_error(f"{message.error} (this turn is not kept)")

    async def on_telemetry_updated(self, message: TelemetryUpdated) -> None:
        if not self.is_running:  # the last poll can land while the app is closing
            return
        self.telemetry = t = message.telemetry
        self.history.push(t)
        self.main.query_one(StatusLine).show(t)
        await self.main.query_one(MemoryView).show(t, self.history)
        self.main.query_one(ExpertsView).show(t)

    # --- the user's actions ---

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if not self.ready:
            self.notify("the model is not ready yet: Enter again once it is", severity="warning")
            return
        if self.reply is not None:
            self.notify("a reply is still coming: Esc stops it", severity="warning")
            return
        prompt = self.main.query_one(PromptInput)
        prompt.remember(text)
        prompt.clear()
        self.conversation.add("user", text)
        transcript = self.main.query_one(Transcript)
        await transcript.add_turn("user", text)
        self.reply_id += 1
        self.reply, self.reply_text = await transcript.start_reply(), ""
        self.refresh_bindings()
        self.generate(self.reply_id, self.conversation.messages(), self.sampling)

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "stop":
            return self.reply is not None or None  # None: shown greyed out in the footer
        return True

    def action_stop(self) -> None:
        self.backend.cancel()

    async def action_new_chat(self) -> None:
        if self.reply is not None:
            self.backend.cancel()
            await self.end_reply()
        self.reply_id += 1
        self.conversation.turns.clear()
        await self.main.query_one(Transcript).clear()
        self.action_view("chat")

    def action_view(self, name: str) -> None:
        self.main.query_one(TabbedContent).active = name
        # focus follows, else the focused prompt in the hidden chat pane pulls its tab back to the front
        self.main.query_one(VIEW_FOCUS[name]).focus()

    def action_settings(self) -> None:
        def apply(result: tuple[str, Sampling] | None) -> None:
            if result is not None:
                self.conversation.system, self.sampling = result
                self.notify("settings apply from the next reply")

        self.push_screen(SettingsScreen(self.conversation.system, self.sampling), apply)

    def action_save(self) -> None:
        def save(path: Path | None) -> None:
            if path is None:
                return
            try:
                self.conversation.save(path, self.backend.name, self.sampling)
            except OSError as e:
                self.notify(f"could not save: {e}", severity="error")
                return
            self.notify(f"saved to {path}")

        default = Path.cwd() / f"dsrun-chat-{datetime.now():%Y%m%d-%H%M%S}.md"
        self.push_screen(SaveScreen(default), save)

    async def end_reply(self) -> None:
        await self.reply.stop()
        self.reply = None
        self.refresh_bindings()


def reply_note(message: ReplyFinished, backend: Backend) -> str:
    """`42 tokens · 11.3 tok/s · TTFT 0.84 s`, and why it ended when that was not the model's own stop."""
    parts, ttft = [], backend.ttft_s
    tokens = (message.usage or {}).get("completion_tokens")
    if tokens:
        parts.append(f"{tokens} tokens")
    if tokens and tokens > 1 and ttft is not None and message.seconds > ttft:
        # decode speed: the wait for the first token (prefill) is what TTFT reports
        parts.append(f"{(tokens - 1) / (message.seconds - ttft):.1f} tok/s")
    if ttft is not None:
        parts.append(f"TTFT {ttft:.2f} s")
    parts += {"cancelled": ["stopped"], "length": ["cut at max tokens"]}.get(message.finish_reason, [])
    return " · ".join(parts)


def error_text(e: Exception) -> str:
    return str(e) if isinstance(e, DsrunError) else f"{type(e).__name__}: {e}"


def make_app(backend: Backend, *, sampling: Sampling | None = None, system: str = "") -> DsrunApp:
    """The one way to build the app, for the CLI and the tests alike."""
    return DsrunApp(backend, sampling=sampling, system=system)


def add_arguments(p) -> None:
    from dsrun.cli import add_model_arguments, add_sampling_arguments

    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--connect", metavar="URL|SOCKET", default=None,
                   help="chat with a running `dsrun serve` (http://host:port or a Unix socket path) "
                        "instead of loading the model here")  # fmt: skip
    p.add_argument("--api-key", default=os.environ.get("DSRUN_API_KEY"),
                   help="bearer key for --connect (default: $DSRUN_API_KEY)")  # fmt: skip


def run(args) -> int:
    from dsrun.cli import load_kwargs, sampling_kwargs

    if args.connect:
        backend = ServerBackend(args.connect, api_key=args.api_key)
    else:
        backend = EngineBackend(model=args.model, load_kwargs=load_kwargs(args))
    kwargs = sampling_kwargs(args) | {"stop": tuple(args.stop)}
    try:
        make_app(backend, sampling=Sampling(**kwargs), system=args.system).run()
    finally:
        backend.close()
    return 0
