"""Routing as llama.cpp's build_moe_ffn does it, against a brute-force reference and rigged routers;
expert compute against a per-token loop."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dsrun.errors import UnsupportedModelError
from dsrun.models.moe import MIN_WEIGHT_SUM, ExpertWeights, Routing, experts_forward, route


def brute_force_route(logits, *, top_k, gating, bias=None, n_group=1, topk_group=1, norm=False, scale=1.0):
    """One token at a time in plain Python: the reading of build_moe_ffn the fast code must match."""
    ids, weights = [], []
    for row in logits.tolist():
        E = len(row)
        if gating == "softmax":
            z = [math.exp(v - max(row)) for v in row]
            scores = [v / sum(z) for v in z]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in row]
        sel = [s + (float(bias[e]) if bias is not None else 0.0) for e, s in enumerate(scores)]
        allowed = set(range(E))
        if n_group > 1:
            size = E // n_group
            group_score = [sum(sorted(sel[g * size : (g + 1) * size])[-2:]) for g in range(n_group)]
            kept = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
            allowed = {e for e in range(E) if e // size in kept}
        chosen = sorted(allowed, key=lambda e: -sel[e])[:top_k]
        w = [scores[e] for e in chosen]
        if norm:
            total = max(sum(w), MIN_WEIGHT_SUM)
            w = [v / total for v in w]
        ids.append(chosen)
        weights.append([v * scale for v in w])
    return torch.tensor(ids), torch.tensor(weights)


CASES = [
    dict(top_k=2, gating="softmax"),  # Mixtral / Qwen2-MoE
    dict(top_k=2, gating="softmax", norm=True),  # Qwen3-MoE
    dict(top_k=6, gating="softmax", scale=16.0),  # DeepSeek-V2 style scaling
    dict(top_k=4, gating="sigmoid", bias=True, norm=True, scale=2.5),  # V3 without groups
    dict(top_k=4, gating="sigmoid", bias=True, n_group=4, topk_group=2, norm=True, scale=2.5),  # V3
    dict(top_k=3, gating="softmax", n_group=8, topk_group=3),  # V2: groups over softmax scores
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_route_matches_brute_force(case):
    g = torch.Generator().manual_seed(0)
    E = 32
    logits = torch.randn(64, E, generator=g) * 2
    kw = dict(case)
    bias = torch.randn(E, generator=g) * 0.1 if kw.pop("bias", False) else None
    ids, weights = route(logits, bias=bias, **kw)
    want_ids, want_weights = brute_force_route(logits, bias=bias, **kw)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-6)


def test_rigged_router_picks_the_experts_it_favours():
    logits = torch.full((3, 8), -5.0)
    for t, (a, b) in enumerate([(3, 5), (0, 7), (6, 1)]):
        logits[t, a], logits[t, b] = 4.0, 3.0
    ids, weights = route(logits, top_k=2, gating="softmax", norm=True)
    assert ids.tolist() == [[3, 5], [0, 7], [6, 1]]
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    assert (weights[:, 0] > weights[:, 1]).all()  # the stronger logit gets the larger share


def test_group_limit_drops_the_best_expert_of_a_weak_group():
    # groups {0,1} {2,3} {4,5} {6,7}; group score = sum of its top two selection scores
    probs = torch.tensor([[0.99, 0.01, 0.61, 0.60, 0.55, 0.55, 0.20, 0.20]])
    logits = torch.log(probs / (1 - probs))  # sigmoid gives the probs back
    ids, _ = route(logits, top_k=2, gating="sigmoid", n_group=4, topk_group=2)
    assert ids.tolist() == [[2, 3]]  # expert 0 scores highest, but its group (1.00) loses to 1.21 and 1.10
    ids, _ = route(logits, top_k=2, gating="sigmoid")
    assert ids.tolist() == [[0, 2]]


def test_bias_chooses_but_does_not_weigh():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.55])  # lifts expert 3 (sigmoid 0.27) past expert 1 (0.73)
    ids, weights = route(logits, top_k=2, gating="sigmoid", bias=bias)
    assert ids.tolist() == [[0, 3]]
    torch.testing.assert_close(weights, torch.sigmoid(torch.tensor([[2.0, -1.0]])))  # unbiased scores
    _, normed = route(logits, top_k=2, gating="sigmoid", bias=bias, norm=True, scale=2.5)
    torch.testing.assert_close(normed, 2.5 * weights / weights.sum())


def test_normalizer_is_clamped_like_llama_cpp():
    logits = torch.tensor([[-30.0, -31.0, -32.0]])  # sigmoid scores ~1e-13: the sum is clamped
    _, weights = route(logits, top_k=2, gating="sigmoid", norm=True)
    torch.testing.assert_close(weights, torch.sigmoid(logits[:, :2]) / MIN_WEIGHT_SUM)


class ScaledIdentity:
    """Expert e multiplies its input by e + 1: sums of known experts are easy to check."""

    n_expert = 4

    def forward(self, e, x):
        return x * (e + 1)


def test_experts_forward_sums_each_tokens_weighted_experts():
    x = torch.arange(12, dtype=torch.float32).view(3, 4)
    ids = torch.tensor([[0, 3], [2, 2], [1, 0]])  # a repeated expert counts twice
    weights = torch.tensor([[0.5, 0.25], [1.0, 1.0], [2.0, 0.0]])
    out = experts_forward(x, ids, weights, ScaledIdentity())
    factor = torch.tensor([0.5 * 1 + 0.25 * 4, 3.0 + 3.0, 2.0 * 2])
    torch.testing.assert_close(out, x * factor[:, None])


def test_experts_forward_matches_per_token_swiglu():
    g = torch.Generator().manual_seed(1)
    E, F, D, T, K = 6, 16, 8, 10, 2
    experts = ExpertWeights(
        torch.randn(E, F, D, generator=g),
        torch.randn(E, F, D, generator=g),
        torch.randn(E, D, F, generator=g),
    )
    x = torch.randn(T, D, generator=g)
    ids, weights = route(torch.randn(T, E, generator=g), top_k=K, gating="softmax", norm=True)
    want = torch.zeros(T, D)
    for t, k in itertools.product(range(T), range(K)):
        e = int(ids[t, k])
        h = torch.nn.functional.silu(experts.ffn_gate_exps[e] @ x[t]) * (experts.ffn_up_exps[e] @ x[t])
        want[t] += weights[t, k] * (experts.ffn_down_exps[e] @ h)
    torch.testing.assert_close(experts.run(x, ids, weights), want, rtol=1e-5, atol=1e-5)


class FakeFile:
    arch = "deepseek2"

    def __init__(self, **keys):
        self.keys = keys

    def get(self, key, default=None):
        return self.keys.get(key, default)

    def require(self, key):
        return self.keys[key]


def test_routing_from_gguf_reads_llama_cpp_keys():
    f = FakeFile(
        expert_used_count=8,
        expert_gating_func=2,
        expert_group_count=8,
        expert_group_used_count=4,
        expert_weights_norm=True,
        expert_weights_scale=2.5,
    )
    assert Routing.from_gguf(f) == Routing(8, "sigmoid", 8, 4, True, 2.5)
    v2 = Routing.from_gguf(FakeFile(expert_used_count=6, expert_weights_scale=0.0))
    assert v2 == Routing(6, "softmax", 1, 1, False, 1.0)  # unset gating is softmax; scale 0 means none


def test_unknown_gating_function_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="gating function 3"):
        Routing.from_gguf(FakeFile(expert_used_count=2, expert_gating_func=3))
