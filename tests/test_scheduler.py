"""The continuous batcher: shared steps give the same answers, cancel frees, prefixes are reused."""

from __future__ import annotations

import asyncio

import pytest

from dsrun.sampling import SamplingParams
from dsrun.scheduler import MIN_PREFIX_REUSE, PrefixCache, QueueFullError, Request, Scheduler

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def sched(engine):
    s = Scheduler(engine, max_running=8, max_queue=8, prefill_budget=64)
    yield s
    s.close()


@pytest.fixture
def forwards(engine, monkeypatch):
    """Records the (tokens, sequences) shape of every step the scheduler runs."""
    seen = []
    forward = engine.model.forward

    def recording(batch):
        seen.append((len(batch.tokens), len(batch.seqs)))
        return forward(batch)

    monkeypatch.setattr(engine.model, "forward", recording)
    return seen


def prompt(engine, text: str) -> list[int]:
    return engine.tokenizer.chat_tokens([{"role": "user", "content": text}])


async def collect(stream) -> tuple[str, list[int], str]:
    text, tokens, reason = "", [], None
    async for chunk in stream:
        text += chunk.text
        tokens += chunk.tokens
        reason = chunk.finish_reason or reason
    return text, tokens, reason


def run_all(sched, requests):
    async def main():
        return await asyncio.gather(*(collect(sched.submit(r)) for r in requests))

    return asyncio.run(main())


def test_concurrent_sequences_share_steps_and_answer_as_alone(engine, sched, forwards):
    things = ("a colour", "a fruit", "an animal", "a city")
    prompts = [prompt(engine, f"Name {w} in one word.") for w in things]
    alone = ["".join(c.text for c in engine.generate(p, max_tokens=8, temperature=0)) for p in prompts]
    forwards.clear()
    together = run_all(sched, [Request(p, GREEDY, 8) for p in prompts])
    assert [t for t, _, _ in together] == alone
    assert max(n_seqs for _, n_seqs in forwards) > 1, "the sequences never shared a step"
    assert all(n_tokens <= 64 + len(prompts) for n_tokens, _ in forwards), "prefill exceeded its budget"


def test_long_prompt_is_prefilled_in_chunks(engine, sched, forwards):
    long = prompt(engine, "Repeat after me: " + "the quick brown fox jumps over the lazy dog. " * 20)
    text, tokens, reason = run_all(sched, [Request(long, GREEDY, 2)])[0]
    assert reason == "length" and len(tokens) == 2
    assert len(forwards) >= len(long) // 64
    assert all(n <= 64 for n, _ in forwards)


def test_cancel_frees_the_sequence_within_a_step(engine, sched):
    async def main():
        stream = sched.submit(Request(prompt(engine, "Count to one hundred."), GREEDY, 200))
        await stream.__anext__()
        stream.cancel()
        for _ in range(100):
            if not sched.running:
                return
            await asyncio.sleep(0.05)

    before = sched.counters["cancelled"]
    asyncio.run(main())
    assert sched.running == [] and sched.counters["cancelled"] == before + 1


def test_a_continuing_prompt_reuses_the_finished_cache(engine, sched):
    first = prompt(engine, "Say hello.")
    _, tokens, _ = run_all(sched, [Request(first, GREEDY, 6)])[0]
    second = first + tokens + engine.tokenize("\nAnd again:", add_bos=False)
    hits = sched.counters["prefix_hits"]
    reused = run_all(sched, [Request(second, GREEDY, 6)])[0][0]
    assert sched.counters["prefix_hits"] == hits + 1
    fresh = "".join(c.text for c in engine.generate(second, max_tokens=6, temperature=0))
    assert reused == fresh


def test_a_full_queue_refuses_with_retry_after(engine):
    s = Scheduler(engine, max_running=1, max_queue=1)

    async def main():
        p = prompt(engine, "Hi")
        streams = [s.submit(Request(p, GREEDY, 8)), s.submit(Request(p, GREEDY, 8))]
        with pytest.raises(QueueFullError) as e:
            s.submit(Request(p, GREEDY, 8))
        assert e.value.retry_after >= 1
        for st in streams:
            st.cancel()

    try:
        asyncio.run(main())
    finally:
        s.close()


class FakeCache:
    def __init__(self, n: int, nbytes: int):
        self.n, self.nbytes = n, nbytes

    def allocated_bytes(self) -> int:
        return self.nbytes

    def truncate(self, n: int) -> None:
        self.n = min(self.n, n)


def test_prefix_cache_is_lru_by_bytes_and_leaves_a_token_to_prefill():
    pc = PrefixCache(max_bytes=250)
    head = list(range(MIN_PREFIX_REUSE))
    for i in range(3):
        pc.put([*head, 100 + i], FakeCache(MIN_PREFIX_REUSE + 1, 100))
    assert len(pc.entries) == 2  # the oldest went to keep under 250 bytes
    cache, n = pc.take([*head, 102, 7])  # the longest match wins
    assert n == cache.n == MIN_PREFIX_REUSE + 1
    cache, n = pc.take([*head, 101])  # the prompt is all cached: its last token is left to prefill
    assert n == cache.n == MIN_PREFIX_REUSE
    assert pc.take([*head, 101]) == (None, 0)  # taken entries are gone
    pc.put([*head, 1], FakeCache(MIN_PREFIX_REUSE + 1, 100))
    assert pc.take([*head[:5], 9, *head[5:]]) == (None, 0)  # too short a shared head


def test_stats_report_queue_running_and_latencies(sched):
    st = sched.stats()
    assert st["queue_length"] == 0 and st["running"] == 0
    assert st["ttft_seconds"]["count"] >= 1 and st["inter_token_seconds"]["count"] >= 1
