"""Routed experts spread over tiers, and the scheduler that sits between the router and expert compute.

Every routed expert always lives in RAM or in the memory-mapped GGUF on disk (its *home*); GPUs hold
copies of the hot ones in slots. Per MoE layer, the router's assignments are split by where each expert
is: slot-resident experts run on their device while the rest run on the CPU at the same time, and the
two partial sums are added. After each forward the hot-expert policy decides promotions and demotions,
which a background thread carries out, so a decode step never waits for a copy.

Legend: T tokens, K experts per token, D model width, F expert width, E experts per layer, L layers.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from dsrun.gguf_file import GGUFFile, TensorInfo
from dsrun.models.moe import swiglu, weighted_experts
from dsrun.quants import dequantize

from .cpu_experts import CPUExperts
from .device_slots import DeviceExpertSlots
from .hot_cache import HotExpertPolicy
from .prefill import StreamCost

PROJECTIONS = ("gate", "up", "down")


class ExpertFile:
    """One MoE layer's routed-expert tensors in the GGUF: per-expert bytes, dequantized on demand."""

    def __init__(self, f: GGUFFile, layer: int):
        self.layer = layer
        self.infos: dict[str, TensorInfo] = {
            p: f.tensor(f"blk.{layer}.ffn_{p}_exps.weight") for p in PROJECTIONS
        }
        self.n_expert = self.infos["gate"].shape[0]
        self.n_ff, self.n_embd = self.infos["gate"].shape[1:]
        # opened once: prefetch advises the kernel on every MoE layer of every step
        self.files = {path: open(path, "rb") for path in {i.path for i in self.infos.values()}}

    def expert_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values()) // self.n_expert

    def row_flops(self) -> int:
        """Multiply-adds x 2 of one row through one expert (gate, up, down)."""
        return 2 * 3 * self.n_ff * self.n_embd

    def dequant(self, e: int) -> tuple[torch.Tensor, ...]:
        """(gate (F, D), up (F, D), down (D, F)) float32 from the file's (page-cached) bytes."""
        return tuple(dequantize(i.data[e], i.qtype, i.shape[1:], name=i.name) for i in self.infos.values())

    def page_in(self, e: int) -> None:
        """Ask the kernel to read the expert's bytes into the page cache now, in the background."""
        for info in self.infos.values():
            per_expert = info.nbytes // self.n_expert
            fd = self.files[info.path].fileno()
            os.posix_fadvise(fd, info.offset + e * per_expert, per_expert, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()


class HomeExperts:
    """The CPU side of one layer. RAM experts are loaded into a CPU expert backend (converted or
    dequantized once); the others stay in the mapped file and are dequantized from the page cache at
    each use, which is what serving from NVMe costs."""

    def __init__(self, source: ExpertFile, backend: CPUExperts, in_ram: list[int]):
        self.source = source
        self.backend = backend
        self.ram_mask = np.zeros(source.n_expert, dtype=bool)  # (E,)
        self.keep_in_ram(in_ram)

    def keep_in_ram(self, experts: list[int]) -> None:
        """Load these experts (with those already there) into the CPU backend."""
        self.ram_mask[experts] = True
        if self.ram_mask.any():
            kept = np.flatnonzero(self.ram_mask).tolist()
            self.backend.load_layer(self.source.layer, *self.source.infos.values(), experts=kept)

    def in_ram(self, e: int) -> bool:
        return bool(self.ram_mask[e])

    def ram_bytes(self) -> int:
        return int(self.ram_mask.sum()) * self.source.expert_bytes()

    def weights(self, e: int) -> tuple[torch.Tensor, ...]:
        """F32 weights of one expert (for a copy to a device slot), from the file's bytes."""
        return self.source.dequant(e)

    def run(self, x: torch.Tensor, expert_ids, weights, active) -> torch.Tensor:
        in_ram = torch.from_numpy(self.ram_mask)[expert_ids] & active  # (T, K)
        out = self.backend.forward(self.source.layer, x, expert_ids, weights, in_ram) if in_ram.any() else 0
        mapped = active & ~in_ram
        if mapped.any():
            out = out + weighted_experts(
                x, expert_ids, weights, mapped, lambda e, rows: swiglu(rows, *self.weights(e))
            )
        return out if torch.is_tensor(out) else torch.zeros_like(x)


def _tier(tier: str, device: str, budget: int | None) -> dict:
    return {
        "tier": tier,
        "device": device,
        "budget_bytes": budget,
        "used_bytes": 0,
        "experts_bytes": 0,
        "experts": 0,
    }


@dataclass
class Counters:
    steps: int = 0
    cpu_assignments: int = 0
    device_assignments: int = 0
    predicted_hits: int = 0  # prefetch: next-layer experts predicted that were then routed to
    predicted_total: int = 0  # experts actually routed in layers that had a prediction
    promotions: int = 0
    demotions: int = 0
    streamed_assignments: int = 0  # cold assignments of heavy batches run on a GPU, their experts streamed
    cpu_expert_s: float = 0.0  # time in the CPU part of MoE layers


class Offload:
    """Owns the expert homes, the device slots and the hot-expert policy for a whole model."""

    def __init__(
        self,
        homes: dict[int, HomeExperts],
        slots: dict[int, DeviceExpertSlots],
        *,
        background: bool = True,
        policy: HotExpertPolicy | None = None,
    ):
        self.homes = homes  # MoE layer -> its experts' home
        self.slots = slots  # MoE layer -> the device slots of the GPU holding that layer
        self.layers = sorted(homes)
        first = homes[self.layers[0]].source if homes else None
        n_layers = max(self.layers) + 1 if homes else 0
        self.policy = policy or HotExpertPolicy(n_layers, first.n_expert if first else 0)
        self.counters = Counters()
        self.cost = StreamCost()  # where heavy batches compute their cold experts
        self.lock = threading.Lock()  # slot tables change in the mover thread, are read by forward
        self.predicted: dict[int, set[int]] = {}
        self.routers: dict[int, object] = {}  # MoE layer -> its MoE FFN, for pre-gating the next layer
        self.graph = None  # the DecodeGraph whose step is running, if one is
        self.worker: ThreadPoolExecutor | None = None  # runs the CPU part while a prefill streams
        self.background = background
        self.jobs: queue.Queue = queue.Queue(maxsize=1)
        self.mover = threading.Thread(target=self._move_loop, daemon=True) if background else None
        if self.mover:
            self.mover.start()

    # --- the forward path -------------------------------------------------------------------------------

    def run(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """The layer's routed-expert output (T, D) for the router's assignments, split by tier."""
        if self.graph is not None:  # a DecodeGraph's step: it splits the step here and calls back
            return self.graph.split(layer, x, expert_ids, weights)
        ids, w = expert_ids.cpu(), weights.cpu()  # the one device-to-host sync of the layer
        slots, home = self.slots.get(layer), self.homes[layer]
        with self.lock:
            resident = self.resident(layer)
            on_device = torch.from_numpy(resident)[ids]  # (T, K)
            streamed = self._to_stream(slots, home, ids, ~on_device)  # (T, K) cold ones computed on the GPU
            on_gpu = on_device | streamed
            cold = ~on_gpu
            # a prefill whose experts are all on the GPU copies nothing to the host
            x_cpu = x.cpu() if cold.any() or not on_gpu.any() else None
            # the CPU part overlaps the GPU's; a streaming GPU part keeps this thread busy, so the CPU part
            # then runs on a worker
            cpu_part = (
                self._on_worker(self.run_cold, layer, x_cpu, ids, w, cold)
                if streamed.any() and x_cpu is not None
                else None
            )
            device_out = None
            if on_gpu.any():
                source = home.source if streamed.any() else None
                device_out = slots.run(layer, x, ids, weights, on_gpu, stream_from=source)
                if source is not None:  # the stream's rate: its experts' bytes over the copies' time
                    n_bytes = len(torch.unique(ids[streamed])) * home.source.expert_bytes()
                    self.cost.observe_stream(n_bytes, slots.stream_seconds)
        self.count(layer, ids, resident, on_device, streamed)
        if x_cpu is None:
            out = device_out
        else:  # summed where the layer runs: no copy back of the GPU part
            out = cpu_part.result() if cpu_part is not None else self.run_cold(layer, x_cpu, ids, w, cold)
            out = out.to(x.device, non_blocking=True)
            if device_out is not None:
                out = out + device_out.to(x.device, out.dtype)
        self.finish_layer(layer, x)
        return out.to(x.device, x.dtype)

    def _to_stream(self, slots, home: HomeExperts, ids: torch.Tensor, cold: torch.Tensor) -> torch.Tensor:
        """The cold assignments (T, K) of a heavy batch whose experts are streamed to the GPU: the busiest
        cold experts, as many as the cost model's split gives (none for a few tokens)."""
        none = torch.zeros_like(cold)
        if slots is None or not slots.quantized or not cold.any():
            return none
        experts, rows = torch.unique(ids[cold], return_counts=True)  # (U,)
        order = torch.argsort(rows, descending=True, stable=True)
        n = self.cost.stream_count(
            len(ids), rows[order].tolist(), home.source.expert_bytes(), home.source.row_flops()
        )
        return cold & torch.isin(ids, experts[order[:n]]) if n else none

    def _on_worker(self, fn, *args) -> Future:
        """fn(*args) on the worker thread, in this thread's inference and grad modes (they are per thread)."""
        if self.worker is None:
            self.worker = ThreadPoolExecutor(1, thread_name_prefix="dsrun-cold-experts")
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def call():
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return fn(*args)

        return self.worker.submit(call)

    def resident(self, layer: int) -> np.ndarray:
        """Which of the layer's experts hold a GPU slot now, a copy (E,); call under the lock."""
        slots = self.slots.get(layer)
        return (
            slots.host_table[layer] >= 0
            if slots is not None
            else np.zeros(self.homes[layer].source.n_expert, bool)
        )

    def run_cold(self, layer: int, x_cpu, ids, w, cold) -> torch.Tensor:
        """The CPU part (T, D): the cold assignments, from RAM or the mapped file, timed for the prefill
        cost model."""
        home = self.homes[layer]
        n_cold, cold_bytes, cold_flops = self._cold_work(home, ids, cold)
        t0 = time.perf_counter()
        out = home.run(x_cpu, ids, w, cold)  # (T, D)
        seconds = time.perf_counter() - t0
        self.cost.observe_cpu(int(cold.sum()) / max(1, n_cold), cold_bytes, cold_flops, seconds)
        self.counters.cpu_expert_s += seconds
        return out

    def finish_layer(self, layer: int, x: torch.Tensor) -> None:
        """A MoE layer is done: page in what the next one will want; after the last, the cache may move."""
        self.prefetch_next(layer, x)
        if layer == self.layers[-1]:
            self.after_step()

    def _cold_work(self, home: HomeExperts, ids: torch.Tensor, cold: torch.Tensor) -> tuple[int, int, int]:
        """The distinct experts the CPU part would read, their bytes, and its multiply-adds x 2."""
        n_experts = len(np.unique(ids[cold].numpy()))
        flops = home.source.row_flops() * int(cold.sum())
        return n_experts, n_experts * home.source.expert_bytes(), flops

    def count(
        self, layer: int, expert_ids: torch.Tensor, resident: np.ndarray, on_device, streamed=None
    ) -> None:
        """Counts of where this layer's assignments ran: slot-resident, streamed to the GPU (a mask like
        on_device), or on the CPU."""
        ids = expert_ids.cpu().numpy()
        self.policy.observe(layer, ids, resident)
        n_dev, n_streamed = int(on_device.sum()), 0 if streamed is None else int(streamed.sum())
        self.counters.device_assignments += n_dev
        self.counters.streamed_assignments += n_streamed
        self.counters.cpu_assignments += ids.size - n_dev - n_streamed
        guess = self.predicted.pop(layer, None)
        if guess is not None:
            actual = set(ids.ravel().tolist())
            self.counters.predicted_hits += len(actual & guess)
            self.counters.predicted_total += len(actual)

    def prefetch_next(self, layer: int, x: torch.Tensor) -> None:
        """Pre-gating: the next MoE layer's router on this layer's input predicts its experts; those
        living in the mapped file are paged in now so the read overlaps this layer's compute."""
        nxt = next((i for i in self.layers if i > layer), None)
        if nxt is None or nxt not in self.routers or self.homes[nxt].ram_mask.all():
            return  # (all in RAM: nothing to page in, and the guess would cost a wait for the device)
        router = self.routers[nxt]
        with torch.no_grad():  # the next layer may sit on another GPU
            ids, _ = router.route(x.to(router.ffn_gate_inp.device, non_blocking=True))
        guess = set(ids.cpu().flatten().tolist())
        self.predicted[nxt] = guess
        home = self.homes[nxt]
        for e in guess:
            if not home.in_ram(e):
                home.source.page_in(e)

    # --- the hot-expert cache ---------------------------------------------------------------------------

    def after_step(self) -> None:
        """One forward is done: decay counts and move experts (in the background unless told not to)."""
        self.counters.steps += 1
        self.policy.step()
        if not self.slots:
            return
        if self.background:
            try:
                self.jobs.put_nowait(True)  # one pending rebalance is enough; skip if one is queued
            except queue.Full:
                pass
        else:
            self.rebalance()

    def _move_loop(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job is None:  # close(): no more moves
                    return
                self.rebalance()
            finally:
                self.jobs.task_done()

    def close(self) -> None:
        """Stop the mover once its current job is done; the engine then drops the file maps."""
        if self.mover is not None and self.mover.is_alive():
            self.jobs.put(None)
            self.mover.join()
        self.background = False
        if self.worker is not None:
            self.worker.shutdown()
        for home in self.homes.values():
            home.source.close()

    def rebalance(self) -> None:
        for device_slots, layers in self._devices():
            with self.lock:
                resident = set(device_slots.slot_of)
            moves = self.policy.decide(layers, device_slots.n_slots, resident)
            for key in moves.demote:
                with self.lock:
                    device_slots.drop(*key)
                self.counters.demotions += 1
            for layer, e in moves.promote:
                self.promote(device_slots, layer, e)

    def promote(self, device_slots: DeviceExpertSlots, layer: int, e: int) -> None:
        parts = device_slots.fetch(self.homes[layer].source, e)  # outside the lock: forward keeps running
        try:
            with self.lock:
                device_slots.load(layer, e, parts)
        except torch.OutOfMemoryError:  # the device is fuller than its budget said: keep it on the CPU
            return
        self.counters.promotions += 1

    def _devices(self) -> list[tuple[DeviceExpertSlots, list[int]]]:
        by_id: dict[int, tuple[DeviceExpertSlots, list[int]]] = {}
        for layer, s in self.slots.items():
            by_id.setdefault(id(s), (s, []))[1].append(layer)
        return list(by_id.values())

    # --- what it reports ---------------------------------------------------------------------------------

    def stats(self, budgets: dict[str, int | None]) -> dict:
        """Expert placement per tier and the cache's counters, in the schema of tui/telemetry.py.

        Each expert counts once, at the fastest tier that holds it: a GPU slot, else RAM, else the file.
        """
        pools = self._devices()
        tiers = {p.name: _tier("gpu", p.name, budgets.get(p.name)) for p, _ in pools}
        tiers["cpu"] = _tier("ram", "cpu", budgets.get("cpu"))
        tiers["disk"] = _tier("nvme", "disk", None)
        rows = []
        with self.lock:
            for layer in self.layers:
                home, pool = self.homes[layer], self.slots.get(layer)
                row = []
                for e in range(home.source.n_expert):
                    if pool is not None and pool.host_table[layer, e] >= 0:
                        key, char = pool.name, pool.name.rpartition(":")[2]
                    else:
                        key, char = ("cpu", "r") if home.in_ram(e) else ("disk", "n")
                    tiers[key]["experts"] += 1
                    tiers[key]["experts_bytes"] += home.source.expert_bytes()
                    row.append(char)
                rows.append("".join(row))
            for p, _ in pools:
                tiers[p.name]["experts_bytes"] = p.used_bytes()  # a slot's bytes, dequantized or not
        for t in tiers.values():
            t["used_bytes"] = t["experts_bytes"]
        c = self.counters
        scores = self.policy.scores[self.layers]  # (L, E)
        peak = scores.max() if scores.size and scores.max() > 0 else 1.0
        return {
            "tiers": list(tiers.values()),
            "experts": {
                "total": sum(h.source.n_expert for h in self.homes.values()),
                "hit_rate": self.policy.hit_rate,
                "first_layer": self.layers[0] if self.layers else 0,
                "placement": rows,
                "hotness": (scores / peak).round(3).tolist(),
                "promotions": c.promotions,
                "demotions": c.demotions,
                "bytes_moved_per_step": sum(p.bytes_moved for p, _ in pools) / max(1, c.steps),
                "prefetch_accuracy": c.predicted_hits / c.predicted_total if c.predicted_total else None,
                "cpu_assignments": c.cpu_assignments,
                "device_assignments": c.device_assignments,
                "streamed_assignments": c.streamed_assignments,
                "stream_cost": dataclasses.asdict(self.cost),  # the rates the prefill choice learned
            },
        }

    def wait_idle(self) -> None:
        """Block until queued moves are done (tests and benchmarks that need a settled cache)."""
        if self.background:
            self.jobs.join()
