"""CPU experts on torch's weight-only int4 kernel (`_weight_int4pack_mm_for_cpu`: groups of 32, AVX-512 on
bf16 activations). The shards hold the kernel's own packed layout, so loading is a memory map.

8-bit codes (Q8_0, requantized Q5/Q6 types) run on the same kernel as two 4-bit planes side by side
along K, the high nibbles with 16x the scale and the low nibbles, fed the input twice: the same bytes
as int8 but group-32 exact, where torch's int8 kernel (`_weight_int8pack_mm`) has one scale per row
and would need a requantization (1.4% relative error on Q8_0).
Exactness: scale and zero of each group in bf16 (~0.4% relative rounding); activations bf16 (fp32
activations run the kernel 10-40x slower).

Legend: A assignments, D model width, F expert width, N output rows, Kin input width, G group (32),
E experts.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .cpu_experts import (
    GROUP,
    Assignments,
    BackendUnavailableError,
    ConvertedExperts,
    GroupQuant,
    LayerShape,
    stack_rows,
)

INT4_ROWS = 16  # the int4 packing wants N a multiple of 16


def int4_layout(gq: GroupQuant) -> dict[str, np.ndarray]:
    """4-bit codes in the kernel's packing and its scales-and-zeros: w = (code - 8) * scale + zero."""
    codes = torch.from_numpy(gq.codes).int()  # (N, Kin)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)  # (N, Kin/2) uint8
    scale = torch.from_numpy(gq.scale)  # (N, Kin/G)
    zero = torch.from_numpy(gq.bias) + 8 * scale  # scale * code + bias = (code - 8) * scale + zero
    scale_zero = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()  # (Kin/G, N, 2)
    return {"packed": packed.numpy(), "scale_zero": _bf16_bits(scale_zero)}


def nibble_planes(gq: GroupQuant) -> GroupQuant:
    """8-bit codes as a 4-bit matrix (N, 2 Kin): [16 scale * high + bias | scale * low], for input [x | x]."""
    high = GroupQuant(gq.codes >> 4, 16 * gq.scale, gq.bias, 4)
    low = GroupQuant(gq.codes & 15, gq.scale, np.zeros_like(gq.bias), 4)
    return GroupQuant(*(np.concatenate(parts, 1) for parts in zip(high.fields(), low.fields())), 4)


def _bf16_bits(t: torch.Tensor) -> np.ndarray:
    """bf16 values as int16 numpy (numpy has no bf16); `_from_bf16_bits` undoes it without a copy."""
    return t.to(torch.bfloat16).view(torch.int16).numpy()


def _from_bf16_bits(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).view(torch.bfloat16)


class Projection:
    """One expert's matrix in the kernel's layout, computing (n, Kin) bf16 -> (n, N) bf16."""

    def __init__(self, arrays: dict[str, np.ndarray], prefix: str, e: int, in_width: int):
        self.weight = torch.from_numpy(arrays[f"{prefix}.packed"][e])  # (N, planes * Kin/2)
        self.scales = _from_bf16_bits(arrays[f"{prefix}.scale_zero"][e])  # (planes * Kin/G, N, 2)
        self.planes = self.weight.shape[1] * 2 // in_width  # 2 for 8-bit codes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.planes == 2:
            x = torch.cat([x, x], 1)  # (n, 2 Kin)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, GROUP, self.scales)


class TorchExperts(ConvertedExperts):
    name = "torch"
    version = 1

    def __init__(self, **options):
        super().__init__(**options)
        torch.set_num_threads(self.threads)  # torch has one pool per process: the rest of dsrun shares it

    def check_shape(self, shape: LayerShape) -> None:
        if shape.ff % INT4_ROWS or shape.hidden % INT4_ROWS:
            raise BackendUnavailableError(f"torch int4 kernels need widths divisible by {INT4_ROWS}")

    def convert_expert(self, gate: GroupQuant, up: GroupQuant, down: GroupQuant) -> dict[str, np.ndarray]:
        out = {}
        for prefix, gq in (("gate_up", stack_rows(gate, up, interleave=False)), ("down", down)):
            layout = int4_layout(gq if gq.bits == 4 else nibble_planes(gq))
            out |= {f"{prefix}.{name}": a for name, a in layout.items()}
        return out

    def build(self, arrays, experts, shape):
        # views of the memory-mapped shard: an expert's pages are read from disk on its first use
        D, F_ = shape.hidden, shape.ff
        return F_, [(Projection(arrays, "gate_up", e, D), Projection(arrays, "down", e, F_)) for e in experts]

    def _compute(self, state, a: Assignments) -> torch.Tensor:
        ff, experts = state
        x = a.x.to(torch.bfloat16)
        parts = []
        for e, r0, r1 in a.groups():  # in row order, so the parts concatenate to (A, D)
            gate_up, down = experts[e]
            h = gate_up(x[r0:r1])  # (n, 2F)
            act = F.silu(h[:, :ff], inplace=True).mul_(h[:, ff:])  # (n, F) in h's memory
            parts.append(down(act.contiguous()))  # the kernel wants contiguous rows: a copy only if n > 1
        return torch.cat(parts).float()
