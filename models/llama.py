"""The llama architecture (dense, and Mixtral-style with routed experts), as llama.cpp runs it.

Legend: T tokens in a step, n tokens of one sequence, H query heads, G KV heads, D head dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsrun.errors import UnsupportedModelError
from dsrun.gguf_file import GGUFFile

from .base import (
    Batch,
    LanguageModel,
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
from .gguf_matrix import linear, linears, swiglu
from .moe import MoEFFN, Routing


@dataclass(frozen=True)
class Config:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    norm_eps: float
    rope_dim: int
    rope_base: float
    rope_scale: float  # linear position scale (1 / rope.scaling.factor)
    n_expert: int = 0  # Mixtral-style routed experts; 0 for dense models
    n_expert_used: int = 0

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> Config:
        n_embd = f.require("embedding_length")
        n_head = f.require("attention.head_count")
        head_dim = f.get("attention.key_length", n_embd // n_head)
        scaling = f.get("rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise UnsupportedModelError(f"llama models with rope scaling '{scaling}' are not supported yet")
        factor = f.get("rope.scaling.factor", 1.0) if scaling == "linear" else 1.0
        return cls(
            n_layer=f.require("block_count"),
            n_embd=n_embd,
            n_ff=f.get("feed_forward_length", 0),
            n_head=n_head,
            n_head_kv=f.get("attention.head_count_kv", n_head),
            head_dim=head_dim,
            n_vocab=f.get("vocab_size") or len(f.meta["tokenizer.ggml.tokens"]),
            n_ctx_train=f.get("context_length", 4096),
            norm_eps=f.get("attention.layer_norm_rms_epsilon", 1e-5),
            rope_dim=f.get("rope.dimension_count", head_dim),
            rope_base=f.get("rope.freq_base", 10000.0),
            rope_scale=1.0 / factor,
            n_expert=f.get("expert_count", 0),
            n_expert_used=f.get("expert_used_count", 0),
        )


class Block:
    """One transformer layer; attributes carry the GGUF tensor names of `blk.N.*.weight`."""

    def __init__(self, cfg: Config, f: GGUFFile, i: int):
        def w(name: str):
            return load_linear(f, f"blk.{i}.{name}.weight")

        self.cfg = cfg
        self.attn_norm = load_weight(f, f"blk.{i}.attn_norm.weight")
        self.attn_q, self.attn_k, self.attn_v = w("attn_q"), w("attn_k"), w("attn_v")
        self.attn_output = w("attn_output")
        self.ffn_norm = load_weight(f, f"blk.{i}.ffn_norm.weight")
        # Mixtral: llama.cpp renormalizes the top-k softmax weights of llama-arch experts
        self.moe = MoEFFN(f, i, Routing.from_gguf(f, norm=True, gating="softmax")) if cfg.n_expert else None
        if self.moe is None:
            self.ffn_gate, self.ffn_up, self.ffn_down = w("ffn_gate"), w("ffn_up"), w("ffn_down")

    def attention(self, x: torch.Tensor, batch: Batch, layer: int, cos, sin) -> torch.Tensor:
        c = self.cfg
        q, k, v = linears(x, [self.attn_q, self.attn_k, self.attn_v])
        q = q.unflatten(-1, (c.n_head, c.head_dim))  # (T, H, D)
        k = k.unflatten(-1, (c.n_head_kv, c.head_dim))  # (T, G, D)
        v = v.unflatten(-1, (c.n_head_kv, c.head_dim))  # (T, G, D)
        q, k = apply_rope(q, cos, sin, neox=False), apply_rope(k, cos, sin, neox=False)
        out = torch.empty_like(q)
        for s in batch.seqs:
            k_all, v_all = s.cache.append(layer, k[s.rows], v[s.rows])  # (N, G, D) each
            out[s.rows] = attend(q[s.rows], k_all, v_all, s.cache.n, default_attn_scale(c.head_dim))
        return linear(out.flatten(1), self.attn_output)  # (T, n_embd)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        if self.moe is not None:
            return self.moe(x)
        return swiglu(x, self.ffn_gate, self.ffn_up, self.ffn_down)

    def __call__(self, x: torch.Tensor, batch: Batch, layer: int, cos, sin) -> torch.Tensor:
        x = x + self.attention(rms_norm(x, self.attn_norm, self.cfg.norm_eps), batch, layer, cos, sin)
        return x + self.ffn(rms_norm(x, self.ffn_norm, self.cfg.norm_eps))


class Model(LanguageModel):
    def __init__(self, cfg: Config, f: GGUFFile):
        super().__init__(cfg, f, Block)
        self.inv_freq = rope_inv_freq(cfg.rope_dim, cfg.rope_base, maybe_weight(f, "rope_freqs.weight"))

    def block_args(self, batch: Batch) -> tuple:
        return rope_cos_sin(batch.positions(), self.inv_freq, self.cfg.rope_scale)  # (cos, sin)
