"""Quantized weight matrices left in the GGUF's blocks and multiplied by ggml's own kernels.

Decode reads every dense weight once per token, so keeping projections in their quant type (not
dequantized to float32) cuts the bytes a token reads 4-8x; the kernels are llama.cpp's, and so are the
numerics (activations rounded to the type's dot-product partner). Graphs for a few rows are built once
per set of matrices and reused, so a decode step only copies x in and runs them.

Matrices sharing an input run as one graph (q/k/v; gate/up with down), one thread wake-up per group.
Legend: T rows of input, K input width, N output rows, F feed-forward width.
"""

from __future__ import annotations

import ctypes as C
import os
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from dsrun.gguf_file import TensorInfo
from dsrun.quants import dequantize

FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
REUSED_ROWS = 8  # graphs for up to this many rows (decode, small batches) are kept; larger ones are built
_WORK_LOCK = threading.Lock()  # one work buffer (quantized activations) serves every dense graph
_WORK = [np.empty(0, np.uint8)]


def _ggml():
    from dsrun.offload import backend_ggml

    return backend_ggml


def available() -> bool:
    return _ggml().ggml() is not None


class GGUFMatrix:
    """An (N, K) quantized weight as it lies in the mapped file, with a ggml tensor header over it; or a
    stack (H, N, K) of one such matrix per head, multiplied by `per_head`."""

    def __init__(self, info: TensorInfo):
        g = _ggml()
        lib = g.ggml()
        self.lib = lib  # kept for __del__, which may run while Python shuts down
        self.info = info
        self.shape = tuple(info.shape)  # (N, K) or (H, N, K)
        self.data = g.aligned(info.data)  # the file's bytes: must outlive the tensor pointing into them
        self.ctx = lib.ggml_init(g.InitParams(g.SCRATCH_OVERHEAD >> 8, None, True))  # one header
        if len(self.shape) == 3:
            H, N, K = self.shape
            self.tensor = lib.ggml_new_tensor_3d(self.ctx, int(info.qtype), K, N, H)  # ne (K, N, H)
        else:
            N, K = self.shape
            self.tensor = lib.ggml_new_tensor_2d(self.ctx, int(info.qtype), K, N)  # ne (K, N)
        self.buffer = lib.ggml_backend_cpu_buffer_from_ptr(self.data.ctypes.data, self.data.nbytes)
        if lib.ggml_backend_tensor_alloc(self.buffer, self.tensor, self.data.ctypes.data) != 0:
            raise RuntimeError(f"ggml could not map {info.name}")
        self.graphs: dict[tuple, Graph] = {}  # reused graphs this matrix leads, by (kind, partners, rows)
        self.device = torch.device("cpu")

    def __del__(self):
        if getattr(self, "buffer", None):
            self.lib.ggml_backend_buffer_free(self.buffer)  # the wrapper only: the bytes are the file's
        if getattr(self, "ctx", None):
            self.lib.ggml_free(self.ctx)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.info.data, self.info.qtype, self.shape, name=self.info.name)  # (N, K)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows `ids` (an embedding lookup), reading only their blocks: (T, K)."""
        block, type_size = GGML_QUANT_SIZES[self.info.qtype]
        N, K = self.shape
        raw = self.data.reshape(N, K // block * type_size)[ids.cpu().numpy()]  # (T, row bytes)
        return dequantize(raw, self.info.qtype, (len(raw), K), name=self.info.name)

    def to(self, device) -> GGUFMatrix | DeviceMatrix | torch.Tensor:
        """Itself on the CPU; on a GPU its bytes where gpu_quant's kernels take the type (what the plan
        counts), else a float32 copy."""
        from dsrun.offload import gpu_quant

        device = torch.device(device)
        if device.type == "cpu":
            return self
        if self.info.qtype in gpu_quant.QUANT_TYPES and len(self.shape) == 2:
            return DeviceMatrix(self, device)
        return self.dequantize().to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return run_graph("linear", [self], x, lambda lib, ctx, xt: [lib.ggml_mul_mat(ctx, self.tensor, xt)])[
            0
        ]


class DeviceMatrix:
    """A GGUFMatrix's bytes on a GPU, multiplied there by gpu_quant's kernels: no float copy."""

    def __init__(self, m: GGUFMatrix, device: torch.device):
        self.qtype, self.shape, self.device = m.info.qtype, m.shape, device
        self.data = torch.from_numpy(np.array(m.data)).view(-1).to(device)  # (bytes,)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from dsrun.offload.gpu_quant import quantized_matmul

        return quantized_matmul(x, self.data, self.qtype, *self.shape)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        from dsrun.offload.gpu_quant import dequantize_gpu

        N, K = self.shape
        raw = self.data.view(N, -1)[ids.to(self.device)]  # (T, row bytes)
        return dequantize_gpu(raw.contiguous(), self.qtype, len(raw), K, dtype=torch.float32)  # (T, K)


def load_matrix(info: TensorInfo) -> GGUFMatrix | None:
    """A GGUFMatrix for a quantized 2-D tensor when ggml is there; None where torch should run it
    (dequantized to float32; also everywhere with DSRUN_DENSE=torch, the exact reference path)."""
    return _quantized(info, 2)


def load_heads(info: TensorInfo) -> GGUFMatrix | None:
    """The same for a stack of per-head matrices (H, N, K), run by `per_head`."""
    return _quantized(info, 3)


def _quantized(info: TensorInfo, ndim: int) -> GGUFMatrix | None:
    if os.environ.get("DSRUN_DENSE", "ggml") == "torch":
        return None
    if info.qtype in FLOAT_TYPES or len(info.shape) != ndim or not available():
        return None
    return GGUFMatrix(info)


class Graph:
    """A ggml graph from a (T, K) float32 input to its outputs, in memory of its own.

    Everything a call does not change is made once: torch views over the input and the outputs, and the
    compute plan per thread count, so a call is a copy in, one ggml_graph_compute and a copy out.
    """

    def __init__(self, in_shape: tuple, out_shapes: Sequence[tuple], floats: int, build: Callable):
        """in_shape (T, K) or (H, T, K) in torch order; out_shapes likewise; `floats`: what the input,
        the outputs and the temporaries take."""
        g = _ggml()
        lib = g.ggml()
        self.lib = lib
        self.memory = np.empty(g.SCRATCH_OVERHEAD + 4 * floats, np.uint8)
        self.ctx = lib.ggml_init(g.InitParams(self.memory.nbytes, self.memory.ctypes.data, False))
        ne = tuple(reversed(in_shape))  # ggml's order: (K, T) or (K, T, H)
        new_tensor = lib.ggml_new_tensor_2d if len(ne) == 2 else lib.ggml_new_tensor_3d
        self.x = new_tensor(self.ctx, g.GGML_TYPE_F32, *ne)
        self.outputs = build(lib, self.ctx, self.x)
        self.graph = lib.ggml_new_graph(self.ctx)
        for out in self.outputs:
            lib.ggml_build_forward_expand(self.graph, out)
        self.x_in = _float_view(lib, self.x, in_shape)  # over the graph's input
        self.results = [_float_view(lib, out, shape) for out, shape in zip(self.outputs, out_shapes)]
        self.plans: dict[int, tuple] = {}  # threads -> (plan, the work buffer it points into)

    def __del__(self):
        if getattr(self, "ctx", None):
            self.lib.ggml_free(self.ctx)

    def __call__(self, x: torch.Tensor, threads: int) -> list[torch.Tensor]:
        self.x_in.copy_(x.detach())  # to float32 where it is not
        with _WORK_LOCK:
            plan, work = self.plans.get(threads, (None, None))
            if work is not _WORK[0]:  # first call at this thread count, or the work buffer grew since
                plan = self._plan(threads)
                self.plans[threads] = plan, _WORK[0]
            if self.lib.ggml_graph_compute(self.graph, C.byref(plan)) != 0:
                raise RuntimeError("ggml graph compute failed")
        return [r.clone() for r in self.results]  # the graph's memory is reused by the next call

    def _plan(self, threads: int):
        g = _ggml()
        plan = self.lib.ggml_graph_plan(self.graph, threads, g.shared_threadpool(threads))
        if _WORK[0].nbytes < plan.work_size:
            _WORK[0] = np.empty(2 * plan.work_size, np.uint8)
        plan.work_data = _WORK[0].ctypes.data
        return plan


def _float_view(lib, tensor, shape: tuple) -> torch.Tensor:
    """A float32 ggml tensor's data as a torch tensor sharing its memory."""
    data = np.ctypeslib.as_array(C.cast(lib.ggml_get_data(tensor), C.POINTER(C.c_float)), shape=shape)
    return torch.from_numpy(data)


def run_graph(
    kind: str, matrices: Sequence[GGUFMatrix], x: torch.Tensor, build: Callable
) -> list[torch.Tensor]:
    """Run (and for a few rows, keep) the graph `build` makes over x for these matrices."""
    lead_shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (T, K)
    T, K = x2.shape
    widths = [m.shape[0] for m in matrices] if kind != "swiglu" else [matrices[2].shape[0]]
    if T == 0:  # no rows (a chunk that asks for no logits): ggml would leave the results unallocated
        return [x2.new_zeros(*lead_shape, n) for n in widths]
    key = (kind, tuple(id(m) for m in matrices), T)
    graph = matrices[0].graphs.get(key)
    if graph is None:
        # the input, each matrix's product and one temporary as wide (swiglu's), with alignment slack
        floats = T * (K + 2 * sum(m.shape[0] for m in matrices)) + 64 * (2 * len(matrices) + 4)
        graph = Graph((T, K), [(T, n) for n in widths], floats, build)
        if T <= REUSED_ROWS:
            matrices[0].graphs[key] = graph
    outs = graph(x2, torch.get_num_threads())
    return [o.reshape(*lead_shape, o.shape[-1]) for o in outs]


def per_head(x: torch.Tensor, w: torch.Tensor | GGUFMatrix) -> torch.Tensor:
    """Each head's rows times that head's matrix: x (T, H, K), w (H, N, K) -> (T, H, N).

    A quantized stack runs as one ggml mul_mat batched over heads, as llama.cpp runs MLA's k_b and v_b
    (activations rounded to the type's dot-product partner); a float one as an einsum.
    """
    if isinstance(w, torch.Tensor):
        return torch.einsum("thk,hnk->thn", x, w)
    T, H, K = x.shape
    N = w.shape[1]
    if T == 0:
        return x.new_zeros(0, H, N)
    key = ("per_head", id(w), T)
    graph = w.graphs.get(key)
    if graph is None:
        graph = Graph(
            (H, T, K),
            [(H, T, N)],
            H * T * (K + N) + 256,
            lambda lib, ctx, xt: [lib.ggml_mul_mat(ctx, w.tensor, xt)],
        )  # input ne (K, T, H), product ne (N, T, H)
        if T <= REUSED_ROWS:
            w.graphs[key] = graph
    (out,) = graph(x.transpose(0, 1), torch.get_num_threads())  # (H, T, N)
    return out.transpose(0, 1)  # (T, H, N)


def linear(x: torch.Tensor, w: torch.Tensor | GGUFMatrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias) for a float tensor, a GGUFMatrix or a DeviceMatrix."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    y = w(x)
    return y if bias is None else y + bias


def linears(x: torch.Tensor, weights: Sequence[torch.Tensor | GGUFMatrix]) -> list[torch.Tensor]:
    """Several projections of one input; GGUF matrices run as one graph."""
    if all(isinstance(w, GGUFMatrix) for w in weights):

        def build(lib, ctx, xt):
            return [lib.ggml_mul_mat(ctx, w.tensor, xt) for w in weights]

        return run_graph("linears", weights, x, build)
    return [linear(x, w) for w in weights]


def swiglu(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    """down(silu(gate x) * up x) with weights in numpy order: gate/up (F, D), down (D, F)."""
    if all(isinstance(w, GGUFMatrix) for w in (gate, up, down)):

        def build(lib, ctx, xt):
            act = lib.ggml_swiglu_split(
                ctx, lib.ggml_mul_mat(ctx, gate.tensor, xt), lib.ggml_mul_mat(ctx, up.tensor, xt)
            )  # ne (F, T)
            return [lib.ggml_mul_mat(ctx, down.tensor, act)]  # ne (D, T)

        return run_graph("swiglu", [gate, up, down], x, build)[0]
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)
