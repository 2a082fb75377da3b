"""The hybrid engine: placement never changes the answer, the cache moves experts, stats report it.

The "GPU" tier runs with CPU tensors here (CI has no GPU): the plan is made for a GPU the machine does
not have, and its expert slots are put on the CPU, so the same slot code that runs on CUDA is exercised.
Expert popularity comes from the generator's skewed routers (Zipf exponent 1.2, high locality).
"""

from __future__ import annotations

import numpy as np
import pytest

import dsrun
from dsrun.errors import MemoryBudgetError

FAKE_GPU = {"device_map": {"cuda:0": "cpu"}}


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory):
    from dsrun.synth import synthesize

    path = tmp_path_factory.mktemp("hybrid") / "ds2-tiny.gguf"
    return synthesize(
        path, "deepseek2", n_layer=4, n_expert=16, n_expert_used=4, skew=1.2, locality=0.8, seed=3
    )


@pytest.fixture(scope="module")
def budgets(moe_gguf):
    """RAM that holds the non-expert tensors and KV cache and not one expert; a GPU budget with room
    for 6 expert slots (F32 slots on the CPU stand-in) beyond those and a forward's workspace."""
    from dsrun.gguf_file import GGUFFile
    from dsrun.offload.planner import model_sizes
    from dsrun.plan import gpu_workspace_bytes

    f = GGUFFile(moe_gguf)
    sizes = model_sizes(f, 256)
    need = sizes.resident_bytes + sizes.kv_cache_bytes
    gpu_need = need + gpu_workspace_bytes(f, sizes)
    slot = 3 * 256 * 256 * 4
    return {"starved_ram": need, "gpu": {"gpus": [0], "gpu_mem": gpu_need + 6 * slot, "ram": "1MiB"}}


@pytest.fixture(scope="module")
def prompt(moe_gguf):
    eng = dsrun.load(moe_gguf, ctx=256)
    tokens = eng.tokenize("The quick brown fox jumps over the lazy dog, then runs far away into the woods.")
    eng.close()
    return tokens


def logits_with(path, tokens, **load):
    eng = dsrun.load(path, ctx=256, **load)
    try:
        return eng.logits(tokens), eng
    finally:
        eng.close()


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_every_placement_gives_the_same_logits(moe_gguf, prompt, budgets):
    reference, eng = logits_with(moe_gguf, prompt, gpus=[], ram="64GiB")
    assert eng.offload is not None and all(h.ram_mask.all() for h in eng.offload.homes.values())
    starved, eng = logits_with(moe_gguf, prompt, gpus=[], ram=budgets["starved_ram"])  # experts from the file
    assert not any(h.ram_mask.any() for h in eng.offload.homes.values())
    tiny_gpu, eng = logits_with(
        moe_gguf, prompt, **budgets["gpu"], offload_options=FAKE_GPU | {"background": False}
    )
    assert eng.offload.counters.device_assignments > 0 and eng.offload.counters.cpu_assignments > 0
    for other in (starved, tiny_gpu):
        assert rel_diff(other, reference) <= 1e-4


def test_decode_while_the_cache_promotes_and_demotes(moe_gguf, prompt, budgets):
    reference = dsrun.load(moe_gguf, ctx=256, gpus=[])
    cached = dsrun.load(moe_gguf, ctx=256, **budgets["gpu"], offload_options=FAKE_GPU | {"background": False})
    cached.offload.policy.max_moves = 2
    ours = [t for c in cached.generate(prompt, max_tokens=24, temperature=0) for t in c.tokens]
    ref = [t for c in reference.generate(prompt, max_tokens=24, temperature=0) for t in c.tokens]
    assert ours == ref
    counters = cached.offload.counters
    assert counters.promotions > 0 and counters.demotions > 0
    assert rel_diff(cached.logits(prompt + ours), reference.logits(prompt + ours)) <= 1e-4


def test_background_mover_keeps_answers(moe_gguf, prompt, budgets):
    reference, _ = logits_with(moe_gguf, prompt, gpus=[])
    eng = dsrun.load(moe_gguf, ctx=256, **budgets["gpu"], offload_options=FAKE_GPU)
    for _ in range(3):
        assert rel_diff(eng.logits(prompt), reference) <= 1e-4
        eng.offload.wait_idle()
    assert eng.offload.counters.promotions > 0


def test_stats_report_tiers_and_hit_rate(moe_gguf, prompt, budgets):
    eng = dsrun.load(moe_gguf, ctx=256, **budgets["gpu"], offload_options=FAKE_GPU | {"background": False})
    eng.logits(prompt)
    stats = eng.stats()
    tiers = {t["device"]: t for t in stats["memory"]["tiers"]}
    assert {"cuda:0", "cpu", "disk"} <= set(tiers)
    assert sum(t["experts"] for t in tiers.values()) == stats["experts"]["total"] == 3 * 16
    assert 0 < stats["experts"]["hit_rate"] < 1
    assert stats["experts"]["placement"] and len(stats["experts"]["placement"][0]) == 16


def test_budget_too_small_for_resident_tensors_names_what_is_missing(moe_gguf):
    with pytest.raises(MemoryBudgetError, match="cuda:0"):
        dsrun.load(moe_gguf, ctx=256, gpus=[0], gpu_mem="64KiB", offload_options=FAKE_GPU)


def test_out_of_memory_during_a_promotion_keeps_the_expert_on_the_cpu(moe_gguf, prompt, budgets, monkeypatch):
    import torch

    from dsrun.offload.device_slots import DeviceExpertSlots

    def out_of_memory(self, *args):
        raise torch.OutOfMemoryError("injected: the device is full")

    monkeypatch.setattr(DeviceExpertSlots, "load", out_of_memory)
    reference, _ = logits_with(moe_gguf, prompt, gpus=[])
    starved, eng = logits_with(
        moe_gguf, prompt, **budgets["gpu"], offload_options=FAKE_GPU | {"background": False}
    )
    assert eng.offload.counters.promotions == 0 and eng.offload.counters.device_assignments == 0
    assert rel_diff(starved, reference) <= 1e-4


def test_a_recorded_profile_puts_its_hottest_experts_on_the_gpu(moe_gguf, prompt, budgets, tmp_path):
    from dsrun.offload.profile import read_profile, write_profile

    eng = dsrun.load(moe_gguf, ctx=256, gpus=[])
    eng.logits(prompt)
    path = tmp_path / "profile.json"
    write_profile(eng.activation_profile(), path)
    profile = read_profile(path)
    counts = [np.array(c) for c in profile.counts]
    assert sum(int(c.sum()) for c in counts) == len(prompt) * 4 * 3  # tokens x top-k x MoE layers
    hot = dsrun.load(
        moe_gguf,
        ctx=256,
        **budgets["gpu"],
        placement=str(path),
        offload_options=FAKE_GPU | {"background": False},
    )
    pool = next(iter(hot.offload.slots.values()))
    on_gpu = [counts[layer][e] for layer, e in pool.slot_of]
    elsewhere = [
        c[e]
        for layer, c in enumerate(counts)
        if len(c)
        for e in range(len(c))
        if (layer, e) not in pool.slot_of
    ]
    assert min(on_gpu) >= max(elsewhere)  # the GPU started with the profile's hottest experts


def test_quantized_slots_keep_the_files_bytes_and_the_answer(q8_moe):
    """Slots that keep Q8_0 experts as the file's bytes (what a GPU holds, 3.8x smaller than F32) give the
    all-CPU answer; on the CPU stand-in their kernels are the torch fallback of gpu_quant."""
    path = q8_moe
    tokens = list(range(300, 340))
    reference, _ = logits_with(path, tokens, gpus=[])
    options = FAKE_GPU | {"background": False, "quantized_slots": True}
    quantized, eng = logits_with(path, tokens, gpus=[0], gpu_mem="64MiB", ram="1MiB", offload_options=options)
    pool = next(iter(eng.offload.slots.values()))
    assert pool.quantized and pool.slot_bytes * 3 < 3 * pool.layout.n_ff * pool.layout.n_embd * 4
    assert eng.offload.counters.device_assignments > 0
    assert rel_diff(quantized, reference) <= 1e-4
    # decode steps: a layer's resident experts in one grouped launch (its torch fallback here)
    engines = [dsrun.load(path, ctx=256, gpus=[])]
    engines.append(dsrun.load(path, ctx=256, gpus=[0], gpu_mem="64MiB", ram="1MiB", offload_options=options))
    ref, ours = (
        [t for c in e.generate(tokens, max_tokens=6, temperature=0) for t in c.tokens] for e in engines
    )
    assert ours == ref and engines[1].offload.counters.device_assignments > 0
    for e in engines:
        e.close()
    # a heavy batch whose cost model says so runs every cold expert on the "GPU", streamed in
    from dsrun.offload.prefill import StreamCost

    eng = dsrun.load(path, ctx=256, gpus=[0], gpu_mem="64MiB", ram="1MiB", offload_options=options)
    eng.offload.cost = StreamCost(stream_bytes_per_s=1e30, min_rows=len(tokens))
    pool = next(iter(eng.offload.slots.values()))
    for key in list(pool.slot_of)[4:]:  # most experts cold, a few resident
        pool.drop(*key)
    eng.offload.policy.max_moves = 0
    streamed = eng.logits(tokens)
    assert eng.offload.counters.streamed_assignments > 0 and eng.offload.counters.cpu_assignments == 0
    assert eng.stats()["experts"]["streamed_assignments"] == eng.offload.counters.streamed_assignments
    eng.close()
    assert rel_diff(streamed, reference) <= 1e-4


@pytest.mark.parametrize("backend", ["dequant", "ggml"])
def test_prefill_splits_cold_experts_between_stream_and_cpu(q8_moe, monkeypatch, backend):
    """With the stream and the CPU equally fast, a heavy batch streams the busiest half of the cold
    experts, two staging pools of two experts taking turns, while the CPU computes the rest on its worker
    (in the engine's inference mode: ggml's arenas are written in place there): the all-CPU answer."""
    from dsrun.models import gguf_matrix
    from dsrun.offload import device_slots
    from dsrun.offload.prefill import StreamCost

    if backend == "ggml" and not gguf_matrix.available():
        pytest.skip("llama-cpp-python's libggml is missing")
    path, tokens = q8_moe, list(range(300, 340))
    reference, _ = logits_with(path, tokens, gpus=[])
    options = FAKE_GPU | {"background": False, "quantized_slots": True}
    eng = dsrun.load(
        path, ctx=256, gpus=[0], gpu_mem="64MiB", ram="1MiB", cpu_backend=backend, offload_options=options
    )
    pool = next(iter(eng.offload.slots.values()))
    monkeypatch.setattr(device_slots, "STAGE_BYTES", 2 * pool.slot_bytes)
    eng.offload.cost = StreamCost(
        cpu_bytes_per_s=1e9, cpu_flops_per_s=1e30, stream_bytes_per_s=1e9, min_rows=8
    )
    for key in list(pool.slot_of)[4:]:
        pool.drop(*key)
    eng.offload.policy.max_moves = 0
    split = eng.logits(tokens)
    c = eng.offload.counters
    assert c.streamed_assignments > 0 and c.cpu_assignments > 0 and c.device_assignments > 0
    assert pool.staging[0].n_slots == 2
    eng.close()
    # ggml rounds the CPU part's activations to Q8_0 (as llama.cpp): within 1e-2 of the exact answer
    assert rel_diff(split, reference) <= (1e-4 if backend == "dequant" else 3e-2)
