"""Mixture-of-experts pieces every MoE architecture shares, as llama.cpp's build_moe_ffn computes them.

Routing is a pure function from router logits to (expert ids, weights); expert compute takes those
assignments and never sees the router, so an offload scheduler can sit between the two.

Legend: T tokens, D model width, E experts, K experts used per token, F expert width,
G expert groups, Eg experts per group.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsrun.errors import UnsupportedModelError
from dsrun.gguf_file import GGUFFile

from .base import load_linear, load_weight, maybe_weight
from .gguf_matrix import swiglu

GATING_FUNCS = {0: "softmax", 1: "softmax", 2: "sigmoid"}  # GGUF expert_gating_func: 0 = unset
MIN_WEIGHT_SUM = 6.103515625e-5  # llama.cpp clamps the normalizer to the smallest normal f16


@dataclass(frozen=True)
class Routing:
    """How one model picks experts: the keyword arguments of route(), read from the GGUF."""

    top_k: int
    gating: str = "softmax"  # "softmax" | "sigmoid": how router logits become expert scores
    n_group: int = 1  # expert groups (DeepSeek-V3 group-limited routing); 1 = no groups
    topk_group: int = 1  # groups kept per token before the top-k
    norm: bool = False  # renormalize the K chosen weights to sum to 1
    scale: float = 1.0  # multiply the chosen weights (expert_weights_scale)

    @classmethod
    def from_gguf(cls, f: GGUFFile, *, norm: bool | None = None, gating: str | None = None) -> Routing:
        """Keys as llama.cpp reads them; an architecture that hard-codes norm or gating passes it."""
        if gating is None:
            func = f.get("expert_gating_func", 0)
            if func not in GATING_FUNCS:
                raise UnsupportedModelError(f"expert gating function {func} of {f.arch} is not supported")
            gating = GATING_FUNCS[func]
        scale = f.get("expert_weights_scale", 0.0)
        return cls(
            top_k=f.require("expert_used_count"),
            gating=gating,
            n_group=max(1, f.get("expert_group_count", 1)),
            topk_group=max(1, f.get("expert_group_used_count", 1)),
            norm=bool(f.get("expert_weights_norm", False)) if norm is None else norm,
            scale=scale or 1.0,  # llama.cpp scales only when the key is set and non-zero
        )


def route(
    router_logits: torch.Tensor,
    *,
    top_k: int,
    gating: str = "softmax",
    bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    norm: bool = False,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose each token's experts: (expert_ids (T, K) int64, weights (T, K) float32).

    Scores are softmax or sigmoid of the logits. The bias (DeepSeek-V3's exp_probs_b) and the group
    limit only decide *which* experts are chosen; the weights are the unbiased scores of those experts,
    optionally renormalized, then scaled.
    """
    logits = router_logits.float()
    if gating == "softmax":
        scores = torch.softmax(logits, dim=-1)  # (T, E)
    elif gating == "sigmoid":
        scores = torch.sigmoid(logits)  # (T, E)
    else:
        raise ValueError(f"unknown gating {gating!r}")
    selection = scores if bias is None else scores + bias
    if n_group > 1:
        selection = keep_top_groups(selection, n_group, topk_group)
    expert_ids = selection.topk(top_k, dim=-1).indices  # (T, K)
    weights = scores.gather(-1, expert_ids)  # (T, K)
    if norm:
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=MIN_WEIGHT_SUM)
    if scale != 1.0:
        weights = weights * scale
    return expert_ids, weights


def keep_top_groups(selection: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Mask (to -inf) every expert outside the token's best groups; a group scores its top two."""
    T, E = selection.shape
    grouped = selection.view(T, n_group, E // n_group)  # (T, G, Eg)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (T, G)
    kept = group_scores.topk(topk_group, dim=-1).indices  # (T, topk_group)
    dropped = torch.ones(T, n_group, dtype=torch.bool, device=selection.device).scatter_(
        1, kept, False
    )  # (T, G)
    return grouped.masked_fill(dropped[..., None], -math.inf).view(T, E)  # (T, E)


class SwiGLU:
    """Dense SwiGLU from `{prefix}ffn_{gate,up,down}{suffix}.weight`: dense layers, shared experts."""

    def __init__(self, f: GGUFFile, prefix: str, suffix: str = ""):
        self.ffn_gate = load_linear(f, f"{prefix}ffn_gate{suffix}.weight")  # (F, D)
        self.ffn_up = load_linear(f, f"{prefix}ffn_up{suffix}.weight")  # (F, D)
        self.ffn_down = load_linear(f, f"{prefix}ffn_down{suffix}.weight")  # (D, F)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.ffn_gate, self.ffn_up, self.ffn_down)


class ExpertWeights:
    """One layer's routed experts, stacked. A placement layer replaces this object: MoEFFN only calls
    `run(x, expert_ids, weights)` (one call per layer) and reads `n_expert`."""

    def __init__(self, ffn_gate_exps: torch.Tensor, ffn_up_exps: torch.Tensor, ffn_down_exps: torch.Tensor):
        self.ffn_gate_exps = ffn_gate_exps  # (E, F, D)
        self.ffn_up_exps = ffn_up_exps  # (E, F, D)
        self.ffn_down_exps = ffn_down_exps  # (E, D, F)

    @classmethod
    def from_gguf(cls, f: GGUFFile, layer: int) -> ExpertWeights:
        return GGUFExperts(f, layer)

    @property
    def n_expert(self) -> int:
        return self.ffn_gate_exps.shape[0]

    def forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on the rows routed to it: (n, D) -> (n, D)."""
        return swiglu(x, self.ffn_gate_exps[e], self.ffn_up_exps[e], self.ffn_down_exps[e])

    def run(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return experts_forward(x, expert_ids, weights, self)


class GGUFExperts(ExpertWeights):
    """A layer's experts straight from the file, dequantized on first use: a placement layer that
    replaces them at load never holds the whole model in float32."""

    def __init__(self, f: GGUFFile, layer: int):
        self.f, self.prefix = f, f"blk.{layer}."

    @property
    def n_expert(self) -> int:
        return self.f.tensor(f"{self.prefix}ffn_gate_exps.weight").shape[0]

    @functools.cached_property
    def ffn_gate_exps(self) -> torch.Tensor:
        return load_weight(self.f, f"{self.prefix}ffn_gate_exps.weight")  # (E, F, D)

    @functools.cached_property
    def ffn_up_exps(self) -> torch.Tensor:
        return load_weight(self.f, f"{self.prefix}ffn_up_exps.weight")  # (E, F, D)

    @functools.cached_property
    def ffn_down_exps(self) -> torch.Tensor:
        return load_weight(self.f, f"{self.prefix}ffn_down_exps.weight")  # (E, D, F)


def group_by_expert(expert_ids: torch.Tensor, active: torch.Tensor | None = None):
    """Active assignments grouped by expert: yields (expert, token rows, flat assignment indices)."""
    K = expert_ids.shape[1]
    flat = expert_ids.flatten()  # (T*K,) assignment j is token j // K
    idx = torch.arange(flat.numel()) if active is None else active.flatten().nonzero().flatten()  # (A,)
    if idx.numel() == 0:
        return
    order = idx[torch.argsort(flat[idx], stable=True)]  # (A,) grouped by expert
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    start = 0
    for e, n in zip(experts.tolist(), counts.tolist()):
        sel = order[start : start + n]
        yield e, sel // K, sel
        start += n


def weighted_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    active: torch.Tensor | None,
    run_expert: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Sum over each token's active assignments of weight * expert(x), each chosen expert run once on its
    rows: run_expert(e, rows (n, D)). Ids and the active mask may live on the CPU while x is on a GPU."""
    out = torch.zeros_like(x)  # (T, D)
    w = weights.flatten().to(x.dtype)  # (T*K,)
    for e, rows, sel in group_by_expert(expert_ids.cpu(), None if active is None else active.cpu()):
        rows_d, sel_d = rows.to(x.device), sel.to(x.device)
        out.index_add_(0, rows_d, run_expert(e, x[rows_d]) * w[sel_d, None])
    return out


def experts_forward(
    x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: ExpertWeights
) -> torch.Tensor:
    """Each token's weighted sum of its experts' outputs (every assignment active)."""
    return weighted_experts(x, expert_ids, weights, None, experts.forward)


class MoEFFN:
    """A layer's MoE feed-forward: router, routed experts, and an optional shared expert that
    Qwen2-MoE scales by a sigmoid gate. Attribute names are the GGUF tensor names."""

    def __init__(self, f: GGUFFile, layer: int, routing: Routing):
        p = f"blk.{layer}."
        self.routing = routing
        self.ffn_gate_inp = load_weight(f, f"{p}ffn_gate_inp.weight")  # (E, D) router
        self.exp_probs_b = maybe_weight(f, f"{p}exp_probs_b.bias")  # (E,) selection bias, V3
        self.experts = ExpertWeights.from_gguf(f, layer)
        self.shexp = SwiGLU(f, p, "_shexp") if f"{p}ffn_up_shexp.weight" in f.tensors else None
        self.ffn_gate_inp_shexp = maybe_weight(f, f"{p}ffn_gate_inp_shexp.weight")  # (D,)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.route_logits(F.linear(x, self.ffn_gate_inp))  # (T, E)

    def route_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts and weights of router logits (T, E)."""
        r = self.routing
        return route(
            logits,
            top_k=r.top_k,
            gating=r.gating,
            bias=self.exp_probs_b,
            n_group=r.n_group,
            topk_group=r.topk_group,
            norm=r.norm,
            scale=r.scale,
        )

    def routed(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum (T, D) for x and its router logits (T, E)."""
        return self.experts.run(x, *self.route_logits(logits))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.routed(x, F.linear(x, self.ffn_gate_inp))
        if self.shexp is not None:
            shared = self.shexp(x)  # (T, D)
            if self.ffn_gate_inp_shexp is not None:
                shared = shared * torch.sigmoid(x @ self.ffn_gate_inp_shexp)[:, None]
            out = out + shared
        return out
