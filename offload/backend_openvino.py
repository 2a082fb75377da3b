"""CPU experts on OpenVINO: one compiled model per layer, its experts as compressed-weight branches.

Each loaded expert is a branch reading its rows of the assignment matrix (a Slice between two entries
of an offsets input), with weights in OpenVINO's compressed pattern (u4/u8 codes -> f16, minus integer
zero points, times f16 scales, groups of 32), which the CPU plugin runs as a compressed fully-connected
layer without materializing float weights. One infer call per layer; a branch with no rows still
costs a few microseconds, so a layer's call grows with its loaded experts (docs/cpu-backends.md).
OpenVINO has no fused MoE op on the CPU; `grouped_matmul` constant-folds compressed weights to f32.

Inference precision is pinned to f32: the CPU plugin's default bf16 on AVX-512-bf16 machines gave
wrong results for these graphs. Zero points must be integers, as for ORT (GroupQuant.integer_zero).
One Core per process, its thread count set by the first backend made.

Legend: A assignments, D model width, F expert width, N output rows, Kin input width, G group (32),
Es experts loaded.
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import torch
from openvino import op

from .cpu_experts import GROUP, Assignments, ConvertedExperts, GroupQuant, pack_codes, stack_rows

CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
_CORE: list[ov.Core] = []


def shared_core(threads: int) -> ov.Core:
    if not _CORE:
        core = ov.Core()
        core.set_property("CPU", {"INFERENCE_NUM_THREADS": threads})
        _CORE.append(core)
    return _CORE[0]


def ov_layout(gq: GroupQuant) -> dict[str, np.ndarray]:
    """Codes and zero points packed flat (OpenVINO's u4 is two elements a byte, low nibble first)."""
    gq = gq.integer_zero()
    return {
        "w": pack_codes(gq.codes.reshape(1, -1), gq.bits)[0],  # (N * Kin * bits/8,)
        "z": pack_codes(gq.zero_points().reshape(1, -1), gq.bits)[0],  # (N * Kin/G * bits/8,)
        "s": gq.scale.astype(np.float16),  # (N, Kin/G)
    }


def compressed_weight(arrays: dict[str, np.ndarray], prefix: str, e: int, n: int, k: int) -> ov.Node:
    """(N, Kin) f32 weight node decompressed on the fly: (codes - zero) * scale per group."""
    w = arrays[f"{prefix}.w"][e]
    bits = w.size * 8 // (n * k)
    kind = ov.Type.u4 if bits == 4 else ov.Type.u8
    codes = op.Constant(ov.Tensor(w, ov.Shape([n, k // GROUP, GROUP]), kind), shared_memory=True)
    zero = op.Constant(
        ov.Tensor(arrays[f"{prefix}.z"][e], ov.Shape([n, k // GROUP, 1]), kind), shared_memory=True
    )
    scale = op.Constant(arrays[f"{prefix}.s"][e][..., None], shared_memory=False)  # (N, Kin/G, 1)
    x = ops.subtract(ops.convert(codes, ov.Type.f16), ops.convert(zero, ov.Type.f16))
    x = ops.reshape(ops.multiply(x, scale), ops.constant(np.array([n, k], np.int64)), False)  # (N, Kin)
    return ops.convert(x, ov.Type.f32)


def layer_model(arrays: dict[str, np.ndarray], experts: list[int], hidden: int, ff: int) -> ov.Model:
    """x (A, D) and offsets (Es + 1,) -> (A, D): branch i runs expert experts[i] on rows offsets[i:i+2]."""
    x = ops.parameter([-1, hidden], ov.Type.f32, name="x")
    offsets = ops.parameter([len(experts) + 1], ov.Type.i64, name="offsets")
    axis0, one = ops.constant(np.array([0], np.int64)), ops.constant(np.array([1], np.int64))
    outputs = []
    for i, e in enumerate(experts):
        bounds = [
            ops.gather(offsets, ops.constant(np.array([j], np.int64)), ops.constant(np.int64(0)))
            for j in (i, i + 1)
        ]
        rows = ops.slice(x, bounds[0], bounds[1], one, axis0)  # (n, D)
        h = ops.matmul(rows, compressed_weight(arrays, "gate_up", e, 2 * ff, hidden), False, True)  # (n, 2F)
        gate, up = ops.split(h, ops.constant(np.int64(-1)), 2).outputs()
        act = ops.multiply(ops.swish(gate), up)  # (n, F)
        outputs.append(
            ops.matmul(act, compressed_weight(arrays, "down", e, hidden, ff), False, True)
        )  # (n, D)
    return ov.Model([ops.concat(outputs, 0)], [x, offsets], "moe_layer")


class OpenVinoExperts(ConvertedExperts):
    name = "openvino"
    version = 1

    def __init__(self, **options):
        super().__init__(**options)
        self.core = shared_core(self.threads)

    def convert_expert(self, gate: GroupQuant, up: GroupQuant, down: GroupQuant) -> dict[str, np.ndarray]:
        gate_up = stack_rows(gate.integer_zero(), up.integer_zero(), interleave=False)  # (2F, D)
        return {f"gate_up.{k}": a for k, a in ov_layout(gate_up).items()} | {
            f"down.{k}": a for k, a in ov_layout(down).items()
        }

    def build(self, arrays, experts, shape):
        model = layer_model(arrays, experts, shape.hidden, shape.ff)
        request = self.core.compile_model(model, "CPU", CONFIG).create_infer_request()
        return request, len(experts), arrays  # the constants share the arrays' memory: keep them

    def _compute(self, state, a: Assignments) -> torch.Tensor:
        request, n_loaded, _ = state
        offsets = np.r_[0, np.bincount(a.local, minlength=n_loaded).cumsum()]  # (Es + 1,)
        request.infer({0: a.x.numpy(), 1: offsets})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())  # (A, D)
