"""DeepSeek-V2/V3/R1 and Kimi-K2 (GGUF arch `deepseek2`): MLA attention, leading dense layers, then MoE
layers with shared experts, as llama.cpp runs them.

Attention always runs in the absorbed form: the cache keeps only each token's compressed latent and
its rotated rope key, and the per-head key/value up-projections are folded into the query and output.
Both GGUF layouts (one `attn_kv_b`, or split `attn_k_b`/`attn_v_b`) load into that form.

Legend: T tokens in a step, n tokens of one sequence, N cached positions, H heads, D model width,
C kv_lora rank (the latent), R rope dims, P nope dims (P + R = query/key head dim), Dv value head dim,
V vocab.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsrun.errors import UnsupportedModelError
from dsrun.gguf_file import GGUFFile

from .base import (
    Batch,
    LanguageModel,
    PreNormBlock,
    apply_rope,
    attend_one_row,
    by_query_blocks,
    causal_mask,
    load_linear,
    load_weight,
    maybe_weight,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
)
from .gguf_matrix import (
    REUSED_ROWS,
    GGUFMatrix,
    Graph,
    host_float,
    kept_graph,
    linear,
    linears,
    load_heads,
    per_head,
    rms_norm_node,
    swiglu_node,
)
from .moe import MoEFFN, Routing, SwiGLU

YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0  # llama.cpp's YaRN correction range (its defaults)


@dataclass(frozen=True)
class Config:
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    norm_eps: float
    n_head: int
    q_lora_rank: int  # 0: one attn_q projection; else attn_q_a -> norm -> attn_q_b
    kv_lora_rank: int  # C: width of the cached latent
    qk_nope_dim: int  # P
    qk_rope_dim: int  # R
    v_head_dim: int  # Dv
    n_ff: int  # width of the leading dense layers' FFN
    n_layer_dense_lead: int
    n_ff_exp: int
    n_expert: int
    n_expert_shared: int
    routing: Routing
    rope_base: float
    rope_freq_scale: float  # 1 / rope.scaling.factor under YaRN, else 1
    yarn: bool
    yarn_orig_ctx: int  # context the frequencies were trained for (rope.scaling.original_context_length)
    yarn_log_mul: float  # DeepSeek's mscale_all_dim: the GGUF stores 0.1 x this
    rope_attn_factor: float  # rope.scaling.attn_factor, 1 in every released model

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> Config:
        n_embd = f.require("embedding_length")
        n_head = f.require("attention.head_count")
        rope = f.require("rope.dimension_count")
        if f.get("attention.key_length_mla") is not None:  # split attn_k_b / attn_v_b layout
            qk_head, v_head = f.require("attention.key_length_mla"), f.require("attention.value_length_mla")
        else:
            qk_head = f.get("attention.key_length", n_embd // n_head)
            v_head = f.get("attention.value_length", qk_head)
        scaling = f.get("rope.scaling.type", "none")
        if scaling not in ("none", "yarn"):
            raise UnsupportedModelError(f"deepseek2 models with rope scaling '{scaling}' are not supported")
        yarn = scaling == "yarn"
        n_ctx_train = f.get("context_length", 4096)
        return cls(
            n_layer=f.require("block_count"),
            n_embd=n_embd,
            n_vocab=f.get("vocab_size") or len(f.meta["tokenizer.ggml.tokens"]),
            n_ctx_train=n_ctx_train,
            norm_eps=f.require("attention.layer_norm_rms_epsilon"),
            n_head=n_head,
            q_lora_rank=f.get("attention.q_lora_rank", 0),
            kv_lora_rank=f.require("attention.kv_lora_rank"),
            qk_nope_dim=qk_head - rope,
            qk_rope_dim=rope,
            v_head_dim=v_head,
            n_ff=f.get("feed_forward_length", 0),
            n_layer_dense_lead=f.get("leading_dense_block_count", 0),
            n_ff_exp=f.require("expert_feed_forward_length"),
            n_expert=f.require("expert_count"),
            n_expert_shared=f.get("expert_shared_count", 0),
            routing=Routing.from_gguf(f),
            rope_base=f.get("rope.freq_base", 10000.0),
            rope_freq_scale=1.0 / f.require("rope.scaling.factor") if yarn else 1.0,
            yarn=yarn,
            yarn_orig_ctx=f.get("rope.scaling.original_context_length") or n_ctx_train,
            yarn_log_mul=f.get("rope.scaling.yarn_log_multiplier", 0.0) / 0.1,
            rope_attn_factor=f.get("rope.scaling.attn_factor", 1.0),
        )


def yarn_inv_freq(cfg: Config) -> torch.Tensor:
    """Per-pair rotation speeds (R/2,): YaRN blends interpolated (slowed by freq_scale) and original
    speeds with a ramp over the pair index, as ggml's rope_yarn does with ext_factor 1."""
    dim, base = cfg.qk_rope_dim, cfg.rope_base
    inv = rope_inv_freq(dim, base)  # (R/2,) float64
    if not cfg.yarn:
        return inv

    def corr_dim(n_rot: float) -> float:  # pair index whose wavelength fits n_rot times in the old context
        return dim * math.log(cfg.yarn_orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(0.0, math.floor(corr_dim(YARN_BETA_FAST)))
    high = min(dim - 1.0, math.ceil(corr_dim(YARN_BETA_SLOW)))
    pair = torch.arange(dim // 2, dtype=torch.float64)
    keep = 1 - ((pair - low) / max(0.001, high - low)).clamp(0, 1)  # 1: fast pairs keep their speed
    return inv * (cfg.rope_freq_scale * (1 - keep) + keep)


def rope_magnitude_and_kq_scale(cfg: Config) -> tuple[float, float]:
    """The factor on rotated q/k and the softmax scale, llama.cpp's way (context setup plus the deepseek2
    graph): with a yarn_log_multiplier the rotation magnitude stays 1 and mscale^2 goes into the scale."""
    ln_factor = -math.log(cfg.rope_freq_scale)  # 0 without YaRN
    gain = 1 + 0.1 * ln_factor  # ggml's rope multiplies this in under YaRN
    ctx_attn = cfg.rope_attn_factor  # the context's yarn_attn_factor
    if cfg.yarn:  # llama.cpp pre-divides by the gain ggml will multiply back
        ctx_attn *= (1.0 if cfg.yarn_log_mul or ln_factor <= 0 else gain) / gain
    magnitude = ctx_attn * gain
    mscale = magnitude * (1 + 0.1 * cfg.yarn_log_mul * ln_factor)
    return magnitude, mscale * mscale / math.sqrt(cfg.qk_nope_dim + cfg.qk_rope_dim)


def attend_latent(
    q: torch.Tensor, kv: torch.Tensor, n_latent: int, start: int | torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of every head over one shared key per position (MQA without copying the cache).

    q (n, H, C + R); kv (N, C + R), whose first C columns are also the values; returns (n, H, C).
    """
    return by_query_blocks(
        lambda qb, n_keys, s: attend_latent_block(qb, kv[:n_keys], n_latent, s, scale), q, kv.shape[0], start
    )


def attend_latent_block(
    q: torch.Tensor, kv: torch.Tensor, n_latent: int, start: int | torch.Tensor, scale: float
) -> torch.Tensor:
    """attend_latent for rows whose scores fit at once."""
    n, H, width = q.shape
    # one new row sees the whole cache: no mask (building one cost more than the attention at decode);
    # but a start on the device is a recorded step over a fixed-length cache, not written past it
    whole = n == 1 and not torch.is_tensor(start)
    if whole and q.device.type == "cpu":
        return attend_one_row(q, kv[:, None], kv[:, None, :n_latent], scale)  # one group: MQA
    mask = None if whole else causal_mask(start, n, kv.shape[0], q.device).repeat_interleave(H, dim=0)
    out = F.scaled_dot_product_attention(
        q.reshape(1, n * H, width), kv[None], kv[None, :, :n_latent], attn_mask=mask, scale=scale
    )  # (1, n*H, C)
    return out.view(n, H, n_latent)


class Attention:
    """Multi-head latent attention; attributes carry the GGUF tensor names of `blk.N.*.weight`."""

    def __init__(self, cfg: Config, f: GGUFFile, i: int):
        def w(name: str) -> torch.Tensor:
            return load_weight(f, f"blk.{i}.{name}.weight")

        def proj(name: str):
            return load_linear(f, f"blk.{i}.{name}.weight")

        def heads(name: str, shape: tuple[int, int, int]):  # left quantized where ggml runs it
            info = f.tensor(f"blk.{i}.{name}.weight")
            stack = load_heads(info) if tuple(info.shape) == shape else None
            return w(name).view(shape) if stack is None else stack

        self.cfg = cfg
        H, C, P, Dv = cfg.n_head, cfg.kv_lora_rank, cfg.qk_nope_dim, cfg.v_head_dim
        if cfg.q_lora_rank:
            self.attn_q_a, self.attn_q_a_norm, self.attn_q_b = (
                proj("attn_q_a"),
                w("attn_q_a_norm"),
                proj("attn_q_b"),
            )
        else:
            self.attn_q = proj("attn_q")  # (H*(P+R), D)
        self.attn_kv_a_mqa = proj("attn_kv_a_mqa")  # (C+R, D)
        self.attn_kv_a_norm = w("attn_kv_a_norm")  # (C,)
        kv_b = maybe_weight(f, f"blk.{i}.attn_kv_b.weight")  # (H*(P+Dv), C) in the older layout
        if kv_b is not None:
            kv_b = kv_b.view(H, P + Dv, C)  # (H, P+Dv, C)
            self.attn_k_b = kv_b[:, :P].transpose(1, 2).contiguous()  # (H, C, P)
            self.attn_v_b = kv_b[:, P:].contiguous()  # (H, Dv, C)
        else:  # quantized, 4-7x fewer bytes a token than float32
            self.attn_k_b = heads("attn_k_b", (H, C, P))  # (H, C, P)
            self.attn_v_b = heads("attn_v_b", (H, Dv, C))  # (H, Dv, C)
        self.attn_output = proj("attn_output")  # (D, H*Dv)

    def __call__(
        self, x: torch.Tensor, batch: Batch, layer: int, rope: tuple, kq_scale: float
    ) -> torch.Tensor:
        c = self.cfg
        cos, sin = rope
        # the query's first projection and the latent's read the same x: one ggml graph
        q, kv_a = linears(x, [self.attn_q_a if c.q_lora_rank else self.attn_q, self.attn_kv_a_mqa])
        if c.q_lora_rank:
            q = linear(rms_norm(q, self.attn_q_a_norm, c.norm_eps), self.attn_q_b)
        q = q.unflatten(-1, (c.n_head, c.qk_nope_dim + c.qk_rope_dim))  # (T, H, P+R)
        q_nope, q_pe = q.split([c.qk_nope_dim, c.qk_rope_dim], dim=-1)  # (T, H, P), (T, H, R)
        latent, k_pe = kv_a.split([c.kv_lora_rank, c.qk_rope_dim], dim=-1)  # (T, C), (T, R)
        latent = rms_norm(latent, self.attn_kv_a_norm, c.norm_eps)  # (T, C)
        k_pe = apply_rope(k_pe[:, None, :], cos, sin, neox=False)[:, 0]  # (T, R)
        q_latent = per_head(q_nope, self.attn_k_b)  # (T, H, C): k_b folded into q
        q = torch.cat([q_latent, apply_rope(q_pe, cos, sin, neox=False)], dim=-1)  # (T, H, C+R)
        kv_new = torch.cat([latent, k_pe], dim=-1)  # (T, C+R): all this layer caches per token
        heads = per_head(self.attend(q, kv_new, batch, layer, kq_scale), self.attn_v_b)  # (T, H, Dv)
        return linear(heads.flatten(1), self.attn_output)  # (T, D): v_b folded into the output

    def attend(
        self, q: torch.Tensor, kv_new: torch.Tensor, batch: Batch, layer: int, kq_scale: float
    ) -> torch.Tensor:
        """Each sequence's queries q (T, H, C+R) over its cache, after kv_new (T, C+R) is appended to it:
        the latent output (T, H, C)."""
        C = self.cfg.kv_lora_rank
        out = torch.empty(q.shape[0], self.cfg.n_head, C, device=q.device)  # (T, H, C)
        for s in batch.seqs:
            (kv,) = s.cache.append(layer, kv_new[s.rows])  # (N, C+R)
            out[s.rows] = attend_latent(q[s.rows], kv, C, s.cache.n, kq_scale)
        return out

    def on_ggml(self) -> bool:
        """Every projection is ggml's (a CPU layer of a quantized file), k_b and v_b too or on the CPU in
        float32 (the attn_kv_b layout): the layer can run as ggml graphs."""
        names = ("attn_q_a", "attn_q_b") if self.cfg.q_lora_rank else ("attn_q",)
        names += ("attn_kv_a_mqa", "attn_output")
        heads = (self.attn_k_b, self.attn_v_b)
        return all(isinstance(getattr(self, n), GGUFMatrix) for n in names) and all(
            isinstance(w, GGUFMatrix) or w.device.type == "cpu" for w in heads
        )


class Block(PreNormBlock):
    def __init__(self, cfg: Config, f: GGUFFile, i: int):
        self.cfg = cfg
        self.attn_norm = load_weight(f, f"blk.{i}.attn_norm.weight")
        self.attn = Attention(cfg, f, i)
        self.ffn_norm = load_weight(f, f"blk.{i}.ffn_norm.weight")
        self.ffn = SwiGLU(f, f"blk.{i}.") if i < cfg.n_layer_dense_lead else MoEFFN(f, i, cfg.routing)
        self.graphs: LayerGraphs | None | bool = False  # made on the first step, once the layer is placed

    def __call__(
        self, x: torch.Tensor, batch: Batch, layer: int, rope: tuple, kq_scale: float
    ) -> torch.Tensor:
        if self.graphs is False:
            self.graphs = LayerGraphs(self) if x.device.type == "cpu" and LayerGraphs.fits(self) else None
        if self.graphs is None:
            return super().__call__(x, batch, layer, rope, kq_scale)
        q, kv_new = self.graphs.queries(x, batch.positions())
        out = self.attn.attend(q, kv_new, batch, layer, kq_scale)  # (T, H, C)
        if isinstance(self.ffn, SwiGLU):
            return self.graphs.rest(out, x)[0]
        base, xn, logits = self.graphs.rest(out, x)  # residual + shared experts, normed x, router logits
        return base + self.ffn.routed(xn, logits)


class LayerGraphs:
    """A CPU block of a quantized file as two ggml graphs around the cached attention, kept per row count
    for small steps: torch ops between ggml's cost 5-20 us each there, dozens a layer.

    `queries`: x -> attn_norm -> the queries (rope on the last R dims, k_b folded in) and the new cache row
    (normed latent, roped key). `rest`: the latent attention output -> v_b -> attn_output, + x, ffn_norm,
    then the dense FFN + residual; or for a MoE layer the residual plus the shared experts, the normed x and
    the router logits, so only routing and the routed experts run outside.
    """

    def __init__(self, block: Block):
        self.attn, self.ffn, self.cfg = block.attn, block.ffn, block.cfg  # not the block: walkers recurse
        a, ffn, c = block.attn, block.ffn, block.cfg
        self.attn_norm, self.ffn_norm = host_float(block.attn_norm), host_float(block.ffn_norm)
        self.kv_a_norm = host_float(a.attn_kv_a_norm)
        self.q_a_norm = host_float(a.attn_q_a_norm) if c.q_lora_rank else None
        self.router = host_float(ffn.ffn_gate_inp) if isinstance(ffn, MoEFFN) else None
        self.k_b, self.v_b = (
            w if isinstance(w, GGUFMatrix) else host_float(w) for w in (a.attn_k_b, a.attn_v_b)
        )
        # ggml turns pair i by position * base^(-2i/R) / factor_i: the factors give YaRN's speeds
        speeds = yarn_inv_freq(c)  # (R/2,)
        self.rope_factors = host_float(rope_inv_freq(c.qk_rope_dim, c.rope_base) / speeds)
        self.rope_magnitude = rope_magnitude_and_kq_scale(c)[0]
        self.lead = a.attn_q_a if c.q_lora_rank else a.attn_q  # keeps the graphs

    @staticmethod
    def fits(block: Block) -> bool:
        """Every matrix is ggml's, and the FFN is one these graphs build (no Qwen-style shared gate)."""
        ffn = block.ffn
        if isinstance(ffn, MoEFFN):
            if ffn.ffn_gate_inp_shexp is not None:
                return False
            swiglus = [] if ffn.shexp is None else [ffn.shexp]
        else:
            swiglus = [ffn]
        matrices = [w for m in swiglus for w in vars(m).values()]
        return block.attn.on_ggml() and all(isinstance(w, GGUFMatrix) for w in matrices)

    def queries(self, x: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """q (T, H, C+R) and the cache rows (T, C+R) of x (T, D) at positions (T,)."""
        c, T = self.cfg, x.shape[0]
        inputs = [((T, c.n_embd), torch.float32), ((T,), torch.int32)]
        outputs = [(T, c.n_head, c.kv_lora_rank + c.qk_rope_dim), (T, c.kv_lora_rank + c.qk_rope_dim)]
        build = functools.partial(self.build_queries, T)
        graph = kept_graph(self.lead, ("mla queries", T), T, lambda: Graph(inputs, outputs, build))
        return graph([x, positions], torch.get_num_threads(), copy=T > REUSED_ROWS)  # kept: used this step

    def rest(self, out: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
        """The block's output (T, D) from attention's `out` (T, H, C) and the block's input x (T, D); for a
        MoE layer (x + attention + shared experts, the FFN's normed input, router logits (T, E))."""
        c, T = self.cfg, x.shape[0]
        inputs = [((T, c.n_head, c.kv_lora_rank), torch.float32), ((T, c.n_embd), torch.float32)]
        outputs = [(T, c.n_embd)] + ([(T, c.n_embd), (T, c.n_expert)] if self.router is not None else [])
        build = functools.partial(self.build_rest, T)
        graph = kept_graph(self.attn.attn_output, ("mla rest", T), T, lambda: Graph(inputs, outputs, build))
        return graph([out, x], torch.get_num_threads(), copy=T > REUSED_ROWS)

    def build_queries(self, T: int, lib, ctx, x, positions) -> list:
        """x ne (D, T), positions ne (T,) -> q ne (C+R, H, T), the cache rows ne (C+R, 1, T)."""
        a, c = self.attn, self.cfg
        H, C, P, R = c.n_head, c.kv_lora_rank, c.qk_nope_dim, c.qk_rope_dim
        cur = rms_norm_node(lib, ctx, x, self.attn_norm, c.norm_eps)
        if c.q_lora_rank:
            q_a = rms_norm_node(
                lib, ctx, lib.ggml_mul_mat(ctx, a.attn_q_a.tensor, cur), self.q_a_norm, c.norm_eps
            )
            q = lib.ggml_mul_mat(ctx, a.attn_q_b.tensor, q_a)  # ne (H*(P+R), T)
        else:
            q = lib.ggml_mul_mat(ctx, a.attn_q.tensor, cur)  # ne (H*(P+R), T)
        head, row = 4 * (P + R), 4 * (P + R) * H
        q_nope = lib.ggml_view_3d(ctx, q, P, H, T, head, row, 0)  # ne (P, H, T)
        q_pe = self.rope(
            lib, ctx, lib.ggml_view_3d(ctx, q, R, H, T, head, row, 4 * P), positions
        )  # (R, H, T)
        q_latent = lib.ggml_mul_mat(
            ctx, self.k_b.tensor, lib.ggml_permute(ctx, q_nope, 0, 2, 1, 3)
        )  # (C, T, H)
        q_out = lib.ggml_concat(ctx, lib.ggml_permute(ctx, q_latent, 0, 2, 1, 3), q_pe, 0)  # ne (C+R, H, T)
        kv_a = lib.ggml_mul_mat(ctx, a.attn_kv_a_mqa.tensor, cur)  # ne (C+R, T)
        latent = rms_norm_node(
            lib, ctx, lib.ggml_view_2d(ctx, kv_a, C, T, 4 * (C + R), 0), self.kv_a_norm, c.norm_eps
        )
        k_pe = lib.ggml_view_3d(ctx, kv_a, R, 1, T, 4 * (C + R), 4 * (C + R), 4 * C)  # ne (R, 1, T)
        kv_new = lib.ggml_concat(
            ctx, lib.ggml_reshape_3d(ctx, latent, C, 1, T), self.rope(lib, ctx, k_pe, positions), 0
        )  # ne (C+R, 1, T)
        return [q_out, kv_new]

    def rope(self, lib, ctx, x, positions):
        """ggml's NORM-mode rope of x ne (R, heads, T), llama.cpp's rotation for deepseek2."""
        c = self.cfg
        return lib.ggml_rope_ext(
            ctx, x, positions, self.rope_factors.tensor, c.qk_rope_dim, 0, c.yarn_orig_ctx,
            c.rope_base, 1.0, 0.0, self.rope_magnitude, 0.0, 0.0,
        )  # fmt: skip

    def build_rest(self, T: int, lib, ctx, out, x) -> list:
        """out ne (C, H, T), x ne (D, T) -> the outputs `rest` names, each ne (width, T)."""
        a, ffn, c = self.attn, self.ffn, self.cfg
        v = lib.ggml_mul_mat(ctx, self.v_b.tensor, lib.ggml_permute(ctx, out, 0, 2, 1, 3))  # ne (Dv, T, H)
        heads = lib.ggml_cont_2d(ctx, lib.ggml_permute(ctx, v, 0, 2, 1, 3), c.n_head * c.v_head_dim, T)
        h = lib.ggml_add(ctx, x, lib.ggml_mul_mat(ctx, a.attn_output.tensor, heads))  # ne (D, T)
        xn = rms_norm_node(lib, ctx, h, self.ffn_norm, c.norm_eps)
        if self.router is None:
            return [lib.ggml_add(ctx, h, swiglu_node(lib, ctx, xn, ffn.ffn_gate, ffn.ffn_up, ffn.ffn_down))]
        base = h
        if ffn.shexp is not None:
            s = ffn.shexp
            base = lib.ggml_add(ctx, h, swiglu_node(lib, ctx, xn, s.ffn_gate, s.ffn_up, s.ffn_down))
        return [base, xn, lib.ggml_mul_mat(ctx, self.router.tensor, xn)]  # logits ne (E, T)


class Model(LanguageModel):
    def __init__(self, cfg: Config, f: GGUFFile):
        super().__init__(cfg, f, Block)
        self.inv_freq = yarn_inv_freq(cfg)
        self.rope_magnitude, self.kq_scale = rope_magnitude_and_kq_scale(cfg)

    def block_args(self, batch: Batch) -> tuple:
        rope = rope_cos_sin(batch.positions(), self.inv_freq, mscale=self.rope_magnitude)
        return rope, self.kq_scale
