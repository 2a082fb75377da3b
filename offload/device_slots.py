"""Copies of hot routed experts on one device, in a fixed pool of slots.

The pool is allocated once at its budget, so promotions never allocate; a promotion copies an expert into
a free slot on a side stream, and a demotion only frees the slot (RAM or the mapped file still holds every
expert). A slot holds either the expert's GGUF bytes as they are in the file (quantized types the GPU
kernels of gpu_quant run: ~3.5x more experts per GiB than bf16) or dequantized float weights. In tests
without CUDA the same class runs with device "cpu".

Legend: S slots, F expert width, D model width, E experts per layer, T tokens, K experts per token.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType

from dsrun.models.gguf_matrix import FLOAT_TYPES
from dsrun.models.moe import swiglu, weighted_experts

from . import gpu_quant

GROUPED_MAX_ROWS = 64  # assignments up to which quantized slots run a layer as one grouped launch
STAGE_BYTES = 256 << 20  # a staging pool's experts, of two: what a prefill streams in per chunk


@dataclass(frozen=True)
class SlotLayout:
    """What one slot holds: `qtypes` (gate, up, down) kept quantized, or None for dense `dtype` weights.
    `dtype` is also what the slot computes in."""

    n_ff: int
    n_embd: int
    dtype: torch.dtype
    qtypes: tuple[GGMLQuantizationType, ...] | None = None

    @classmethod
    def for_experts(cls, source, device: torch.device, quantized: bool | None = None) -> SlotLayout:
        """Quantized slots where the GPU kernels take the file's types (auto on CUDA; `quantized` forces
        the choice, so tests run them on a CPU stand-in). Else bf16 on a GPU for quantized experts, F32
        for float experts (parity references) and on a CPU."""
        qtypes = tuple(i.qtype for i in source.infos.values())  # gate, up, down
        kernels_fit = all(q in gpu_quant.QUANT_TYPES for q in qtypes)
        exact = all(q in FLOAT_TYPES for q in qtypes)
        dtype = torch.float32 if device.type != "cuda" or exact else torch.bfloat16
        keep = kernels_fit and (device.type == "cuda" if quantized is None else quantized)
        return cls(source.n_ff, source.n_embd, dtype, qtypes if keep else None)

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        return (self.n_ff, self.n_embd), (self.n_ff, self.n_embd), (self.n_embd, self.n_ff)  # gate, up, down

    def slot_bytes(self) -> int:
        if self.qtypes is None:
            return 3 * self.n_ff * self.n_embd * torch.finfo(self.dtype).bits // 8
        return sum(gpu_quant.pool_stride(q, *s) for q, s in zip(self.qtypes, self.shapes))


class DeviceExpertSlots:
    def __init__(
        self,
        device: str | torch.device,
        n_slots: int,
        layout: SlotLayout,
        n_layers: int,
        n_experts: int,
        name: str | None = None,
    ):
        self.device = torch.device(device)
        self.name = name or str(self.device)  # the planned GPU ("cuda:0"), even where a test uses the CPU
        self.layout = layout
        if layout.qtypes is None:
            self.pools = [
                torch.empty(n_slots, *s, dtype=layout.dtype, device=self.device) for s in layout.shapes
            ]
        else:
            self.pools = [
                gpu_quant.new_pool(n_slots, q, *s, self.device) for q, s in zip(layout.qtypes, layout.shapes)
            ]  # (S, bytes) each
        self.slot_of: dict[tuple[int, int], int] = {}
        self.free = list(range(n_slots - 1, -1, -1))
        # each expert's slot or -1, on the host; and on the device, where a captured step looks it up
        self.host_table = np.full((n_layers, n_experts), -1, dtype=np.int32)  # (L, E)
        self.table = torch.full((n_layers, n_experts), -1, dtype=torch.int32, device=self.device)  # (L, E)
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None  # copies overlap compute
        self.bytes_moved = 0
        self.staging: list[Staged] = []  # two pools that stream cold experts in for a prefill
        self.stream_seconds = 0.0  # how long the last streaming call's copies took

    @property
    def n_slots(self) -> int:
        return self.pools[0].shape[0]

    @property
    def slot_bytes(self) -> int:
        return self.layout.slot_bytes()

    @property
    def quantized(self) -> bool:
        return self.layout.qtypes is not None

    def used_bytes(self) -> int:
        return len(self.slot_of) * self.slot_bytes

    def holds(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.slot_of

    def fetch(self, source, expert: int) -> tuple[torch.Tensor, ...]:
        """What a slot copies in, read from the expert's home (no lock held: forward keeps running):
        its GGUF bytes for quantized slots, else its dequantized weights."""
        if self.quantized:  # pinned: it crosses PCIe ~8x faster than pageable memory
            pin = self.stream is not None
            raws = [read_only_bytes(i.data[expert]) for i in source.infos.values()]
            return tuple(torch.empty_like(r, pin_memory=pin).copy_(r) for r in raws)
        return source.dequant(expert)

    def load(self, layer: int, expert: int, parts: tuple[torch.Tensor, ...]) -> None:
        """Copy one expert in (`fetch`'s result); the copy is ordered before any later compute here."""
        if not self.free:
            raise RuntimeError("no free expert slot: demote before promoting")
        slot = self.free.pop()
        if self.stream is not None:  # work queued on the slot's previous expert is done before the copy
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            for pool, src in zip(self.pools, parts):
                dst = pool[slot, : src.numel()] if self.quantized else pool[slot]
                dst.copy_(src, non_blocking=True)
        if self.stream is not None:  # compute on the default stream waits for the copy, not the host
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.table[layer, expert] = slot  # in stream order: steps queued from now on see it
        self.slot_of[(layer, expert)] = slot
        self.host_table[layer, expert] = slot
        self.bytes_moved += self.slot_bytes

    def drop(self, layer: int, expert: int) -> None:
        self.table[layer, expert] = -1
        self.free.append(self.slot_of.pop((layer, expert)))
        self.host_table[layer, expert] = -1

    def run(
        self,
        layer: int,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        active: torch.Tensor,
        stream_from=None,
    ) -> torch.Tensor:
        """Weighted sum of the active assignments' experts: (T, D). Every expert holds a slot here, or,
        with `stream_from` (quantized slots: a prefill), those that do not are copied in as they come."""
        if not self.quantized:
            xd = x.to(self.device, self.layout.dtype, non_blocking=True)
            run_one = lambda e, rows: swiglu(rows, *self.parts(self.slot_of[(layer, e)]))  # noqa: E731
            return weighted_experts(xd, expert_ids, weights, active, run_one)
        if stream_from is None and expert_ids.numel() <= GROUPED_MAX_ROWS:
            # the active assignments are those whose expert holds a slot: the device's table says which
            x, ids, w = (t.to(self.device, non_blocking=True) for t in (x, expert_ids, weights))
            return self.run_resident(layer, x, ids, w)
        return self.run_sorted(layer, x, expert_ids, weights, active, stream_from)

    def parts(self, slot: int) -> tuple[torch.Tensor, ...]:
        return tuple(pool[slot] for pool in self.pools)

    def run_resident(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Weighted sum of the assignments whose expert holds a slot here, the others left out: (T, D) in
        x's dtype, every assignment a row of one grouped launch (quantized slots, a few tokens). The slots
        are looked up in the device's table, so nothing waits for the host: a CUDA graph captures this."""
        T, K = expert_ids.shape
        F_, D = self.layout.shapes[0]
        rows = x.to(self.layout.dtype)[:, None, :].expand(T, K, D).reshape(T * K, D)  # (T*K, D): one per k
        slots = self.table[layer][expert_ids].flatten()  # (T*K,) -1 where the expert has no slot
        y = gpu_quant.grouped_swiglu(rows, *self.pools, slots, self.layout.qtypes, F_, D)  # (T*K, D), 0 at -1
        return (y.view(T, K, D).float() * weights.float()[..., None]).sum(1).to(x.dtype)  # (T, D)

    def run_sorted(
        self,
        layer: int,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        active,
        stream_from,
    ) -> torch.Tensor:
        """Weighted sum of the active assignments' experts (T, D), quantized slots: each expert's rows in
        blocks for tensor cores (gpu_quant.sorted_swiglu), one launch for all slot-resident experts. With
        `stream_from`, the others are copied in a staging pool's worth at a time, two pools alternating,
        so one chunk's copy overlaps the last one's compute. expert_ids and active are host tensors."""
        T, K = expert_ids.shape
        sel = active.flatten().nonzero().flatten()  # (A,) active assignments, token a // K
        experts = expert_ids.flatten()[sel]  # (A,)
        slots = torch.from_numpy(self.host_table[layer])[experts]  # (A,) -1: no slot
        xd = x.to(self.device, self.layout.dtype, non_blocking=True)  # (T, D)
        w = weights.to(self.device, torch.float32, non_blocking=True).flatten()  # (T*K,)
        out = torch.zeros(T, self.layout.n_embd, dtype=torch.float32, device=self.device)  # (T, D)
        held = slots >= 0
        self._add_experts(out, xd, w, sel[held], slots[held], self.pools, K)
        if stream_from is not None and not held.all():
            t0 = time.perf_counter()
            staging = self._staging()
            for i, chunk in enumerate(torch.unique(experts[~held]).split(staging[0].n_slots)):
                pools = staging[i % 2].load(stream_from, chunk.tolist(), self)
                in_chunk = torch.isin(experts, chunk)  # (A,)
                local = torch.searchsorted(chunk, experts[in_chunk])  # its staging slot
                self._add_experts(out, xd, w, sel[in_chunk], local, pools, K)
            staging[i % 2].wait_copied()
            self.stream_seconds = time.perf_counter() - t0  # the copies' time, for the cost model
        return out.to(self.layout.dtype)

    def _add_experts(self, out, xd, w, sel, slots, pools, K: int) -> None:
        """out[token] += weight * expert(x[token]) for assignments sel (host, flat t * K + k) whose
        experts are in `slots` of `pools`."""
        if not sel.numel():
            return
        rows = sel // K  # (A,) tokens
        y = gpu_quant.sorted_swiglu(xd, *pools, rows, slots, self.layout.qtypes, *self.layout.shapes[0])
        sel_d = sel.to(self.device, non_blocking=True)
        out.index_add_(0, sel_d // K, y.float() * w[sel_d, None])  # (A, D) weighted into (T, D)

    def _staging(self) -> list[Staged]:
        if not self.staging:
            n = max(1, min(STAGE_BYTES // self.slot_bytes, self.table.shape[1]))  # at most a layer's experts
            self.staging = [Staged(self, n) for _ in range(2)]
        return self.staging


class Staged:
    """A staging pool of n experts: pinned host rows and a device pool, for gate, up and down."""

    def __init__(self, slots: DeviceExpertSlots, n: int):
        pin = slots.stream is not None
        sizes = [pool.shape[1] for pool in slots.pools]  # slot bytes of gate, up, down
        self.host = [torch.empty(n, b, dtype=torch.uint8, pin_memory=pin) for b in sizes]  # (n, bytes)
        self.device = [torch.empty(n, b, dtype=torch.uint8, device=slots.device) for b in sizes]
        self.copied = torch.cuda.Event() if pin else None  # host buffers free again
        self.used = torch.cuda.Event() if pin else None  # marks the compute queued on the device pools

    @property
    def n_slots(self) -> int:
        return self.host[0].shape[0]

    def wait_copied(self) -> None:
        """Until the last transfer from the host buffers is done: they may be written again."""
        if self.copied is not None:
            self.copied.synchronize()

    def load(self, source, experts: list[int], slots: DeviceExpertSlots) -> tuple[torch.Tensor, ...]:
        """Copy these experts (at most n_slots) into slots 0.. of the device pools; returns the pools."""
        self.wait_copied()
        for host, info in zip(self.host, source.infos.values()):
            for i, e in enumerate(experts):
                raw = read_only_bytes(info.data[e])
                host[i, : raw.numel()].copy_(raw)  # page cache -> pinned, on torch's threads
        n = len(experts)
        stream = slots.stream
        compute = torch.cuda.current_stream(slots.device) if stream is not None else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if self.used is not None:  # the compute last queued on these device pools is done first
                self.used.record(compute)
                stream.wait_event(self.used)
            for dev, host in zip(self.device, self.host):
                dev[:n].copy_(host[:n], non_blocking=True)
            if self.copied is not None:
                self.copied.record(stream)
        if stream is not None:
            compute.wait_stream(stream)
        return tuple(self.device)


def read_only_bytes(a: np.ndarray) -> torch.Tensor:
    """A read-only mapped array as a flat uint8 tensor, without copying (only read from)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that it cannot mark it read-only
        return torch.from_numpy(a).view(-1).view(torch.uint8)
