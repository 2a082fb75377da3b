"""GPU placements against dsrun's all-CPU F32 path, for every architecture (CONTRACT.md parity between
dsrun's own paths). Needs CUDA: CI has none and skips these; the figures from a real GPU are in
docs/benchmarks.md."""

from __future__ import annotations

import numpy as np
import pytest

import dsrun

pytestmark = pytest.mark.gpu

VARIANTS = {
    "deepseek2-split-softmax": dict(arch="deepseek2"),
    "deepseek2-kvb-qlora-sigmoid": dict(
        arch="deepseek2",
        mla_layout="kv_b",
        q_lora_rank=48,
        gating="sigmoid",
        n_group=2,
        topk_group=1,
        weights_norm=True,
        weights_scale=2.5,
    ),
    "qwen3moe": dict(arch="qwen3moe"),
    "qwen2moe": dict(arch="qwen2moe"),
    "mixtral": dict(arch="mixtral"),
}
PROMPT = [1, 504, 3575, 282, 4649, 314, 9789, 30, 378, 3575, 282, 6474, 314]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def model(request, tmp_path_factory):
    from dsrun.synth import synthesize

    opts = VARIANTS[request.param]
    return synthesize(tmp_path_factory.mktemp("gpu") / f"{request.param}.gguf", n_layer=3, seed=5, **opts)


def test_gpu_logits_equal_cpu_logits(model):
    cpu = dsrun.load(model, ctx=128, gpus=[])
    ref = cpu.logits(PROMPT)
    # a budget that holds the dense part and only some experts: both sides of every MoE layer run
    gpu = dsrun.load(model, ctx=128, gpus=[0], gpu_mem="200MiB")
    ours = gpu.logits(PROMPT)
    assert gpu.offload.counters.device_assignments > 0
    assert np.abs(ours - ref).max() <= 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_gpu_decode_through_the_cache_equals_cpu(model):
    from parity import incremental_logits

    cpu = incremental_logits(dsrun.load(model, ctx=128, gpus=[]).model, PROMPT)
    gpu = incremental_logits(dsrun.load(model, ctx=128, gpus=[0], gpu_mem="200MiB").model, PROMPT)
    assert np.abs(gpu - cpu).max() <= 1e-3


QUANTIZED = {
    "deepseek2-q8": dict(arch="deepseek2", weight_type="Q8_0"),
    "qwen3moe-q8": dict(arch="qwen3moe", weight_type="Q8_0"),
    "mixtral-q8": dict(arch="mixtral", weight_type="Q8_0"),
    # Q4_K decode kernels round x to int8 (gpu_quant.takes_int8_x), as llama.cpp's CUDA decode does
    "deepseek2-q4k": dict(arch="deepseek2", weight_type="Q4_K"),
    "qwen3moe-q4k": dict(arch="qwen3moe", weight_type="Q4_K"),
}
# tests/test_moe_parity.py's tau per type against llama.cpp; the same bar between dsrun's paths
TAU = {"Q8_0": 0.5, "Q4_K": 0.6}


@pytest.fixture(scope="module", params=sorted(QUANTIZED))
def quantized_model(request, tmp_path_factory):
    """(path, tau) of a generated model with quantized weights."""
    from dsrun.synth import synthesize

    opts = QUANTIZED[request.param]
    path = synthesize(tmp_path_factory.mktemp("gpu-q") / f"{request.param}.gguf", n_layer=3, seed=5, **opts)
    return path, TAU[opts["weight_type"]]


def half_resident(eng) -> None:
    """Keep half of each pool's experts and freeze the cache: both sides of every MoE layer run."""
    eng.offload.policy.max_moves = 0
    for pool in {id(p): p for p in eng.offload.slots.values()}.values():
        for key in list(pool.slot_of)[len(pool.slot_of) // 2 :]:
            pool.drop(*key)


@pytest.mark.parametrize("resident", ["half", "all"])
def test_cuda_graph_decode_equals_eager_and_the_f32_path(quantized_model, resident, monkeypatch):
    """Decode replayed from CUDA graphs (quantized slots, the split at each MoE layer) against the same
    placement run eagerly and against dsrun's F32 CPU path (CONTRACT.md parity, the type's tau); with half
    the experts resident both sides of each layer run, with all of them the crossings find nothing cold."""
    from parity import compare, incremental_logits

    quantized_model, tau = quantized_model
    monkeypatch.setenv("DSRUN_DENSE", "torch")
    reference = incremental_logits(dsrun.load(quantized_model, ctx=128, gpus=[]).model, PROMPT)
    monkeypatch.delenv("DSRUN_DENSE")
    runs = {}
    for graphs in ("0", "1"):
        monkeypatch.setenv("DSRUN_CUDA_GRAPHS", graphs)
        eng = dsrun.load(
            quantized_model, ctx=128, gpus=[0], gpu_mem="4GiB", offload_options={"background": False}
        )
        if resident == "half":
            half_resident(eng)
        runs[graphs] = incremental_logits(eng.model, PROMPT)
        c = eng.offload.counters
        assert c.device_assignments > 0 and (c.cpu_assignments > 0) == (resident == "half")
    decode = eng.stats()["decode"]
    assert decode["cuda_graphs"] and decode["replays"] == len(PROMPT) - 2  # first: eager; second: recorded
    # bf16 expert inputs make any two GPU paths part at ~1e-3 (one flipped rounding), so the bar is tau's
    for ours, ref in ((runs["1"], runs["0"]), (runs["1"], reference)):
        report = compare(ours, ref, tau)
        assert report.ok, str(report)


def test_gpu_prefill_equals_the_f32_path(quantized_model, monkeypatch):
    """A long prompt's prefill: each MoE layer's resident experts in one sorted launch per half
    (gpu_quant.sorted_swiglu), part of the cold ones streamed in (the cost model told so) while the CPU
    computes the others; CONTRACT.md parity with dsrun's F32 CPU path, the type's tau."""
    from parity import compare

    from dsrun.offload.prefill import StreamCost

    path, tau = quantized_model
    prompt = (PROMPT * 8)[:100]
    monkeypatch.setenv("DSRUN_DENSE", "torch")
    reference = dsrun.load(path, ctx=256, gpus=[]).logits(prompt)
    monkeypatch.delenv("DSRUN_DENSE")
    eng = dsrun.load(path, ctx=256, gpus=[0], gpu_mem="4GiB", offload_options={"background": False})
    half_resident(eng)
    eng.offload.cost = StreamCost(
        cpu_bytes_per_s=1e9, cpu_flops_per_s=1e30, stream_bytes_per_s=1e9, min_rows=8
    )
    ours = eng.logits(prompt)
    c = eng.offload.counters
    assert c.device_assignments > 0 and c.streamed_assignments > 0 and c.cpu_assignments > 0
    report = compare(ours, reference, tau)
    assert report.ok, str(report)


def two_gpus() -> bool:
    import torch

    return torch.cuda.device_count() >= 2


@pytest.mark.skipif(not two_gpus(), reason="needs two GPUs")
def test_two_gpus_decode_and_prefill_equal_the_f32_path(quantized_model, monkeypatch):
    """The layers split over cuda:0 and cuda:1 (the planner's split by budget), half of each GPU's experts
    resident: decode replayed from graphs cut where the device changes (a Hop), the same decode run
    eagerly, and a 100-token prefill, each against dsrun's F32 CPU path (CONTRACT.md parity, tau)."""
    from parity import compare, incremental_logits

    from dsrun.decode_graph import Hop

    path, tau = quantized_model
    prompt = (PROMPT * 8)[:100]
    monkeypatch.setenv("DSRUN_DENSE", "torch")
    cpu = dsrun.load(path, ctx=256, gpus=[])
    reference = {"decode": incremental_logits(cpu.model, PROMPT), "prefill": cpu.logits(prompt)}
    monkeypatch.delenv("DSRUN_DENSE")
    for graphs in ("0", "1"):
        monkeypatch.setenv("DSRUN_CUDA_GRAPHS", graphs)
        eng = dsrun.load(path, ctx=256, gpus=[0, 1], gpu_mem="4GiB", offload_options={"background": False})
        assert set(eng.plan.layer_devices) == {"cuda:0", "cuda:1"}
        half_resident(eng)
        ours = {"decode": incremental_logits(eng.model, PROMPT), "prefill": eng.logits(prompt)}
        for kind in ours:
            report = compare(ours[kind], reference[kind], tau)
            assert report.ok, f"{kind}, graphs {graphs}: {report}"
        c = eng.offload.counters
        assert c.device_assignments > 0 and c.cpu_assignments > 0
    decode = eng.decoder.report()
    assert decode["cuda_graphs"] and decode["replays"] == len(PROMPT) - 2, decode["off_because"]
    assert sum(isinstance(b, Hop) for b in eng.decoder.order) == 1


def test_a_step_that_cannot_be_recorded_decodes_eagerly(quantized_model, monkeypatch):
    """An op that fails while the step is captured: the capture ends on its own stream, a warning says
    why, and decode goes on eagerly with the same logits as a load that never records."""
    import torch
    from parity import compare, incremental_logits

    path, tau = quantized_model
    monkeypatch.setenv("DSRUN_CUDA_GRAPHS", "0")
    reference = incremental_logits(dsrun.load(path, ctx=128, gpus=[0], gpu_mem="4GiB").model, PROMPT)
    monkeypatch.setenv("DSRUN_CUDA_GRAPHS", "1")
    eng = dsrun.load(path, ctx=128, gpus=[0], gpu_mem="4GiB")
    forward = eng.decoder.forward

    def fails_in_capture(batch):
        out = forward(batch)
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("not capturable")
        return out

    eng.decoder.forward = fails_in_capture
    with pytest.warns(UserWarning, match="not capturable"):
        ours = incremental_logits(eng.model, PROMPT)
    assert not eng.decoder.report()["cuda_graphs"] and "not capturable" in eng.decoder.report()["off_because"]
    report = compare(ours, reference, tau)
    assert report.ok, str(report)


def test_a_budget_given_holds_torch_to_it(quantized_model):
    """gpu_mem as a card's size: torch's allocator on that GPU may not grow past it (and the room
    Engine.logits takes for every row's logits)."""
    import torch

    eng = dsrun.load(quantized_model[0], ctx=128, gpus=[0], gpu_mem="4GiB")
    try:
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(5 << 30, dtype=torch.uint8, device="cuda:0")
    finally:
        eng.close()
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
