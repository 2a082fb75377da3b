"""deepseek2 pieces on their own: latent attention's decode shortcut and the quantized k_b / v_b load.

Legend: n new rows, N cached positions, H heads, C latent width, R rope dims.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsrun.models.base import causal_mask
from dsrun.models.deepseek2 import attend_latent


def masked_reference(q: torch.Tensor, kv: torch.Tensor, n_latent: int, start: int, scale: float):
    n, H, _ = q.shape
    scores = torch.einsum("nhw,kw->nhk", q, kv) * scale  # (n, H, N)
    mask = causal_mask(start, n, kv.shape[0])[:, None, :]  # (n, 1, N)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("nhk,kc->nhc", weights, kv[:, :n_latent])  # (n, H, C)


def test_latent_attention_of_one_new_row_sees_the_whole_cache_without_a_mask():
    """Decode skips building the (H, N) mask: the one new row is the cache's last position."""
    g = torch.Generator().manual_seed(0)
    H, C, R, N = 4, 32, 8, 9
    kv = torch.randn(N, C + R, generator=g)
    for n in (1, 3):
        q = torch.randn(n, H, C + R, generator=g)
        got = attend_latent(q, kv, C, N - n, 0.2)
        assert torch.allclose(got, masked_reference(q, kv, C, N - n, 0.2), atol=1e-5)


def test_split_k_b_and_v_b_stay_quantized_and_agree_with_the_float_path(tmp_path, monkeypatch):
    """With ggml, attn_k_b / attn_v_b run in their GGUF type (as llama.cpp runs them); the exact path
    (DSRUN_DENSE=torch) holds them in float32. Both give the same logits within Q8 activation rounding."""
    import dsrun
    from dsrun.models.gguf_matrix import GGUFMatrix, available
    from dsrun.synth import synthesize

    if not available():
        pytest.skip("llama-cpp-python's libggml is missing")
    path = synthesize(tmp_path / "ds2.gguf", "deepseek2", weight_type="Q8_0", router="hash", n_layer=2)
    prompt = list(range(5, 17))
    with dsrun.load(path, ctx=64, threads=1, cpu_backend="dequant") as eng:
        attn = eng.model.blocks[0].attn
        assert isinstance(attn.attn_k_b, GGUFMatrix) and isinstance(attn.attn_v_b, GGUFMatrix)
        quantized = eng.logits(prompt)
    monkeypatch.setenv("DSRUN_DENSE", "torch")
    with dsrun.load(path, ctx=64, threads=1, cpu_backend="dequant") as eng:
        assert isinstance(eng.model.blocks[0].attn.attn_k_b, torch.Tensor)
        exact = eng.logits(prompt)
    assert np.abs(quantized - exact).max() < 0.05 * np.abs(exact).max()


@pytest.mark.parametrize("layout, q_lora", [("kv_b", 0), ("split", 256)])
def test_cpu_layers_run_as_ggml_graphs_and_agree_with_the_op_by_op_path(tmp_path, layout, q_lora):
    """A quantized file's CPU blocks run as two ggml graphs around the cached attention (norms, rope, k_b,
    v_b, the residuals, the FFN's norm, router and shared experts inside); prefill and decode steps give the
    op-by-op path's logits within Q8 activation rounding, and decode's graphs are kept."""
    import dsrun
    from dsrun.models.base import Batch
    from dsrun.models.deepseek2 import LayerGraphs
    from dsrun.models.gguf_matrix import available
    from dsrun.synth import synthesize

    if not available():
        pytest.skip("llama-cpp-python's libggml is missing")
    path = synthesize(
        tmp_path / "ds2.gguf", "deepseek2", weight_type="Q8_0", router="hash", n_layer=3, n_dense_lead=1,
        mla_layout=layout, q_lora_rank=q_lora, yarn_factor=40.0, yarn_mscale_all_dim=0.707,
    )  # fmt: skip

    def steps(eng, fused: bool) -> list[torch.Tensor]:
        blocks = [getattr(b, "block", b) for b in eng.model.blocks]
        for b in blocks:
            b.graphs = False if fused else None  # False: made on the next step; None: op by op
        cache = eng.model.new_cache()
        logits = [eng.model.forward(Batch.single(list(range(5, 17)), cache, all_logits=True))]
        logits += [eng.model.forward(Batch.single([t], cache)) for t in (3, 40, 7)]
        assert all(isinstance(b.graphs, LayerGraphs) == fused for b in blocks)
        return logits

    with dsrun.load(path, ctx=64, threads=1, cpu_backend="ggml") as eng:
        fused, op_by_op = steps(eng, True), steps(eng, False)
        kept = getattr(eng.model.blocks[1], "block", eng.model.blocks[1]).attn.attn_output.graphs
        assert ("mla rest", 1) in kept and ("mla rest", 12) not in kept
    for a, b in zip(fused, op_by_op):
        assert torch.abs(a - b).max() < 0.02 * torch.abs(b).max()
        assert torch.equal(a.argmax(-1), b.argmax(-1))
