"""The split decode step that CUDA graphs record (dsrun.decode_graph), run eagerly on the CPU.

CI has no GPU, so the graphs themselves are recorded only in tests/test_gpu.py; here the same step runs
without them (`graphs=False`): the fixed-length KV cache written at a position held in a tensor, the
masked attention over it, and each MoE layer's crossing (resident experts looked up in the slots' table,
cold ones on the CPU from the pinned copies) must give the plain forward's logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dsrun
from dsrun.decode_graph import DecodeGraph
from dsrun.models.base import Batch

FAKE_GPU = {"device_map": {"cuda:0": "cpu"}, "background": False, "quantized_slots": True}
PROMPT = [1, 504, 3575, 282, 4649, 314, 9789, 30, 378, 3575, 282, 6474]


def greedy(prefill, step, cache, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """The prompt through `prefill` (a plain forward), then n greedy steps through `step`: tokens and
    their steps' logits (n, V)."""
    logits = prefill(Batch.single(prompt, cache))
    tokens, rows = [], []
    for _ in range(n):
        tokens.append(int(logits[-1].argmax()))
        logits = step(Batch.single([tokens[-1]], cache))
        rows.append(logits[-1].numpy())
    return tokens, np.stack(rows)


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def gpu_mem(q8_moe) -> int:
    """A "GPU" budget with room for the non-expert tensors, the KV cache, a forward's workspace and 6 of
    the 32 experts."""
    from dsrun.gguf_file import GGUFFile
    from dsrun.offload.planner import model_sizes
    from dsrun.plan import gpu_workspace_bytes

    eng = dsrun.load(q8_moe, ctx=128, gpus=[0], gpu_mem="64MiB", ram="1MiB", offload_options=FAKE_GPU)
    slot = next(iter(eng.offload.slots.values())).slot_bytes
    eng.close()
    f = GGUFFile(q8_moe)
    sizes = model_sizes(f, 128)
    return sizes.resident_bytes + sizes.kv_cache_bytes + gpu_workspace_bytes(f, sizes) + 6 * slot


def load(path, gpu_mem: int) -> dsrun.Engine:
    return dsrun.load(path, ctx=128, gpus=[0], gpu_mem=gpu_mem, ram="1MiB", offload_options=FAKE_GPU)


def test_split_step_equals_the_plain_forward_while_experts_move(q8_moe, gpu_mem):
    """Both halves of every MoE layer run (resident experts through the table, cold ones on the CPU),
    and the cache promotes and demotes between steps: the table the device reads stays the host's."""
    ref = load(q8_moe, gpu_mem)
    ref_tokens, ref_logits = greedy(ref.model.forward, ref.model.forward, ref.model.new_cache(), PROMPT, 12)

    eng = load(q8_moe, gpu_mem)
    dec = DecodeGraph(eng.model.forward, eng.offload, 128, "cpu", graphs=False)
    eng.offload.policy.max_moves = 2
    before = eng.offload.counters.device_assignments, eng.offload.counters.cpu_assignments
    tokens, logits = greedy(eng.model.forward, dec.step, eng.model.new_cache(), PROMPT, 12)
    c = eng.offload.counters
    assert tokens == ref_tokens
    assert rel_diff(logits, ref_logits) <= 1e-4
    assert c.device_assignments > before[0] and c.cpu_assignments > before[1]  # both sides ran
    assert c.promotions > 0 and c.demotions > 0
    assert sorted(dec.crossings) == sorted(eng.offload.layers)  # the steps went through split()
    pool = next(iter(eng.offload.slots.values()))
    expect = torch.full_like(pool.table, -1)
    for (layer, e), slot in pool.slot_of.items():
        expect[layer, e] = slot
    assert torch.equal(pool.table, expect)
    for e in (ref, eng):
        e.close()


def test_caches_take_turns_on_the_fixed_buffers(q8_moe, gpu_mem):
    """Two sequences decoding in turn: each bind gives the cache bound before its own rows back."""
    eng = load(q8_moe, gpu_mem)
    dec = DecodeGraph(eng.model.forward, eng.offload, 128, "cpu", graphs=False)
    prompts = [PROMPT, PROMPT[::-1]]
    plain = eng.model.forward
    refs = [greedy(plain, plain, eng.model.new_cache(), p, 4) for p in prompts]
    caches = [eng.model.new_cache() for _ in prompts]
    last = [plain(Batch.single(p, c)) for c, p in zip(caches, prompts)]
    got: list[list[int]] = [[], []]
    for _ in range(4):
        for i, cache in enumerate(caches):
            got[i].append(int(last[i][-1].argmax()))
            batch = Batch.single([got[i][-1]], cache)
            assert dec.takes(batch)
            last[i] = dec.step(batch)
    assert got == [r[0] for r in refs]
    assert dec.kv.bound is caches[1] and caches[0].layers[0][0].shape[0] == caches[0].n
    eng.close()


def test_dense_model_split_step(default_gguf):
    """A dense llama (grouped-query attention, two cached parts) through the masked fixed cache."""
    eng = dsrun.load(default_gguf, ctx=64)
    plain = eng.model.forward
    dec = DecodeGraph(plain, None, 64, "cpu", graphs=False)
    ref_tokens, ref_logits = greedy(plain, plain, eng.model.new_cache(), PROMPT, 6)
    tokens, logits = greedy(plain, dec.step, eng.model.new_cache(), PROMPT, 6)
    assert tokens == ref_tokens and rel_diff(logits, ref_logits) <= 1e-4
    full = Batch.single([1], eng.model.new_cache())
    assert not dec.takes(full)  # an empty cache: the prompt's first step runs eagerly
    eng.close()
