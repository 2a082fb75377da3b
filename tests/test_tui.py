"""`dsrun chat`: Pilot tests for behaviour, snapshot tests (pytest-textual-snapshot) for the views' layout
fed with recorded or synthesized stats, unit tests for the pure parts."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from textual.widgets import TabbedContent

from dsrun.generation import Chunk
from dsrun.tui.app import make_app
from dsrun.tui.backends import EngineBackend, ServerBackend, StreamingBackend, error_message, sse_events
from dsrun.tui.chat import PromptInput, Transcript
from dsrun.tui.conversation import Conversation, Sampling
from dsrun.tui.experts import CODE_INDEX, bin_map
from dsrun.tui.telemetry import Telemetry

DATA = Path(__file__).parent / "data"
SYNTHETIC = "stats_synthetic_deepseek_2gpu.json"  # made up by data/synth_stats.py, not recorded
RECORDED = "stats_smollm2_recorded.json"  # Engine.stats() of the default model after one reply


def load_stats(name: str) -> dict:
    return json.loads((DATA / name).read_text())


class FakeBackend(StreamingBackend):
    """Streams the given words, one chunk each, with a pause between; stats from a fixture file."""

    def __init__(self, words=("Hello", " **there**", "!"), *, delay=0.0, stats=SYNTHETIC):
        super().__init__()
        self.name = "fake"
        self.words, self.delay, self._stats = words, delay, load_stats(stats)
        self.requests: list[list[dict]] = []

    def open(self) -> None:
        pass

    def _stream(self, messages, sampling):
        self.requests.append(messages)
        n = 0
        for n, word in enumerate(self.words, 1):
            time.sleep(self.delay)
            yield Chunk(word, [n])
        yield Chunk("", [], "stop", {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n})

    def stats(self) -> dict:
        return self._stats

    def close(self) -> None:
        pass


async def wait_until(pilot, condition, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the app"
        await pilot.pause(0.05)


async def ask(pilot, text: str) -> None:
    app = pilot.app
    await wait_until(pilot, lambda: app.ready)
    await pilot.click(PromptInput)
    await pilot.press(*text, "enter")


def replied(app, n_turns: int) -> bool:
    """No reply is streaming and the conversation holds n_turns."""
    return app.reply is None and len(app.conversation.turns) == n_turns


def turns(app) -> list[str]:
    return [str(t.source) for t in app.query_one(Transcript).query(".turn")]


# --- behaviour (Pilot) ---


@pytest.mark.slow
@pytest.mark.asyncio
async def test_reply_streams_from_the_default_model(engine):
    sampling = Sampling(max_tokens=8, temperature=0.0)
    app = make_app(EngineBackend(engine), sampling=sampling)
    async with app.run_test(size=(80, 24)) as pilot:
        await ask(pilot, "What is the capital of France?")
        await wait_until(pilot, lambda: replied(app, 2))
        reply = app.conversation.turns[1]["content"]
        assert turns(app)[1].strip() == reply.strip() != ""
        assert "tokens" in app.query(".turn").last().border_subtitle
        await wait_until(pilot, lambda: app.telemetry.model == engine.name)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    assert reply == "".join(c.text for c in engine.chat(question, **sampling.kwargs()))


@pytest.mark.asyncio
async def test_escape_stops_a_reply_and_keeps_what_came():
    backend = FakeBackend(itertools.repeat("word "), delay=0.02)
    app = make_app(backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await ask(pilot, "go on forever")
        await wait_until(pilot, lambda: "word word" in app.reply_text)
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.reply is None)
        assert app.query(".turn").last().border_subtitle.endswith("stopped")
        assert app.conversation.turns[-1]["content"].startswith("word word")
        await ask(pilot, "again")  # the app takes the next question after a stop
        await wait_until(pilot, lambda: len(backend.requests) == 2)


@pytest.mark.asyncio
async def test_new_chat_forgets_the_conversation():
    backend = FakeBackend()
    app = make_app(backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await ask(pilot, "first")
        await wait_until(pilot, lambda: replied(app, 2))
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert turns(app) == [] and app.conversation.turns == []
        await ask(pilot, "second")
        await wait_until(pilot, lambda: len(backend.requests) == 2)
        assert backend.requests[1] == [{"role": "user", "content": "second"}]


@pytest.mark.asyncio
async def test_multi_turn_history_and_system_prompt_reach_the_backend():
    backend = FakeBackend(("ok",))
    app = make_app(backend, system="Be brief.")
    async with app.run_test(size=(80, 24)) as pilot:
        for n, question in enumerate(("one", "two"), 1):
            await ask(pilot, question)
            await wait_until(pilot, lambda n=n: replied(app, 2 * n))
    assert backend.requests[1] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "two"},
    ]


@pytest.mark.asyncio
async def test_function_keys_switch_views():
    app = make_app(FakeBackend())
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.telemetry.model)
        for key, view in (("f2", "memory"), ("f3", "experts"), ("f1", "chat")):
            await pilot.press(key)
            await pilot.pause()
            assert app.query_one(TabbedContent).active == view
        assert app.focused is app.query_one(PromptInput)


@pytest.mark.asyncio
async def test_up_and_down_walk_the_input_history():
    app = make_app(FakeBackend())
    async with app.run_test(size=(80, 24)) as pilot:
        for question in ("first", "second"):
            await ask(pilot, question)
            await wait_until(pilot, lambda: app.reply is None)
        prompt = app.query_one(PromptInput)
        await pilot.press(*"draft")
        await pilot.press("up")
        assert prompt.value == "second"
        await pilot.press("up", "up")  # stops at the oldest
        assert prompt.value == "first"
        await pilot.press("down", "down")
        assert prompt.value == "draft"


@pytest.mark.asyncio
async def test_settings_screen_changes_sampling_and_system_prompt():
    backend = FakeBackend(("ok",))
    app = make_app(backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.ready)
        await pilot.press("f4")
        await pilot.pause()
        app.screen.query_one("#system").text = "You are terse."
        app.screen.query_one("#temperature").value = "0"
        app.screen.query_one("#seed").value = "7"
        await pilot.click("#ok")
        await pilot.pause()
        assert (app.sampling.temperature, app.sampling.seed) == (0.0, 7)
        await ask(pilot, "hi")
        await wait_until(pilot, lambda: backend.requests)
    assert backend.requests[0][0] == {"role": "system", "content": "You are terse."}


@pytest.mark.asyncio
async def test_save_writes_markdown_or_json(tmp_path):
    app = make_app(FakeBackend())
    async with app.run_test(size=(80, 24)) as pilot:
        await ask(pilot, "hello")
        await wait_until(pilot, lambda: app.reply is None)
        for name in ("chat.md", "chat.json"):
            await pilot.press("ctrl+s")
            await pilot.pause()
            app.screen.query_one("#path").value = str(tmp_path / name)
            await pilot.press("enter")
            await pilot.pause()
    assert (tmp_path / "chat.md").read_text().startswith("# Chat with fake\n\n## User\n\nhello")
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert saved["messages"][1] == {"role": "assistant", "content": "Hello **there**!"}


@pytest.fixture
def served(tmp_path):
    """`dsrun serve` of the default model on a free TCP port and a Unix socket; yields (url, socket)."""
    pytest.importorskip("dsrun.server", reason="dsrun.server is not importable: no server to attach to")
    sock = tmp_path / "dsrun.sock"
    cmd = [sys.executable, "-m", "dsrun.cli", "serve", "-m", "default", "--ctx", "1024", "--port", "0"]
    env = os.environ | {"DSRUN_TEST_THREADS": "1"}
    proc = subprocess.Popen([*cmd, "--socket", str(sock)], stderr=subprocess.PIPE, text=True, env=env)
    urls = []
    while len(urls) < 2:  # both lines come before the model loads: the sockets are bound first
        line = proc.stderr.readline()
        assert line, "dsrun serve exited before listening"
        urls += re.findall(r"listening on (\S+)", line)
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe from filling up
    yield urls
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_attach_to_a_running_server(served):
    url, unix = served
    app = make_app(ServerBackend(unix), sampling=Sampling(max_tokens=4, temperature=0.0))
    async with app.run_test(size=(80, 24)) as pilot:
        await ask(pilot, "Say hi.")
        await wait_until(pilot, lambda: replied(app, 2))
        assert app.conversation.turns[1]["content"] and "tokens" in app.query(".turn").last().border_subtitle
        await wait_until(pilot, lambda: app.telemetry.model == "SmolLM2-135M-Instruct.Q4_1")
    assert ServerBackend(url).stats()["model"] == "SmolLM2-135M-Instruct.Q4_1"


# --- layout (snapshots with fixed stats) ---


def show_view(key: str):
    async def run_before(pilot) -> None:
        await wait_until(pilot, lambda: pilot.app.telemetry.model)
        await pilot.press(key)
        await pilot.pause()

    return run_before


@pytest.mark.parametrize("size", [(80, 24), (140, 40)])
@pytest.mark.parametrize("key", ["f2", "f3"])
def test_views_with_synthesized_deepseek_stats(snap_compare, key, size):
    assert snap_compare(make_app(FakeBackend()), terminal_size=size, run_before=show_view(key))


def test_memory_view_with_recorded_dense_model_stats(snap_compare):
    app = make_app(FakeBackend(stats=RECORDED))
    assert snap_compare(app, terminal_size=(80, 24), run_before=show_view("f2"))


# --- pure parts ---


def test_telemetry_parses_missing_keys_as_absent():
    t = Telemetry.from_stats({})
    assert (t.tiers, t.placement, t.hotness, t.decode_tps) == ((), (), None, None)


def test_telemetry_of_the_synthesized_stats():
    t = Telemetry.from_stats(load_stats(SYNTHETIC))
    assert [tier.label for tier in t.tiers] == ["GPU 0", "GPU 1", "RAM", "NVMe"]
    assert sum(tier.experts for tier in t.tiers) == t.experts_total == 58 * 256
    assert t.hotness.shape == (58, 256) and len(t.placement) == 58


def test_bin_map_shows_the_hottest_expert_of_each_cell():
    placement = ["0rnn", "rrrn"]
    hotness = np.array([[0.1, 0.9, 0.2, 0.3], [0.0, 0.1, 0.2, 1.0]])
    codes, heat, per_row, per_col = bin_map(placement, hotness, max_rows=1, max_cols=2)
    assert (per_row, per_col) == (2, 2)
    assert codes.tolist() == [[CODE_INDEX["r"], CODE_INDEX["n"]]]
    assert heat[0].tolist() == pytest.approx([0.9, 1.0])


def test_cancel_stays_in_force_when_the_next_stream_starts():
    backend = FakeBackend(itertools.repeat("w"))
    first = backend.chat([], Sampling())
    next(first)
    backend.cancel()  # "new chat" cancels, then the next question opens a stream at once
    second = backend.chat([], Sampling())
    assert next(second).text == "w"
    assert list(itertools.islice(first, 3)) == []


def test_sse_events_stop_at_done():
    lines = ['data: {"a": 1}', "", ": keep-alive", 'data: {"b": 2}', "data: [DONE]", 'data: {"c": 3}']
    assert list(sse_events(iter(lines))) == [{"a": 1}, {"b": 2}]


def test_error_message_reads_openai_errors_and_raw_bodies():
    assert error_message(b'{"error": {"message": "bad"}}', 400) == "server answered 400: bad"
    assert error_message(b"oops", 502) == "server answered 502: oops"


def test_request_fields_send_extensions_only_when_changed():
    assert Sampling().request_fields() == {"max_tokens": 512, "temperature": 0.8, "top_p": 0.95}
    assert Sampling(top_k=5, seed=1).request_fields()["top_k"] == 5


def test_conversation_puts_the_system_prompt_first():
    c = Conversation(system="sys")
    c.add("user", "q")
    assert c.messages() == [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}]
    assert Conversation(system="  ").messages() == []
