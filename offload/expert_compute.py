"""Expert compute over (token, expert, weight) assignments, shared by every tier that holds weights.

Legend: T tokens, K experts per token, D model width, F expert width, A active assignments.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x); gate/up (F, D), down (D, F)."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def group_by_expert(expert_ids: torch.Tensor, active: torch.Tensor | None = None):
    """Active assignments grouped by expert: yields (expert, token rows, assignment flat indices)."""
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
    """Sum over each token's active assignments of weight * expert(x); run_expert(e, rows (n, D))."""
    out = torch.zeros_like(x)  # (T, D)
    w = weights.flatten().to(x.dtype)  # (T*K,)
    for e, rows, sel in group_by_expert(expert_ids.cpu(), None if active is None else active.cpu()):
        rows_d, sel_d = rows.to(x.device), sel.to(x.device)
        out.index_add_(0, rows_d, run_expert(e, x[rows_d]) * w[sel_d, None])
    return out
