"""CPU expert backends: exact GGUF decoding, each backend's layer output against the F32 dequant reference,
and the backend choice.

Expert tensors are quantized by ggml itself (dsrun.synth.encode) from Gaussian weights and written to a
small GGUF, so shapes, offsets and paths are those of a real model file.
Legend: E experts, D model width, F expert width, T tokens, K experts per token.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from dsrun.errors import DsrunError
from dsrun.gguf_file import GGUFFile
from dsrun.models.moe import ExpertWeights, experts_forward
from dsrun.offload import cpu_experts
from dsrun.offload.cpu_experts import (
    DequantExperts,
    GroupQuant,
    LayerShape,
    choose_backend,
    expert_matrix,
    make_backend,
    requantize,
    write_synthetic_experts,
)
from dsrun.quants import dequantize

E, D, F, T, K = 8, 256, 256, 6, 3

# Relative error of a layer's output against the F32 reference (measured ~0.6% torch, ~1.5% ort and
# openvino, ~2% ggml at these small widths; docs/cpu-backends.md): torch rounds activations and group
# scales to bf16, ORT and OpenVINO quantize activations to int8 per group of 32, ggml (as llama.cpp)
# to Q8_K per row of 256 or Q8_0 per 32.
TOLERANCE = {"torch": 0.012, "ort": 0.025, "openvino": 0.025, "ggml": 0.03}
BACKEND_PACKAGES = {"torch": "torch", "ort": "onnxruntime", "openvino": "openvino", "ggml": "llama_cpp"}
LAYER_TYPES = [
    (Q.Q8_0, Q.Q8_0, Q.Q8_0),
    (Q.Q4_0, Q.Q4_0, Q.Q4_0),
    (Q.Q4_K, Q.Q4_K, Q.Q4_K),
    (Q.Q4_K, Q.Q4_K, Q.Q6_K),  # Q4_K_M's experts: down projections in Q6_K
    (Q.Q4_1, Q.Q8_0, Q.Q5_K),  # gate and up of different widths
]


def backend_param(name: str):
    missing = importlib.util.find_spec(BACKEND_PACKAGES[name]) is None
    return pytest.param(
        name, marks=pytest.mark.skipif(missing, reason=f"{BACKEND_PACKAGES[name]} not installed")
    )


BACKENDS = [backend_param(name) for name in TOLERANCE]


def write_expert_gguf(path, qtypes, *, n_expert=E, hidden=D, ff=F, layers=(0,), seed=0) -> GGUFFile:
    shape = LayerShape(n_expert, hidden, ff, K, tuple(qtypes))
    return GGUFFile(write_synthetic_experts(path, shape, layers, seed))


def layer_tensors(f: GGUFFile, layer: int = 0):
    return [f.tensor(f"blk.{layer}.ffn_{p}_exps.weight") for p in ("gate", "up", "down")]


def routed_step(seed=0, n_expert=E, tokens=T, k=K):
    """x (T, D), expert_ids (T, K) distinct per token, weights (T, K), active (T, K) with some off."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, D, generator=g)
    ids = torch.stack([torch.randperm(n_expert, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    active = torch.rand(tokens, k, generator=g) > 0.3
    return x, ids, weights, active


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=LAYER_TYPES, ids=lambda q: "-".join(t.name for t in q))
def layer_file(request, tmp_path_factory):
    return write_expert_gguf(tmp_path_factory.mktemp("experts") / "experts.gguf", request.param)


# --- conversion ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K])
def test_exact_types_decode_bit_exact(tmp_path, qtype):
    f = write_expert_gguf(tmp_path / "m.gguf", (qtype,) * 3)
    for info in layer_tensors(f):
        gq = expert_matrix(info, 3)
        ref = dequantize(info.data[3], info.qtype, info.shape[1:]).numpy()
        assert np.array_equal(gq.to_float(), ref), info.qtype.name


def test_integer_zero_points_stay_within_a_32nd_of_a_step(tmp_path):
    info = layer_tensors(write_expert_gguf(tmp_path / "m.gguf", (Q.Q4_K,) * 3))[0]
    gq = expert_matrix(info, 0)
    wide = gq.integer_zero()
    assert wide.bits == 8 and wide.has_integer_zero()
    step = np.repeat(gq.scale, 32, axis=1)  # (N, Kin)
    assert np.all(np.abs(wide.to_float() - gq.to_float()) <= step / 32 + 1e-6)


def test_integer_zero_points_of_q4_0_are_kept(tmp_path):
    info = layer_tensors(write_expert_gguf(tmp_path / "m.gguf", (Q.Q4_0,) * 3))[0]
    gq = expert_matrix(info, 0)
    assert gq.integer_zero() is gq and np.all(gq.zero_points() == 8)


@pytest.mark.parametrize(
    ("qtype", "bits", "bound"),
    [(Q.Q2_K, 4, 0.09), (Q.Q3_K, 4, 0.09), (Q.Q5_K, 8, 0.006), (Q.Q6_K, 8, 0.006), (Q.IQ4_XS, 8, 0.006)],
)
def test_requantized_types_error(tmp_path, qtype, bits, bound):
    """The documented requantization errors (docs/cpu-backends.md), against the GGUF's own values."""
    info = layer_tensors(write_expert_gguf(tmp_path / "m.gguf", (qtype,) * 3))[0]
    gq = expert_matrix(info, 0)
    ref = dequantize(info.data[0], info.qtype, info.shape[1:]).numpy()
    assert gq.bits == bits
    assert np.linalg.norm(gq.to_float() - ref) / np.linalg.norm(ref) < bound


def test_widened_codes_are_the_same_matrix():
    gq = requantize(np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32), 4)
    wide = gq.widened(8)
    assert wide.bits == 8 and np.allclose(wide.to_float(), gq.to_float(), rtol=0, atol=1e-6)


# --- layer outputs -------------------------------------------------------------------------------------


def test_dequant_reference_matches_moe_experts_forward(layer_file):
    """The interface's reference computes what models/moe.py computes when every assignment is active."""
    tensors = layer_tensors(layer_file)
    ref = DequantExperts()
    ref.load_layer(0, *tensors)
    x, ids, weights, _ = routed_step()
    stacked = ExpertWeights(*(dequantize(t.data, t.qtype, t.shape) for t in tensors))
    expected = experts_forward(x, ids, weights, stacked)
    got = ref.forward(0, x, ids, weights, torch.ones_like(ids, dtype=torch.bool))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_matches_dequant_reference(layer_file, name, tmp_path):
    tensors = layer_tensors(layer_file)
    loaded = [0, 2, 3, 5, 6, 7]
    ref = DequantExperts()
    ref.load_layer(0, *tensors)
    backend = make_backend(name, cache_dir=tmp_path)
    backend.load_layer(0, *tensors, experts=loaded)
    x, ids, weights, active = routed_step(seed=1)
    active &= torch.isin(ids, torch.tensor(loaded))  # the others would be placed elsewhere
    got = backend.forward(0, x, ids, weights, active)
    expected = ref.forward(0, x, ids, weights, active)
    assert got.shape == (T, D) and got.dtype == torch.float32
    assert rel_err(got, expected) < TOLERANCE[name]
    untouched = ~active.any(1)  # tokens with nothing on the CPU get exact zeros
    assert torch.all(got[untouched] == 0)


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_decode_step_of_one_token(layer_file, name, tmp_path):
    tensors = layer_tensors(layer_file)
    ref, backend = DequantExperts(), make_backend(name, cache_dir=tmp_path)
    for b in (ref, backend):
        b.load_layer(0, *tensors)
    x, ids, weights, _ = routed_step(seed=2, tokens=1)
    active = torch.ones_like(ids, dtype=torch.bool)
    assert (
        rel_err(backend.forward(0, x, ids, weights, active), ref.forward(0, x, ids, weights, active))
        < TOLERANCE[name]
    )


@pytest.mark.parametrize("qtypes", [(Q.Q2_K,) * 3, (Q.Q3_K, Q.Q3_K, Q.IQ4_XS)], ids=["Q2_K", "Q3_K-IQ4_XS"])
def test_ggml_runs_low_bit_types_on_their_own_blocks(tmp_path, qtypes):
    """The backends that requantize lose ~13% on Q2_K/Q3_K layers; ggml reads the blocks as they are."""
    pytest.importorskip("llama_cpp")
    tensors = layer_tensors(write_expert_gguf(tmp_path / "m.gguf", qtypes))
    ref, backend = DequantExperts(), make_backend("ggml")
    for b in (ref, backend):
        b.load_layer(0, *tensors)
    x, ids, weights, active = routed_step(seed=4)
    assert (
        rel_err(backend.forward(0, x, ids, weights, active), ref.forward(0, x, ids, weights, active)) < 0.03
    )


def test_combine_adds_as_np_add_at_does():
    """The weighted sum per token, bit for bit the sums np.add.at made (same additions, same order)."""
    rng = np.random.default_rng(0)
    for A, n_tokens in ((6, 1), (64, 1), (1, 1), (12, 2), (40, 7), (1, 3)):
        y = rng.standard_normal((A, D), dtype=np.float32)
        w = rng.random(A, dtype=np.float32)
        tokens = rng.integers(0, n_tokens, A)
        expected = np.zeros((n_tokens, D), np.float32)
        np.add.at(expected, tokens, y * w[:, None])
        assert np.array_equal(cpu_experts.combine(y, w, tokens, n_tokens), expected)


def test_ggml_kept_graphs_equal_graphs_built_per_call(monkeypatch, tmp_path):
    """Decode-sized calls reuse a graph per (layer, assignment count) over activations shared by the
    layers; they give what a graph built for the call gives, across layers and counts in any order."""
    pytest.importorskip("llama_cpp")
    from dsrun.offload import backend_ggml

    f = write_expert_gguf(tmp_path / "two.gguf", (Q.Q4_K, Q.Q4_K, Q.Q8_0), layers=(0, 1))
    order = [(0, 1), (1, 1), (0, 2), (1, 1), (0, 1), (1, 2)]  # (layer, tokens) of each call
    steps = [(layer, routed_step(seed=seed, tokens=tokens)) for seed, (layer, tokens) in enumerate(order)]
    results = []
    for kept in (backend_ggml.KEPT_ASSIGNMENTS, 0):
        monkeypatch.setattr(backend_ggml, "KEPT_ASSIGNMENTS", kept)
        backend = make_backend("ggml")
        for layer in (0, 1):
            backend.load_layer(layer, *layer_tensors(f, layer))
        results.append([backend.forward(layer, *step) for layer, step in steps])
        assert bool(backend.layers[0].graphs) == bool(kept)  # graphs kept by assignment count, or none
    for with_kept, fresh in zip(*results):
        assert torch.equal(with_kept, fresh)


def test_no_active_assignment_gives_zeros(layer_file):
    ref = DequantExperts()
    ref.load_layer(0, *layer_tensors(layer_file))
    x, ids, weights, active = routed_step()
    assert torch.all(ref.forward(0, x, ids, weights, torch.zeros_like(active)) == 0)


def test_expert_not_loaded_is_refused(layer_file):
    ref = DequantExperts()
    ref.load_layer(0, *layer_tensors(layer_file), experts=[0, 1])
    x, ids, weights, _ = routed_step()
    with pytest.raises(ValueError, match="not loaded"):
        ref.forward(0, x, ids, weights, torch.ones_like(ids, dtype=torch.bool))


# --- choosing a backend --------------------------------------------------------------------------------

SHAPE = LayerShape(n_expert=E, hidden=D, ff=F, top_k=K, qtypes=(Q.Q4_K, Q.Q4_K, Q.Q4_K))


def test_requested_backend_is_made_without_timing(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_experts, "benchmark_backends", lambda *a, **k: pytest.fail("timed"))
    assert choose_backend(SHAPE, "dequant", cache_dir=tmp_path).name == "dequant"


def test_unknown_backend_names_the_choices(tmp_path):
    with pytest.raises(DsrunError, match="one of auto, dequant, torch"):
        choose_backend(SHAPE, "cuda", cache_dir=tmp_path)


def test_auto_times_once_then_reads_the_cached_verdict(monkeypatch, tmp_path):
    calls = []
    available = cpu_experts.available_backends()
    fake = {
        name: 1.0 + i
        for i, name in enumerate(reversed([n for n in cpu_experts.CANDIDATES if n in available]))
    }

    def timings(shape, *, threads):
        calls.append(shape)
        return fake

    monkeypatch.setattr(cpu_experts, "benchmark_backends", timings)
    first = choose_backend(SHAPE, None, cache_dir=tmp_path)
    second = choose_backend(SHAPE, "auto", cache_dir=tmp_path)
    assert first.name == second.name == min(fake, key=fake.get)
    assert len(calls) == 1 and (tmp_path / "cpu-backend.json").exists()
    choose_backend(LayerShape(E, D, F, K, (Q.Q8_0,) * 3), None, cache_dir=tmp_path)  # another shape: timed
    assert len(calls) == 2


@pytest.mark.slow
def test_micro_benchmark_times_every_available_backend():
    shape = LayerShape(n_expert=16, hidden=256, ff=256, top_k=2, qtypes=(Q.Q4_0,) * 3)
    timings = cpu_experts.benchmark_backends(shape, threads=1)
    assert set(timings) == {n for n in cpu_experts.CANDIDATES if n in cpu_experts.available_backends()}
    assert all(0 < t < 1 for t in timings.values())


def test_group_quant_round_trip_fields():
    gq = GroupQuant(np.zeros((2, 32), np.uint8), np.ones((2, 1), np.float32), -np.ones((2, 1), np.float32), 4)
    assert np.all(gq.to_float() == -1) and np.all(gq.zero_points() == 1)
