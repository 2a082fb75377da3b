"""GGUF tensor data to float32 torch tensors, bit-exact with `gguf.quants.dequantize` but vectorized in torch.

`dequantize` walks a tensor in chunks; a kernel per block family takes one chunk as uint8
`(B, type_size)` and writes `(B, block_size)` floats into the result. Kernels do gguf's float operations
in gguf's order, or in one that provably rounds the same (noted where used), so results match bit for bit.
Shapes: B blocks in the chunk, S sub-blocks (one scale each) per block, W weights per sub-block or per
codebook entry, G entries in an IQ codebook, N bytes.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from .errors import ModelFormatError, UnsupportedModelError

Q = GGMLQuantizationType
Kernel = Callable[[torch.Tensor, torch.Tensor], None]

# Input bytes per chunk: small enough that a chunk's temporaries stay in cache and bound memory.
CHUNK_BYTES = 1 << 20

_BYTE_SHIFTS = torch.arange(0, 32, 8)


def _unpack(x: torch.Tensor, bits: int, *, minor: bool = False) -> torch.Tensor:
    """Split each byte of x (..., N) into k = 8 // bits fields, low bits first.

    The fields form a new axis before the bytes, (..., k, N), or after them with minor=True, (..., N, k).
    """
    if minor:  # one lookup per byte yields its fields already side by side
        return _lookup(_SPREAD[bits], x).unsqueeze(-1).view(torch.uint8)  # (..., N, k)
    mask = (1 << bits) - 1
    shifts = range(0, 8, bits)
    if x.shape[-1] % 8:  # small fields: byte by byte
        return torch.stack([(x >> s) & mask for s in shifts], dim=-2)
    # Bulk quants: shift and mask 8 bytes at once as int64, 8x fewer elements for torch to walk.
    # A fresh copy is 8-byte aligned, which a slice of the block rows need not be.
    w = x.clone(memory_format=torch.contiguous_format).view(torch.int64)  # (..., N / 8)
    m = mask * 0x0101010101010101
    return torch.stack([((w >> s) & m).view(torch.uint8) for s in shifts], dim=-2)  # (..., k, N)


# Byte -> its 8 // bits fields, one byte each, packed into one integer: minor unpacking as one lookup.
_SPREAD = {
    bits: _unpack(torch.arange(256, dtype=torch.uint8), bits).T.contiguous().view(dtype).squeeze(-1)
    for bits, dtype in ((1, torch.int64), (2, torch.int32), (4, torch.int16))
}  # (256,) each


def _le(x: torch.Tensor) -> torch.Tensor:
    """Little-endian unsigned integers from the bytes on the last dim: (..., N) -> (...), int64."""
    return (x.long() << _BYTE_SHIFTS[: x.shape[-1]]).sum(-1)


def _f16_at(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 field at byte `at` of every block, as float32 (B, 1)."""
    return blocks[:, at : at + 2].view(torch.float16).float()


def _scaled(out: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> None:
    """out = d * q (+ m), as gguf computes it; q is small integers shaped like the block's weights.

    Converting into `out` and then scaling in place beats a mixed-dtype multiply and new temporaries.
    Kernels that subtract a min pass m negated: a - b and a + (-b) round the same.
    """
    o = out.view(q.shape)
    o.copy_(q)
    o.mul_(d)
    if m is not None:
        o.add_(m)


def _gather(out: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Write table rows (or values) picked by idx into out; returns out as (idx.numel(), W) or (N,)."""
    o = out.view(-1, *table.shape[1:])
    torch.index_select(table, 0, idx.reshape(-1), out=o)
    return o


def _lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table[idx] for a 1-D table; index_select is several times faster than indexing on CPU."""
    return table.index_select(0, idx.reshape(-1).int()).view(idx.shape)


def _table(values: np.ndarray | tuple[int, ...]) -> torch.Tensor:
    """A float32 lookup table from gguf's own numbers, so lookups match gguf exactly."""
    return torch.from_numpy(np.array(values, dtype=np.float32))


_IQ4_VALUES = _table(gq.IQ4_NL.kvalues)  # (16,)
_FP4_VALUES = _table(gq.MXFP4.kvalues)  # (16,): e2m1 doubled, the scale tables are halved to match
_E8M0_HALF = _table(gq.MXFP4.e8m0_to_fp32_half(np.arange(256, dtype=np.uint8)))  # (256,)
_UE4M3_HALF = _table(gq.NVFP4.ue4m3_to_fp32(np.arange(256, dtype=np.uint8)))  # (256,)
# A sign byte's two nibbles as an int32 pair packed in an int64; viewed as int32 they come out interleaved.
_SIGN_NIBBLES = (torch.arange(256) & 15) + (torch.arange(256) >> 4 << 32)  # (256,)
# IQ2/IQ3 sign bytes stored as 7 bits (the eighth is parity), already split as above.
_KSIGN_NIBBLES = _SIGN_NIBBLES[
    torch.frombuffer(bytearray(gq.IQ2_XXS.ksigns), dtype=torch.uint8).long()
]  # (128,)


@functools.cache
def _grid(qtype: GGMLQuantizationType) -> torch.Tensor:
    """gguf's codebook for an IQ type as (G entries, W) float32, decoded once on first use."""
    cls = getattr(gq, qtype.name)
    cls.init_grid()
    return _table(cls.grid.reshape(cls.grid_shape))


@functools.cache
def _signed_quads(qtype: GGMLQuantizationType) -> torch.Tensor:
    """Every (grid entry, quad of 4 weights in it, 4 sign bits) as 4 signed weights: (G * W/4 * 16, 4).

    One lookup then yields a quad ready to scale, instead of a grid lookup, a sign lookup and a multiply.
    """
    grid = _grid(qtype)  # (G, W)
    signs = 1.0 - 2.0 * _unpack(torch.arange(16, dtype=torch.uint8), 1, minor=True)[:, :4].float()  # (16, 4)
    return (grid.view(len(grid), -1, 1, 4) * signs).view(-1, 4)  # (G, W/4, 16, 4) -> (rows, 4)


@functools.cache
def _offset_rows(qtype: GGMLQuantizationType) -> torch.Tensor:
    """IQ1 grid rows + 0.125, then the same rows - 0.125: (2G, 8); row index bit 11 picks the minus."""
    grid = _grid(qtype)
    return torch.cat((grid + 0.125, grid - 0.125))


# --- floats ---------------------------------------------------------------------------------------------


def _f32(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.view(torch.float32))  # (B, 1)


def _f16(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.view(torch.float16))  # (B, 1)


def _bf16(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.view(torch.bfloat16))  # (B, 1); bf16 -> f32 is a 16-bit shift, as in gguf


# --- 32-weight legacy blocks: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 -----------------------------------------------


def _legacy_quants(blocks: torch.Tensor, at: int, bits: int) -> torch.Tensor:
    """Unsigned quants (B, 32) of a Q4/Q5 block whose qh (Q5 only) then qs start at byte `at`."""
    qs = blocks[:, at + 4 * (bits == 5) :]  # (B, 16)
    q = _unpack(qs, 4).view(-1, 32)  # (B, 2, 16) -> (B, 32): low nibbles are weights 0..15
    if bits == 5:
        q |= _unpack(blocks[:, at : at + 4], 1, minor=True).view(-1, 32) << 4  # (B, 4, 8) -> (B, 32)
    return q


def _symmetric(blocks: torch.Tensor, out: torch.Tensor, *, bits: int) -> None:
    """Q4_0 / Q5_0: d * (q - 2^(bits-1))."""
    q = _legacy_quants(blocks, 2, bits).view(torch.int8) - (1 << (bits - 1))
    _scaled(out, q, _f16_at(blocks, 0))


def _affine(blocks: torch.Tensor, out: torch.Tensor, *, bits: int) -> None:
    """Q4_1 / Q5_1: d * q + m."""
    _scaled(out, _legacy_quants(blocks, 4, bits), _f16_at(blocks, 0), _f16_at(blocks, 2))


def _q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    _scaled(out, blocks[:, 2:].view(torch.int8), _f16_at(blocks, 0))


# --- K-quants: 256-weight super-blocks ------------------------------------------------------------------


def _q2_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    scales = blocks[:, :16]  # (B, S=16): low nibble scale, high nibble min
    dl = (_f16_at(blocks, 80) * (scales & 15)).unsqueeze(-1)  # (B, S, 1)
    ml = (_f16_at(blocks, 82) * (scales >> 4)).unsqueeze(-1)  # (B, S, 1)
    q = _unpack(blocks[:, 16:80].reshape(-1, 2, 32), 2).view(-1, 16, 16)  # (B, 2, 4, 32) -> (B, S, W)
    _scaled(out, q, dl, -ml)


def _q3_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # 6-bit scales: low nibbles in bytes 96..103, high 2-bit pairs in 104..107.
    lo = _unpack(blocks[:, 96:104], 4).view(-1, 16)  # (B, 2, 8) -> (B, S=16)
    hi = _unpack(blocks[:, 104:108], 2).view(-1, 16)  # (B, 4, 4) -> (B, S)
    scales = (lo | (hi << 4)).view(torch.int8) - 32
    dl = (_f16_at(blocks, 108) * scales).unsqueeze(-1)  # (B, S, 1)
    ql = _unpack(blocks[:, 32:96].reshape(-1, 2, 32), 2).view(-1, 16, 16)  # (B, 2, 4, 32) -> (B, S, W)
    qh = _unpack(blocks[:, :32], 1).view(-1, 16, 16)  # (B, 8, 32) -> (B, S, W)
    # A set hmask bit means no -4 offset: q = ql - 4 * (1 - h).
    _scaled(out, (ql | (qh << 2)).view(torch.int8) - 4, dl)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's eight 6-bit scales and mins packed in 12 bytes (see gguf Q4_K.get_scale_min)."""
    d, m, md = scales.reshape(-1, 3, 4).unbind(1)  # 3 x (B, 4)
    sc = torch.cat((d & 63, (md & 15) | ((d >> 2) & 48)), dim=-1)  # (B, S=8)
    mn = torch.cat((m & 63, (md >> 4) | ((m >> 2) & 48)), dim=-1)  # (B, S)
    return sc, mn


def _k_affine(blocks: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> None:
    """Q4_K / Q5_K: (d * sc) * q - dmin * mn, with q (B, S=8, W=32)."""
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dl = (_f16_at(blocks, 0) * sc).unsqueeze(-1)  # (B, S, 1)
    ml = (_f16_at(blocks, 2) * mn).unsqueeze(-1)  # (B, S, 1)
    _scaled(out, q, dl, -ml)


def _q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    q = _unpack(blocks[:, 16:].reshape(-1, 4, 32), 4)  # (B, 4, 2, 32): low then high nibbles
    _k_affine(blocks, q.view(-1, 8, 32), out)  # (B, S, W)


def _q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    ql = _unpack(blocks[:, 48:].reshape(-1, 4, 32), 4).view(-1, 8, 32)  # (B, 4, 2, 32) -> (B, S, W)
    qh = _unpack(blocks[:, 16:48], 1)  # (B, 8, 32): bit i of byte j is weight 32 * i + j
    _k_affine(blocks, ql | (qh << 4), out)


def _q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    dl = (_f16_at(blocks, 208) * blocks[:, 192:208].view(torch.int8)).unsqueeze(-1)  # (B, S=16, 1)
    ql = _unpack(blocks[:, :128].reshape(-1, 2, 64), 4).view(-1, 8, 32)  # (B, 2, 2, 64) -> (B, 8, 32)
    qh = _unpack(blocks[:, 128:192].reshape(-1, 2, 32), 2).view(-1, 8, 32)  # (B, 2, 4, 32) -> (B, 8, 32)
    q = (ql | (qh << 4)).view(torch.int8) - 32
    _scaled(out, q.view(-1, 16, 16), dl)  # (B, S, W)


# --- ternary: TQ1_0 TQ2_0 -------------------------------------------------------------------------------

_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8)


def _trits(x: torch.Tensor, k: int) -> torch.Tensor:
    """Base-3 digits packed as fixed-point fractions of 256: (B, N) -> (B, k * N) digits 0..2."""
    x = x.unsqueeze(-2) * _POW3[:k].unsqueeze(-1)  # (B, k, N), wraps mod 256 on purpose
    return ((x.short() * 3) >> 8).flatten(1)  # (B, k * N)


def _tq1_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # 48 bytes of 5 trits (32 then 16 bytes, digit-major), then 4 bytes of 4 trits.
    q = torch.cat((_trits(blocks[:, :32], 5), _trits(blocks[:, 32:48], 5), _trits(blocks[:, 48:52], 4)), -1)
    _scaled(out, q - 1, _f16_at(blocks, 52))  # (B, 256)


def _tq2_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    q = _unpack(blocks[:, :64].reshape(-1, 2, 32), 2).view(-1, 256)  # (B, 2, 4, 32) -> (B, 256)
    _scaled(out, q.view(torch.int8) - 1, _f16_at(blocks, 64))


# --- non-linear 4-bit: IQ4_NL IQ4_XS MXFP4 NVFP4 --------------------------------------------------------


def _iq4_nl(blocks: torch.Tensor, out: torch.Tensor) -> None:
    v = _gather(out, _IQ4_VALUES, _unpack(blocks[:, 2:], 4).int())  # (B, 2, 16) -> (B * 32,)
    v.view(-1, 32).mul_(_f16_at(blocks, 0))  # (B, 32)


def _iq4_xs(blocks: torch.Tensor, out: torch.Tensor) -> None:
    lo = _unpack(blocks[:, 4:8], 4, minor=True).view(-1, 8)  # (B, 4, 2) -> (B, S=8)
    hi = _unpack(blocks[:, 2:4], 2, minor=True).view(-1, 8)  # (B, 2, 4) -> (B, S)
    dl = (_f16_at(blocks, 0) * ((lo | (hi << 4)).view(torch.int8) - 32)).unsqueeze(-1)  # (B, S, 1)
    q = _unpack(blocks[:, 8:].reshape(-1, 8, 16), 4)  # (B, S, 2, 16)
    _gather(out, _IQ4_VALUES, q.int()).view(-1, 8, 32).mul_(dl)  # (B, S, W)


def _mxfp4(blocks: torch.Tensor, out: torch.Tensor) -> None:
    d = _lookup(_E8M0_HALF, blocks[:, 0]).unsqueeze(-1)  # (B, 1)
    v = _gather(out, _FP4_VALUES, _unpack(blocks[:, 1:], 4).int())  # (B, 2, 16) -> (B * 32,)
    v.view(-1, 32).mul_(d)  # (B, 32)


def _nvfp4(blocks: torch.Tensor, out: torch.Tensor) -> None:
    d = _lookup(_UE4M3_HALF, blocks[:, :4]).unsqueeze(-1)  # (B, S=4, 1)
    q = _unpack(blocks[:, 4:].reshape(-1, 4, 8), 4)  # (B, S, 2, 8)
    _gather(out, _FP4_VALUES, q.int()).view(-1, 4, 16).mul_(d)  # (B, S, W)


# --- codebook (grid) types: IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S IQ1_S IQ1_M ----------------------------
# Grid rows are gathered straight into out, then offset or signed and scaled in place.

_XXS_SIGN_SHIFTS = torch.tensor([0, 7, 14, 21])
_IQ1_SHIFTS = torch.tensor([0, 3, 6, 9])
_NIBBLE_SHIFTS = torch.tensor([0, 4, 8, 12])


def _runs(out: torch.Tensor, n: int) -> torch.Tensor:
    """out (B, block_size) as n equal runs of weights per block: (B, n, block_size / n)."""
    return out.view(out.shape[0], n, -1)


def _signed_grid(
    out: torch.Tensor, qtype: GGMLQuantizationType, idx: torch.Tensor, nibbles: torch.Tensor, db: torch.Tensor
) -> None:
    """out = db * grid[idx] * signs, looked up as signed quads of 4 weights (see _signed_quads).

    idx (B, entries) grid entries, nibbles (B, 32) one sign byte per 8 weights as _SIGN_NIBBLES pairs,
    db (B, S, 1). gguf computes (db * grid) * signs; db * (grid * signs) is the same number, as a sign flip
    commutes with rounding.
    """
    if _grid(qtype).shape[1] == 8:  # entry e holds quads 2e and 2e + 1: one packed pair per entry
        quads = idx.reshape(len(out), 32).long() * (2 + (2 << 32)) + (1 << 32)  # (B, 32)
    else:  # 4-wide entries: each pair of them shares a sign byte
        quads = idx.int().reshape(-1, 32, 2).view(torch.int64).squeeze(-1)  # (B, 32, 2) -> (B, 32)
    rows = (quads * 16 + nibbles).view(torch.int32)  # (B, 64): quad * 16 + its 4 sign bits
    _gather(out, _signed_quads(qtype), rows)  # (B * 64, 4)
    _runs(out, db.shape[1]).mul_(db)  # (B, S, W)


def _half_scales(d: torch.Tensor, s: torch.Tensor, step: float) -> torch.Tensor:
    """IQ2/IQ3_XXS sub-block scales, d * (0.5 + s) * step, as (B, S, 1)."""
    return (d * (0.5 + s.float()) * step).unsqueeze(-1)


def _iq_xxs(blocks: torch.Tensor, out: torch.Tensor, *, qtype: GGMLQuantizationType) -> None:
    """IQ2_XXS / IQ3_XXS: a uint32 per sub-block holds four 7-bit sign indices and a 4-bit scale."""
    if qtype == Q.IQ3_XXS:
        idx = blocks[:, 2:66]  # (B, 64) entries of 4 weights
        aux = _le(blocks[:, 66:98].reshape(-1, 8, 4))  # (B, S=8)
        step = 0.5
    else:
        groups = blocks[:, 2:66].reshape(-1, 8, 2, 4)  # (B, S, 2, 4): 4 index bytes, then 4 aux bytes
        idx = groups[:, :, 0]  # (B, S, 4) entries of 8 weights
        aux = _le(groups[:, :, 1])  # (B, S)
        step = 0.25
    db = _half_scales(_f16_at(blocks, 0), aux >> 28, step)  # (B, S, 1)
    signs = _lookup(_KSIGN_NIBBLES, (aux.unsqueeze(-1) >> _XXS_SIGN_SHIFTS) & 127)  # (B, S, 4)
    _signed_grid(out, qtype, idx, signs.view(-1, 32), db)


def _iq2_xs(blocks: torch.Tensor, out: torch.Tensor) -> None:
    q = _le(blocks[:, 2:66].reshape(-1, 32, 2))  # (B, 32): 9-bit grid index, 7-bit sign index
    s = _unpack(blocks[:, 66:74], 4, minor=True).view(-1, 16)  # (B, 8, 2) -> (B, S=16)
    db = _half_scales(_f16_at(blocks, 0), s, 0.25)  # (B, S, 1)
    _signed_grid(out, Q.IQ2_XS, q & 511, _lookup(_KSIGN_NIBBLES, q >> 9), db)


def _iq2_s(blocks: torch.Tensor, out: torch.Tensor) -> None:
    qh = _unpack(blocks[:, 66:74], 2, minor=True).view(-1, 32)  # (B, 8, 4) -> (B, 32)
    idx = blocks[:, 2:34].int() | (qh.int() << 8)  # (B, 32)
    s = _unpack(blocks[:, 74:82], 4, minor=True).view(-1, 16)  # (B, 8, 2) -> (B, S=16)
    db = _half_scales(_f16_at(blocks, 0), s, 0.25)  # (B, S, 1)
    _signed_grid(out, Q.IQ2_S, idx, _lookup(_SIGN_NIBBLES, blocks[:, 34:66]), db)


def _iq3_s(blocks: torch.Tensor, out: torch.Tensor) -> None:
    qh = _unpack(blocks[:, 66:74], 1, minor=True).view(-1, 64)  # (B, 8, 8) -> (B, 64)
    idx = blocks[:, 2:66].int() | (qh.int() << 8)  # (B, 64)
    s = _unpack(blocks[:, 106:110], 4, minor=True).view(-1, 8)  # (B, 4, 2) -> (B, S=8)
    db = (_f16_at(blocks, 0) * (1 + 2 * s)).unsqueeze(-1)  # (B, S, 1)
    _signed_grid(out, Q.IQ3_S, idx, _lookup(_SIGN_NIBBLES, blocks[:, 74:106]), db)


def _iq1_s(blocks: torch.Tensor, out: torch.Tensor) -> None:
    qh = _le(blocks[:, 34:50].reshape(-1, 8, 2))  # (B, S=8): 4 x 3 index high bits, 3-bit scale, sign
    dl = (_f16_at(blocks, 0) * (2 * ((qh >> 12) & 7) + 1)).unsqueeze(-1)  # (B, S, 1)
    hi = (qh.unsqueeze(-1) >> _IQ1_SHIFTS) & 7  # (B, S, 4)
    idx = blocks[:, 2:34].view(-1, 8, 4).long() | (hi << 8) | ((qh >> 15) << 11).unsqueeze(-1)  # (B, S, 4)
    _gather(out, _offset_rows(Q.IQ1_S), idx)  # (B * 32, 8): grid + delta, not yet scaled
    _runs(out, 8).mul_(dl)  # (B, S, W)


def _iq1_m(blocks: torch.Tensor, out: torch.Tensor) -> None:
    sc = _le(blocks[:, 48:56].reshape(-1, 4, 2))  # (B, 4): 4 x 3-bit scales, then a nibble of d, each
    d_bits = ((sc >> 12) << _NIBBLE_SHIFTS).sum(-1, keepdim=True)  # (B, 1): d's fp16 bits
    d = torch.cat((d_bits & 255, d_bits >> 8), -1).to(torch.uint8).view(torch.float16).float()  # (B, 1)
    s = ((sc.unsqueeze(-1) >> _IQ1_SHIFTS) & 7).view(-1, 16)  # (B, 4, 4) -> (B, S=16)
    dl = (d * (2 * s + 1)).unsqueeze(-1)  # (B, S, 1)
    # Each qh nibble holds 3 index high bits and the delta sign: exactly bits 8..11 of the row index.
    qh = _unpack(blocks[:, 32:48], 4, minor=True).view(-1, 32)  # (B, 16, 2) -> (B, 32)
    _gather(out, _offset_rows(Q.IQ1_M), blocks[:, :32].int() | (qh.int() << 8))  # (B * 32, 8)
    _runs(out, 16).mul_(dl)  # (B, S, W)


_KERNELS: dict[GGMLQuantizationType, Kernel] = {
    Q.F32: _f32,
    Q.F16: _f16,
    Q.BF16: _bf16,
    Q.Q4_0: functools.partial(_symmetric, bits=4),
    Q.Q4_1: functools.partial(_affine, bits=4),
    Q.Q5_0: functools.partial(_symmetric, bits=5),
    Q.Q5_1: functools.partial(_affine, bits=5),
    Q.Q8_0: _q8_0,
    Q.Q2_K: _q2_k,
    Q.Q3_K: _q3_k,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
    Q.TQ1_0: _tq1_0,
    Q.TQ2_0: _tq2_0,
    Q.IQ4_NL: _iq4_nl,
    Q.IQ4_XS: _iq4_xs,
    Q.MXFP4: _mxfp4,
    Q.NVFP4: _nvfp4,
    Q.IQ2_XXS: functools.partial(_iq_xxs, qtype=Q.IQ2_XXS),
    Q.IQ3_XXS: functools.partial(_iq_xxs, qtype=Q.IQ3_XXS),
    Q.IQ2_XS: _iq2_xs,
    Q.IQ2_S: _iq2_s,
    Q.IQ3_S: _iq3_s,
    Q.IQ1_S: _iq1_s,
    Q.IQ1_M: _iq1_m,
}

SUPPORTED: frozenset[GGMLQuantizationType] = frozenset(_KERNELS)


def _result(n: int) -> torch.Tensor:
    """An uninitialized float32 result. numpy asks the OS for huge pages for large arrays, which makes
    first-touch page faults (otherwise costlier than dequantizing itself) several times cheaper."""
    return torch.from_numpy(np.empty(n, dtype=np.float32))


def dequantize(
    data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...], *, name: str | None = None
) -> torch.Tensor:
    """Dequantize one tensor's raw GGUF data (as GGUFReader gives it) to float32 of `shape` (numpy order).

    Reads the (possibly memory-mapped, read-only) data chunk by chunk; only the result is allocated whole.
    """
    where = f" (tensor {name})" if name else ""
    kernel = _KERNELS.get(qtype)
    if kernel is None:
        names = ", ".join(sorted(t.name for t in SUPPORTED))
        raise UnsupportedModelError(
            f"quant type {qtype.name}{where} is not supported by dsrun; supported: {names}"
        )
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n = math.prod(shape)
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)  # a view for the reader's memmaps
    n_blocks = n // block_size
    if n % block_size or raw.size != n_blocks * type_size:
        raise ModelFormatError(
            f"{qtype.name} data{where}: {raw.size} bytes cannot hold shape {shape}; the GGUF file is"
            " truncated or inconsistent"
        )
    out = _result(n)
    step = max(1, CHUNK_BYTES // type_size)  # blocks per chunk
    buf = torch.empty(min(step, n_blocks) * type_size, dtype=torch.uint8)
    for b0 in range(0, n_blocks, step):
        b1 = min(b0 + step, n_blocks)
        # Copy the chunk out of the read-only map (torch wants writable memory); it is small next to out.
        blocks = buf[: (b1 - b0) * type_size]
        blocks.numpy()[:] = raw[b0 * type_size : b1 * type_size]
        kernel(blocks.view(-1, type_size), out[b0 * block_size : b1 * block_size].view(-1, block_size))
    return out.view(shape)


# Byte offsets of each type's fp16 scale fields, which random test/bench blocks must keep finite.
_F16_AT: dict[GGMLQuantizationType, tuple[int, ...]] = {
    Q.F16: (0,),
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q8_0: (0,),
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
    Q.TQ1_0: (52,),
    Q.TQ2_0: (64,),
    Q.IQ4_NL: (0,),
    Q.IQ4_XS: (0,),
    Q.IQ2_XXS: (0,),
    Q.IQ2_XS: (0,),
    Q.IQ2_S: (0,),
    Q.IQ3_XXS: (0,),
    Q.IQ3_S: (0,),
    Q.IQ1_S: (0,),
}


def random_blocks(qtype: GGMLQuantizationType, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random but valid blocks (B, type_size) uint8: random bits with finite fp16 scales of varied size."""
    rng = np.random.default_rng(seed)
    type_size = GGML_QUANT_SIZES[qtype][1]
    if qtype in (Q.F32, Q.BF16):
        x = rng.standard_normal(n_blocks, dtype=np.float32).view(np.uint8).reshape(n_blocks, 4)  # (B, 4)
        return np.ascontiguousarray(x[:, 2:]) if qtype == Q.BF16 else x  # bf16: the high half of f32

    def finite_f16() -> np.ndarray:
        scale = np.exp2(rng.integers(-24, 8, n_blocks))  # reaches fp16 subnormals and zero
        return (rng.standard_normal(n_blocks) * scale).astype(np.float16)  # (B,)

    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for at in _F16_AT.get(qtype, ()):
        blocks[:, at : at + 2] = finite_f16().view(np.uint8).reshape(n_blocks, 2)
    if qtype == Q.MXFP4:  # e8m0 exponents above 252, times the largest value (12), overflow float32
        blocks[:, 0] = rng.integers(0, 253, n_blocks)
    if qtype == Q.IQ1_M:  # d's four nibbles sit in the top nibble of each of the last four uint16s
        d = finite_f16().view(np.uint16)
        for i in range(4):
            hi = blocks[:, 49 + 2 * i]
            blocks[:, 49 + 2 * i] = (hi & 0x0F) | (((d >> (4 * i)) & 0x0F) << 4).astype(np.uint8)
    return blocks


# Standard deviation of a block's dequantized weights per unit of its scale d, for uniformly random bits:
# Q8_0: int8 codes; Q4_K: (sc * q - 7.5 * m) with 6-bit sc, m and 4-bit q (dmin = 7.5 d centres it).
_RANDOM_WEIGHT_SPREAD = {Q.Q8_0: 73.9, Q.Q4_K: 258.3}


def random_weight_blocks(qtype: GGMLQuantizationType, n_blocks: int, std: float, rng) -> np.ndarray:
    """Blocks (B, type_size) of random weights with about `std` spread, written as bits directly: a
    real-shaped file's experts in seconds, where quantizing floats takes minutes (dsrun synth)."""
    if qtype not in _RANDOM_WEIGHT_SPREAD:
        raise UnsupportedModelError(
            f"random weight blocks are made for {', '.join(q.name for q in _RANDOM_WEIGHT_SPREAD)}"
        )
    type_size = GGML_QUANT_SIZES[qtype][1]
    blocks = np.frombuffer(bytearray(rng.bytes(n_blocks * type_size)), np.uint8).reshape(n_blocks, type_size)
    d = (std / _RANDOM_WEIGHT_SPREAD[qtype] * rng.uniform(0.8, 1.2, n_blocks)).astype(np.float16)  # (B,)
    blocks[:, 0:2] = d.view(np.uint8).reshape(n_blocks, 2)
    if qtype == Q.Q4_K:
        blocks[:, 2:4] = (7.5 * d.astype(np.float32)).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return blocks


def dequant_speed(qtype: GGMLQuantizationType, nbytes: int = 16 << 20, *, repeat: int = 3) -> float:
    """Measured dequantization speed in MB/s of input (best of `repeat`) on random valid blocks."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = max(1, nbytes // type_size)
    data = random_blocks(qtype, n_blocks)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        dequantize(data, qtype, (n_blocks * block_size,))
        best = min(best, time.perf_counter() - t)
    return data.nbytes / best / 1e6
