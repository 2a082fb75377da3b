"""A decode step (one sequence, one token) recorded once as CUDA graphs and replayed.

On a GPU a decode step is bound by kernel launches and Python, not by bytes: a DeepSeek layer is dozens
of small kernels. The first step runs eagerly (compiling and tuning every kernel), then the same code is
recorded; later steps replay it, setting only the token and position, which the graphs read on the device.

A MoE layer whose cold experts run on the CPU cuts the step: graph A ends by copying the layer's input and
routing to pinned host memory; graph B runs the GPU-resident experts, looked up in the slots' device table
so it needs no host decision; while B runs, the host computes the cold experts, and the next graph A
starts by copying their sum back. One host wait per MoE layer, on an event after its A.

The graphs write the KV cache in place, so a cache decoded here is bound to fixed buffers of the
context's length (FixedKV.bind), and attention reads the whole buffer under a mask.

Legend: T tokens (1 here), K experts per token, D model width, N context length.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsrun.models.base import Batch, KVCache, OnDevice, Seq, to_device


class FixedKV:
    """The KV cache as a recorded step sees it: per layer, buffers of `capacity` rows that never move,
    written at a position held on the device. A KVCache decoding here is bound to them: it keeps its
    count of tokens, the rows live in these buffers."""

    def __init__(self, capacity: int, devices: list[torch.device]):
        self.capacity = capacity
        # the row this step writes, on every device that holds layers: a recorded graph reads its own
        self.pos = {d: torch.zeros((), dtype=torch.long, device=d) for d in devices}
        self.at = devices[0]  # the device of the block running now
        self.buffers: list[list[torch.Tensor]] | None = None
        self.bound: KVCache | None = None

    @property
    def n(self) -> torch.Tensor:
        return self.pos[self.at]  # attention's start: rows before it are cached

    def seek(self, n: int) -> None:
        for pos in self.pos.values():
            pos.fill_(n)

    def positions(self, n_new: int, device: torch.device | None = None) -> torch.Tensor:
        pos = self.pos[device or self.at]
        return pos + torch.arange(n_new, device=pos.device)  # (n_new,)

    def append(self, layer: int, *parts: torch.Tensor) -> list[torch.Tensor]:
        """Write this step's rows at pos; return the whole buffers (N, ...), masked by the attention."""
        bufs = self.buffers[layer]
        at = self.positions(parts[0].shape[0], bufs[0].device)
        for b, p in zip(bufs, parts):
            b.index_copy_(0, at, p.to(b.dtype))
        return bufs

    def commit(self, n_new: int) -> None:
        """The bound KVCache counts the tokens (the runner commits it)."""

    def holds(self, cache: KVCache) -> bool:
        return self.buffers is not None and cache.layers[0][0] is self.buffers[0][0]

    def bind(self, cache: KVCache) -> None:
        """Move `cache`'s rows into the fixed buffers and make it use them; the cache bound before gets
        its rows back in buffers of its own."""
        if self.holds(cache):
            return
        if self.buffers is None:  # zeros: rows past a position are masked, and 0 * NaN would not be
            self.buffers = [
                [torch.zeros((self.capacity, *b.shape[1:]), dtype=b.dtype, device=b.device) for b in bufs]
                for bufs in cache.layers
            ]
        old = self.bound
        if old is not None and self.holds(old):
            old.layers = [[b[: old.n].clone() for b in bufs] for bufs in old.layers]
        for mine, theirs in zip(self.buffers, cache.layers):
            for m, t in zip(mine, theirs):
                m[: cache.n] = t[: cache.n]
        cache.layers = [list(bufs) for bufs in self.buffers]
        self.bound = cache


@dataclass
class Crossing:
    """One MoE layer's crossing between device and host: its input and routing out to pinned memory,
    the CPU experts' sum back."""

    x: torch.Tensor  # (T, D) float32, host
    ids: torch.Tensor  # (T, K) int64, host
    weights: torch.Tensor  # (T, K) float32, host
    cpu_out: torch.Tensor  # (T, D) float32, host: the cold experts' sum
    cpu_out_device: torch.Tensor  # (T, D) float32, where the layer runs
    x_device: torch.Tensor  # the layer's input as the recorded step holds it (pre-gating reads it)
    sent: torch.cuda.Event | None  # recorded after graph A: x, ids and weights are on the host

    @classmethod
    def like(cls, x: torch.Tensor, ids: torch.Tensor) -> Crossing:
        pin = x.device.type == "cuda"

        def host(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(like.shape, dtype=dtype, pin_memory=pin)

        return cls(
            host(x, torch.float32),
            host(ids, torch.long),
            host(ids, torch.float32),
            host(x, torch.float32),
            torch.zeros(x.shape, dtype=torch.float32, device=x.device),
            x,
            torch.cuda.Event() if pin else None,
        )

    def send(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        self.x_device = x
        for dst, src in ((self.x, x), (self.ids, ids), (self.weights, weights)):
            dst.copy_(src, non_blocking=True)

    def receive(self, gpu_out: torch.Tensor | None) -> torch.Tensor:
        out = self.cpu_out_device.copy_(self.cpu_out, non_blocking=True)  # (T, D)
        return out if gpu_out is None else out + gpu_out.to(out.dtype)


@dataclass
class StepTimes:
    """Where the host's time of the replayed steps went, in seconds, summed (`dsrun bench --profile`)."""

    steps: int = 0
    launch: float = 0.0  # handing graphs to the GPU
    wait: float = 0.0  # blocked on the GPU: its work not hidden behind the host's
    cpu_experts: float = 0.0  # the cold experts, on the CPU backend
    gpu_dense: float = 0.0  # GPU time of the A graphs (attention, dense layers, router, shared experts)
    gpu_experts: float = 0.0  # GPU time of the B graphs (the resident routed experts)
    total: float = 0.0

    @property
    def host(self) -> float:
        """The rest of the host's time: counting, the cache policy, Python."""
        return self.total - self.launch - self.wait - self.cpu_experts

    def per_token_ms(self) -> dict[str, float]:
        n = max(1, self.steps)
        keys = ("launch", "wait", "cpu_experts", "host", "gpu_dense", "gpu_experts", "total")
        return {k: round(getattr(self, k) / n * 1e3, 3) for k in keys}


@dataclass
class Hop:
    """A block on another GPU than the one before it: the graph of the device left ends, its outputs are
    copied into buffers on the next device (outside any graph: a graph holds one device's work), and
    that device's graph reads them."""

    sources: list[torch.Tensor]
    targets: list[torch.Tensor]

    def copy(self) -> None:
        for target, source in zip(self.targets, self.sources):
            target.copy_(source, non_blocking=True)


def _tensors(args) -> list[torch.Tensor]:
    """The tensors of a block's arguments, tuples walked, in order."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, tuple):
            out += _tensors(a)
    return out


class DecodeGraph:
    """Runs `forward` (a model's forward, its layers on `devices`) for single-token steps, replayed from
    graphs on CUDA. On a CPU (`graphs=False`, tests) the same split step runs eagerly.

    Layers on several GPUs cut the step where the device changes (a Hop); `blocks`, the model's OnDevice
    blocks, then move their inputs through this object while it runs the model."""

    def __init__(
        self,
        forward: Callable,
        offload,
        capacity: int,
        devices: str | torch.device | list,
        graphs: bool = True,
        blocks: list = (),
    ):
        self.forward, self.offload = forward, offload
        devices = [devices] if isinstance(devices, (str, torch.device)) else devices
        self.devices = list(dict.fromkeys(torch.device(d) for d in devices))  # each once, in layer order
        self.device = self.devices[0]  # where the step starts: its token, the embeddings
        self.graphs = graphs and self.device.type == "cuda"
        self.blocks = [b for b in blocks if isinstance(b, OnDevice)]
        self.kv = FixedKV(capacity, self.devices)
        self.token = torch.zeros(1, dtype=torch.long, device=self.device)
        self.crossings: dict[int, Crossing] = {}
        # (device, graph): A, then B and A for each MoE layer, and another A after each Hop
        self.segments: list[tuple[torch.device, torch.cuda.CUDAGraph]] = []
        self.order: list[int | Hop] = []  # what comes between two A graphs: a MoE layer's crossing, a Hop
        self.logits: torch.Tensor | None = None
        self.recording: torch.cuda.CUDAGraph | None = None
        self.recording_on: torch.device | None = None
        self.sides: dict[torch.device, torch.cuda.Stream] = {}  # the streams graphs are recorded on
        self.streams: contextlib.ExitStack | None = None  # the side streams made current while recording
        self.pools: dict = {}
        self.failed: str | None = None
        self.replays = 0
        self.times: StepTimes | None = None  # set to a StepTimes to profile replays

    def takes(self, batch: Batch) -> bool:
        """One sequence, one token, a cache already started and with room: the steps recorded here."""
        if self.failed or len(batch.seqs) != 1 or batch.tokens.numel() != 1:
            return False
        cache = batch.seqs[0].cache
        return isinstance(cache, KVCache) and 0 < cache.n < self.kv.capacity and bool(cache.layers[0])

    @torch.inference_mode()  # as the model's forward: the buffers made in its first step are updated here
    def step(self, batch: Batch) -> torch.Tensor:
        """Logits (1, V) of the batch's one token; its cache grows by it."""
        cache = batch.seqs[0].cache
        self.kv.bind(cache)
        self.kv.seek(cache.n)
        self.token.fill_(int(batch.tokens.reshape(-1)[0]))
        if self.segments:
            logits = self._replay()
        elif self.graphs:
            logits = self._first_step()
        else:
            logits = self._run()
        cache.commit(1)
        return logits

    # --- running the step ---------------------------------------------------------------------------

    def _run(self) -> torch.Tensor:
        """The model's forward over the fixed cache; MoE layers come back through split(), blocks'
        inputs through move()."""
        batch = Batch(self.token, [Seq(self.kv, 0, 1)], None)
        self.kv.at = self.device
        if self.offload is not None:
            self.offload.graph = self
        for b in self.blocks:
            b.move = self.move
        try:
            return self.forward(batch)
        finally:
            if self.offload is not None:
                self.offload.graph = None
            for b in self.blocks:
                b.move = to_device

    def move(self, args: tuple, device: torch.device) -> tuple:
        """A block's inputs to its device; while recording, a new device ends one graph and starts the
        next (a Hop)."""
        self.kv.at = device
        if self.recording is None or device == self.recording_on:
            return to_device(args, device)
        self._end_segment()
        moved = to_device(args, device)  # buffers the next graph reads, made outside any graph
        self.order.append(Hop(_tensors(args), _tensors(moved)))
        self._begin_segment(device)
        return moved

    def split(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Offload.run's work for this step: the device part in graph B, the host part between graphs."""
        c = self.crossings.get(layer)
        if c is None:
            c = self.crossings[layer] = Crossing.like(x, ids)
        c.send(x, ids, weights)
        slots = self.offload.slots.get(layer)
        device_part = (
            (lambda: slots.run_resident(layer, x, ids, weights)) if slots is not None else (lambda: None)
        )
        if self.recording is not None:
            self._next_segment()  # A ends with the copies out
            gpu_out = device_part()
            self._next_segment()  # B: the resident experts
            self.order.append(layer)
        else:
            gpu_out = self._cross(layer, c, device_part)
        return c.receive(gpu_out).to(x.dtype)

    def _cross(self, layer: int, c: Crossing, device_part: Callable):
        """From A's end to the next A: launch the device part, compute the cold experts meanwhile."""
        off = self.offload
        if c.sent is not None:
            c.sent.record(torch.cuda.current_stream(c.x_device.device))
        with off.lock:  # the table B reads and the host's copy of it agree: moves wait for both
            gpu_out = device_part()
            resident = off.resident(layer)
        t0 = time.perf_counter()
        if c.sent is not None:
            c.sent.synchronize()
        t1 = time.perf_counter()
        on_device = torch.from_numpy(resident)[c.ids]  # (T, K)
        cold = ~on_device
        off.count(layer, c.ids, resident, on_device)
        if cold.any():
            c.cpu_out.copy_(off.run_cold(layer, c.x, c.ids, c.weights, cold))
        else:
            c.cpu_out.zero_()
        t2 = time.perf_counter()
        off.finish_layer(layer, c.x_device)
        if self.times is not None:
            self.times.wait += t1 - t0
            self.times.cpu_experts += t2 - t1
        return gpu_out

    # --- recording and replaying --------------------------------------------------------------------

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self.sides:
            self.sides[device] = side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
        return self.sides[device]

    def _sync(self) -> None:
        """Every device's own stream after the side streams' work, and the host after both."""
        for device, side in self.sides.items():
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)

    def _first_step(self) -> torch.Tensor:
        """Run the step eagerly (kernels compile and tune), then record it; a step that cannot be
        recorded leaves decode on the eager path, with a warning saying why."""
        with torch.cuda.stream(self._side(self.device)):
            logits = self._run().clone()
        self._sync()
        self._record()
        return logits

    def _record(self) -> None:
        if self.offload is not None:
            self.offload.wait_idle()  # no copies in flight while recording
        self.pools = {}  # a graph memory pool per device, shared by its segments
        lock = self.offload.lock if self.offload is not None else contextlib.nullcontext()
        with lock, contextlib.ExitStack() as self.streams:
            try:
                self._begin_segment(self.device)
                self.logits = self._run()
                self._end_segment()
            except Exception as e:  # an op that cannot be captured: this model decodes eagerly
                self._give_up(e)  # while the capture's own stream is still current: it ends there
        self.streams, self.recording_on = None, None
        self._sync()

    def _give_up(self, e: Exception) -> None:
        if self.recording is not None:
            with contextlib.suppress(Exception), torch.cuda.device(self.recording_on):
                self.recording.capture_end()
            self.recording = None
        self.segments, self.order, self.logits = [], [], None
        self.failed = f"{type(e).__name__}: {e}"
        warnings.warn(f"CUDA graphs are off for this model, decode runs eagerly: {self.failed}", stacklevel=4)

    def _begin_segment(self, device: torch.device) -> None:
        if device != self.recording_on:  # its side stream current (and so the device) until recorded
            self.streams.enter_context(torch.cuda.stream(self._side(device)))
            self.recording_on = device
        pool = self.pools.setdefault(device, torch.cuda.graph_pool_handle())
        self.recording = torch.cuda.CUDAGraph()
        # a capture begins and ends on the current device's stream: the block that asked may have left
        # another device current (OnDevice restores the one before it)
        with torch.cuda.device(device):
            # thread-local: the cache's mover thread may copy experts (on its own stream) meanwhile
            self.recording.capture_begin(pool=pool, capture_error_mode="thread_local")

    def _end_segment(self) -> None:
        graph, self.recording = self.recording, None
        with torch.cuda.device(self.recording_on):
            graph.capture_end()
        self.segments.append((self.recording_on, graph))

    def _next_segment(self) -> None:
        self._end_segment()
        self._begin_segment(self.recording_on)

    def _replay(self) -> torch.Tensor:
        t = self.times
        t0 = time.perf_counter()
        segments = iter(self.segments)
        marks = [] if t is not None else None  # (kind, start, end) events of each graph, to time it
        self._launch(next(segments), marks, "gpu_dense")
        for between in self.order:
            if isinstance(between, Hop):
                between.copy()
            else:
                b = next(segments)
                self._cross(
                    between, self.crossings[between], lambda b=b: self._launch(b, marks, "gpu_experts")
                )
            self._launch(next(segments), marks, "gpu_dense")
        self.replays += 1
        if t is not None:
            t1 = time.perf_counter()
            # the caller would wait for the logits
            torch.cuda.current_stream(self.logits.device).synchronize()
            t.wait += time.perf_counter() - t1
            self._account(marks, time.perf_counter() - t0)
        return self.logits

    def _launch(self, segment: tuple, marks: list | None, kind: str) -> None:
        """Replay a (device, graph) segment, timed into marks where profiling."""
        device, graph = segment
        t0 = time.perf_counter()
        with torch.cuda.device(device):  # a graph replays on the current device's stream
            if marks is None:
                graph.replay()
                return
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
        marks.append((kind, start, end))
        self.times.launch += time.perf_counter() - t0

    def _account(self, marks: list, total: float) -> None:
        t = self.times
        for kind, start, end in marks:
            setattr(t, kind, getattr(t, kind) + start.elapsed_time(end) / 1e3)
        t.steps += 1
        t.total += total

    def report(self) -> dict:
        """What `Engine.stats()` shows of the recorded decode."""
        return {
            "cuda_graphs": bool(self.segments),
            "segments": len(self.segments),
            "replays": self.replays,
            "off_because": self.failed,
        }


def for_model(model, offload, devices: list[str], ctx: int, forward: Callable) -> DecodeGraph | None:
    """A DecodeGraph where its graphs serve: the model's layers on CUDA devices (one or several),
    quantized expert slots (or none), and DSRUN_CUDA_GRAPHS not 0. Else None: decode stays eager."""
    if os.environ.get("DSRUN_CUDA_GRAPHS", "1") == "0":
        return None
    if any(torch.device(d).type != "cuda" for d in devices):
        return None
    if offload is not None and any(not s.quantized for s in offload.slots.values()):
        return None  # dense slots run expert by expert, from host-side tables
    return DecodeGraph(forward, offload, ctx, devices, blocks=model.blocks)
