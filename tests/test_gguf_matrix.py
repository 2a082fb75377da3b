"""Dense projections left quantized: ggml's kernels (GGUFMatrix) and gpu_quant's (DeviceMatrix, here on
the CPU through its torch fallback) against the dequantized float32 reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from dsrun.gguf_file import TensorInfo
from dsrun.models import gguf_matrix as gm
from dsrun.quants import random_weight_blocks

pytestmark = pytest.mark.skipif(not gm.available(), reason="llama-cpp-python's libggml is missing")


def matrix(qtype: Q, n: int, k: int, seed: int = 0) -> gm.GGUFMatrix:
    blocks = random_weight_blocks(
        qtype, n * k // (256 if qtype == Q.Q4_K else 32), 0.05, np.random.default_rng(seed)
    )
    return gm.GGUFMatrix(TensorInfo(f"w{seed}", qtype, (n, k), blocks.reshape(n, -1), Path("-"), 0))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K])
@pytest.mark.parametrize("rows", [1, 5, 12])
def test_ggml_projection_matches_the_dequantized_weights(qtype, rows):
    """Within the rounding of the activations to Q8 (what llama.cpp does), for reused and fresh graphs."""
    m = matrix(qtype, 96, 512)
    x = torch.randn(rows, 512)
    ref = x @ m.dequantize().T
    assert rel(m(x), ref) < 2e-2
    assert torch.equal(m(x), m(x))  # a kept graph gives the same answer twice
    assert (rows <= gm.REUSED_ROWS) == any(key[2] == rows for key in m.graphs)


def test_fused_graphs_equal_one_matrix_at_a_time():
    gate, up, down = matrix(Q.Q4_K, 256, 512, 1), matrix(Q.Q4_K, 256, 512, 2), matrix(Q.Q4_K, 512, 256, 3)
    x = torch.randn(3, 512)
    together = gm.linears(x, [gate, up])
    assert torch.equal(together[0], gate(x)) and torch.equal(together[1], up(x))
    fused = gm.swiglu(x, gate, up, down)
    unfused = down(torch.nn.functional.silu(gate(x)) * up(x))
    assert rel(fused, unfused) < 2e-2  # the fused graph quantizes ggml's own f32 activation once more


def test_embedding_rows_and_the_device_copy():
    m = matrix(Q.Q4_K, 64, 256)
    ids = torch.tensor([5, 0, 63])
    full = m.dequantize()
    assert torch.equal(m.rows(ids), full[ids])
    on_device = gm.DeviceMatrix(m, torch.device("cpu"))  # the GPU path, on gpu_quant's torch fallback
    assert on_device.nbytes == m.nbytes and torch.equal(on_device.rows(ids), full[ids])
    x = torch.randn(2, 256)
    assert rel(gm.linear(x, on_device), x @ full.T) < 1e-5


def test_float_types_and_the_exact_switch_stay_on_torch(monkeypatch):
    f32 = TensorInfo("f", Q.F32, (4, 32), np.zeros((4, 32), np.float32), Path("-"), 0)
    assert gm.load_matrix(f32) is None
    q = matrix(Q.Q8_0, 4, 32)
    assert gm.load_matrix(q.info) is not None
    monkeypatch.setenv("DSRUN_DENSE", "torch")
    assert gm.load_matrix(q.info) is None


def test_no_rows_gives_no_rows():
    """Regression: a prefill chunk that wants no logits ran the head on 0 rows and read a NULL result."""
    m = matrix(Q.Q8_0, 32, 64)
    assert m(torch.zeros(0, 64)).shape == (0, 32)
    assert gm.linears(torch.zeros(0, 64), [m, m])[1].shape == (0, 32)


def head_stack(qtype: Q, heads: int, n: int, k: int, seed: int = 0) -> gm.GGUFMatrix:
    blocks = random_weight_blocks(
        qtype, heads * n * k // (256 if qtype == Q.Q4_K else 32), 0.05, np.random.default_rng(seed)
    )
    info = TensorInfo(f"s{seed}", qtype, (heads, n, k), blocks.reshape(heads, n, -1), Path("-"), 0)
    return gm.load_heads(info)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K])
@pytest.mark.parametrize("rows", [1, 3, 12])
def test_per_head_products_match_the_einsum_of_the_dequantized_stack(qtype, rows):
    """MLA's k_b / v_b left quantized: one mul_mat batched over heads, on strided input (a split view)."""
    w = head_stack(qtype, 4, 64, 256)
    assert w is not None and w.shape == (4, 64, 256)
    x = torch.randn(rows, 4, 300)[..., :256]  # (T, H, K), not contiguous
    ref = gm.per_head(x, w.dequantize())  # the float path: an einsum
    assert torch.allclose(ref, torch.einsum("thk,hnk->thn", x, w.dequantize()))
    got = gm.per_head(x, w)
    assert got.shape == (rows, 4, 64) and rel(got, ref) < 2e-2
    assert torch.equal(gm.per_head(x, w), got)  # a kept graph gives the same answer twice
    assert gm.per_head(torch.zeros(0, 4, 256), w).shape == (0, 4, 64)


def test_head_stacks_stay_float_where_ggml_does_not_run_them(monkeypatch):
    f32 = TensorInfo("f", Q.F32, (2, 4, 32), np.zeros((2, 4, 32), np.float32), Path("-"), 0)
    assert gm.load_heads(f32) is None
    q = head_stack(Q.Q8_0, 2, 4, 32)
    assert gm.load_matrix(q.info) is None  # a stack is not a 2-D projection
    assert gm.load_heads(matrix(Q.Q8_0, 4, 32).info) is None  # nor the other way round
    monkeypatch.setenv("DSRUN_DENSE", "torch")
    assert gm.load_heads(q.info) is None


def test_kept_graph_reads_each_new_input():
    """A kept graph copies each call's input in: consecutive calls with different rows differ."""
    m = matrix(Q.Q8_0, 32, 64)
    a, b = torch.randn(1, 64), torch.randn(1, 64)
    ya, yb = m(a), m(b)
    assert not torch.equal(ya, yb)
    assert torch.equal(m(a), ya)  # and its earlier result was a copy, not a view of the graph's memory
    assert torch.equal(m(a.double()), ya)  # other dtypes are copied in as float32


def test_graph_of_several_inputs_and_its_uncopied_outputs():
    """A graph of two inputs; with copy=False its outputs are its memory, overwritten by the next call (what
    a kept graph's caller uses within one step), with copy=True they are the caller's."""
    m = matrix(Q.Q8_0, 32, 64)

    def build(lib, ctx, x, y):
        return [lib.ggml_add(ctx, lib.ggml_mul_mat(ctx, m.tensor, x), y)]  # ne (32, 1)

    graph = gm.Graph([((1, 64), torch.float32), ((1, 32), torch.float32)], [(1, 32)], build)
    a, b, y = torch.randn(1, 64), torch.randn(1, 64), torch.randn(1, 32)
    (view,) = graph([a, y], 1, copy=False)
    (copied,) = graph([a, y], 1)
    assert torch.allclose(copied, m(a) + y, atol=1e-5) and torch.equal(view, copied)
    graph([b, y], 1, copy=False)
    assert torch.allclose(view, m(b) + y, atol=1e-5)
    assert not torch.allclose(copied, view)
