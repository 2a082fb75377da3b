"""Qwen3-MoE (GGUF arch `qwen3moe`): grouped-query attention with per-head q/k RMS norms and NEOX RoPE,
every layer an MoE with renormalized top-k softmax weights and no shared expert, as llama.cpp runs it.

The Qwen2-MoE module reuses this model: it differs only in attention biases instead of q/k norms and a
sigmoid-gated shared expert, both picked up from the tensors present.

Legend: T tokens in a step, n tokens of one sequence, H query heads, G KV heads, Dh head dim,
D model width, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsrun.errors import UnsupportedModelError
from dsrun.gguf_file import GGUFFile

from .base import (
    Batch,
    LanguageModel,
    PreNormBlock,
    apply_rope,
    attend,
    default_attn_scale,
    load_linear,
    load_weight,
    maybe_weight,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
)
from .gguf_matrix import linear
from .moe import MoEFFN, Routing

NORM_TOP_K = True  # llama.cpp renormalizes qwen3moe's chosen weights whatever the file says


@dataclass(frozen=True)
class Config:
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    norm_eps: float
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_dim: int
    rope_base: float
    n_expert: int
    n_ff_exp: int
    routing: Routing

    @classmethod
    def from_gguf(cls, f: GGUFFile, *, norm_top_k: bool = NORM_TOP_K) -> Config:
        n_embd = f.require("embedding_length")
        n_head = f.require("attention.head_count")
        head_dim = f.get("attention.key_length", n_embd // n_head)
        scaling = f.get("rope.scaling.type", "none")
        if scaling != "none":
            raise UnsupportedModelError(f"{f.arch} models with rope scaling '{scaling}' are not supported")
        return cls(
            n_layer=f.require("block_count"),
            n_embd=n_embd,
            n_vocab=f.get("vocab_size") or len(f.meta["tokenizer.ggml.tokens"]),
            n_ctx_train=f.get("context_length", 4096),
            norm_eps=f.require("attention.layer_norm_rms_epsilon"),
            n_head=n_head,
            n_head_kv=f.get("attention.head_count_kv", n_head),
            head_dim=head_dim,
            rope_dim=f.get("rope.dimension_count", head_dim),
            rope_base=f.get("rope.freq_base", 10000.0),
            n_expert=f.require("expert_count"),
            n_ff_exp=f.get("expert_feed_forward_length", 0),
            routing=Routing.from_gguf(f, norm=norm_top_k, gating="softmax"),
        )


class Attention:
    """GQA with NEOX RoPE; q/k norms and q/k/v biases apply when the file has them."""

    def __init__(self, cfg: Config, f: GGUFFile, i: int):
        p = f"blk.{i}."
        self.cfg = cfg
        self.attn_q, self.attn_k, self.attn_v = (load_linear(f, f"{p}attn_{n}.weight") for n in "qkv")
        self.attn_q_bias, self.attn_k_bias, self.attn_v_bias = (
            maybe_weight(f, f"{p}attn_{n}.bias") for n in "qkv"
        )
        self.attn_q_norm = maybe_weight(f, f"{p}attn_q_norm.weight")  # (Dh,)
        self.attn_k_norm = maybe_weight(f, f"{p}attn_k_norm.weight")  # (Dh,)
        self.attn_output = load_linear(f, f"{p}attn_output.weight")  # (D, H*Dh)

    def project(self, x: torch.Tensor, weight, bias, norm, heads: int) -> torch.Tensor:
        y = linear(x, weight, bias).unflatten(-1, (heads, self.cfg.head_dim))  # (T, heads, Dh)
        return y if norm is None else rms_norm(y, norm, self.cfg.norm_eps)

    def __call__(self, x: torch.Tensor, batch: Batch, layer: int, cos, sin) -> torch.Tensor:
        c = self.cfg
        q = self.project(x, self.attn_q, self.attn_q_bias, self.attn_q_norm, c.n_head)  # (T, H, Dh)
        k = self.project(x, self.attn_k, self.attn_k_bias, self.attn_k_norm, c.n_head_kv)  # (T, G, Dh)
        v = self.project(x, self.attn_v, self.attn_v_bias, None, c.n_head_kv)  # (T, G, Dh)
        q, k = apply_rope(q, cos, sin, neox=True), apply_rope(k, cos, sin, neox=True)
        out = torch.empty_like(q)
        for s in batch.seqs:
            k_all, v_all = s.cache.append(layer, k[s.rows], v[s.rows])  # (N, G, Dh) each
            out[s.rows] = attend(q[s.rows], k_all, v_all, s.cache.n, default_attn_scale(c.head_dim))
        return linear(out.flatten(1), self.attn_output)  # (T, D)


class Block(PreNormBlock):
    def __init__(self, cfg: Config, f: GGUFFile, i: int):
        self.cfg = cfg
        self.attn_norm = load_weight(f, f"blk.{i}.attn_norm.weight")
        self.attn = Attention(cfg, f, i)
        self.ffn_norm = load_weight(f, f"blk.{i}.ffn_norm.weight")
        self.ffn = MoEFFN(f, i, cfg.routing)


class Model(LanguageModel):
    def __init__(self, cfg: Config, f: GGUFFile):
        super().__init__(cfg, f, Block)
        self.inv_freq = rope_inv_freq(cfg.rope_dim, cfg.rope_base)

    def block_args(self, batch: Batch) -> tuple:
        return rope_cos_sin(batch.positions(), self.inv_freq)  # (cos, sin)
