"""Token sampling in llama.cpp's default order: penalties, top-k, top-p, min-p, temperature."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from .errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64  # llama.cpp's window for the penalties
    seed: int | None = None

    def __post_init__(self):
        checks = [
            (self.temperature >= 0 and math.isfinite(self.temperature), "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)


class Sampler:
    """Picks the next token from logits; owns the seeded generator so a seed reproduces a sequence."""

    def __init__(self, params: SamplingParams):
        self.p = params
        self.gen = torch.Generator()
        self.gen.manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        logits = self.apply_penalties(logits.float().clone(), history)  # (V,)
        if self.p.temperature == 0:
            return int(torch.argmax(logits))
        return self.sample(logits)

    def apply_penalties(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        p = self.p
        if p.repeat_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0:
            return logits
        counts = Counter(history[-p.penalty_last_n :] if p.penalty_last_n > 0 else [])
        if not counts:
            return logits
        ids = torch.tensor(list(counts.keys()))
        n = torch.tensor(list(counts.values()), dtype=logits.dtype)
        sel = logits[ids]
        sel = torch.where(sel > 0, sel / p.repeat_penalty, sel * p.repeat_penalty)
        logits[ids] = sel - n * p.frequency_penalty - p.presence_penalty
        return logits

    def sample(self, logits: torch.Tensor) -> int:
        p = self.p
        k = p.top_k if 0 < p.top_k < logits.numel() else logits.numel()
        vals, ids = torch.topk(logits, k)  # sorted, descending
        probs = torch.softmax(vals, dim=-1)
        if p.top_p < 1.0:  # keep the smallest head whose mass reaches top_p
            keep = int(torch.searchsorted(torch.cumsum(probs, 0), torch.tensor(p.top_p)).item()) + 1
            vals, ids = vals[:keep], ids[:keep]
        if p.min_p > 0:  # drop tokens below min_p times the best one's probability
            keep = vals >= vals[0] + math.log(p.min_p)
            vals, ids = vals[keep], ids[keep]
        probs = torch.softmax(vals / p.temperature, dim=-1)
        return int(ids[torch.multinomial(probs, 1, generator=self.gen)])
