"""The dense llama path (the default model) against llama.cpp, as CONTRACT.md defines parity."""

from __future__ import annotations

import numpy as np
import pytest
from parity import F32_TAU, compare, greedy_parting, incremental_logits, ours_greedy, reference

import dsrun

# Q4_1: llama.cpp quantizes activations to Q8_1 before its Q4_1 dot products; dsrun multiplies the exact
# dequantized weights in F32. Measured on these prompts: llama.cpp's own Q4_1 file against its F32 copy of
# the very same weights differs by up to 2.55 (at a system-prompt position), and dsrun-vs-llama.cpp-Q4_1
# differs by that same 2.55 while dsrun-vs-llama.cpp-F32 stays under 2e-4. So tau is llama.cpp's own
# activation-quantization error with a margin.
Q4_1_TAU = 3.0

LOGIT_PROMPTS = [
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "深度求索是一家人工智能公司，它的模型",
]
CHAT_PROMPTS = [
    "Why is the sky blue?",
    "用三句话介绍一下长城。",
    "Write a Python function that checks whether a number is prime.",
    "What is the capital of Australia?",
    "List three fruits that are red.",
    "Translate 'good morning' into French and Spanish.",
]


@pytest.fixture(scope="module")
def f32_engine(f32_gguf):
    eng = dsrun.load(f32_gguf, ctx=1024)
    yield eng
    eng.close()


def test_f32_logits_match_llama_cpp(f32_engine, f32_gguf):
    prompts = [f32_engine.tokenize(p) for p in LOGIT_PROMPTS]
    for prompt, ref in zip(prompts, reference(f32_gguf, prompts)):
        report = compare(f32_engine.logits(prompt), ref.logits, F32_TAU)
        assert report.ok, report


def test_q4_1_logits_and_64_greedy_tokens_match_llama_cpp(engine, default_gguf):
    prompts = [engine.tokenizer.chat_tokens([{"role": "user", "content": m}]) for m in CHAT_PROMPTS]
    refs = reference(default_gguf, prompts, n_greedy=64)
    for prompt, ref in zip(prompts, refs):
        report = compare(engine.logits(prompt), ref.logits, Q4_1_TAU)
        assert report.ok, report
        parting = greedy_parting(ours_greedy(engine, prompt, 64), ref, Q4_1_TAU, engine.tokenizer.eog_ids)
        assert parting is None, parting


def test_incremental_decode_equals_full_forward(f32_engine):
    tokens = f32_engine.tokenize(LOGIT_PROMPTS[0])
    full = f32_engine.logits(tokens)
    assert np.abs(incremental_logits(f32_engine.model, tokens) - full).max() < 1e-4


def test_batch_of_two_equals_each_alone(f32_engine):
    from parity import batched_logits

    a, b = (f32_engine.tokenize(p) for p in LOGIT_PROMPTS[:2])
    together = batched_logits(f32_engine.model, [a, b])
    for tokens, logits in zip((a, b), together):
        assert np.abs(logits - f32_engine.logits(tokens)).max() < 1e-4


def test_greedy_generation_is_deterministic(engine):
    prompt = engine.tokenizer.chat_tokens([{"role": "user", "content": "Count to five."}])
    assert ours_greedy(engine, prompt, 24) == ours_greedy(engine, prompt, 24)
