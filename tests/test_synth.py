"""The MoE model generator: file layout and keys per architecture, weight types, streaming, determinism,
routing structure (skew, locality, hash), presets and the command line. Models are tiny (n_embd 64-256)."""

from __future__ import annotations

import argparse
import hashlib

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from dsrun import synth
from dsrun.errors import InvalidRequestError
from dsrun.gguf_file import GGUFFile
from dsrun.synth import make_spec, synthesize

TINY = dict(
    n_embd=64, n_layer=2, n_expert=8, n_expert_used=2, n_ff_exp=32, head_dim=16, n_ff=64, n_ff_shexp=64
)


def test_deepseek2_split_layout_keys_and_shapes(tmp_path):
    path = synthesize(
        tmp_path / "ds.gguf", "deepseek2", q_lora_rank=48, gating="sigmoid", n_group=4, topk_group=2, **TINY
    )
    f = GGUFFile(path)
    s = make_spec("deepseek2", q_lora_rank=48, **TINY)
    C, R, P, Dv, H = s.kv_lora_rank, s.qk_rope_dim, s.qk_nope_dim, s.v_head_dim, s.n_head
    assert f.arch == "deepseek2"
    assert f.get("attention.head_count_kv") == 1
    assert f.get("attention.key_length") == C + R and f.get("attention.value_length") == C
    assert f.get("attention.key_length_mla") == P + R and f.get("attention.value_length_mla") == Dv
    assert f.get("expert_gating_func") == 2 and f.get("expert_group_count") == 4
    assert f.tensors["blk.0.ffn_gate.weight"].shape == (s.n_ff, 64)  # leading dense layer
    assert f.tensors["blk.1.attn_k_b.weight"].shape == (H, C, P)
    assert f.tensors["blk.1.attn_v_b.weight"].shape == (H, Dv, C)
    assert f.tensors["blk.1.attn_q_b.weight"].shape == (H * (P + R), 48)
    assert f.tensors["blk.1.ffn_gate_exps.weight"].shape == (8, 32, 64)
    assert f.tensors["blk.1.ffn_down_exps.weight"].shape == (8, 64, 32)
    assert f.tensors["blk.1.exp_probs_b.bias"].shape == (8,)
    assert "blk.1.attn_kv_b.weight" not in f.tensors and "blk.1.attn_q.weight" not in f.tensors
    assert len(f.meta["tokenizer.ggml.tokens"]) == f.tensors["token_embd.weight"].shape[0]


def test_deepseek2_older_layout_and_yarn_keys(tmp_path):
    path = synthesize(tmp_path / "ds.gguf", "deepseek2", mla_layout="kv_b", yarn_factor=40.0,
                      yarn_mscale_all_dim=0.707, **TINY)  # fmt: skip
    f = GGUFFile(path)
    s = make_spec("deepseek2", **TINY)
    assert f.get("attention.head_count_kv") == s.n_head
    assert f.get("attention.key_length") == s.qk_nope_dim + s.qk_rope_dim
    assert f.get("attention.key_length_mla") is None
    assert f.tensors["blk.1.attn_kv_b.weight"].shape == (
        s.n_head * (s.qk_nope_dim + s.v_head_dim),
        s.kv_lora_rank,
    )
    assert f.get("rope.scaling.type") == "yarn"
    assert f.get("rope.scaling.yarn_log_multiplier") == pytest.approx(0.0707)  # 0.1 x mscale_all_dim
    assert "blk.1.exp_probs_b.bias" not in f.tensors  # softmax routing has no selection bias


GQA_TENSORS = [  # (arch, GGUF arch, tensors of blk.1 present, absent)
    ("qwen3moe", "qwen3moe", ["attn_q_norm.weight", "attn_k_norm.weight"],
     ["attn_q.bias", "ffn_up_shexp.weight"]),
    ("qwen2moe", "qwen2moe", ["attn_q.bias", "ffn_up_shexp.weight", "ffn_gate_inp_shexp.weight"],
     ["attn_q_norm.weight"]),
    ("mixtral", "llama", ["ffn_gate_exps.weight"], ["attn_q_norm.weight", "ffn_up_shexp.weight"]),
]  # fmt: skip


@pytest.mark.parametrize("arch, gguf_arch, present, absent", GQA_TENSORS)
def test_gqa_architectures(tmp_path, arch, gguf_arch, present, absent):
    f = GGUFFile(synthesize(tmp_path / "m.gguf", arch, **TINY))
    assert f.arch == gguf_arch
    assert f.get("expert_count") == 8 and f.get("expert_used_count") == 2
    for name in present:
        assert f"blk.1.{name}" in f.tensors
    for name in absent:
        assert f"blk.1.{name}" not in f.tensors


def test_weight_types_and_fallbacks(tmp_path):
    spec = dict(TINY, n_embd=256, n_ff_exp=256)
    f = GGUFFile(synthesize(tmp_path / "q.gguf", "deepseek2", weight_type="Q4_K", **spec))
    types = {name: t.qtype for name, t in f.tensors.items()}
    assert types["blk.1.ffn_gate_exps.weight"] == Q.Q4_K  # rows of 256 split into K-quant blocks
    assert types["token_embd.weight"] == Q.Q4_K
    assert types["blk.1.attn_k_b.weight"] == Q.Q8_0  # rows of 32 (nope dims) do not: Q8_0
    assert types["blk.1.ffn_gate_inp.weight"] == Q.F32  # routers stay F32, as llama.cpp keeps them
    assert types["blk.1.attn_norm.weight"] == Q.F32
    f16 = GGUFFile(synthesize(tmp_path / "h.gguf", "qwen3moe", weight_type="F16", **TINY))
    assert f16.tensors["blk.0.attn_q.weight"].qtype == Q.F16


def test_quantized_bytes_are_ggmls_own(tmp_path):
    """Q8_0 through ggml's quantizer decodes within Q8_0's rounding of the F32 file's values."""
    from dsrun.quants import dequantize

    exact = GGUFFile(synthesize(tmp_path / "f.gguf", "qwen3moe", **TINY)).tensors["blk.0.ffn_up_exps.weight"]
    q8 = GGUFFile(synthesize(tmp_path / "q.gguf", "qwen3moe", weight_type="Q8_0", **TINY)).tensors[
        "blk.0.ffn_up_exps.weight"
    ]
    assert q8.qtype == Q.Q8_0
    values = dequantize(q8.data, q8.qtype, q8.shape).numpy()
    step = np.abs(exact.data).reshape(-1, 32).max(-1) / 127  # Q8_0's step per 32-block
    # half a step, plus what rounding the step to f16 costs over 127 steps
    assert (np.abs(values - exact.data).reshape(-1, 32) <= step[:, None] * 0.6).all()


@pytest.mark.parametrize("weight_type", ["Q4_K", "Q8_0"])
def test_random_expert_blocks_have_the_fills_spread(tmp_path, weight_type):
    """Experts written as random bits decode to zero-centred weights at 1/sqrt(fan-in), like the quantized
    fill; the other tensors are still quantized from floats (same bytes as without the option)."""
    from dsrun.quants import dequantize

    spec = dict(TINY, n_embd=256, n_ff_exp=256)
    fast = GGUFFile(
        synthesize(
            tmp_path / "r.gguf", "deepseek2", weight_type=weight_type, random_expert_blocks=True, **spec
        )
    )
    slow = GGUFFile(synthesize(tmp_path / "q.gguf", "deepseek2", weight_type=weight_type, **spec))
    for name in ("blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight"):
        t = fast.tensors[name]
        values = dequantize(t.data, t.qtype, t.shape).numpy()
        assert abs(values.std() * np.sqrt(t.shape[-1]) - 1) < 0.1 and abs(values.mean()) < 0.1 * values.std()
        assert not np.array_equal(t.data, slow.tensors[name].data)
    assert np.array_equal(
        fast.tensors["blk.1.attn_output.weight"].data, slow.tensors["blk.1.attn_output.weight"].data
    )


def test_streams_in_bounded_chunks(tmp_path, monkeypatch):
    """A tensor never passes through memory whole: with a 4096-float chunk, every encoded piece is small."""
    sizes = []
    real_encode = synth.encode

    def spy(rows, qtype):
        sizes.append(rows.size)
        return real_encode(rows, qtype)

    monkeypatch.setattr(synth, "CHUNK_FLOATS", 4096)
    monkeypatch.setattr(synth, "encode", spy)
    f = GGUFFile(synthesize(tmp_path / "s.gguf", "qwen2moe", weight_type="Q8_0", **TINY))
    assert max(sizes) <= 4096
    assert f.tensors["output.weight"].shape[0] * 64 > 100 * 4096  # the head alone took many chunks


def test_same_seed_same_file_other_seed_other_weights(tmp_path):
    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    a = synthesize(tmp_path / "a.gguf", "mixtral", seed=3, **TINY)
    b = synthesize(tmp_path / "b.gguf", "mixtral", seed=3, **TINY)
    c = synthesize(tmp_path / "c.gguf", "mixtral", seed=4, **TINY)
    assert digest(a) == digest(b) != digest(c)


def _routing_trace(path, n_tokens=400):
    """Expert ids (T, K) per MoE layer when dsrun runs random token ids through the model."""
    from dsrun.models import qwen3moe
    from dsrun.models.base import Batch
    from dsrun.models.moe import MoEFFN

    f = GGUFFile(path)
    model = qwen3moe.Model(qwen3moe.Config.from_gguf(f), f)
    trace = []
    route = MoEFFN.route

    def spy(self, x):
        ids, weights = route(self, x)
        trace.append(ids)
        return ids, weights

    tokens = torch.randint(0, 49152, (n_tokens,), generator=torch.Generator().manual_seed(0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MoEFFN, "route", spy)
        model.forward(Batch.single(tokens, model.new_cache()))
    return tokens, trace


def _top_share(ids: torch.Tensor) -> float:
    return float(torch.bincount(ids.flatten(), minlength=16).max()) / ids.numel()


def _reuse(ids: torch.Tensor) -> float:
    """Mean share of a token's experts that the next token also uses."""
    sets = [set(row) for row in ids.tolist()]
    return float(np.mean([len(a & b) / len(a) for a, b in zip(sets, sets[1:])]))


SKEW_MODEL = dict(TINY, n_embd=128, n_layer=3, n_expert=16, head_dim=32)


def test_skew_concentrates_popularity(tmp_path):
    _, flat = _routing_trace(synthesize(tmp_path / "u.gguf", "qwen3moe", **SKEW_MODEL))
    _, skewed = _routing_trace(synthesize(tmp_path / "z.gguf", "qwen3moe", skew=1.5, **SKEW_MODEL))
    for uniform, zipf in zip(flat, skewed):
        assert _top_share(uniform) < 0.15  # ~1/16 each
        assert _top_share(zipf) > 0.3


def test_locality_makes_consecutive_tokens_share_experts(tmp_path):
    _, independent = _routing_trace(synthesize(tmp_path / "a.gguf", "qwen3moe", **SKEW_MODEL))
    _, local = _routing_trace(synthesize(tmp_path / "b.gguf", "qwen3moe", locality=1.0, **SKEW_MODEL))
    for a, b in zip(independent, local):
        assert _reuse(a[16:]) < 0.25  # ~K/E = 1/8 by chance
        assert _reuse(b[16:]) > 0.5


def test_hash_routing_gives_each_token_its_own_experts(tmp_path):
    tokens, trace = _routing_trace(synthesize(tmp_path / "h.gguf", "qwen3moe", router="hash", **SKEW_MODEL))
    for ids in trace:
        first = {}
        for t, row in zip(tokens.tolist(), ids.tolist()):
            assert first.setdefault(t, set(row)) == set(row)  # a token id meets the same experts every time


def test_presets_have_real_layer_shapes():
    spec = make_spec(preset="deepseek-v3", n_layer=4)
    g = synth.Generator(spec, "soft", 0.0, 0.0, 0, n_vocab=129280)
    shapes = {t.name: t.shape for t in synth.plan(spec, g)}
    assert shapes["blk.3.ffn_gate_exps.weight"] == (256, 2048, 7168)
    assert shapes["blk.3.attn_q_a.weight"] == (1536, 7168)
    assert shapes["blk.0.ffn_up.weight"] == (18432, 7168)  # the first three layers are dense
    expert_bytes = synth.nbytes((2048, 7168), Q.Q4_K) * 3
    assert expert_bytes == 3 * 2048 * 7168 // 256 * 144  # 44 M parameters at 4.5 bits


def test_bad_specs_are_refused():
    with pytest.raises(InvalidRequestError, match="topk_group"):
        make_spec("deepseek2", n_expert=16, n_group=4, topk_group=4)
    with pytest.raises(InvalidRequestError, match="unknown synth option"):
        make_spec("deepseek2", n_experts=16)
    with pytest.raises(InvalidRequestError, match="preset"):
        make_spec(preset="deepseek-v9")
    with pytest.raises(InvalidRequestError, match="locality"):
        synthesize("/nonexistent/x.gguf", "qwen3moe", router="hash", locality=0.5)


def test_command_line(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    out = tmp_path / "cli.gguf"
    args = parser.parse_args(
        ["-o", str(out), "--arch", "qwen2moe", "--layers", "1", "--type", "Q8_0", "--set", "n_embd=64",
         "--set", "n_expert=4", "--set", "head_dim=16", "--set", "n_ff_exp=32"]
    )  # fmt: skip
    assert synth.run(args) == 0
    assert "wrote" in capsys.readouterr().out
    f = GGUFFile(out)
    assert f.get("block_count") == 1 and f.get("expert_count") == 4
