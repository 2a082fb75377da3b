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
