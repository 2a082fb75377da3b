"""Every MoE architecture and layout, on generated models, against llama.cpp (tests/parity.py).

F32 files use the generator's soft routers (close calls between experts are common, so any slip in
routing maths shows). Quantized files use hash routing, where each token's experts win by a wide margin:
llama.cpp rounds activations before quantized matmuls, and with soft routers that rounding flips close
routing calls, which moves a token's logits by whole units (measured on soft-routed copies of these
variants: up to 7.7 at Q8_0 and 9.4 at Q4_K, at tokens whose top-k gap was below 1e-3) -- a property of
MoE under any activation rounding, not a dsrun error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from parity import (
    F32_TAU,
    batched_logits,
    compare,
    greedy_parting,
    incremental_logits,
    ours_greedy,
    reference,
)

import dsrun
from dsrun.errors import UnsupportedModelError
from dsrun.synth import synthesize

# tau per weight type. Measured as the max |dlogit| against llama.cpp over all 11 variants x the 3 prompts
# below (hash-routed test models, seed 0): Q8_0 0.37, Q4_K 0.47; tau adds ~30%. The whole gap is
# llama.cpp's activation rounding (Q8_0 blocks before Q8_0 matmuls, Q8_K before K-quant ones): emulating
# it in dsrun's matmuls brought the qwen2moe gap from 0.18 (Q8_0) and 0.25 (Q4_K) to 1e-5.
TAU = {"F32": F32_TAU, "Q8_0": 0.5, "Q4_K": 0.6}

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! 1 2 3",
    "Once upon a time in a land far, far away, there lived",
]
N_GREEDY = 32

_DS2 = dict(n_layer=3, n_dense_lead=1)
_V3_ROUTING = dict(
    gating="sigmoid",
    n_expert=16,
    n_group=4,
    topk_group=2,
    n_expert_used=3,
    weights_norm=True,
    weights_scale=2.5,
)


def _deepseek2_variants() -> dict[str, tuple[str, dict]]:
    """Both MLA layouts x q-LoRA or not x V2 (softmax) or V3 (sigmoid + exp_probs_b + groups) routing;
    half of them with YaRN, V2-style (mscale_all_dim 0.707) or V3-style (1.0)."""
    out = {}
    for layout in ("kv_b", "split"):
        for q_lora in (0, 256):
            for gating in ("softmax", "sigmoid"):
                kw = dict(
                    _DS2,
                    mla_layout=layout,
                    q_lora_rank=q_lora,
                    **(_V3_ROUTING if gating == "sigmoid" else {}),
                )
                if (layout == "kv_b") == (q_lora == 0):
                    kw |= dict(yarn_factor=40.0, yarn_mscale_all_dim=0.707 if gating == "softmax" else 1.0)
                out[f"ds2-{layout}-{'qlora' if q_lora else 'q'}-{gating}"] = ("deepseek2", kw)
    return out


VARIANTS = _deepseek2_variants() | {
    "qwen3moe": ("qwen3moe", dict(n_layer=2)),
    "qwen2moe": ("qwen2moe", dict(n_layer=2)),
    "mixtral": ("mixtral", dict(n_layer=2)),
}


# The default run covers every variant in F32 and a few quantized ones; the rest are slow (a quantized
# file costs 8-15 s here to generate, load, and run through llama.cpp and dsrun).
QUICK = {"Q8_0": ("ds2-kv_b-q-softmax", "ds2-split-qlora-sigmoid", "qwen2moe", "mixtral"),
         "Q4_K": ("ds2-kv_b-q-softmax", "mixtral")}  # fmt: skip


def _case(variant: str, weight_type: str):
    slow = weight_type != "F32" and variant not in QUICK[weight_type]
    return pytest.param(variant, weight_type, id=f"{variant}-{weight_type}", marks=[pytest.mark.slow] * slow)


def generate(tmp_path, variant: str, weight_type: str) -> Path:
    """F32 files are soft-routed, quantized ones hash-routed (see the module docstring)."""
    arch, kw = VARIANTS[variant]
    router = "soft" if weight_type == "F32" else "hash"
    return synthesize(
        tmp_path / f"{variant}-{weight_type}.gguf", arch, weight_type=weight_type, router=router, **kw
    )


def load(path: Path) -> dsrun.Engine:
    """dsrun's exact path (experts dequantized to F32), on one thread: tiny models on 2 busy cores run
    ~10x faster so."""
    return dsrun.load(path, ctx=512, threads=1, cpu_backend="dequant")


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """Loading with threads=1 must not leak into other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("variant, weight_type", [_case(v, t) for t in TAU for v in VARIANTS])
def test_matches_llama_cpp_and_its_own_cache_paths(tmp_path, monkeypatch, variant, weight_type):
    """llama.cpp parity; then, on hash-routed files, incremental and batched decoding against the full
    forward, and for deepseek2 the latent-only cache. The cache paths are checked on the exact dense path
    (DSRUN_DENSE=torch): ggml's quantized kernels round differently at different row counts."""
    path = generate(tmp_path, variant, weight_type)
    with load(path) as eng:
        check_matches_llama_cpp(eng, path, TAU[weight_type])
    monkeypatch.setenv("DSRUN_DENSE", "torch")
    with load(path) as eng:
        if weight_type != "F32":
            check_incremental_and_batched_equal_full_forward(eng)
        if variant.startswith("ds2"):
            check_cache_holds_only_the_latent(eng)


def check_matches_llama_cpp(eng, path: Path, tau: float) -> None:
    prompts = [eng.tokenize(p) for p in PROMPTS]
    for i, (prompt, ref) in enumerate(zip(prompts, reference(path, prompts, n_greedy=N_GREEDY))):
        report = compare(eng.logits(prompt), ref.logits, tau)
        assert report.ok, f"logits of prompt {i}: {report}"
        parting = greedy_parting(ours_greedy(eng, prompt, N_GREEDY), ref, tau, eng.tokenizer.eog_ids)
        assert parting is None, f"greedy continuation of prompt {i}: {parting}"


def check_incremental_and_batched_equal_full_forward(eng) -> None:
    """On hash-routed files only: soft routers' closest calls (gaps of 1e-5) can flip between summation
    orders, which is routing sensitivity, not a cache error."""
    a, b = (eng.tokenize(p) for p in PROMPTS[:2])
    full_a, full_b = eng.logits(a), eng.logits(b)
    assert np.abs(incremental_logits(eng.model, a) - full_a).max() < 1e-4, "one token at a time"
    together = batched_logits(eng.model, [a, b])
    assert np.abs(together[0] - full_a).max() < 1e-4, "first of a batch of two"
    assert np.abs(together[1] - full_b).max() < 1e-4, "second of a batch of two"


def _grow_cache(model, tokens: list[int], n_more: int):
    """A fresh cache after `tokens`, then n_more decode steps: (cache, bytes used before, after)."""
    from dsrun.models.base import Batch

    cache = model.new_cache()
    model.forward(Batch.single(tokens, cache))
    before = cache.used_bytes()
    for _ in range(n_more):
        model.forward(Batch.single([42], cache))
    return cache, before, cache.used_bytes()


def check_cache_holds_only_the_latent(eng) -> None:
    c = eng.config
    cache, _, _ = _grow_cache(eng.model, eng.tokenize(PROMPTS[0]), 1)
    for layer in cache.layers:  # one float32 buffer per layer, kv_lora + rope wide
        assert [tuple(b.shape[1:]) for b in layer] == [(c.kv_lora_rank + c.qk_rope_dim,)]
        assert layer[0].dtype == torch.float32


def test_deepseek2_cache_grows_by_the_latent_per_token(tmp_path):
    from dsrun.gguf_file import GGUFFile
    from dsrun.models import deepseek2

    f = GGUFFile(generate(tmp_path, "ds2-kv_b-q-softmax", "F32"))
    c = deepseek2.Config.from_gguf(f)
    per_token = (c.kv_lora_rank + c.qk_rope_dim) * c.n_layer * 4
    cache, before, after = _grow_cache(deepseek2.Model(c, f), [1, 2, 3, 4, 5], 3)
    assert cache.bytes_per_token() == per_token
    assert after - before == 3 * per_token


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "grok.gguf"
    w = GGUFWriter(str(path), "grok")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="grok"):
        dsrun.load(path)
