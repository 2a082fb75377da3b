"""The hot-expert cache policy: which routed experts a GPU should hold right now.

Plain numpy over counters, no tensors: the engine reports each step's routed expert ids, the policy keeps
exponentially decayed activation scores and says what to promote and demote. A GPU is a cache over the
full expert set, which always stays in RAM or the mapped file, so a demotion only drops a copy.

Legend: L layers, E experts per layer, S slots (experts a device can hold).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class CacheMoves:
    promote: list[tuple[int, int]] = field(default_factory=list)  # (layer, expert) to copy onto the device
    demote: list[tuple[int, int]] = field(default_factory=list)  # (layer, expert) whose copy is dropped


class HotExpertPolicy:
    """Decayed counts per (layer, expert); a device's wanted set is its top-S experts by score.

    `half_life` is in steps (one step = one forward); `margin` is the hysteresis: a resident expert is
    only evicted for a candidate whose score beats it by that factor, so near-ties do not thrash.
    """

    def __init__(
        self,
        n_layers: int,
        n_experts: int,
        *,
        half_life: float = 64.0,
        margin: float = 2.0,
        max_moves: int = 8,
        initial: np.ndarray | None = None,
    ):
        self.scores = (
            np.zeros((n_layers, n_experts)) if initial is None else initial.astype(float).copy()
        )  # (L, E)
        self.decay = 0.5 ** (1.0 / half_life)
        self.margin = margin
        self.max_moves = max_moves  # promotions per decision: bounds the bytes moved per step
        self.counts = np.zeros(self.scores.shape, dtype=np.int64)  # (L, E) undecayed: activation profiles
        self.hits = 0
        self.lookups = 0

    def observe(self, layer: int, expert_ids: np.ndarray, resident: np.ndarray) -> None:
        """Count one layer's routed ids (any shape) and whether each was already on a GPU."""
        ids = np.asarray(expert_ids).ravel()
        np.add.at(self.scores[layer], ids, 1.0)
        np.add.at(self.counts[layer], ids, 1)
        self.lookups += ids.size
        self.hits += int(np.asarray(resident).ravel()[ids].sum())

    def step(self) -> None:
        """One forward has passed: older activations weigh less."""
        self.scores *= self.decay

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.lookups if self.lookups else None

    def decide(self, layers: list[int], slots: int, resident: set[tuple[int, int]]) -> CacheMoves:
        """Moves for one device that holds `layers` and has room for `slots` experts."""
        sub = self.scores[layers]  # (L', E)
        order = np.argsort(-sub, axis=None, kind="stable")[:slots]
        wanted = [(layers[i // sub.shape[1]], int(i % sub.shape[1])) for i in order]
        wanted = [k for k in wanted if self.scores[k] > 0]
        moves = CacheMoves()
        free = slots - len(resident)
        keep = set(wanted)
        evictable = sorted((k for k in resident if k not in keep), key=lambda k: self.scores[k])
        for k in wanted:
            if k in resident or len(moves.promote) >= self.max_moves:
                continue
            if free > 0:
                free -= 1
            elif evictable and self.scores[k] > self.margin * self.scores[evictable[0]]:
                moves.demote.append(evictable.pop(0))
            else:
                continue
            moves.promote.append(k)
        return moves


@dataclass
class ReplayResult:
    hit_rate: float
    promotions: int


def replay(
    trace: list[list[np.ndarray]], n_experts: int, slots: int, *, static: set | None = None, **policy_kwargs
) -> ReplayResult:
    """Hit rate of the cache over a routing trace: trace[step][layer] holds that step's expert ids.

    With `static`, the resident set is fixed (a hand-made split like llama.cpp's) and never moves.
    """
    n_layers = len(trace[0])
    policy = HotExpertPolicy(n_layers, n_experts, **policy_kwargs)
    resident = set(static or ())
    promotions = 0
    for step in trace:
        mask = np.zeros((n_layers, n_experts), dtype=bool)  # (L, E)
        for layer, expert in resident:
            mask[layer, expert] = True
        for layer, ids in enumerate(step):
            policy.observe(layer, ids, mask[layer])
        policy.step()
        if static is None:
            moves = policy.decide(list(range(n_layers)), slots, resident)
            resident.difference_update(moves.demote)
            resident.update(moves.promote)
            promotions += len(moves.promote)
    return ReplayResult(policy.hit_rate or 0.0, promotions)
