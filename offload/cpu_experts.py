"""Cold experts on the CPU: one interface over a whole MoE layer, the GGUF -> int4/int8 conversion every
backend shares, the F32 reference backend, and the choice of backend for this machine.

A backend computes, in one call per layer, the SwiGLU experts `down(silu(gate x) * up x)` of the
(token, expert) assignments placed on the CPU and returns their weighted sum. Backends:
  dequant   F32 weights, torch matmuls: the correctness reference (4-8x the memory of Q4)
  torch     torch's weight-only int4 (group 32, bf16 activations) and int8 (per channel) CPU kernels
  ort       ONNX Runtime's fused QMoE op: the whole layer in one call, int8 activations
  openvino  one compiled OpenVINO model per layer with compressed int4/int8 weights
The converted weights of every backend but `dequant` are written once to memory-mapped shards
(offload/shards.py) and reused on the next start.

Conversion goes through one exact intermediate, `GroupQuant`: w = scale * code + bias per group of
G = 32 weights along K. Q4_0, Q4_1, Q4_K (4-bit codes) and Q8_0 (8-bit) decode into it exactly; every
other type is dequantized and requantized (4-bit for Q2_K/Q3_K-sized types, else 8-bit).

Legend: T tokens, K experts per token, A active (token, expert) assignments, D model width (hidden),
F expert width, E experts in a layer, Es experts loaded, N output rows of a matrix, Kin its input width,
G group size (32), B quant blocks.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import platform
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from dsrun.errors import DsrunError, UnsupportedModelError
from dsrun.gguf_file import TensorInfo
from dsrun.quants import dequantize, random_blocks

from . import shards

Q = GGMLQuantizationType
GROUP = 32  # weights per scale: Q4_0/Q8_0 blocks and Q4_K sub-blocks are 32 wide
SMALL_COMBINE = 64  # assignments up to which a layer's outputs are summed in numpy
PROJECTIONS = ("gate", "up", "down")
ZERO_TOLERANCE = 1e-3  # code units: -bias / scale of an integer zero point is off by float rounding
REQUANT_4BIT_MAX_BPW = 3.5  # types of at most this many bits per weight requantize to 4 bits, others to 8


class BackendUnavailableError(DsrunError):
    """The CPU expert backend asked for cannot run here (package missing, shape unsupported)."""


def default_threads() -> int:
    """Physical cores this process may use: a second hyper-thread per core adds no memory bandwidth."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(psutil.cpu_count(logical=False) or usable, usable))


# --- the layer's shape ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerShape:
    """What a backend needs to know about a MoE layer before seeing its weights."""

    n_expert: int  # E
    hidden: int  # D
    ff: int  # F
    top_k: int  # K: experts per token, what one decode step computes
    qtypes: tuple[GGMLQuantizationType, GGMLQuantizationType, GGMLQuantizationType]  # gate, up, down

    @classmethod
    def from_tensors(cls, gate: TensorInfo, up: TensorInfo, down: TensorInfo, top_k: int) -> LayerShape:
        E, F_, D = gate.shape  # TensorInfo shapes are in weights, numpy order
        return cls(E, D, F_, top_k, (gate.qtype, up.qtype, down.qtype))

    def key(self) -> str:
        types = ",".join(q.name for q in self.qtypes)
        return f"E{self.n_expert}xD{self.hidden}xF{self.ff}xK{self.top_k}:{types}"


# --- GGUF -> groups of 32: the exact intermediate ------------------------------------------------------


@dataclass
class GroupQuant:
    """One matrix as w[n, k] = scale[n, k // G] * codes[n, k] + bias[n, k // G]."""

    codes: np.ndarray  # (N, Kin) uint8, < 2**bits
    scale: np.ndarray  # (N, Kin/G) float32
    bias: np.ndarray  # (N, Kin/G) float32
    bits: int  # 4 or 8

    def fields(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.codes, self.scale, self.bias

    def to_float(self) -> np.ndarray:
        N, Kin = self.codes.shape
        g = self.codes.reshape(N, -1, GROUP).astype(np.float32)  # (N, Kin/G, G)
        return (g * self.scale[..., None] + self.bias[..., None]).reshape(N, Kin)

    def integer_zero(self) -> GroupQuant:
        """The same matrix as scale * (code - zero) with integer zero points (what ORT and OpenVINO take).

        Zero points that already are integers (Q4_0, Q8_0, requantized types) are kept. Otherwise
        (Q4_1, Q4_K) the codes widen to 8 bits, whose zero point rounds 16x finer: the error is at most
        scale / 32 per weight, where rounding a 4-bit zero point would cost up to scale / 2.
        A group with scale 0 but a non-zero bias (a constant sub-block) becomes zeros.
        """
        if self.has_integer_zero():
            return self
        wide = self.widened(8)
        zero = np.clip(np.rint(wide.zero_float()), 0, 255)
        return GroupQuant(wide.codes, wide.scale, (-wide.scale * zero).astype(np.float32), 8)

    def has_integer_zero(self) -> bool:
        zero = self.zero_float()
        close = np.abs(zero - np.rint(zero)) < ZERO_TOLERANCE
        return bool(
            close.all()
            and zero.min() > -ZERO_TOLERANCE
            and zero.max() < (1 << self.bits) - 1 + ZERO_TOLERANCE
        )

    def zero_float(self) -> np.ndarray:
        """-bias / scale (N, Kin/G): the zero point in code units, 0 where the scale is 0."""
        return -self.bias / np.where(self.scale == 0, 1.0, self.scale)

    def zero_points(self) -> np.ndarray:
        """Integer zero points (N, Kin/G) uint8 of a matrix returned by integer_zero()."""
        return np.rint(self.zero_float()).astype(np.uint8)

    def widened(self, bits: int) -> GroupQuant:
        """The same matrix with 8-bit codes 16 code + 8 (scale / 16): gate and up of different widths can
        share one matrix. Centring the codes keeps bias and scale * code of similar size, which keeps
        bf16 scales and zeros (torch) precise."""
        if bits == self.bits:
            return self
        scale = self.scale / 16
        return GroupQuant((self.codes * 16 + 8).astype(np.uint8), scale, self.bias - 8 * scale, 8)


def canonical_bits(qtype: GGMLQuantizationType) -> int:
    """Code width a type converts to. Requantizing to 4 bits costs ~8% relative error against the GGUF's
    values whatever the type: acceptable only where the type's own error is far larger (Q2_K 30%, Q3_K
    15%); IQ4, Q5 and Q6 types go to 8 bits (0.5%) at twice the bytes (docs/cpu-backends.md)."""
    if qtype in EXACT_DECODERS:
        return EXACT_DECODERS[qtype][0]
    block, type_size = GGML_QUANT_SIZES[qtype]
    return 4 if type_size * 8 <= REQUANT_4BIT_MAX_BPW * block else 8


def expert_matrix(info: TensorInfo, expert: int) -> GroupQuant:
    """Expert `expert` of a stacked GGUF tensor as groups of 32: exact where the type allows."""
    _, N, Kin = info.shape
    if Kin % GROUP:
        raise UnsupportedModelError(f"{info.name}: rows of {Kin} do not split into groups of {GROUP}")
    raw = np.ascontiguousarray(info.data[expert]).reshape(-1)
    if info.qtype in EXACT_DECODERS:
        bits, decode = EXACT_DECODERS[info.qtype]
        block, type_size = GGML_QUANT_SIZES[info.qtype]
        codes, scale, bias = decode(raw.view(np.uint8).reshape(-1, type_size))  # per block, per group
        return GroupQuant(
            codes.reshape(N, Kin).astype(np.uint8),
            scale.reshape(N, -1).astype(np.float32),
            bias.reshape(N, -1).astype(np.float32),
            bits,
        )
    w = dequantize(raw, info.qtype, (N, Kin), name=info.name).numpy()
    return requantize(w, canonical_bits(info.qtype))


def requantize(w: np.ndarray, bits: int) -> GroupQuant:
    """Round-to-nearest asymmetric quantization per group of 32, with integer zero points."""
    N, Kin = w.shape
    g = w.reshape(N, -1, GROUP)  # (N, Kin/G, G)
    top = (1 << bits) - 1
    lo = np.minimum(g.min(-1), 0)  # keep 0 inside the range so the zero point is a valid code
    hi = np.maximum(g.max(-1), 0)
    scale = ((hi - lo) / top).astype(np.float32)
    safe = np.where(scale == 0, 1.0, scale)
    zero = np.clip(np.rint(-lo / safe), 0, top)
    codes = np.clip(np.rint(g / safe[..., None]) + zero[..., None], 0, top)
    return GroupQuant(codes.reshape(N, Kin).astype(np.uint8), scale, (-scale * zero).astype(np.float32), bits)


def _f16_field(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte `at` of every block as float32 (B, 1)."""
    return blocks[:, at : at + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes (B, n) as 2n codes: low nibbles first, then high nibbles (ggml's 32-weight layout)."""
    return np.concatenate([qs & 15, qs >> 4], -1)  # (B, 2n)


def _decode_q4_0(blocks: np.ndarray):
    d = _f16_field(blocks, 0)  # (B, 1)
    return _nibbles(blocks[:, 2:]), d, -8 * d


def _decode_q4_1(blocks: np.ndarray):
    return _nibbles(blocks[:, 4:]), _f16_field(blocks, 0), _f16_field(blocks, 2)


def _decode_q8_0(blocks: np.ndarray):
    d = _f16_field(blocks, 0)  # (B, 1)
    return blocks[:, 2:] ^ 0x80, d, -128 * d  # int8 bytes -> offset binary: code = q + 128


def _decode_q4_k(blocks: np.ndarray):
    s = blocks[:, 4:16].astype(np.int32)  # eight 6-bit scales and mins in 12 bytes (gguf get_scale_min)
    lo, hi, top = s[:, 0:4], s[:, 4:8], s[:, 8:12]  # (B, 4) each
    sc = np.concatenate([lo & 63, (top & 15) | ((lo >> 2) & 48)], -1)  # (B, S=8)
    mn = np.concatenate([hi & 63, (top >> 4) | ((hi >> 2) & 48)], -1)  # (B, S)
    qs = blocks[:, 16:].reshape(-1, 4, 32)  # (B, 4, 32): 64 weights per 32 bytes
    codes = np.stack([qs & 15, qs >> 4], 2).reshape(-1, 8, 32)  # (B, 4, 2, 32) -> (B, S, G)
    # gguf computes (d * sc) * q - dmin * m: scale * code + bias rounds the same
    return codes, _f16_field(blocks, 0) * sc, -(_f16_field(blocks, 2) * mn)


EXACT_DECODERS = {  # qtype -> (code bits, blocks (B, type_size) uint8 -> codes, scale, bias per group)
    Q.Q4_0: (4, _decode_q4_0),
    Q.Q4_1: (4, _decode_q4_1),
    Q.Q8_0: (8, _decode_q8_0),
    Q.Q4_K: (4, _decode_q4_k),
}


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (..., n) as bytes, two 4-bit codes a byte low nibble first; 8-bit codes as they are."""
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:  # zero-point rows of an odd group count pad to a whole byte
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], -1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)  # (..., n/2)


def stack_rows(a: GroupQuant, b: GroupQuant, *, interleave: bool) -> GroupQuant:
    """gate and up as one matrix (2F, D): b's rows after a's, or interleaved a0 b0 a1 b1 ..."""
    bits = max(a.bits, b.bits)
    a, b = a.widened(bits), b.widened(bits)

    def join(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        if not interleave:
            return np.concatenate([x, y])
        return np.stack([x, y], 1).reshape(-1, x.shape[1])  # (F, 2, n) -> (2F, n)

    return GroupQuant(join(a.codes, b.codes), join(a.scale, b.scale), join(a.bias, b.bias), bits)


# --- the interface -------------------------------------------------------------------------------------


@dataclass
class Assignments:
    """The active assignments of a step, grouped by loaded expert (ascending)."""

    x: torch.Tensor  # (A, D) float32: each assignment's token row
    experts: np.ndarray  # (A,) int64: its expert
    local: np.ndarray  # (A,) int64: that expert's index among the layer's loaded experts
    tokens: torch.Tensor  # (A,) int64: its token
    weights: torch.Tensor  # (A,) float32: its routing weight

    def groups(self) -> list[tuple[int, int, int]]:
        """(loaded expert, first row, end row) of each expert's run of rows."""
        starts = np.flatnonzero(np.r_[True, self.local[1:] != self.local[:-1]])
        ends = np.r_[starts[1:], len(self.local)]
        return list(zip(self.local[starts].tolist(), starts.tolist(), ends.tolist()))


def combine(y: np.ndarray, weights: np.ndarray, tokens: np.ndarray, n_tokens: int) -> np.ndarray:
    """sum over assignments a of weights[a] * y[a] into row tokens[a]: (n_tokens, D).

    numpy on one thread, a row at a time: torch's index_add_ wakes every pool thread (ms a call at decode
    sizes) and np.add.at takes ~25 us a row, where a row's add takes ~1 us. The sums are np.add.at's,
    bit for bit (the same additions in the same order).
    """
    weighted = y * weights[:, None]  # (A, D)
    if n_tokens == 1:  # a decode step: a sum over axis 0 adds the rows in order, in two numpy calls not 2A
        return weighted.sum(0, keepdims=True)  # (1, D)
    out = np.zeros((n_tokens, y.shape[1]), dtype=np.float32)
    for row, t in zip(weighted, tokens.tolist()):
        out[t] += row
    return out


class CPUExperts(ABC):
    """Routed experts computed on the CPU, one call per MoE layer."""

    name: str = ""
    version: int = 1  # bump when the converted layout changes: old shards are then rebuilt
    maps_file: bool = False  # computes on the mapped file's bytes: holding an expert costs no RAM

    def __init__(self, *, threads: int | None = None):
        self.threads = threads or default_threads()
        self.layers: dict[int, object] = {}  # layer -> the backend's loaded state
        self.loaded: dict[int, np.ndarray] = {}  # layer -> (E,) int64 loaded index of each expert, or -1

    def load_layer(
        self,
        layer: int,
        gate: TensorInfo,
        up: TensorInfo,
        down: TensorInfo,
        experts: list[int] | None = None,
    ) -> None:
        """Make `experts` (default: all) of `layer` computable.

        GGUF shapes: gate/up (E, F, D), down (E, D, F).
        """
        E = gate.shape[0]
        experts = list(range(E)) if experts is None else sorted(experts)
        index = np.full(E, -1, np.int64)
        index[experts] = np.arange(len(experts))
        self.layers[layer] = self._load(layer, gate, up, down, experts)
        self.loaded[layer] = index

    def unload_layer(self, layer: int) -> None:
        self.layers.pop(layer, None)
        self.loaded.pop(layer, None)

    def forward(
        self,
        layer: int,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        active: torch.Tensor,
    ) -> torch.Tensor:
        """sum over active (t, k) of weights[t, k] * expert[expert_ids[t, k]](x[t]): (T, D) float32.

        x (T, D) float32, expert_ids (T, K) int64, weights (T, K) float32, active (T, K) bool: the
        assignments this call computes (the others run elsewhere and add their share there).
        """
        a = self.assignments(layer, x, expert_ids, weights, active)
        if a is None:
            return torch.zeros(x.shape, dtype=torch.float32)
        y = self._compute(self.layers[layer], a)  # (A, D)
        if len(y) > SMALL_COMBINE:
            return torch.zeros(x.shape, dtype=torch.float32).index_add_(0, a.tokens, y * a.weights[:, None])
        return torch.from_numpy(combine(y.numpy(), a.weights.numpy(), a.tokens.numpy(), len(x)))

    def assignments(self, layer, x, expert_ids, weights, active) -> Assignments | None:
        # numpy: these few tiny index operations cost ~1 us each there, 3-5 us each in torch
        tokens, slots = np.nonzero(active.numpy())  # (A,) each
        if len(tokens) == 0:
            return None
        experts = expert_ids.numpy()[tokens, slots]  # (A,)
        local = self.loaded[layer][experts]
        if (local < 0).any():
            missing = sorted(set(experts[local < 0].tolist()))
            raise ValueError(f"experts {missing} of layer {layer} are not loaded on the CPU")
        order = np.argsort(local, kind="stable")
        tokens, slots = tokens[order], slots[order]
        rows = torch.from_numpy(x.float().numpy()[tokens])  # (A, D)
        w = torch.from_numpy(weights.float().numpy()[tokens, slots])  # (A,)
        return Assignments(rows, experts[order], local[order], torch.from_numpy(tokens), w)

    def stats(self) -> dict:
        return {"backend": self.name, "layers": len(self.layers), "threads": self.threads}

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here although its package imports (an old version), or None."""
        return None

    @abstractmethod
    def _load(self, layer: int, gate: TensorInfo, up: TensorInfo, down: TensorInfo, experts: list[int]):
        """The backend's state for these experts of the layer."""

    @abstractmethod
    def _compute(self, state, a: Assignments) -> torch.Tensor:
        """Each assignment's expert output, unweighted: (A, D) float32."""


class DequantExperts(CPUExperts):
    """The reference: weights dequantized to F32 (bit-exact with gguf), torch matmuls."""

    name = "dequant"

    def _load(self, layer, gate, up, down, experts):
        def f32(info: TensorInfo, e: int) -> torch.Tensor:
            _, N, Kin = info.shape
            return dequantize(info.data[e], info.qtype, (N, Kin), name=info.name)

        return [tuple(f32(t, e) for t in (gate, up, down)) for e in experts]

    def _compute(self, state, a: Assignments) -> torch.Tensor:
        y = torch.empty_like(a.x)
        for e, r0, r1 in a.groups():
            g, u, d = state[e]
            x = a.x[r0:r1]
            y[r0:r1] = F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
        return y


class ConvertedExperts(CPUExperts):
    """A backend whose weights are converted from GGUF once per (model, layer, backend version), to a shard.

    Subclasses say how one expert converts (`convert_expert`: named arrays, the same shapes for every
    expert) and how a layer is built from the stacked arrays (`build`: arrays (E, ...) memory-mapped).
    """

    def __init__(self, *, threads: int | None = None, cache_dir: str | Path | None = None, use_shards=True):
        super().__init__(threads=threads)
        self.store = shards.ShardStore(cache_dir) if use_shards else None
        self.converted: list[int] = []  # layers converted in this process (the rest came from shards)
        self.reused: list[int] = []

    @abstractmethod
    def convert_expert(self, gate: GroupQuant, up: GroupQuant, down: GroupQuant) -> dict[str, np.ndarray]:
        """One expert in the backend's layout."""

    @abstractmethod
    def build(self, arrays: dict[str, np.ndarray], experts: list[int], shape: LayerShape):
        """The loaded state for `experts` from the layer's converted arrays, each (E, ...)."""

    def _load(self, layer, gate, up, down, experts):
        shape = LayerShape.from_tensors(gate, up, down, top_k=1)
        self.check_shape(shape)

        def convert(e: int) -> dict[str, np.ndarray]:
            return self.convert_expert(*(expert_matrix(t, e) for t in (gate, up, down)))

        label = f"{self.name}: converting layer {layer}"
        if self.store is None:
            arrays, converted = shards.convert_in_memory(shape.n_expert, convert), True
        else:
            meta = shards.layer_meta(self.name, self.version, layer, (gate, up, down))
            arrays, converted = self.store.load_or_convert(gate.path, meta, shape.n_expert, convert, label)
        (self.converted if converted else self.reused).append(layer)
        return self.build(arrays, experts, shape)

    def check_shape(self, shape: LayerShape) -> None:
        """Raise BackendUnavailableError for a layer this backend cannot run."""

    def stats(self) -> dict:
        return super().stats() | {"converted_layers": len(self.converted), "shard_layers": len(self.reused)}


# --- choosing a backend --------------------------------------------------------------------------------

BACKENDS = {  # name -> (module, class), imported on first use: each pulls in a large runtime
    "dequant": ("dsrun.offload.cpu_experts", "DequantExperts"),
    "torch": ("dsrun.offload.backend_torch", "TorchExperts"),
    "ort": ("dsrun.offload.backend_ort", "OrtExperts"),
    "openvino": ("dsrun.offload.backend_openvino", "OpenVinoExperts"),
    "ggml": ("dsrun.offload.backend_ggml", "GgmlExperts"),
}
CANDIDATES = (
    "ggml",
    "torch",
    "ort",
    "openvino",
)  # what "auto" times; dequant is the reference, never the fastest
BENCH_BYTES = 192 << 20  # weights the micro-benchmark cycles through: several times the last-level cache
BENCH_REPEATS = 12


def backend_class(name: str) -> type[CPUExperts]:
    if name not in BACKENDS:
        raise DsrunError(f"unknown CPU expert backend '{name}': one of auto, {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise BackendUnavailableError(f"CPU expert backend '{name}' cannot be imported here: {e}") from e


def make_backend(name: str, **options) -> CPUExperts:
    cls = backend_class(name)
    reason = cls.unavailable_reason()
    if reason:
        raise BackendUnavailableError(f"CPU expert backend '{name}' cannot run here: {reason}")
    if not issubclass(cls, ConvertedExperts):
        options.pop("cache_dir", None)
        options.pop("use_shards", None)
    return cls(**options)


def available_backends() -> list[str]:
    names = []
    for name in BACKENDS:
        try:
            if backend_class(name).unavailable_reason() is None:
                names.append(name)
        except BackendUnavailableError:
            continue
    return names


def choose_backend(
    shape: LayerShape,
    requested: str | None = None,
    *,
    threads: int | None = None,
    cache_dir: str | Path | None = None,
) -> CPUExperts:
    """The backend named by `requested` (the --cpu-backend flag), or with None / "auto" the fastest here
    for this layer shape: timed once on a synthetic layer, the verdict kept in the cache dir."""
    threads = threads or default_threads()
    if requested not in (None, "auto"):
        return make_backend(requested, threads=threads, cache_dir=cache_dir)
    cache = shards.cache_root(cache_dir) / "cpu-backend.json"
    key = machine_key(shape, threads)
    verdicts = _read_json(cache)
    name = verdicts.get(key, {}).get("backend")
    if name not in CANDIDATES or name not in available_backends():
        timings = benchmark_backends(shape, threads=threads)
        if not timings:
            raise BackendUnavailableError(f"no CPU expert backend can run a layer of shape {shape.key()}")
        name = min(timings, key=timings.get)
        verdicts[key] = {"backend": name, "seconds_per_layer": timings}
        _write_json(cache, verdicts)
    return make_backend(name, threads=threads, cache_dir=cache_dir)


def machine_key(shape: LayerShape, threads: int) -> str:
    """The verdict holds for this layer shape, CPU, thread count and backend versions."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line for line in open("/proc/cpuinfo") if line.startswith("model name")).split(":")[1]
    except (OSError, StopIteration):
        pass
    versions = {name: _package_version(name) for name in CANDIDATES}
    raw = json.dumps([shape.key(), threads, cpu.strip(), versions], sort_keys=True)
    return f"{shape.key()}/t{threads}/{hashlib.sha256(raw.encode()).hexdigest()[:12]}"


def _package_version(backend: str) -> str:
    module = {"torch": "torch", "ort": "onnxruntime", "openvino": "openvino", "ggml": "llama_cpp"}[backend]
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return "-"


def benchmark_backends(shape: LayerShape, *, threads: int) -> dict[str, float]:
    """Seconds per layer at batch 1 (best of a few) of each candidate that can run the shape."""
    layer = synthetic_layer(shape)
    timings = {}
    for name in CANDIDATES:
        try:
            backend = make_backend(name, threads=threads, use_shards=False)
            backend.load_layer(0, *layer)
        except BackendUnavailableError:
            continue
        timings[name] = time_layer(backend, shape, layer[0].shape[0])
    return timings


def synthetic_layer(shape: LayerShape, n_expert: int | None = None, seed: int = 0) -> list[TensorInfo]:
    """gate, up, down of random valid blocks: enough experts that timing them reads memory, not cache."""
    D, F_ = shape.hidden, shape.ff
    dims = ((F_, D), (F_, D), (D, F_))
    expert_bytes = sum(
        n * k * GGML_QUANT_SIZES[q][1] // GGML_QUANT_SIZES[q][0] for (n, k), q in zip(dims, shape.qtypes)
    )
    E = n_expert or min(shape.n_expert, max(2 * shape.top_k, math.ceil(BENCH_BYTES / expert_bytes)))
    layer = []
    for i, ((N, Kin), qtype, proj) in enumerate(zip(dims, shape.qtypes, PROJECTIONS)):
        block, type_size = GGML_QUANT_SIZES[qtype]
        blocks = random_blocks(qtype, E * N * Kin // block, seed=seed + i)
        data = blocks.reshape(E, N, Kin // block * type_size)  # (E, N, row bytes)
        layer.append(TensorInfo(f"blk.0.ffn_{proj}_exps.weight", qtype, (E, N, Kin), data, Path("-"), 0))
    return layer


def write_synthetic_experts(path: str | Path, shape: LayerShape, layers=(0,), seed: int = 0) -> Path:
    """A GGUF holding only the routed-expert tensors of `shape` for `layers`: Gaussian weights (variance
    1 / fan-in) quantized by ggml itself (dsrun.synth.encode), what tests and benchmarks load like a
    real model's layer."""
    from gguf import GGUFWriter

    from dsrun.synth import encode

    rng = np.random.default_rng(seed)
    D, F_ = shape.hidden, shape.ff
    w = GGUFWriter(str(path), "deepseek2")
    for layer in layers:
        for proj, qtype, (N, Kin) in zip(PROJECTIONS, shape.qtypes, ((F_, D), (F_, D), (D, F_))):
            block, type_size = GGML_QUANT_SIZES[qtype]
            data = np.empty((shape.n_expert, N, Kin // block * type_size), np.uint8)  # (E, N, row bytes)
            for e in range(shape.n_expert):  # one expert's floats at a time
                rows = (rng.standard_normal((N, Kin), dtype=np.float32) / np.sqrt(Kin)).astype(np.float32)
                data[e] = encode(rows, qtype).reshape(N, -1)
            w.add_tensor(f"blk.{layer}.ffn_{proj}_exps.weight", data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def time_layer(backend: CPUExperts, shape: LayerShape, n_loaded: int, repeats: int = BENCH_REPEATS) -> float:
    """Best time of one decode step's call (one token, K experts), cycling through the loaded experts."""
    x = torch.randn(1, shape.hidden)
    K = min(shape.top_k, n_loaded)
    weights = torch.full((1, K), 1.0 / K)
    active = torch.ones(1, K, dtype=torch.bool)
    best = math.inf
    for i in range(repeats + 1):
        ids = (torch.arange(K) + i * K) % n_loaded
        t0 = time.perf_counter()
        backend.forward(0, x, ids[None], weights, active)
        if i:  # the first call pays one-time costs
            best = min(best, time.perf_counter() - t0)
    return best


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
