"""Copies of hot routed experts on one device, in a fixed pool of slots.

The pool is allocated once at its budget, so promotions never allocate; a promotion copies an expert's
dequantized weights into a free slot on a side stream, and a demotion only frees the slot (RAM or the
mapped file still holds every expert). In tests without CUDA the same class runs with device "cpu".

Legend: S slots, F expert width, D model width, E experts per layer, T tokens, K experts per token.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from dsrun.models.moe import swiglu, weighted_experts


class DeviceExpertSlots:
    def __init__(
        self,
        device: str | torch.device,
        n_slots: int,
        n_ff: int,
        n_embd: int,
        n_layers: int,
        n_experts: int,
        dtype: torch.dtype = torch.float32,
        name: str | None = None,
    ):
        self.device = torch.device(device)
        self.name = name or str(self.device)  # the planned GPU ("cuda:0"), even where a test uses the CPU
        self.dtype = dtype
        self.gate = torch.empty(n_slots, n_ff, n_embd, dtype=dtype, device=self.device)  # (S, F, D)
        self.up = torch.empty(n_slots, n_ff, n_embd, dtype=dtype, device=self.device)  # (S, F, D)
        self.down = torch.empty(n_slots, n_embd, n_ff, dtype=dtype, device=self.device)  # (S, D, F)
        self.slot_of: dict[tuple[int, int], int] = {}
        self.free = list(range(n_slots - 1, -1, -1))
        self.resident = np.zeros((n_layers, n_experts), dtype=bool)  # (L, E) which experts have a slot
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None  # copies overlap compute
        self.bytes_moved = 0

    @property
    def n_slots(self) -> int:
        return self.gate.shape[0]

    @property
    def slot_bytes(self) -> int:
        return 3 * self.gate[0].numel() * self.gate.element_size()

    def used_bytes(self) -> int:
        return len(self.slot_of) * self.slot_bytes

    def holds(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.slot_of

    def load(self, layer: int, expert: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """Copy one expert in; the copy is ordered before any later compute on this device."""
        if not self.free:
            raise RuntimeError("no free expert slot: demote before promoting")
        slot = self.free.pop()
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            for dst, src in ((self.gate, gate), (self.up, up), (self.down, down)):
                dst[slot].copy_(src, non_blocking=True)
        if self.stream is not None:  # compute on the default stream waits for the copy, not the host
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.slot_of[(layer, expert)] = slot
        self.resident[layer, expert] = True
        self.bytes_moved += self.slot_bytes

    def drop(self, layer: int, expert: int) -> None:
        self.free.append(self.slot_of.pop((layer, expert)))
        self.resident[layer, expert] = False

    def run(
        self,
        layer: int,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        active: torch.Tensor,
    ) -> torch.Tensor:
        """Weighted sum of the active assignments' experts, all of which hold a slot here: (T, D)."""
        xd = x.to(self.device, self.dtype, non_blocking=True)

        def run_expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            s = self.slot_of[(layer, e)]
            return swiglu(rows, self.gate[s], self.up[s], self.down[s])

        return weighted_experts(xd, expert_ids, weights, active, run_expert)
