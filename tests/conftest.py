"""Shared fixtures: the default model, its F32 copy, and engines loaded once per session."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

import dsrun
from dsrun.engine import resolve_model

# Two cores: one torch thread per test process keeps timing noise and oversubscription down.
torch.set_num_threads(int(os.environ.get("DSRUN_TEST_THREADS", "2")))
# Parity tests run the exact CPU expert path; backend tests ask for their backend by name.
os.environ.setdefault("DSRUN_CPU_BACKEND", "dequant")
# Shards and backend verdicts go to a throwaway folder, not the user's ~/.cache/dsrun.
os.environ.setdefault("DSRUN_CACHE_DIR", tempfile.mkdtemp(prefix="dsrun-test-cache-"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_gguf():
    return resolve_model("default")


@pytest.fixture(scope="session")
def f32_gguf(tmp_path_factory, default_gguf):
    """The default model with every tensor dequantized to F32: the exact parity reference."""
    from dsrun.gguf_convert import to_f32

    return to_f32(default_gguf, tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf")


@pytest.fixture(scope="session")
def engine(default_gguf):
    eng = dsrun.load(default_gguf, ctx=1024)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def q8_moe(tmp_path_factory):
    """A tiny deepseek2 with Q8_0 weights and skewed, local routing: quantized expert slots' tests."""
    from dsrun.synth import synthesize

    return synthesize(
        tmp_path_factory.mktemp("q8") / "ds2-q8.gguf",
        "deepseek2",
        weight_type="Q8_0",
        n_layer=3,
        n_expert=16,
        n_expert_used=4,
        skew=1.2,
        locality=0.8,
        seed=5,
    )
