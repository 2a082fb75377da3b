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
