"""Where replies and stats come from: the engine in this process, or a running `dsrun serve`.

Both offer the one interface the app uses, all of it blocking (the app calls it from thread workers):
`open()` loads the model or reaches the server, `chat(messages, sampling)` streams `Chunk`s, `cancel()`
ends the stream in progress after its next chunk, `stats()` returns the dict `telemetry.py` describes.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import httpx

from dsrun.errors import DsrunError
from dsrun.generation import Chunk

from .conversation import Sampling


class Backend(Protocol):
    name: str
    ttft_s: float | None  # of the latest reply, measured here

    def open(self) -> None: ...
    def chat(self, messages: list[dict], sampling: Sampling) -> Iterator[Chunk]: ...
    def cancel(self) -> None: ...
    def stats(self) -> dict: ...
    def close(self) -> None: ...


class ServerError(DsrunError):
    """The server could not be reached or refused a request."""


class StreamingBackend:
    """Cancel and time-to-first-token, shared by both backends around their own `_stream`."""

    name = ""

    def __init__(self):
        # one event per stream, so a stream cancelled by "new chat" stays cancelled when the next one starts
        self._live: weakref.WeakSet[threading.Event] = weakref.WeakSet()
        self.ttft_s: float | None = None

    def chat(self, messages: list[dict], sampling: Sampling) -> Iterator[Chunk]:
        cancelled = threading.Event()
        self._live.add(cancelled)  # here, not in the generator: a cancel before its first step still counts
        return self._guarded(self._stream(messages, sampling), cancelled, time.perf_counter())

    def cancel(self) -> None:
        for cancelled in list(self._live):
            cancelled.set()

    def _guarded(self, chunks: Iterator[Chunk], cancelled: threading.Event, t0: float) -> Iterator[Chunk]:
        try:
            for i, chunk in enumerate(chunks):
                if i == 0:
                    self.ttft_s = time.perf_counter() - t0
                yield chunk
                if cancelled.is_set():
                    return
        finally:
            chunks.close()  # releases the engine's lock or the HTTP response in this same thread
            self._live.discard(cancelled)

    def _stream(self, messages: list[dict], sampling: Sampling) -> Iterator[Chunk]:
        raise NotImplementedError


class EngineBackend(StreamingBackend):
    """The model loaded in this process; `engine` given (tests) or loaded by `open()` (the CLI)."""

    def __init__(self, engine=None, *, model: str = "default", load_kwargs: dict | None = None):
        super().__init__()
        self.engine, self.model, self.load_kwargs = engine, model, load_kwargs or {}
        self.owns_engine = engine is None
        self.name = engine.name if engine is not None else model

    def open(self) -> None:
        if self.engine is None:
            import dsrun

            self.engine = dsrun.load(self.model, **self.load_kwargs)
            self.name = self.engine.name

    def _stream(self, messages, sampling):
        return self.engine.chat(messages, **sampling.kwargs())

    def stats(self) -> dict:
        return {"ttft_s": self.ttft_s, **self.engine.stats()} if self.engine is not None else {}

    def close(self) -> None:
        if self.owns_engine and self.engine is not None:
            self.engine.close()


class ServerBackend(StreamingBackend):
    """A `dsrun serve` at an http(s) URL or a Unix socket path (`unix:` prefix optional)."""

    STATS_TIMEOUT = 2.0  # a stalled server must not stall the stats poll for long
    HEALTH_POLL_S = 0.5

    def __init__(self, target: str, *, api_key: str | None = None):
        super().__init__()
        self.target = target
        if target.startswith(("http://", "https://")):
            base, transport = target.rstrip("/"), None
        else:
            base, transport = "http://dsrun", httpx.HTTPTransport(uds=target.removeprefix("unix:"))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # no read timeout on the chat stream: a long prefill on a big model sends nothing for a while
        timeout = httpx.Timeout(10.0, read=None)
        self.client = httpx.Client(base_url=base, transport=transport, headers=headers, timeout=timeout)
        self.name = self.model = target
        self.closed = threading.Event()  # ends the wait for a loading server when the app quits

    def open(self) -> None:
        self._wait_while_loading()
        models = self._get("/v1/models").get("data") or []
        self.model = models[0]["id"] if models else "default"
        self.name = f"{self.model} @ {self.target}"

    def _stream(self, messages, sampling):
        body = {"model": self.model, "messages": messages, "stream": True,
                "stream_options": {"include_usage": True}, **sampling.request_fields()}  # fmt: skip
        with reaching(self.target), self.client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise ServerError(error_message(r.read(), r.status_code))
            finish, usage = None, None
            for event in sse_events(r.iter_lines()):
                usage = event.get("usage") or usage  # include_usage sends it on a last, choice-less event
                for choice in event.get("choices") or ():
                    finish = choice.get("finish_reason") or finish
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield Chunk(text)
            yield Chunk("", finish_reason=finish, usage=usage)

    def stats(self) -> dict:
        try:
            with reaching(self.target):
                r = self.client.get("/stats", timeout=self.STATS_TIMEOUT)
        except ServerError:
            return {}
        own = {"model": self.model, "ttft_s": self.ttft_s}
        return own | r.json() if r.status_code == 200 else own

    def close(self) -> None:
        self.closed.set()
        self.client.close()

    def _wait_while_loading(self) -> None:
        """A server answers /health with 503 until its model is loaded, which can take minutes."""
        while not self.closed.is_set():
            with reaching(self.target):
                r = self.client.get("/health")
            if r.status_code == 200:
                return
            if r.status_code != 503 or r.json().get("status") != "loading":
                raise ServerError(error_message(r.content, r.status_code))
            self.closed.wait(self.HEALTH_POLL_S)

    def _get(self, path: str) -> dict:
        with reaching(self.target):
            r = self.client.get(path)
        if r.status_code != 200:
            raise ServerError(error_message(r.content, r.status_code))
        return r.json()


@contextmanager
def reaching(target: str):
    """Turn httpx's transport errors into a ServerError that says which server and what to do."""
    try:
        yield
    except httpx.TransportError as err:
        raise ServerError(f"cannot reach dsrun serve at {target}: {err} (is it running?)") from err


def sse_events(lines: Iterator[str]) -> Iterator[dict]:
    """The JSON payloads of a server-sent event stream, up to `data: [DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def error_message(body: bytes, status: int) -> str:
    """The message of an OpenAI-style error body, or the raw body when it is not one."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace").strip()[:200]
    return f"server answered {status}: {message}"
