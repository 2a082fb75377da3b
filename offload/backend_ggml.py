"""CPU experts on ggml's own kernels (libggml from llama-cpp-python), reading the GGUF's blocks in place.

The layer's expert stacks become ggml tensors whose data is the model file's memory map: nothing is
converted or copied, every GGUF type ggml runs is supported, and the numerics are llama.cpp's (the
activations are quantized to the type's dot-product partner, Q8_K for K-quants, as llama.cpp does).
Experts not in RAM are paged in from the file on first use, so the NVMe tier needs no extra work.

A layer's call runs a four-node graph, the way llama.cpp's build_moe_ffn does: `mul_mat_id` for gate
and up (one row per assignment, its expert as the row's id), `swiglu_split`, `mul_mat_id` for down; it
runs on one ggml thread pool per process whose threads sleep between calls (poll 0), so they leave the
cores to torch in between. Graphs of decode sizes (up to KEPT_ASSIGNMENTS) are built once per layer and
assignment count, their activations in one arena per count that every layer shares (calls run one at a
time): a decode step copies x and the expert ids in, computes, and copies the rows out.

The bindings below follow the ggml.h / ggml-cpu.h that llama-cpp-python installs (site-packages/include);
`unavailable_reason` refuses the backend if a symbol is missing.

Legend: A assignments, D model width, F expert width, E experts; ggml shapes are written ne0-first.
"""

from __future__ import annotations

import ctypes as C
import functools
import importlib.util
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from dsrun.gguf_file import TensorInfo

from .cpu_experts import Assignments, CPUExperts

GGML_TYPE_F32, GGML_TYPE_I32 = 0, 26
MAX_THREADS = 512  # GGML_MAX_N_THREADS
TENSOR_ALIGNMENT = 32  # ggml asserts (and aborts the process) on a less aligned buffer
SCRATCH_OVERHEAD = 1 << 20  # tensor and graph headers of a call's context, with room to spare
KEPT_ASSIGNMENTS = 16  # expert graphs for up to this many assignments are kept (decode, small batches)
GRAPH_NODES = 16  # room in an expert graph (it has 4 nodes and 2 inputs)
ACTIVATION_ALIGNMENT = 64
_POINTER = C.c_void_p


class InitParams(C.Structure):
    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", C.c_void_p), ("no_alloc", C.c_bool)]


class ThreadpoolParams(C.Structure):
    _fields_ = [
        ("cpumask", C.c_bool * MAX_THREADS),
        ("n_threads", C.c_int),
        ("prio", C.c_int),
        ("poll", C.c_uint32),
        ("strict_cpu", C.c_bool),
        ("paused", C.c_bool),
    ]


class ComputePlan(C.Structure):  # struct ggml_cplan
    _fields_ = [
        ("work_size", C.c_size_t),
        ("work_data", C.c_void_p),
        ("n_threads", C.c_int),
        ("threadpool", C.c_void_p),
        ("abort_callback", C.c_void_p),
        ("abort_callback_data", C.c_void_p),
        ("use_ref", C.c_bool),
    ]


SIGNATURES = {  # name -> (library, result, argument types)
    "ggml_init": ("base", _POINTER, [InitParams]),
    "ggml_free": ("base", None, [_POINTER]),
    "ggml_new_tensor_2d": ("base", _POINTER, [_POINTER, C.c_int, C.c_int64, C.c_int64]),
    "ggml_new_tensor_3d": ("base", _POINTER, [_POINTER, C.c_int, C.c_int64, C.c_int64, C.c_int64]),
    "ggml_get_data": ("base", _POINTER, [_POINTER]),
    "ggml_mul_mat": ("base", _POINTER, [_POINTER, _POINTER, _POINTER]),
    "ggml_mul_mat_id": ("base", _POINTER, [_POINTER, _POINTER, _POINTER, _POINTER]),
    "ggml_swiglu_split": ("base", _POINTER, [_POINTER, _POINTER, _POINTER]),
    "ggml_rms_norm": ("base", _POINTER, [_POINTER, _POINTER, C.c_float]),
    "ggml_mul": ("base", _POINTER, [_POINTER, _POINTER, _POINTER]),
    "ggml_add": ("base", _POINTER, [_POINTER, _POINTER, _POINTER]),
    "ggml_concat": ("base", _POINTER, [_POINTER, _POINTER, _POINTER, C.c_int]),
    "ggml_rope_ext": (
        "base",
        _POINTER,
        [_POINTER, _POINTER, _POINTER, _POINTER, C.c_int, C.c_int, C.c_int] + [C.c_float] * 6,
    ),
    "ggml_view_2d": ("base", _POINTER, [_POINTER, _POINTER, C.c_int64, C.c_int64, C.c_size_t, C.c_size_t]),
    "ggml_view_3d": (
        "base",
        _POINTER,
        [_POINTER, _POINTER, C.c_int64, C.c_int64, C.c_int64, C.c_size_t, C.c_size_t, C.c_size_t],
    ),
    "ggml_reshape_3d": ("base", _POINTER, [_POINTER, _POINTER, C.c_int64, C.c_int64, C.c_int64]),
    "ggml_permute": ("base", _POINTER, [_POINTER, _POINTER, C.c_int, C.c_int, C.c_int, C.c_int]),
    "ggml_cont_2d": ("base", _POINTER, [_POINTER, _POINTER, C.c_int64, C.c_int64]),
    "ggml_new_tensor_1d": ("base", _POINTER, [_POINTER, C.c_int, C.c_int64]),
    "ggml_backend_alloc_ctx_tensors_from_buft": ("base", _POINTER, [_POINTER, _POINTER]),
    "ggml_new_graph": ("base", _POINTER, [_POINTER]),
    "ggml_new_graph_custom": ("base", _POINTER, [_POINTER, C.c_size_t, C.c_bool]),
    "ggml_graph_overhead_custom": ("base", C.c_size_t, [C.c_size_t, C.c_bool]),
    "ggml_tensor_overhead": ("base", C.c_size_t, []),
    "ggml_build_forward_expand": ("base", None, [_POINTER, _POINTER]),
    "ggml_backend_tensor_alloc": ("base", C.c_int, [_POINTER, _POINTER, _POINTER]),
    "ggml_backend_buffer_free": ("base", None, [_POINTER]),
    "ggml_threadpool_params_init": ("base", None, [C.POINTER(ThreadpoolParams), C.c_int]),
    "ggml_cpu_init": ("cpu", None, []),
    "ggml_backend_cpu_buffer_from_ptr": ("cpu", _POINTER, [_POINTER, C.c_size_t]),
    "ggml_backend_cpu_buffer_type": ("base", _POINTER, []),
    "ggml_threadpool_new": ("cpu", _POINTER, [C.POINTER(ThreadpoolParams)]),
    "ggml_graph_plan": ("cpu", ComputePlan, [_POINTER, C.c_int, _POINTER]),
    "ggml_graph_compute": ("cpu", C.c_int, [_POINTER, C.POINTER(ComputePlan)]),
}


def ggml_lib_dir() -> Path | None:
    """Where libggml-base/cpu are: $DSRUN_GGML_LIB (a ggml built for this CPU), else llama-cpp-python's."""
    if os.environ.get("DSRUN_GGML_LIB"):
        return Path(os.environ["DSRUN_GGML_LIB"])
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


@functools.cache
def ggml() -> SimpleNamespace | None:
    """libggml with the functions used here declared, or None if it is missing."""
    lib_dir = ggml_lib_dir()
    if lib_dir is None:
        return None
    try:
        libs = {k: C.CDLL(str(lib_dir / f"libggml-{k}.so"), mode=C.RTLD_GLOBAL) for k in ("base", "cpu")}
    except OSError:
        return None
    api = SimpleNamespace()
    for name, (lib, result, args) in SIGNATURES.items():
        fn = getattr(libs[lib], name, None)
        if fn is None:
            return None
        fn.restype, fn.argtypes = result, args
        setattr(api, name, fn)
    api.ggml_cpu_init()
    return api


@functools.cache
def shared_threadpool(threads: int) -> int:
    """One ggml pool per thread count; its threads sleep between graphs instead of spinning."""
    params = ThreadpoolParams()
    ggml().ggml_threadpool_params_init(C.byref(params), threads)
    params.poll = 0
    return ggml().ggml_threadpool_new(C.byref(params))


def aligned(data: np.ndarray) -> np.ndarray:
    """The array itself if ggml can use its address (always, for tensors mapped from a GGUF file, whose
    data is 32-byte aligned), else an aligned copy."""
    if data.ctypes.data % TENSOR_ALIGNMENT == 0 and data.flags.c_contiguous:
        return data
    raw = np.empty(data.nbytes + TENSOR_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % TENSOR_ALIGNMENT
    copy = raw[start : start + data.nbytes]
    copy[:] = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return copy


class LayerTensors:
    """One layer's expert stacks as ggml tensors over the model file's mapped bytes."""

    def __init__(self, infos: tuple[TensorInfo, TensorInfo, TensorInfo]):
        lib = ggml()
        self.data = [aligned(info.data) for info in infos]  # must outlive the tensors pointing into them
        self.ctx = lib.ggml_init(InitParams(SCRATCH_OVERHEAD, None, True))  # headers only
        self.tensors, self.buffers = [], []
        for info, data in zip(infos, self.data):
            E, N, Kin = info.shape
            t = lib.ggml_new_tensor_3d(self.ctx, int(info.qtype), Kin, N, E)  # ne (Kin, N, E)
            address = data.ctypes.data
            self.buffers.append(lib.ggml_backend_cpu_buffer_from_ptr(address, data.nbytes))
            if lib.ggml_backend_tensor_alloc(self.buffers[-1], t, address) != 0:
                raise RuntimeError(f"ggml could not map {info.name}")
            self.tensors.append(t)
        self.hidden, self.ff = infos[0].shape[2], infos[0].shape[1]
        self.graphs: dict[int, ExpertGraph] = {}  # kept graphs by assignment count

    def __del__(self):
        lib = ggml()
        for buffer in getattr(self, "buffers", ()):
            lib.ggml_backend_buffer_free(buffer)  # frees the wrapper only: the bytes are the file's
        if getattr(self, "ctx", None):
            lib.ggml_free(self.ctx)


class Arena:
    """Activation memory for graphs of A assignments (x, ids, gate, up, act, y), with torch/numpy views
    of the input and output rows."""

    def __init__(self, A: int, D: int, F_: int, memory: np.ndarray | None = None):
        lib = ggml()
        self.A, self.D, self.F = A, D, F_
        sizes = [4 * A * D, 4 * A, 4 * A * F_, 4 * A * F_, 4 * A * F_, 4 * A * D]  # x ids gate up act y
        self.offsets = np.cumsum([0] + [-(-n // ACTIVATION_ALIGNMENT) * ACTIVATION_ALIGNMENT for n in sizes])
        need = int(self.offsets[-1]) + ACTIVATION_ALIGNMENT
        if memory is None or memory.nbytes < need:
            memory = np.empty(need, np.uint8)
        self.memory = memory  # the buffer and the views point into it
        self.address = memory.ctypes.data + (-memory.ctypes.data % ACTIVATION_ALIGNMENT)
        self.buffer = lib.ggml_backend_cpu_buffer_from_ptr(self.address, need - ACTIVATION_ALIGNMENT)
        base = self.address - memory.ctypes.data
        self.x = torch.from_numpy(memory[base : base + 4 * A * D].view(np.float32).reshape(A, D))  # (A, D)
        ids_at = base + int(self.offsets[1])
        self.ids = memory[ids_at : ids_at + 4 * A].view(np.int32)  # (A,)
        y_at = base + int(self.offsets[5])
        self.y = torch.from_numpy(memory[y_at : y_at + 4 * A * D].view(np.float32).reshape(A, D))  # (A, D)

    def __del__(self):
        if getattr(self, "buffer", None):
            ggml().ggml_backend_buffer_free(self.buffer)  # the wrapper only: the memory is numpy's


class ExpertGraph:
    """One layer's graph for an arena's A assignments: headers in memory of its own, the plan made once."""

    def __init__(self, state: LayerTensors, arena: Arena):
        lib = ggml()
        self.lib, self.arena = lib, arena
        A, D = arena.A, arena.D
        size = 8 * lib.ggml_tensor_overhead() + lib.ggml_graph_overhead_custom(GRAPH_NODES, False)
        self.headers = np.empty(size + 1024, np.uint8)
        self.ctx = lib.ggml_init(InitParams(self.headers.nbytes, self.headers.ctypes.data, True))
        x = lib.ggml_new_tensor_3d(self.ctx, GGML_TYPE_F32, D, 1, A)  # ne (D, 1, A): a row per assignment
        ids = lib.ggml_new_tensor_2d(self.ctx, GGML_TYPE_I32, 1, A)  # ne (1, A): its expert
        gate_w, up_w, down_w = state.tensors
        gate, up = lib.ggml_mul_mat_id(self.ctx, gate_w, x, ids), lib.ggml_mul_mat_id(self.ctx, up_w, x, ids)
        act = lib.ggml_swiglu_split(self.ctx, gate, up)  # ne (F, 1, A)
        y = lib.ggml_mul_mat_id(self.ctx, down_w, act, ids)  # ne (D, 1, A)
        for tensor, offset in zip((x, ids, gate, up, act, y), arena.offsets):
            if lib.ggml_backend_tensor_alloc(arena.buffer, tensor, arena.address + int(offset)) != 0:
                raise RuntimeError("ggml could not place an expert graph's activations")
        self.graph = lib.ggml_new_graph_custom(self.ctx, GRAPH_NODES, False)
        lib.ggml_build_forward_expand(self.graph, y)
        self.plan, self.work = None, None  # the plan, and the work buffer it points into

    def __del__(self):
        if getattr(self, "ctx", None):
            self.lib.ggml_free(self.ctx)


class GgmlExperts(CPUExperts):
    name = "ggml"
    version = 1
    maps_file = True

    def __init__(self, *, threads: int | None = None):
        super().__init__(threads=threads)
        self.pool = shared_threadpool(self.threads)
        self.arenas: dict[tuple[int, int, int], Arena] = {}  # (A, D, F) -> the kept graphs' activations
        self.scratch = np.empty(0, np.uint8)  # activations of a larger call's graph, reused
        self.work = np.empty(0, np.uint8)  # the graphs' work buffer (quantized activations)
        self.lock = threading.Lock()  # the buffers serve one call at a time

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None if ggml() is not None else "llama-cpp-python's libggml (with ggml_mul_mat_id) not found"

    def _load(self, layer, gate, up, down, experts):
        return LayerTensors((gate, up, down))

    def _compute(self, state: LayerTensors, a: Assignments) -> torch.Tensor:
        with self.lock:
            return self._compute_locked(state, a)

    def _compute_locked(self, state: LayerTensors, a: Assignments) -> torch.Tensor:
        graph = self._graph(state, len(a.local))
        arena = graph.arena
        arena.x.copy_(a.x)
        arena.ids[:] = a.experts
        self._run(graph)
        return arena.y.clone()  # (A, D): the arena is the next call's

    def _graph(self, state: LayerTensors, A: int) -> ExpertGraph:
        """The layer's kept graph for A assignments, or a fresh one over the reused scratch memory."""
        if A > KEPT_ASSIGNMENTS:
            arena = Arena(A, state.hidden, state.ff, self.scratch)
            self.scratch = arena.memory
            return ExpertGraph(state, arena)
        graph = state.graphs.get(A)
        if graph is None:
            key = (A, state.hidden, state.ff)
            if key not in self.arenas:
                self.arenas[key] = Arena(*key)
            graph = state.graphs[A] = ExpertGraph(state, self.arenas[key])
        return graph

    def _run(self, graph: ExpertGraph) -> None:
        lib = ggml()
        if graph.work is not self.work:  # first run, or the work buffer grew since
            plan = lib.ggml_graph_plan(graph.graph, self.threads, self.pool)
            if self.work.nbytes < plan.work_size:
                self.work = np.empty(2 * plan.work_size, np.uint8)
            plan.work_data = self.work.ctypes.data
            graph.plan, graph.work = plan, self.work
        if lib.ggml_graph_compute(graph.graph, C.byref(graph.plan)) != 0:
            raise RuntimeError("ggml graph compute failed")
