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


class HostTensor:
    """Bytes in this process's memory (a mapped GGUF tensor, a float32 weight) with a ggml tensor header
    over them, nothing copied; `shape` in numpy order. It keeps the bytes: ggml points into them."""

    def __init__(self, data: np.ndarray, qtype: int, shape: Sequence[int], name: str):
        g = _ggml()
        lib = g.ggml()
        self.lib = lib  # kept for __del__, which may run while Python shuts down
        self.shape = tuple(shape)
        self.data = g.aligned(data)
        self.ctx = lib.ggml_init(g.InitParams(g.SCRATCH_OVERHEAD >> 8, None, True))  # one header
        self.tensor = _new_tensor(lib, self.ctx, qtype, self.shape)
        self.buffer = lib.ggml_backend_cpu_buffer_from_ptr(self.data.ctypes.data, self.data.nbytes)
        if lib.ggml_backend_tensor_alloc(self.buffer, self.tensor, self.data.ctypes.data) != 0:
            raise RuntimeError(f"ggml could not map {name}")

    def __del__(self):
        if getattr(self, "buffer", None):
            self.lib.ggml_backend_buffer_free(self.buffer)  # the wrapper only: the bytes are not ggml's
        if getattr(self, "ctx", None):
            self.lib.ggml_free(self.ctx)


def host_float(t: torch.Tensor) -> HostTensor:
    """A float32 CPU weight (a norm's, a float router) as a ggml tensor over its memory."""
    return HostTensor(
        t.detach().float().contiguous().numpy(), _ggml().GGML_TYPE_F32, t.shape, "a float weight"
    )


def _new_tensor(lib, ctx, qtype: int, shape: Sequence[int]):
    """A 1-3 dimensional ggml tensor of a numpy-order shape (ggml's ne is the reverse)."""
    ne = tuple(reversed(shape))
    new = {1: lib.ggml_new_tensor_1d, 2: lib.ggml_new_tensor_2d, 3: lib.ggml_new_tensor_3d}[len(ne)]
    return new(ctx, int(qtype), *ne)


class GGUFMatrix(HostTensor):
    """An (N, K) quantized weight as it lies in the mapped file, with a ggml tensor header over it; or a
    stack (H, N, K) of one such matrix per head, multiplied by `per_head`."""

    def __init__(self, info: TensorInfo):
        super().__init__(info.data, int(info.qtype), info.shape, info.name)  # (N, K) or (H, N, K)
        self.info = info
        self.graphs: dict[tuple, Graph] = {}  # reused graphs this matrix leads, by (kind, partners, rows)
        self.device = torch.device("cpu")

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


GRAPH_SIZE = 96  # tensors and nodes a graph has room for (a fused attention half makes ~30)
GGML_TYPES = {torch.float32: 0, torch.int32: 26}  # GGML_TYPE_F32, GGML_TYPE_I32


class Graph:
    """A ggml graph from float32/int32 inputs to float32 outputs, its tensors in one buffer of its own.

    Everything a call does not change is made once: torch views over the inputs and the outputs, and the
    compute plan per thread count, so a call is copies in, one ggml_graph_compute and copies out.
    """

    def __init__(
        self, inputs: Sequence[tuple[tuple, torch.dtype]], out_shapes: Sequence[tuple], build: Callable
    ):
        """inputs: (shape, dtype) of each, shapes in torch order, (T, K) or (H, T, K); out_shapes likewise;
        build(lib, ctx, *input tensors) -> output tensors."""
        g = _ggml()
        lib = g.ggml()
        self.lib = lib
        size = GRAPH_SIZE * lib.ggml_tensor_overhead() + lib.ggml_graph_overhead_custom(GRAPH_SIZE, False)
        self.headers = np.empty(size, np.uint8)
        self.ctx = lib.ggml_init(g.InitParams(size, self.headers.ctypes.data, True))
        tensors = [_new_tensor(lib, self.ctx, GGML_TYPES[dtype], shape) for shape, dtype in inputs]
        self.outputs = build(lib, self.ctx, *tensors)
        self.graph = lib.ggml_new_graph_custom(self.ctx, GRAPH_SIZE, False)
        for out in self.outputs:
            lib.ggml_build_forward_expand(self.graph, out)
        self.buffer = lib.ggml_backend_alloc_ctx_tensors_from_buft(
            self.ctx, lib.ggml_backend_cpu_buffer_type()
        )
        if not self.buffer:
            raise RuntimeError("ggml could not allocate a graph's tensors")
        self.inputs = [_view(lib, t, shape, dtype) for t, (shape, dtype) in zip(tensors, inputs)]
        self.results = [_view(lib, out, shape, torch.float32) for out, shape in zip(self.outputs, out_shapes)]
        self.plans: dict[int, tuple] = {}  # threads -> (plan, the work buffer it points into)

    def __del__(self):
        if getattr(self, "buffer", None):
            self.lib.ggml_backend_buffer_free(self.buffer)
        if getattr(self, "ctx", None):
            self.lib.ggml_free(self.ctx)

    def __call__(self, inputs: Sequence[torch.Tensor], threads: int, copy: bool = True) -> list[torch.Tensor]:
        """The outputs, copied; or with copy=False views of the graph's memory, valid until its next call
        (a kept graph's outputs used within the step)."""
        for view, x in zip(self.inputs, inputs):
            view.copy_(x.detach())  # to the input's dtype where it is not
        with _WORK_LOCK:
            plan, work = self.plans.get(threads, (None, None))
            if work is not _WORK[0]:  # first call at this thread count, or the work buffer grew since
                plan = self._plan(threads)
                self.plans[threads] = plan, _WORK[0]
            if self.lib.ggml_graph_compute(self.graph, C.byref(plan)) != 0:
                raise RuntimeError("ggml graph compute failed")
        return [r.clone() for r in self.results] if copy else self.results

    def _plan(self, threads: int):
        g = _ggml()
        plan = self.lib.ggml_graph_plan(self.graph, threads, g.shared_threadpool(threads))
        if _WORK[0].nbytes < plan.work_size:
            _WORK[0] = np.empty(2 * plan.work_size, np.uint8)
        plan.work_data = _WORK[0].ctypes.data
        return plan


def _view(lib, tensor, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A ggml tensor's data as a torch tensor sharing its memory."""
    ctype = C.c_float if dtype == torch.float32 else C.c_int32
    data = np.ctypeslib.as_array(C.cast(lib.ggml_get_data(tensor), C.POINTER(ctype)), shape=shape)
    return torch.from_numpy(data)


def kept_graph(owner: GGUFMatrix, key: tuple, rows: int, make: Callable[[], Graph]) -> Graph:
    """owner's graph under `key`, made on first use; graphs of more than REUSED_ROWS rows are not kept."""
    graph = owner.graphs.get(key)
    if graph is None:
        graph = make()
        if rows <= REUSED_ROWS:
            owner.graphs[key] = graph
    return graph


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
    graph = kept_graph(
        matrices[0], key, T, lambda: Graph([((T, K), torch.float32)], [(T, n) for n in widths], build)
    )
    outs = graph([x2], torch.get_num_threads())
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
    graph = kept_graph(
        w,
        ("per_head", id(w), T),
        T,
        lambda: Graph(
            [((H, T, K), torch.float32)],
            [(H, T, N)],
            lambda lib, ctx, xt: [lib.ggml_mul_mat(ctx, w.tensor, xt)],
        ),
    )  # input ne (K, T, H), product ne (N, T, H)
    (out,) = graph([x.transpose(0, 1)], torch.get_num_threads())  # (H, T, N)
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
            return [swiglu_node(lib, ctx, xt, gate, up, down)]

        return run_graph("swiglu", [gate, up, down], x, build)[0]
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def swiglu_node(lib, ctx, x, gate: GGUFMatrix, up: GGUFMatrix, down: GGUFMatrix):
    """The ggml node of down(silu(gate x) * up x) for x ne (D, T): ne (D, T)."""
    act = lib.ggml_swiglu_split(
        ctx, lib.ggml_mul_mat(ctx, gate.tensor, x), lib.ggml_mul_mat(ctx, up.tensor, x)
    )
    return lib.ggml_mul_mat(ctx, down.tensor, act)  # act ne (F, T)


def rms_norm_node(lib, ctx, x, weight: HostTensor, eps: float):
    """The ggml node of rms_norm(x) * weight over each row of x."""
    return lib.ggml_mul(ctx, lib.ggml_rms_norm(ctx, x, eps), weight.tensor)
