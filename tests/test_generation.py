"""Generation without the model's weights: stop strings, length limits, sampling maths."""

from __future__ import annotations

import pytest
import torch

from dsrun.errors import InvalidRequestError
from dsrun.generation import Generation
from dsrun.sampling import Sampler, SamplingParams


class FakeTokenizer:
    """Each token id is one character: ord(id); id 0 ends the text."""

    eog_ids = frozenset({0})

    def decode_bytes(self, tokens):
        return "".join(chr(t) for t in tokens).encode()


def feed(text: str, stop=(), max_tokens=100, ctx=1000, eos=False):
    g = Generation(FakeTokenizer(), [1, 2], None, SamplingParams(temperature=0), max_tokens, stop, ctx)
    chunks = []
    for ch in [ord(c) for c in text] + ([0] if eos else []):
        chunks.append(g.accept(ch))
        if g.done:
            break
    return "".join(c.text for c in chunks), chunks[-1]


def test_stop_string_cuts_text_and_finishes():
    text, last = feed("hello world, bye", stop=("wor",))
    assert text == "hello " and last.finish_reason == "stop"


def test_partial_stop_prefix_is_released_when_it_does_not_match():
    text, last = feed("a wo b", stop=("world",), eos=True)
    assert text == "a wo b" and last.finish_reason == "stop"


def test_text_before_a_possible_stop_is_held_back():
    g = Generation(FakeTokenizer(), [1], None, SamplingParams(temperature=0), 100, ("END",), 1000)
    assert g.accept(ord("x")).text == "x"
    assert g.accept(ord("E")).text == ""  # might start "END"
    assert g.accept(ord("N")).text == ""
    assert g.accept(ord("D")).finish_reason == "stop"


def test_max_tokens_finishes_with_length_and_usage():
    text, last = feed("abcdef", max_tokens=3)
    assert text == "abc" and last.finish_reason == "length"
    assert last.usage == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_context_end_finishes_with_length():
    text, last = feed("abcdef", ctx=4)
    assert text == "ab" and last.finish_reason == "length"


def test_greedy_takes_argmax_and_penalty_changes_it():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    assert Sampler(SamplingParams(temperature=0))(logits, []) == 1
    penalized = Sampler(SamplingParams(temperature=0, repeat_penalty=1.5))
    assert penalized(logits, [1]) == 2


def test_seed_reproduces_and_top_k_one_is_greedy():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    a = [Sampler(SamplingParams(seed=7, min_p=0, top_p=1))(logits, []) for _ in range(3)]
    b = [Sampler(SamplingParams(seed=7, min_p=0, top_p=1))(logits, []) for _ in range(3)]
    assert a == b
    assert Sampler(SamplingParams(top_k=1, seed=1))(logits, []) == int(logits.argmax())


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3))
    counts = torch.bincount(torch.tensor([s(logits, []) for _ in range(3000)]), minlength=3) / 3000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.2]), atol=0.04)


def test_min_p_and_top_p_cut_the_tail():
    logits = torch.log(torch.tensor([0.6, 0.35, 0.04, 0.01]))
    min_p = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.1, seed=0))
    assert {min_p(logits, []) for _ in range(300)} == {0, 1}
    top_p = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.5, min_p=0.0, seed=0))
    assert {top_p(logits, []) for _ in range(100)} == {0}


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"min_p": 2}, {"repeat_penalty": 0}]
)
def test_bad_sampling_settings_are_refused(kwargs):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)


def test_a_stopped_generation_still_counts_its_decode_time(engine):
    before = engine.timings["decode_tokens"]
    stream = engine.chat([{"role": "user", "content": "Tell me a long story about a dragon."}], max_tokens=50)
    chunks = [c for _, c in zip(range(5), stream)]
    stream.close()
    assert all(c.finish_reason is None for c in chunks)
    assert engine.timings["decode_tokens"] == before + 5
