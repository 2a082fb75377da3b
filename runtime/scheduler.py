"""Continuous batching: one thread owns the engine and steps every running sequence together.

Each step is ONE `model.forward` over a `Batch`: the next token of every decoding sequence, plus at most
`prefill_budget` prompt tokens of joining ones, so a long prompt never freezes the running streams.
Sequences join and leave between steps. A request's chunks reach its asyncio loop through
`call_soon_threadsafe`; the KV caches of finished sequences stay in a small LRU for prompts that continue
them (the next turn of a chat).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from dsrun.models.base import Batch, Seq

from .errors import DsrunError
from .generation import Chunk, Generation
from .sampling import SamplingParams

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # seconds
MIN_PREFIX_REUSE = 16  # shorter shared heads are not worth giving up a cached sequence for


class QueueFullError(DsrunError):
    """Every running slot and the waiting queue are taken; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; 0: the chosen token's; k: also the k likeliest


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token, logprob) of the likeliest alternatives, best first


class Histogram:
    """Cumulative-bucket histogram in Prometheus' shape; observed from the scheduler thread."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        with self.lock:
            self.counts[i] += 1
            self.sum += value

    def snapshot(self) -> dict:
        """{"buckets": [[le, cumulative count], ...], "sum", "count"}; the last le is Prometheus' "+Inf"."""
        with self.lock:
            counts, total = list(self.counts), self.sum
        cumulative = [sum(counts[: i + 1]) for i in range(len(counts))]
        buckets = list(zip((*self.bounds, "+Inf"), cumulative))
        return {"buckets": buckets, "sum": total, "count": cumulative[-1]}


class Stream:
    """One request's chunks as an async iterator; cancel() (idempotent) stops it and frees its KV."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wake):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._wake = wake
        self.cancelled = False
        self.finished = False

    def cancel(self) -> None:
        if not self.finished and not self.cancelled:
            self.cancelled = True
            self._wake()

    def put(self, item: Chunk | BaseException) -> None:
        """Called from the scheduler thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody reads this stream any more
            self.cancelled = True

    def __aiter__(self):
        return self

    async def __anext__(self) -> Chunk:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finish_reason is not None
        return item


@dataclass
class Sequence:
    stream: Stream
    gen: Generation
    top_logprobs: int | None
    pending: list[int]  # to feed before the next sample: the prompt's unfilled tail, then the last token
    t_submit: float
    t_last: float | None = None  # when its last token was delivered


@dataclass
class Waiting:
    gen: Generation
    top_logprobs: int | None
    stream: Stream
    t_submit: float = field(default_factory=time.perf_counter)


class PrefixCache:
    """KV caches of finished sequences keyed by the tokens they hold; bounded by bytes, least recent out."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, tuple[list[int], object]] = OrderedDict()
        self._next = 0

    @property
    def bytes(self) -> int:
        return sum(cache.allocated_bytes() for _, cache in self.entries.values())

    def put(self, tokens: list[int], cache) -> None:
        if cache.n < MIN_PREFIX_REUSE or cache.allocated_bytes() > self.max_bytes:
            return
        self.entries[self._next] = (tokens, cache)
        self._next += 1
        while self.bytes > self.max_bytes:
            self.entries.popitem(last=False)

    def take(self, prompt: list[int]):
        """(cache truncated to the longest cached head of prompt, its length), or (None, 0).

        At least one prompt token is always left to prefill: its logits pick the first new token.
        """
        best_key, best_n = None, 0
        for key, (tokens, _) in self.entries.items():
            n = common_prefix_len(tokens, prompt, len(prompt) - 1)
            if n > best_n:
                best_key, best_n = key, n
        if best_n < MIN_PREFIX_REUSE:
            return None, 0
        _, cache = self.entries.pop(best_key)
        cache.truncate(best_n)
        return cache, best_n


def common_prefix_len(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def rate(n: int, seconds: float) -> float | None:
    return n / seconds if seconds else None


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The model's own log-probabilities (before penalties and truncation), as OpenAI reports them."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (V,)
    top = []
    if k:
        vals, ids = torch.topk(lp, k)
        top = list(zip(ids.tolist(), vals.tolist()))
    return TokenLogprob(token, float(lp[token]), top)


class Scheduler:
    def __init__(
        self,
        engine,
        *,
        max_running: int = 16,
        max_queue: int = 64,
        prefill_budget: int = 256,
        prefix_cache_bytes: int = 256 << 20,
    ):
        self.engine = engine
        self.max_running, self.max_queue, self.prefill_budget = max_running, max_queue, prefill_budget
        self.prefix = PrefixCache(prefix_cache_bytes)
        self.waiting: deque[Waiting] = deque()
        self.running: list[Sequence] = []
        self.ttft, self.itl = Histogram(TTFT_BUCKETS), Histogram(ITL_BUCKETS)
        self.counters = dict.fromkeys(
            ("admitted", "finished", "cancelled", "failed", "prompt_tokens", "prefilled_tokens",
             "generated_tokens", "prefix_hits", "prefix_reused_tokens", "steps"), 0)  # fmt: skip
        # Engine.timings' shape: steps that prefill count as prefill, the others as decode
        self.timings = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}
        self.last_ttft: float | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="dsrun-scheduler", daemon=True)
        self._thread.start()

    # --- called from asyncio ---

    def submit(self, request: Request) -> Stream:
        """Queue a request; its chunks arrive on the returned Stream.

        Raises InvalidRequestError (ContextLengthError) for a prompt that cannot run, QueueFullError.
        """
        r = request
        gen = self.engine.new_generation(r.prompt, r.params, r.max_tokens, r.stop)
        stream = Stream(asyncio.get_running_loop(), self._notify)
        with self._cond:
            if self._closed:
                raise DsrunError("the server is shutting down")
            if len(self.waiting) + len(self.running) >= self.max_queue + self.max_running:
                raise QueueFullError(
                    f"{len(self.running)} requests are running and {len(self.waiting)} waiting: retry later",
                    self._retry_after(),
                )
            self.waiting.append(Waiting(gen, r.top_logprobs, stream))
            self._cond.notify()
        return stream

    def stats(self) -> dict:
        running, t = list(self.running), self.timings
        return {
            "queue_length": len(self.waiting),
            "running": len(running),
            "max_running": self.max_running,
            "max_queue": self.max_queue,
            **self.counters,
            "kv_bytes_running": sum(s.gen.cache.allocated_bytes() for s in running),
            "prefix_cache": {"entries": len(self.prefix.entries), "bytes": self.prefix.bytes},
            "ttft_s": self.last_ttft,
            "tokens_per_s": {
                phase: rate(t[f"{phase}_tokens"], t[f"{phase}_s"]) for phase in ("prefill", "decode")
            },
            "timings": dict(t),
            "ttft_seconds": self.ttft.snapshot(),
            "inter_token_seconds": self.itl.snapshot(),
        }

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify()

    def _retry_after(self) -> int:
        """Seconds until a queue slot likely frees: the queue ahead, drained at the recent request rate."""
        done = self.counters["finished"] + self.counters["cancelled"]
        per_request = (self.timings["prefill_s"] + self.timings["decode_s"]) / done if done else 1.0
        return max(1, math.ceil(len(self.waiting) * per_request / self.max_running))

    # --- the scheduler thread ---

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self.waiting and not self.running:
                    self._cond.wait()
                if self._closed:
                    break
            try:
                self._drop_cancelled()
                self._admit()
                if self.running:
                    self._step()
            except Exception as e:  # a bug or a device error: the running caches are now suspect
                self._fail(list(self.running), e)
        self._fail_all(DsrunError("the server is shutting down"))

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [w for w in self.waiting if w.stream.cancelled]
            for w in gone:
                self.waiting.remove(w)
        stopped = [s for s in self.running if s.stream.cancelled]
        for s in stopped:
            self.running.remove(s)  # its cache is dropped with it
        self.counters["cancelled"] += len(gone) + len(stopped)

    def _admit(self) -> None:
        while len(self.running) < self.max_running:
            with self._cond:
                if not self.waiting:
                    return
                w = self.waiting.popleft()
            self.running.append(self._start(w))

    def _start(self, w: Waiting) -> Sequence:
        gen = w.gen
        cache, reused = self.prefix.take(gen.prompt)
        if cache is not None:
            gen.cache = cache
            self.counters["prefix_hits"] += 1
            self.counters["prefix_reused_tokens"] += reused
        self.counters["admitted"] += 1
        self.counters["prompt_tokens"] += len(gen.prompt)
        return Sequence(w.stream, gen, w.top_logprobs, gen.prompt[reused:], w.t_submit)

    def _plan(self):
        """This step's Batch, the sequences that get a logits row (their pending tokens run out), and how
        many prompt tokens it prefills."""
        tokens, seqs, rows, sampled = [], [], [], []
        budget = self.prefill_budget
        for s in self.running:
            take = 1 if len(s.pending) == 1 else min(len(s.pending), budget)
            if take == 0:
                continue
            if len(s.pending) > 1:
                budget -= take
            seqs.append(Seq(s.gen.cache, len(tokens), take))
            tokens += s.pending[:take]
            s.pending = s.pending[take:]
            if not s.pending:
                rows.append(len(tokens) - 1)
                sampled.append(s)
        batch = Batch(torch.tensor(tokens, dtype=torch.long), seqs, torch.tensor(rows, dtype=torch.long))
        return batch, sampled, self.prefill_budget - budget

    def _step(self) -> None:
        batch, sampled, prefilled = self._plan()
        t0 = time.perf_counter()
        with self.engine.lock:
            logits = self.engine.model.forward(batch)  # (len(sampled), V)
        phase = "prefill" if prefilled else "decode"
        self.timings[f"{phase}_s"] += time.perf_counter() - t0
        self.timings[f"{phase}_tokens"] += prefilled or len(sampled)
        self.counters["steps"] += 1
        self.counters["prefilled_tokens"] += prefilled
        for s, row in zip(sampled, logits):
            self._advance(s, row)

    def _advance(self, s: Sequence, logits: torch.Tensor) -> None:
        g = s.gen
        token = g.sampler(logits, g.history)
        chunk = g.accept(token)
        if s.top_logprobs is not None and chunk.tokens:
            chunk.logprobs = [token_logprob(logits, token, s.top_logprobs)]
        self._observe_latency(s)
        self.counters["generated_tokens"] += len(chunk.tokens)
        s.stream.put(chunk)
        if g.done:
            self.running.remove(s)
            self.counters["finished"] += 1
            self.prefix.put(g.history[: g.cache.n], g.cache)  # the cache holds exactly the tokens fed to it
        else:
            s.pending = list(chunk.tokens)

    def _observe_latency(self, s: Sequence) -> None:
        now = time.perf_counter()
        if s.t_last is None:
            self.last_ttft = now - s.t_submit
            self.ttft.observe(self.last_ttft)
        else:
            self.itl.observe(now - s.t_last)
        s.t_last = now

    def _fail(self, seqs: list[Sequence], error: BaseException) -> None:
        for s in seqs:
            self.running.remove(s)
            s.stream.put(error)
        self.counters["failed"] += len(seqs)

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            waiting, self.waiting = list(self.waiting), deque()
        for w in waiting:
            w.stream.put(error)
        self._fail(list(self.running), error)
