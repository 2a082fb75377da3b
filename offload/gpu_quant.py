"""GGUF-quantized matrices used in place on the GPU: x @ W.T straight from the file's blocks.

A GPU expert slot can hold an expert's GGUF bytes instead of a bf16 copy (Q4_K is 3.5x smaller). Up to
FUSED_MAX_T tokens, one Triton kernel reads each weight byte once and dequantizes in registers (decode is
bound by weight bandwidth); Q4_K below DOT_FROM_T tokens rounds x to int8 per 32 instead and multiplies
the quants as ints with dp4a, as llama.cpp's CUDA decode does (takes_int8_x); for more tokens a Triton
kernel dequantizes into a reused bf16 scratch and cuBLAS multiplies (prefill is bound by compute, where
cuBLAS wins). `grouped_matmul` and `grouped_swiglu`
take rows that each name a slot of a pool, all in one launch: a decode step's experts of one layer. Without
Triton for a device, the same calls run `dsrun.quants.dequantize` and a float32 matmul, so callers work
everywhere.

A decode call's kernel takes ~15 us, so the host side must be smaller still: the first call of each shape
plans it (split-K, grid, tuned config, buffers) and later calls are a dict lookup, a tensor allocation and
launches straight into the compiled kernel (_Launch). As with any Triton kernel, launches go to the current
CUDA device's current stream: call with x's device current.

Kernels walk a row in steps of 256 weights, each seen as a tile (BN, S, W): S sub-blocks of W weights
with one scale (and min) each; weight k = 256 * step + W * s + i is scale * q - min, computed in gguf's
order, so `dequantize_gpu` to float32 is bit-exact with `dsrun.quants.dequantize`.

Legend: T tokens, A rows of a grouped call (each with its own slot), N output rows (n_out), K input width
(n_in), BN rows per program, BT tokens per program (padded), S sub-blocks per step, W weights per
sub-block, P split-K parts, M outputs of one part (T * N or A * N).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from dsrun import quants
from dsrun.errors import ModelFormatError, UnsupportedModelError

try:
    import triton
    import triton.language as tl
except ImportError:  # not a dsrun dependency: CUDA installs bring it with torch
    triton = tl = None

Q = GGMLQuantizationType

# (S, W, has a min) of one 256-weight step: the tile each type's kernel code builds.
_LAYOUTS: dict[GGMLQuantizationType, tuple[int, int, bool]] = {
    Q.Q4_0: (8, 32, False),
    Q.Q8_0: (8, 32, False),
    Q.Q4_K: (8, 32, True),
    Q.Q5_K: (8, 32, True),
    Q.Q6_K: (16, 16, False),
}
QUANT_TYPES: frozenset[GGMLQuantizationType] = frozenset(_LAYOUTS)

STEP = 256  # weights per kernel step: one K-quant super-block, eight 32-weight blocks
FUSED_MAX_T = 16  # up to this many tokens the fused kernel; more: dequantize + cuBLAS
# the most a dequantized matrix takes at once: a larger one (a vocabulary's head) goes in slices of rows
MAX_SCRATCH_BYTES = 256 << 20
DOT_FROM_T = 4  # from this many tokens the fused kernel uses tl.dot (tokens padded to 16); tune on H100
POOL_ALIGN = 256  # slot rows start 256-byte aligned, so every slot's loads vectorize alike
INT8_X_TYPES = frozenset({Q.Q4_K})  # kernels that can take x as int8 words (_q4k_words)
_DEQUANT_BN = 16  # rows per program of the dequantize kernel
_GEMV_BN = 32  # rows per program of the fused kernel when not autotuned


def _interpreting() -> bool:
    """Whether Triton builds kernels for its interpreter (TRITON_INTERPRET=1 at import: the CPU tests)."""
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4
    return bool(knobs.runtime.interpret) if knobs else os.environ.get("TRITON_INTERPRET") == "1"


_INTERPRETED = _interpreting()
_jit = triton.jit if triton else (lambda fn: fn)
_C = tl.constexpr if tl else int  # kernels may read module globals only as constexprs
_Q4_0, _Q8_0, _Q4_K, _Q5_K, _Q6_K = (_C(int(t)) for t in (Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K))
_INTERP = _C(_INTERPRETED)  # the interpreter runs no inline PTX


# --- kernels --------------------------------------------------------------------------------------------


@_jit
def _as_f32(q):
    """Ints |q| < 2^22 as float32, exactly: added into the mantissa of 1.5 * 2^23, which is then taken off.
    Two full-rate ops instead of a conversion, which runs at a fraction of the FMA rate on sm_80/sm_90."""
    return (q + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@_jit
def _dp4a(a, b, c):
    """c + the dot of a's four unsigned bytes with b's four signed bytes, all int32 (one PTX dp4a)."""
    if _INTERP:
        for k in tl.static_range(4):
            c += ((a >> (8 * k)) & 255) * ((b << (24 - 8 * k)) >> 24)  # the shifts sign-extend b's byte
        return c
    return tl.inline_asm_elementwise(
        "dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1
    )


@_jit
def _f16(w, off, mask):
    """The fp16 fields at byte offsets `off` as float32, from two byte loads (no alignment needed)."""
    lo = tl.load(w + off, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(w + off + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@_jit
def _k_scales(w, b2, j, m2):
    """Q4_K/Q5_K sub-block scales d * sc and mins dmin * mn (BN, 8) from the 12 bytes at 4..15.

    Sub-blocks 0..3 keep 6-bit sc, mn in bytes j, j + 4; 4..7 keep their low 4 bits in byte j + 4 and
    their high 2 bits in the top bits of bytes j - 4, j (dsrun.quants._k_scale_min).
    """
    p = w + b2 + 4
    a = tl.load(p + j % 4, mask=m2, other=0).to(tl.int32)  # byte j (j < 4) or j - 4
    b = tl.load(p + j, mask=m2, other=0).to(tl.int32)
    c = tl.load(p + j + 4, mask=m2, other=0).to(tl.int32)
    sc = tl.where(j < 4, a & 63, (c & 15) | ((a >> 6) << 4))
    mn = tl.where(j < 4, c & 63, (c >> 4) | ((b >> 6) << 4))
    return _f16(w, b2, m2) * sc.to(tl.float32), _f16(w, b2 + 2, m2) * mn.to(tl.float32)


@_jit
def _tile(
    w, row_off, rmask, step, n_in, QTYPE: tl.constexpr, S: tl.constexpr, W: tl.constexpr, SB: tl.constexpr
):
    """One step of BN rows: quants q (BN, S, W), scales and mins (BN, S), all float32.

    row_off (BN,) are the rows' byte offsets in w, SB the bytes of one step. Masked rows and blocks past
    n_in (32-weight types only) read as zeros. Mins are returned as the scales for types without one.
    """
    s = tl.arange(0, S)  # (S,)
    i = tl.arange(0, W)[None, None, :]  # (1, 1, W)
    m2 = rmask[:, None] & (step * 256 + W * s < n_in)[None, :]  # (BN, S)
    m3 = m2[:, :, None]  # (BN, S, 1)
    b2 = row_off[:, None] + step * SB  # (BN, 1): byte offset of the step
    b3 = b2[:, :, None]  # (BN, 1, 1)
    s2 = s[None, :]  # (1, S)
    s3 = s[None, :, None]  # (1, S, 1)
    if QTYPE == _Q8_0:  # 34-byte blocks: fp16 d, 32 int8
        q = tl.load(w + b3 + 34 * s3 + 2 + i, mask=m3, other=0).to(tl.int8, bitcast=True).to(tl.int32)
        scale = _f16(w, b2 + 34 * s2, m2)
        mn = scale
    elif QTYPE == _Q4_0:  # 18-byte blocks: fp16 d, 16 bytes: low nibbles weights 0..15, high 16..31
        byte = tl.load(w + b3 + 18 * s3 + 2 + i % 16, mask=m3, other=0).to(tl.int32)
        q = ((byte >> (4 * (i // 16))) & 15) - 8
        scale = _f16(w, b2 + 18 * s2, m2)
        mn = scale
    elif QTYPE == _Q4_K:  # fp16 d, dmin, 12 scale bytes, 128 bytes: qs[32g + i] holds sub-blocks 2g, 2g + 1
        byte = tl.load(w + b3 + 16 + 32 * (s3 // 2) + i, mask=m3, other=0).to(tl.int32)
        q = (byte >> (4 * (s3 % 2))) & 15
        scale, mn = _k_scales(w, b2, s2, m2)
    elif QTYPE == _Q5_K:  # Q4_K's fields with 32 qh bytes at 16 (bit s of qh[i]: weight 32s + i)
        byte = tl.load(w + b3 + 48 + 32 * (s3 // 2) + i, mask=m3, other=0).to(tl.int32)
        qh = tl.load(w + b3 + 16 + i, mask=m3, other=0).to(tl.int32)
        q = ((byte >> (4 * (s3 % 2))) & 15) | (((qh >> s3) & 1) << 4)
        scale, mn = _k_scales(w, b2, s2, m2)
    else:  # Q6_K: ql[128], qh[64], int8 scales[16], fp16 d; weight 128n + 32g + l, l < 32
        n = s3 // 8
        g = (s3 % 8) // 2
        lane = 16 * (s3 % 2) + i  # (1, S, W): l
        ql = tl.load(w + b3 + 64 * n + 32 * (g % 2) + lane, mask=m3, other=0).to(tl.int32)
        qh = tl.load(w + b3 + 128 + 32 * n + lane, mask=m3, other=0).to(tl.int32)
        q = (((ql >> (4 * (g // 2))) & 15) | (((qh >> (2 * g)) & 3) << 4)) - 32
        sc = tl.load(w + b2 + 192 + s2, mask=m2, other=0).to(tl.int8, bitcast=True)
        scale = _f16(w, b2 + 208, m2) * sc.to(tl.float32)
        mn = scale
    return _as_f32(q), scale, mn


@_jit
def _tile_dot(
    xt, q, scale, mn, S: tl.constexpr, W: tl.constexpr, HAS_MIN: tl.constexpr, DOT_F32: tl.constexpr
):
    """xt (R, S * W) @ the dequantized tile (BN rows of _tile's q, scale, mn).T: (R, BN) float32."""
    v = q * scale[:, :, None]  # (BN, S, W)
    if HAS_MIN:
        v = v - mn[:, :, None]
    v = tl.reshape(v.to(xt.dtype), (q.shape[0], S * W))  # (BN, S * W)
    if DOT_F32:  # f32 inputs, or the interpreter (whose bf16 dot is wrong): exact f32 products
        return tl.dot(xt.to(tl.float32), tl.trans(v.to(tl.float32)), input_precision="ieee")
    return tl.dot(xt, tl.trans(v))


@_jit
def _dequant_kernel(
    w,
    out,
    n_out,
    n_in,
    row_bytes,
    QTYPE: tl.constexpr,
    S: tl.constexpr,
    W: tl.constexpr,
    SB: tl.constexpr,
    HAS_MIN: tl.constexpr,
    BN: tl.constexpr,
):
    """out (N, K) = W: one program per BN rows and one step."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)  # (BN,)
    step = tl.program_id(1)
    rmask = rows < n_out
    q, scale, mn = _tile(w, rows * row_bytes, rmask, step, n_in, QTYPE, S, W, SB)
    v = q * scale[:, :, None]  # (BN, S, W)
    if HAS_MIN:
        v = v - mn[:, :, None]
    k = step * 256 + W * tl.arange(0, S)[None, :, None] + tl.arange(0, W)[None, None, :]  # (1, S, W)
    dst = out + rows[:, None, None] * n_in + k
    tl.store(dst, v.to(out.dtype.element_ty), mask=rmask[:, None, None] & (k < n_in))


@_jit
def _gemv_kernel(
    x,
    w,
    out,
    xq,
    xd,
    xs,
    T,
    n_out,
    n_in,
    row_bytes,
    n_steps,
    steps_per_part,
    part_stride,
    QTYPE: tl.constexpr,
    S: tl.constexpr,
    W: tl.constexpr,
    SB: tl.constexpr,
    HAS_MIN: tl.constexpr,
    BT: tl.constexpr,
    DOT: tl.constexpr,
    DOT_F32: tl.constexpr,
    INT8_X: tl.constexpr,
    LEVELS: tl.constexpr,
    KB: tl.constexpr,
    BN: tl.constexpr,
):
    """out[part] (T, N) = x (T, K) @ W.T over this part's steps: one program per BN rows and part. With
    INT8_X (Q4_K, a few tokens) x is read as _quantize_x_kernel wrote it to xq, xd, xs, in LEVELS."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)  # (BN,)
    part = tl.program_id(1)
    rmask = rows < n_out
    row_off = rows * row_bytes  # int32 offsets (_flat checks the sizes): half the address registers
    t = tl.arange(0, BT)  # (BT,)
    kk = W * tl.arange(0, S)[:, None] + tl.arange(0, W)[None, :]  # (S, W): offsets in a step
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    first = part * steps_per_part
    last = tl.minimum(first + steps_per_part, n_steps)
    if INT8_X:  # quants stay ints: four products a dp4a; KB steps at a time keep more bytes in flight
        row_word = rows * (row_bytes // 4)  # (BN,): Q4_K rows are whole words
        for step0 in range(first, last, KB):
            lo, hi, sc_lo, mn_lo, sc_hi, mn_hi = _q4k_words(w, row_word, rmask, step0, last, KB)
            for ti in tl.static_range(BT):
                tx = tl.minimum(ti, T - 1)  # padded tokens repeat the last; not stored
                xq_t = xq + tx * (LEVELS * n_in // 4)
                xd_t, xs_t = xd + tx * (n_in // 32), xs + tx * (n_in // 32)
                r = _q4k_int8_dot(
                    lo, hi, sc_lo, mn_lo, sc_hi, mn_hi, xq_t, xd_t, xs_t, n_in // 4, step0, last, KB, LEVELS
                )
                acc += tl.where(t[:, None] == ti, r[None, :], 0.0)
    else:
        for step in range(first, last):
            q, scale, mn = _tile(w, row_off, rmask, step, n_in, QTYPE, S, W, SB)
            k = step * 256 + kk  # (S, W)
            if DOT:  # enough tokens for tensor cores: dequantize the tile, one (BT, 256) x (256, BN) dot
                xk = step * 256 + tl.arange(0, S * W)  # (S * W,)
                xmask = (t[:, None] < T) & (xk < n_in)[None, :]
                xt = tl.load(x + t[:, None] * n_in + xk[None, :], mask=xmask, other=0.0)  # (BT, S * W)
                acc += _tile_dot(xt, q, scale, mn, S, W, HAS_MIN, DOT_F32)
            else:  # a few tokens: sum q * x per sub-block, then scale once per sub-block (as llama.cpp)
                for ti in tl.static_range(BT):
                    x_row = x + tl.minimum(ti, T - 1) * n_in  # padded tokens repeat the last; not stored
                    xt = tl.load(x_row + k, mask=k < n_in, other=0).to(tl.float32)  # (S, W)
                    r = tl.sum(tl.sum(q * xt[None, :, :], axis=2) * scale, axis=1)  # (BN,)
                    if HAS_MIN:
                        r -= tl.sum(mn * tl.sum(xt, axis=1)[None, :], axis=1)
                    acc += tl.where(t[:, None] == ti, r[None, :], 0.0)
    dst = out + part * part_stride + t[:, None] * n_out + rows[None, :]
    tl.store(dst, acc.to(out.dtype.element_ty), mask=(t[:, None] < T) & rmask[None, :])


@_jit
def _row_dot(
    w,
    row_off,
    rmask,
    step,
    x_row,
    n_in,
    QTYPE: tl.constexpr,
    S: tl.constexpr,
    W: tl.constexpr,
    SB: tl.constexpr,
    HAS_MIN: tl.constexpr,
):
    """One step of BN rows times one token x_row: (BN,) float32, q * x summed per sub-block, then scaled."""
    q, scale, mn = _tile(w, row_off, rmask, step, n_in, QTYPE, S, W, SB)
    k = step * 256 + W * tl.arange(0, S)[:, None] + tl.arange(0, W)[None, :]  # (S, W)
    xt = tl.load(x_row + k, mask=k < n_in, other=0).to(tl.float32)  # (S, W)
    r = tl.sum(tl.sum(q * xt[None, :, :], axis=2) * scale, axis=1)  # (BN,)
    if HAS_MIN:
        r -= tl.sum(mn * tl.sum(xt, axis=1)[None, :], axis=1)
    return r


@_jit
def _int8_words(q, BN: tl.constexpr):
    """(BN, 32) ints in [-127, 127] as (BN, 8) int32 words of four bytes."""
    q = tl.reshape(q & 255, (BN, 8, 4))  # (BN, 8, 4): four bytes of each word
    return tl.sum(q << (8 * tl.arange(0, 4))[None, None, :], axis=2)  # (BN, 8): no bits overlap


@_jit
def _quantize_x_kernel(x, xq, xd, xs, n_in, LEVELS: tl.constexpr, BN: tl.constexpr):
    """Row t of x (R, K) rounded to int8 per 32 with scale d = amax / 127 (llama.cpp's q8_1): words of
    four into xq (R, LEVELS * K / 4) int32, the scales into xd and the blocks' float sums into xs
    (R, K / 32). With LEVELS 2 the rounding's remainder follows, rounded to int8 with scale d / 254. One
    program per row and BN blocks of 32."""
    t = tl.program_id(0)
    b = tl.program_id(1) * BN + tl.arange(0, BN)  # (BN,): blocks of 32
    v = tl.load(x + t * n_in + 32 * b[:, None] + tl.arange(0, 32)[None, :]).to(tl.float32)  # (BN, 32)
    amax = tl.max(tl.abs(v), axis=1)  # (BN,)
    inv = tl.where(amax > 0, 127.0 / amax, 0.0)[:, None]  # (BN, 1)
    q = tl.floor(v * inv + 0.5)  # (BN, 32): ints in [-127, 127]
    row = xq + t * (LEVELS * n_in // 4) + 8 * b[:, None] + tl.arange(0, 8)[None, :]  # (BN, 8)
    tl.store(row, _int8_words(q.to(tl.int32), BN))
    if LEVELS == 2:  # |v * inv - q| <= 1/2: times 254 within [-127, 127]
        r = tl.floor((v * inv - q) * 254.0 + 0.5)
        tl.store(row + n_in // 4, _int8_words(tl.minimum(tl.maximum(r, -127.0), 127.0).to(tl.int32), BN))
    tl.store(xd + t * (n_in // 32) + b, amax / 127.0)
    tl.store(xs + t * (n_in // 32) + b, tl.sum(v, axis=1))


@_jit
def _f16_bits(h):
    """The fp16 in the low 16 bits of int32 h, as float32."""
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@_jit
def _q4k_words(w, row_word, rmask, step0, last, KB: tl.constexpr):
    """KB Q4_K steps from step0 (those before `last`) of BN rows as int8-dot operands, read from w, the
    matrix's bytes viewed as int32 words by the host; row_word (BN,) are the rows' word offsets.

    A step's block is 36 words: d and dmin (fp16 each), 12 scale bytes (dsrun.quants._k_scale_min) and
    128 quant bytes, whose pair g of 8 words holds sub-block 2g in its low nibbles and 2g + 1 in its high
    ones. Returns lo and hi (BN, KB, 4, 8), word j of pair g holding weights 4j..4j + 3 of its sub-block,
    and the even (lo) and odd (hi) sub-blocks' scales d * sc and mins dmin * mn (BN, KB, 4).
    """
    steps = step0 + tl.arange(0, KB)  # (KB,)
    m2 = rmask[:, None] & (steps < last)[None, :]  # (BN, KB)
    at = row_word[:, None] + 36 * steps[None, :]  # (BN, KB): the blocks' first words
    hdr = tl.load(w + at[:, :, None] + tl.arange(0, 4)[None, None, :], mask=m2[:, :, None], other=0)
    h02, h13 = tl.split(tl.reshape(hdr, (hdr.shape[0], KB, 2, 2)))  # (BN, KB, 2): words 0, 2 and 1, 3
    h0, h2 = tl.split(h02)  # (BN, KB) each
    h1, h3 = tl.split(h13)
    # The four scales (mins) of sub-blocks 0..3 and of 4..7, a byte each: _k_scale_min on four at once
    sc03, mn03 = h1 & 0x3F3F3F3F, h2 & 0x3F3F3F3F
    sc47 = (h3 & 0x0F0F0F0F) | ((h1 >> 2) & 0x30303030)
    mn47 = ((h3 >> 4) & 0x0F0F0F0F) | ((h2 >> 2) & 0x30303030)
    g = tl.arange(0, 4)[None, None, :]  # (1, 1, 4): pair g holds sub-blocks 2g, 2g + 1: bytes 2g % 4, + 1
    shift = 16 * (g % 2)
    sc = tl.where(g < 2, sc03[:, :, None], sc47[:, :, None]) >> shift  # (BN, KB, 4)
    mn = tl.where(g < 2, mn03[:, :, None], mn47[:, :, None]) >> shift
    d, dmin = _f16_bits(h0)[:, :, None], _f16_bits(h0 >> 16)[:, :, None]  # (BN, KB, 1)
    j = tl.arange(0, 8)[None, None, None, :]  # (1, 1, 1, 8)
    words = tl.load(
        w + (at + 4)[:, :, None, None] + 8 * g[:, :, :, None] + j, mask=m2[:, :, None, None], other=0
    )
    return (
        words & 0x0F0F0F0F,
        (words >> 4) & 0x0F0F0F0F,
        d * _as_f32(sc & 255),
        dmin * _as_f32(mn & 255),
        d * _as_f32((sc >> 8) & 255),
        dmin * _as_f32((mn >> 8) & 255),
    )


@_jit
def _q4k_int8_dot(
    lo, hi, sc_lo, mn_lo, sc_hi, mn_hi, xq, xd, xs, rest, step0, last, KB: tl.constexpr, LEVELS: tl.constexpr
):
    """(BN,) float32: _q4k_words' steps times one token as _quantize_x_kernel wrote it (its rows at xq,
    xd, xs; the remainder's words `rest` on). Per sub-block: scale * x scale * (int dot of quants) - min *
    (sum of x)."""
    steps = step0 + tl.arange(0, KB)[:, None]  # (KB, 1)
    sub = 4 * steps + tl.arange(0, 4)[None, :]  # (KB, 4): pair index in the row; x's even sub-block 2 sub
    m = steps < last
    at = 16 * sub[:, :, None] + tl.arange(0, 8)[None, None, :]  # (KB, 4, 8): x words of the even sub-blocks
    dot_lo = _levels_dot(lo, xq, at, m, rest, LEVELS)  # (BN, KB, 4)
    dot_hi = _levels_dot(hi, xq, at + 8, m, rest, LEVELS)
    xd_lo, xs_lo = tl.load(xd + 2 * sub, mask=m, other=0)[None], tl.load(xs + 2 * sub, mask=m, other=0)[None]
    xd_hi, xs_hi = (
        tl.load(xd + 2 * sub + 1, mask=m, other=0)[None],
        tl.load(xs + 2 * sub + 1, mask=m, other=0)[None],
    )
    r = sc_lo * xd_lo * dot_lo - mn_lo * xs_lo + sc_hi * xd_hi * dot_hi - mn_hi * xs_hi
    return tl.sum(tl.sum(r, axis=2), axis=1)


@_jit
def _levels_dot(q, xq, at, m, rest, LEVELS: tl.constexpr):
    """(BN, KB, 4) float32: each sub-block's quant words q (BN, KB, 4, 8) dotted with x's int8 words at
    xq + at (KB, 4, 8), in units of x's scale; with LEVELS 2 plus the remainder's, `rest` words on."""
    zero = tl.zeros(q.shape, dtype=tl.int32)
    dot = _as_f32(tl.sum(_dp4a(q, tl.load(xq + at, mask=m[:, :, None], other=0)[None], zero), axis=3))
    if LEVELS == 2:
        low = tl.sum(_dp4a(q, tl.load(xq + at + rest, mask=m[:, :, None], other=0)[None], zero), axis=3)
        dot += _as_f32(low) * (1.0 / 254.0)
    return dot


@_jit
def _q4k_int8_row(w, row_word, rmask, step0, last, xq, xd, xs, rest, KB: tl.constexpr, LEVELS: tl.constexpr):
    """(BN,) float32: KB Q4_K steps of BN rows times one int8 token (_q4k_words, then _q4k_int8_dot)."""
    lo, hi, sc_lo, mn_lo, sc_hi, mn_hi = _q4k_words(w, row_word, rmask, step0, last, KB)
    return _q4k_int8_dot(lo, hi, sc_lo, mn_lo, sc_hi, mn_hi, xq, xd, xs, rest, step0, last, KB, LEVELS)


@_jit
def _grouped_kernel(
    x,
    wa,
    wb,
    slots,
    out,
    xq,
    xd,
    xs,
    n_out,
    n_in,
    slot_bytes_a,
    slot_bytes_b,
    row_bytes_a,
    row_bytes_b,
    n_steps,
    steps_per_part,
    part_stride,
    b_offset,
    QTYPE_A: tl.constexpr,
    S_A: tl.constexpr,
    W_A: tl.constexpr,
    SB_A: tl.constexpr,
    MIN_A: tl.constexpr,
    QTYPE_B: tl.constexpr,
    S_B: tl.constexpr,
    W_B: tl.constexpr,
    SB_B: tl.constexpr,
    MIN_B: tl.constexpr,
    GLU: tl.constexpr,
    FINAL: tl.constexpr,
    INT8_X: tl.constexpr,
    LEVELS: tl.constexpr,
    KB: tl.constexpr,
    BN: tl.constexpr,
):
    """out[a] (N,) = x[a] @ A_s.T for s = slots[a], A_s that slot of pool wa; with GLU silu(x[a] @ A_s.T) *
    (x[a] @ B_s.T), B_s from pool wb. One program per row a, BN output rows and split-K part. Unless FINAL,
    float32 partial sums go to out[part] (P, A, N), and with GLU B's to out + b_offset. With INT8_X x is
    read as _quantize_x_kernel wrote it to xq, xd, xs, in LEVELS."""
    a = tl.program_id(0)  # rows vary fastest: rows that share a slot read its blocks at about the same time
    rows = tl.program_id(1) * BN + tl.arange(0, BN)  # (BN,)
    part = tl.program_id(2)
    slot = tl.load(slots + a).to(tl.int64)  # a pool may pass 2 GiB: int64 slot offsets
    rmask = rows < tl.where(slot >= 0, n_out, 0)  # a negative slot reads nothing: its row comes out zero
    slot = tl.maximum(slot, 0)
    unit = 4 if INT8_X else 1  # int8 x: the pools come as int32 words
    w_a = wa + slot * (slot_bytes_a // unit)
    w_b = wb + slot * (slot_bytes_b // unit)
    x_row = x + a * n_in
    acc_a = tl.zeros((BN,), dtype=tl.float32)
    acc_b = tl.zeros((BN,), dtype=tl.float32)
    first = part * steps_per_part
    last = tl.minimum(first + steps_per_part, n_steps)
    if INT8_X:  # Q4_K both: as _gemv_kernel
        xq_row, xd_row, xs_row = xq + a * (LEVELS * n_in // 4), xd + a * (n_in // 32), xs + a * (n_in // 32)
        for step0 in range(first, last, KB):
            acc_a += _q4k_int8_row(
                w_a,
                rows * (row_bytes_a // 4),
                rmask,
                step0,
                last,
                xq_row,
                xd_row,
                xs_row,
                n_in // 4,
                KB,
                LEVELS,
            )
            if GLU:
                acc_b += _q4k_int8_row(
                    w_b,
                    rows * (row_bytes_b // 4),
                    rmask,
                    step0,
                    last,
                    xq_row,
                    xd_row,
                    xs_row,
                    n_in // 4,
                    KB,
                    LEVELS,
                )
    else:
        for step in range(first, last):
            acc_a += _row_dot(
                w_a, rows * row_bytes_a, rmask, step, x_row, n_in, QTYPE_A, S_A, W_A, SB_A, MIN_A
            )
            if GLU:
                acc_b += _row_dot(
                    w_b, rows * row_bytes_b, rmask, step, x_row, n_in, QTYPE_B, S_B, W_B, SB_B, MIN_B
                )
    dst = out + part * part_stride + a * n_out + rows
    smask = rows < n_out
    if GLU and FINAL:
        tl.store(dst, (acc_a * tl.sigmoid(acc_a) * acc_b).to(out.dtype.element_ty), mask=smask)
    else:
        tl.store(dst, acc_a.to(out.dtype.element_ty), mask=smask)
        if GLU:
            tl.store(dst + b_offset, acc_b, mask=smask)


@_jit
def _sorted_kernel(
    x,
    wa,
    wb,
    row_src,
    block_slot,
    out,
    n_out,
    n_in,
    slot_bytes_a,
    slot_bytes_b,
    row_bytes_a,
    row_bytes_b,
    n_steps,
    QTYPE_A: tl.constexpr,
    S_A: tl.constexpr,
    W_A: tl.constexpr,
    SB_A: tl.constexpr,
    MIN_A: tl.constexpr,
    QTYPE_B: tl.constexpr,
    S_B: tl.constexpr,
    W_B: tl.constexpr,
    SB_B: tl.constexpr,
    MIN_B: tl.constexpr,
    GLU: tl.constexpr,
    GATHER: tl.constexpr,
    DOT_F32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """Rows sorted by slot in blocks of BM, each block one slot's: out[r] (N,) = x_r @ A_s.T for the rows r
    of block b and s = block_slot[b] (with GLU silu(x_r @ A_s.T) * (x_r @ B_s.T)), where x_r is
    x[row_src[r]] with GATHER, else x[r]. Rows with row_src[r] < 0 pad a block: they read zeros. One
    program per block and BN outputs, each weight tile dequantized once for the block's BM rows."""
    b = tl.program_id(0)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)  # (BN,)
    cmask = cols < n_out
    slot = tl.load(block_slot + b).to(tl.int64)  # a pool may pass 2 GiB: int64 slot offsets
    r = b * BM + tl.arange(0, BM)  # (BM,)
    src = tl.load(row_src + r)  # (BM,)
    live = src >= 0
    x_rows = (tl.maximum(src, 0) if GATHER else r) * n_in  # (BM,)
    w_a = wa + slot * slot_bytes_a
    w_b = wb + slot * slot_bytes_b
    acc_a = tl.zeros((BM, BN), dtype=tl.float32)
    acc_b = tl.zeros((BM, BN), dtype=tl.float32)
    for step in range(0, n_steps):
        xk = step * 256 + tl.arange(0, 256)  # (256,): S * W of every type
        xmask = live[:, None] & (xk < n_in)[None, :]
        xt = tl.load(x + x_rows[:, None] + xk[None, :], mask=xmask, other=0.0)  # (BM, 256)
        q, scale, mn = _tile(w_a, cols * row_bytes_a, cmask, step, n_in, QTYPE_A, S_A, W_A, SB_A)
        acc_a += _tile_dot(xt, q, scale, mn, S_A, W_A, MIN_A, DOT_F32)
        if GLU:
            q, scale, mn = _tile(w_b, cols * row_bytes_b, cmask, step, n_in, QTYPE_B, S_B, W_B, SB_B)
            acc_b += _tile_dot(xt, q, scale, mn, S_B, W_B, MIN_B, DOT_F32)
    if GLU:
        acc_a = acc_a * tl.sigmoid(acc_a) * acc_b
    tl.store(out + r[:, None] * n_out + cols[None, :], acc_a.to(out.dtype.element_ty), mask=cmask[None, :])


@_jit
def _reduce_kernel(src, out, M, n_parts, b_offset, GLU: tl.constexpr, BN: tl.constexpr):
    """out (M,) = the sum of n_parts float32 partial sums src (P, M), in part order (deterministic, unlike
    atomics); with GLU, silu(that) * the same sum of the parts at src + b_offset. BN outputs per program."""
    i = tl.program_id(0) * BN + tl.arange(0, BN)  # (BN,)
    m = i < M
    acc = tl.zeros((BN,), dtype=tl.float32)
    acc_b = tl.zeros((BN,), dtype=tl.float32)
    for p in range(n_parts):
        acc += tl.load(src + p * M + i, mask=m, other=0.0)
        if GLU:
            acc_b += tl.load(src + b_offset + p * M + i, mask=m, other=0.0)
    if GLU:
        acc = acc * tl.sigmoid(acc) * acc_b
    tl.store(out + i, acc.to(out.dtype.element_ty), mask=m)


# --- host side ------------------------------------------------------------------------------------------


def triton_available(device: str | torch.device = "cuda") -> bool:
    """Whether the Triton kernels serve tensors on `device` (else the torch fallback does): CUDA, or the
    CPU in a process that imported this module under TRITON_INTERPRET=1 (the kernels' CPU tests)."""
    if triton is None:
        return False
    return torch.device(device).type == ("cpu" if _INTERPRETED else "cuda")


def matrix_nbytes(qtype: GGMLQuantizationType, n_out: int, n_in: int) -> int:
    """GGUF bytes of an (n_out, n_in) matrix of qtype."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return n_out * (n_in // block_size) * type_size


def pool_stride(qtype: GGMLQuantizationType, n_out: int, n_in: int) -> int:
    """Bytes of one slot row of a pool: the matrix rounded up to POOL_ALIGN."""
    return -(-matrix_nbytes(qtype, n_out, n_in) // POOL_ALIGN) * POOL_ALIGN


def new_pool(
    n_slots: int, qtype: GGMLQuantizationType, n_out: int, n_in: int, device: str | torch.device
) -> torch.Tensor:
    """An uninitialized slot pool (n_slots, bytes) for matrices of one shape; pass `pool[s]` to the
    functions here, or the pool and slot numbers to the grouped ones. Fill a slot with
    `pool[s, :matrix_nbytes(...)].copy_(raw_bytes)`."""
    return torch.empty(
        n_slots, pool_stride(qtype, n_out, n_in), dtype=torch.uint8, device=device
    )  # (S, bytes)


def _check_type(qtype: GGMLQuantizationType, n_out: int, n_in: int) -> int:
    """The GGUF bytes of an (n_out, n_in) qtype matrix, once the kernels are known to take it."""
    if qtype not in QUANT_TYPES:
        names = ", ".join(sorted(t.name for t in QUANT_TYPES))
        raise UnsupportedModelError(
            f"{qtype.name} weights cannot stay quantized on the GPU; supported: {names}"
        )
    if n_in % GGML_QUANT_SIZES[qtype][0]:
        raise ModelFormatError(f"a {qtype.name} row of {n_in} weights is not a whole number of blocks")
    if n_out * n_in >= 2**31:  # the kernels index in int32
        raise ValueError(f"a ({n_out}, {n_in}) matrix is too large for the GPU quant kernels (2^31 weights)")
    return matrix_nbytes(qtype, n_out, n_in)


def _bad_bytes(w: torch.Tensor, qtype: GGMLQuantizationType, n_out: int, n_in: int, device) -> ValueError:
    nbytes = matrix_nbytes(qtype, n_out, n_in)
    return ValueError(
        f"expected the {nbytes} bytes of a {qtype.name} ({n_out}, {n_in}) matrix as a contiguous uint8 tensor"
        f" on {device} (a pool row may add padding); got {w.dtype} of shape {tuple(w.shape)} on {w.device}"
    )


def _check_slot_type(qtype: GGMLQuantizationType, n_out: int, n_in: int, stride: int) -> int:
    """_check_type, and that pool rows `stride` bytes apart hold such a matrix."""
    nbytes = _check_type(qtype, n_out, n_in)
    if stride < nbytes:
        raise ValueError(
            f"pool rows {stride} bytes apart cannot hold a {qtype.name} ({n_out}, {n_in}) matrix of"
            f" {nbytes} bytes: make the pool with new_pool"
        )
    return nbytes


def _check_pool(pool: torch.Tensor, qtype: GGMLQuantizationType, n_out: int, n_in: int, device) -> None:
    """A pool as new_pool makes them, of matrices this shape, on device; else a ValueError."""
    if (
        pool.dtype != torch.uint8
        or pool.dim() != 2
        or pool.stride(1) != 1
        or pool.shape[1] < matrix_nbytes(qtype, n_out, n_in)
        or pool.device != device
    ):
        raise ValueError(
            f"expected a pool (slots, bytes) of {qtype.name} ({n_out}, {n_in}) matrices on {device}, as"
            f" new_pool makes; got {pool.dtype} of shape {tuple(pool.shape)}, strides {pool.stride()} on"
            f" {pool.device}"
        )


def _dequant_torch(w: torch.Tensor, qtype: GGMLQuantizationType, n_out: int, n_in: int) -> torch.Tensor:
    """The fallback: float32 (N, K) on w's device through dsrun.quants (on the CPU)."""
    raw = w.reshape(-1)[: matrix_nbytes(qtype, n_out, n_in)].cpu().numpy()
    return quants.dequantize(raw, qtype, (n_out, n_in)).to(w.device)


def _step_args(qtype: GGMLQuantizationType, suffix: str = "") -> dict:
    """The kernels' constexprs for qtype (named with `suffix` for the grouped kernel's second matrix)."""
    s, w, has_min = _LAYOUTS[qtype]
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    args = dict(QTYPE=int(qtype), S=s, W=w, SB=STEP // block_size * type_size)
    args = {k + suffix: v for k, v in args.items()}
    args["MIN" + suffix if suffix else "HAS_MIN"] = has_min
    return args


def _pair_args(qa, qb, stride_a: int, stride_b: int, n_out: int, n_in: int) -> dict:
    """What the two-matrix kernels (grouped, sorted) take of their matrices A and B: slots `stride_*`
    bytes apart in their pools, (n_out, n_in) each."""
    return dict(
        n_out=n_out,
        n_in=n_in,
        slot_bytes_a=stride_a,
        slot_bytes_b=stride_b,
        row_bytes_a=matrix_nbytes(qa, 1, n_in),
        row_bytes_b=matrix_nbytes(qb, 1, n_in),
        n_steps=-(-n_in // STEP),
        **_step_args(qa, "_A"),
        **_step_args(qb, "_B"),
    )


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_k(n_programs: int, n_steps: int, device: torch.device) -> int:
    """Split-K parts: a decode GEMV has too few programs of _GEMV_BN rows to keep every SM streaming
    weights. `n_programs` counts them unsplit."""
    if device.type != "cuda":
        return 1
    parts = 4 * _sm_count(device.index or 0) // n_programs
    return max(1, min(parts, n_steps // 4))  # each part at least 4 steps


def takes_int8_x(qtypes: tuple[GGMLQuantizationType, ...], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the few-token kernels round x to int8 per 32 (as llama.cpp's CUDA decode does) and multiply
    the quants as ints, four at a time: for Q4_K matrices on a Triton device, unless DSRUN_GPU_INT8_X=0.
    An input's rounding error is at most int8_x_error(dtype) times its block's amax."""
    return (
        all(q in INT8_X_TYPES for q in qtypes)
        and dtype in (torch.bfloat16, torch.float16, torch.float32)
        and triton_available(device)
        and os.environ.get("DSRUN_GPU_INT8_X", "1") != "0"
    )


def int8_x_levels(dtype: torch.dtype) -> int:
    """Int8 roundings of x: one for 16-bit x, whose own rounding is of that size; two for float32 x (the
    remainder of the first, to d / 254), which then stays within bf16's error."""
    return 2 if dtype == torch.float32 else 1


def int8_x_error(dtype: torch.dtype) -> float:
    """The most an input rounded to int8 per 32 moves, as a fraction of its block's amax."""
    return 1 / 254 if int8_x_levels(dtype) == 1 else 1 / (254 * 254)


class _Int8X:
    """x (R, K) rounded to int8 per 32 by _quantize_x_kernel into buffers of its own: one call shape's."""

    def __init__(self, rows: int, n_in: int, dtype: torch.dtype, device: torch.device):
        levels = int8_x_levels(dtype)
        self.xq = torch.empty(rows, levels * n_in // 4, dtype=torch.int32, device=device)  # (R, L * K / 4)
        self.xd = torch.empty(rows, n_in // 32, dtype=torch.float32, device=device)  # (R, K / 32): scales
        self.xs = torch.empty(rows, n_in // 32, dtype=torch.float32, device=device)  # (R, K / 32): sums
        grid = lambda bn: (rows, n_in // (32 * bn))  # noqa: E731
        consts = dict(n_in=n_in, LEVELS=levels)
        self.launch = _Launch(_quantize_x_kernel, consts, grid, fp_fusion=True, config=(8, 4, 1))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.launch(x, self.xq, self.xd, self.xs, aligned=not x.data_ptr() & 15)
        return self.xq, self.xd, self.xs


def _int8_tile(bn: int) -> dict:
    """The int8-x kernels' steps per iteration (KB) for BN rows; the float kernels ignore it."""
    return dict(KB=max(1, _INT8_TILE // bn))


def _word_aligned(*tensors: torch.Tensor) -> bool:
    """Whether these uint8 tensors (whose last dimension is whole words) view as int32: the int8-x
    kernels read Q4_K blocks as words."""
    return not any(t.data_ptr() & 3 or t.shape[-1] & 3 for t in tensors)


# --- launches -------------------------------------------------------------------------------------------

_Config = tuple[int, int, int]  # (BN, num_warps, num_stages)
# As Triton 3.9 builds them for sm_90, none spills in the GEMV; BN 64 does in the grouped kernel with a
# Q6_K gate and up, where timing should pass it over.
_CONFIGS: tuple[_Config, ...] = ((16, 4, 3), (16, 8, 3), (32, 8, 3), (64, 8, 3))
# The int8-x kernels read BN rows times KB = _INT8_TILE // BN steps at once (_int8_tile): 8 KiB of quants.
_INT8_CONFIGS: tuple[_Config, ...] = ((4, 4, 3), (8, 4, 3), (16, 4, 3), (16, 8, 3), (32, 8, 3), (64, 8, 3))
_INT8_TILE = 64
# The sorted (prefill) kernel: BN outputs per program for BM rows; its tiles are (BM, 256) x (256, BN).
_SORTED_CONFIGS: tuple[_Config, ...] = ((32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 8, 2))
_DEFAULT_CONFIG: _Config = (_GEMV_BN, 8, 3)  # untuned: the interpreter, DSRUN_GPU_QUANT_AUTOTUNE=0
_TUNED: dict[tuple, _Config] = {}  # tune key -> the fastest of _CONFIGS there


def _autotune() -> bool:
    return not _INTERPRETED and os.environ.get("DSRUN_GPU_QUANT_AUTOTUNE", "1") != "0"


def _capturing() -> bool:
    return not _INTERPRETED and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _bench(fn: Callable[[], object]) -> float:
    """Milliseconds per call of fn on the GPU, with the L2 cache flushed before each; inf for a config
    the GPU cannot run."""
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    try:
        return do_bench(fn, warmup=10, rep=40)
    except OutOfResources:
        return float("inf")


class _Launch:
    """One kernel, launched again and again on new tensors with everything else fixed: its ints and
    constexprs (`consts`, every parameter after the tensors but BN and those `tile(BN)` gives), grid and
    config.

    A launch with a `tune_key` and no config takes the fastest of `configs`, timed on its first call's
    tensors once per key. Once it has compiled on a GPU, calls go straight to the compiled kernel, past
    Triton's argument binding, specialization and cache lookup; as that kernel was specialized for 16-byte
    aligned pointers, a call with one that is not (`aligned=False`) goes through Triton.
    """

    def __init__(
        self,
        kernel,
        consts: dict,
        grid: Callable[[int], tuple[int, ...]],
        *,
        fp_fusion: bool,
        config: _Config | None = None,
        tune_key: tuple | None = None,
        configs: tuple[_Config, ...] = _CONFIGS,
        tile: Callable[[int], dict] = lambda bn: {},
    ):
        self.kernel, self.consts, self.grid_of, self.fp_fusion = kernel, consts, grid, fp_fusion
        self.tune_key, self.configs, self.tile = tune_key, configs, tile
        self.bound = None if config is None else self._bind(config)  # (grid, args, options)
        self.runner = None  # the compiled kernel's launcher, for the bound grid

    def _bind(self, config: _Config) -> tuple[tuple[int, ...], tuple, dict]:
        bn, num_warps, num_stages = config
        values = dict(self.consts, **self.tile(bn), BN=bn)
        names = self.kernel.arg_names
        args = tuple(values[n] for n in names[len(names) - len(values) :])  # in the kernel's order
        options = dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=self.fp_fusion)
        grid = (*self.grid_of(bn), 1, 1)[:3]  # the compiled kernel's launcher takes all three
        return grid, args, options

    def _launch(self, bound: tuple, tensors: tuple):
        grid, args, options = bound
        return self.kernel[grid](*tensors, *args, **options)

    def __call__(self, *tensors: torch.Tensor, aligned: bool = True) -> None:
        if self.runner is not None and aligned:
            self.runner(*tensors, *self.bound[1])
            return
        if self.bound is None:
            if _capturing():  # nothing can be timed while a CUDA graph is captured: untuned, this once
                self._launch(self._bind(_DEFAULT_CONFIG), tensors)
                return
            self.bound = self._bind(self._tune(tensors))
        compiled = self._launch(self.bound, tensors)
        if aligned and not _INTERPRETED:
            self.runner = compiled[self.bound[0]]

    def _tune(self, tensors: tuple) -> _Config:
        if not _autotune():
            return _DEFAULT_CONFIG
        config = _TUNED.get(self.tune_key)
        if config is None:  # outputs are only written, so timing on the call's own tensors is harmless
            ms = {c: _bench(functools.partial(self._launch, self._bind(c), tensors)) for c in self.configs}
            config = _TUNED[self.tune_key] = min(ms, key=ms.get)
        return config


def _reduce_launch(m: int, parts: int, glu: bool) -> _Launch:
    """Adds up the split-K partial sums (P, M) (and with glu the second matrix's, after them) into out."""
    consts = dict(M=m, n_parts=parts, b_offset=parts * m, GLU=glu)
    return _Launch(
        _reduce_kernel, consts, lambda bn: (triton.cdiv(m, bn),), fp_fusion=True, config=(1024, 4, 3)
    )


# Plans by call shape, ("matmul" | "grouped" | "swiglu" | "dequant", ...): what its every call would redo.
_PLANS: dict[tuple, object] = {}


class _MatmulPlan:
    """quantized_matmul for one (qtype, N, K, x shape, dtype, device)."""

    def __init__(self, qtype, n_out, n_in, shape, dtype, device):
        self.qtype, self.n_out, self.n_in, self.dtype, self.device = qtype, n_out, n_in, dtype, device
        self.nbytes = _check_type(qtype, n_out, n_in)
        if not shape or shape[-1] != n_in or not dtype.is_floating_point:
            raise ValueError(f"x must be float (..., {n_in}); got {dtype} {tuple(shape)}")
        self.out_shape = (*shape[:-1], n_out)
        T = shape.numel() // n_in
        self.partials = self.reduce = self.int8_x = None
        if T == 0:
            self.path = "empty"
        elif not triton_available(device):
            self.path = "torch"
        elif T > FUSED_MAX_T:
            self.path = "dequant"
            rows = max(1, MAX_SCRATCH_BYTES // (dtype.itemsize * n_in))
            self.slices = [(r0, min(n_out, r0 + rows)) for r0 in range(0, n_out, rows)]
            self.dequant = {
                r1 - r0: _dequant_plan(qtype, r1 - r0, n_in, dtype, device) for r0, r1 in self.slices
            }
            self.row_bytes = matrix_nbytes(qtype, 1, n_in)
        else:
            self.path = "fused"
            n_steps = triton.cdiv(n_in, STEP)
            per = triton.cdiv(n_steps, _split_k(triton.cdiv(n_out, _GEMV_BN), n_steps, device))
            parts = triton.cdiv(n_steps, per)
            dot = T >= DOT_FROM_T
            bt = 16 if dot else triton.next_power_of_2(T)
            consts = dict(
                T=T,
                n_out=n_out,
                n_in=n_in,
                row_bytes=matrix_nbytes(qtype, 1, n_in),
                n_steps=n_steps,
                steps_per_part=per,
                part_stride=T * n_out,
                **_step_args(qtype),
                BT=bt,
                DOT=dot,
                DOT_F32=dtype == torch.float32 or _INTERPRETED,
            )

            def gemv(int8: bool) -> _Launch:
                return _Launch(
                    _gemv_kernel,
                    dict(consts, INT8_X=int8, LEVELS=int8_x_levels(dtype)),
                    lambda bn: (triton.cdiv(n_out, bn), parts),
                    fp_fusion=True,  # said outright: Triton 3.9 warns that its default will change
                    tune_key=("gemv", qtype, n_out, n_in, bt, dtype, device, int8),
                    configs=_INT8_CONFIGS if int8 else _CONFIGS,
                    tile=_int8_tile,
                )

            self.gemv = gemv(False)
            if not dot and takes_int8_x((qtype,), dtype, device):  # word-aligned weights take it
                self.gemv_int8, self.int8_x = gemv(True), _Int8X(T, n_in, dtype, device)
            if parts > 1:  # float32 partial sums, added up by a second kernel: deterministic, unlike atomics
                self.partials = torch.empty(parts, T, n_out, dtype=torch.float32, device=device)  # (P, T, N)
                self.reduce = _reduce_launch(T * n_out, parts, glu=False)

    def __call__(self, x: torch.Tensor, w: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
        if (
            w.dtype != torch.uint8
            or not w.is_contiguous()
            or not self.nbytes <= w.numel() < self.nbytes + POOL_ALIGN
            or w.device != self.device
        ):
            raise _bad_bytes(w, self.qtype, self.n_out, self.n_in, self.device)
        if not x.is_contiguous():
            x = x.contiguous()
        if self.path == "fused":
            out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)  # (..., N)
            aligned = not (x.data_ptr() | w.data_ptr()) & 15
            dst = out if self.reduce is None else self.partials
            if self.int8_x is not None and _word_aligned(w):
                self.gemv_int8(x, w.view(torch.int32), dst, *self.int8_x(x), aligned=aligned)
            else:
                self.gemv(x, w, dst, x, x, x, aligned=aligned)  # x stands for the unused int8 buffers
            if self.reduce is not None:
                self.reduce(self.partials, out)
            return out
        x2 = x.view(-1, self.n_in)  # (T, K)
        if self.path == "dequant":  # each slice's product is queued before the next reuses the scratch
            parts = [x2 @ self._dequantized(w, r0, r1, scratch).T for r0, r1 in self.slices]  # (T, n) each
            return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).view(self.out_shape)
        if self.path == "empty":
            return x.new_empty(self.out_shape)
        wf = _dequant_torch(w, self.qtype, self.n_out, self.n_in)  # (N, K)
        return (x2.float() @ wf.T).to(self.dtype).view(self.out_shape)

    def _dequantized(self, w: torch.Tensor, r0: int, r1: int, scratch: torch.Tensor | None) -> torch.Tensor:
        """Rows [r0, r1) of W, dequantized into the scratch: (r1 - r0, K)."""
        n = (r1 - r0) * self.n_in
        wd = (_scratch(self.device, self.dtype, n) if scratch is None else scratch[:n]).view(
            r1 - r0, self.n_in
        )
        rows = w[r0 * self.row_bytes : r1 * self.row_bytes]
        self.dequant[r1 - r0](rows, wd, aligned=not (rows.data_ptr() | wd.data_ptr()) & 15)
        return wd


def _dequant_plan(qtype, n_out: int, n_in: int, dtype: torch.dtype, device: torch.device) -> _Launch:
    key = ("dequant", qtype, n_out, n_in, dtype, device)
    launch = _PLANS.get(key)
    if launch is None:
        consts = dict(n_out=n_out, n_in=n_in, row_bytes=matrix_nbytes(qtype, 1, n_in), **_step_args(qtype))
        grid = lambda bn: (triton.cdiv(n_out, bn), triton.cdiv(n_in, STEP))  # noqa: E731
        # No fused multiply-add: scale * q - min then rounds exactly as dsrun.quants does.
        launch = _PLANS[key] = _Launch(
            _dequant_kernel, consts, grid, fp_fusion=False, config=(_DEQUANT_BN, 4, 3)
        )
    return launch


class _GroupedPlan:
    """grouped_matmul (one pool) or the gate-and-up half of grouped_swiglu (two) for one (qtypes, N, K,
    x shape, dtype, device, slot dtype, pool strides)."""

    def __init__(self, qtypes, n_out, n_in, shape, dtype, device, slot_dtype, strides):
        self.qtypes, self.n_out, self.n_in, self.dtype, self.device = qtypes, n_out, n_in, dtype, device
        for q, stride in zip(qtypes, strides):
            _check_slot_type(q, n_out, n_in, stride)
        if len(shape) != 2 or shape[1] != n_in or not dtype.is_floating_point:
            raise ValueError(f"x must be float (A, {n_in}); got {dtype} {tuple(shape)}")
        if slot_dtype not in (torch.int32, torch.int64):
            raise ValueError(f"slots must be int32 or int64; got {slot_dtype}")
        A = self.A = shape[0]
        glu = len(qtypes) == 2
        self.partials = self.reduce = self.int8_x = None
        if A == 0:
            self.path = "empty"
            return
        if not triton_available(device):
            self.path = "torch"
            return
        self.path = "kernel"
        n_steps = triton.cdiv(n_in, STEP)
        per = triton.cdiv(n_steps, _split_k(A * triton.cdiv(n_out, _GEMV_BN), n_steps, device))
        parts = triton.cdiv(n_steps, per)
        m = A * n_out
        if A * n_in >= 2**31 or 2 * parts * m >= 2**31:  # the kernels index in int32
            raise ValueError(f"{A} rows are too many for one grouped launch of a ({n_out}, {n_in}) matrix")
        consts = dict(
            _pair_args(qtypes[0], qtypes[-1], strides[0], strides[-1], n_out, n_in),
            steps_per_part=per,
            part_stride=m,
            b_offset=parts * m,
            GLU=glu,
            FINAL=parts == 1,
        )
        bucket = min(triton.next_power_of_2(A), 64)  # the best BN depends on how many programs there are

        def kernel(int8: bool) -> _Launch:
            return _Launch(
                _grouped_kernel,
                dict(consts, INT8_X=int8, LEVELS=int8_x_levels(dtype)),
                lambda bn: (A, triton.cdiv(n_out, bn), parts),
                fp_fusion=True,
                tune_key=("grouped", qtypes, n_out, n_in, bucket, parts, dtype, device, int8),
                configs=_INT8_CONFIGS if int8 else _CONFIGS,
                tile=_int8_tile,
            )

        self.kernel = kernel(False)
        if takes_int8_x(qtypes, dtype, device):  # word-aligned pools take it
            self.kernel_int8, self.int8_x = kernel(True), _Int8X(A, n_in, dtype, device)
        if parts > 1:
            n = (1 + glu) * parts * m  # (P, A, N), and B's after them with glu
            self.partials = torch.empty(n, dtype=torch.float32, device=device)
            self.reduce = _reduce_launch(m, parts, glu)

    def __call__(self, x: torch.Tensor, pools: tuple[torch.Tensor, ...], slots: torch.Tensor) -> torch.Tensor:
        self.check_pools(pools)
        x, slots = self.check(x, slots)
        return self.run(x, pools, slots)

    def check_pools(self, pools: tuple[torch.Tensor, ...]) -> None:
        for pool, q in zip(pools, self.qtypes):
            _check_pool(pool, q, self.n_out, self.n_in, self.device)

    def check(self, x: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x and slots, contiguous, once slots is known to fit."""
        if slots.shape != (self.A,) or slots.device != self.device:
            raise ValueError(
                f"slots must be ({self.A},) on {self.device}, one per row of x; got {tuple(slots.shape)} on"
                f" {slots.device}"
            )
        return (
            x if x.is_contiguous() else x.contiguous(),
            slots if slots.is_contiguous() else slots.contiguous(),
        )

    def run(self, x: torch.Tensor, pools: tuple[torch.Tensor, ...], slots: torch.Tensor) -> torch.Tensor:
        if self.path == "kernel":
            out = torch.empty(self.A, self.n_out, dtype=self.dtype, device=self.device)  # (A, N)
            pa, pb = pools[0], pools[-1]
            aligned = not (x.data_ptr() | pa.data_ptr() | pb.data_ptr() | slots.data_ptr()) & 15
            dst = out if self.reduce is None else self.partials
            if self.int8_x is not None and _word_aligned(pa, pb):
                pa, pb = pa.view(torch.int32), pb.view(torch.int32)  # (S, bytes / 4)
                self.kernel_int8(x, pa, pb, slots, dst, *self.int8_x(x), aligned=aligned)
            else:
                self.kernel(x, pa, pb, slots, dst, x, x, x, aligned=aligned)  # x: no int8 buffers
            if self.reduce is not None:
                self.reduce(self.partials, out)
            return out
        if self.path == "empty":
            return x.new_empty(0, self.n_out)
        # The fallback: each slot's rows at once; silu(a) * b in float32, rounded once as the kernel does.
        out = torch.empty(self.A, self.n_out, dtype=torch.float32, device=self.device)  # (A, N)
        by_slot: dict[int, list[int]] = {}
        for a, s in enumerate(slots.tolist()):
            by_slot.setdefault(s, []).append(a)
        for s, rows in by_slot.items():
            idx = torch.tensor(rows, device=self.device)
            if s < 0:  # no expert: the kernel's zeros
                out[idx] = 0
                continue
            xs = x[idx].float()  # (n, K)
            ys = [xs @ _dequant_torch(p[s], q, self.n_out, self.n_in).T for p, q in zip(pools, self.qtypes)]
            out[idx] = F.silu(ys[0]) * ys[1] if len(ys) == 2 else ys[0]  # (n, N)
        return out.to(self.dtype)


_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _scratch(device: torch.device, dtype: torch.dtype, n: int) -> torch.Tensor:
    """A per-(device, dtype) buffer for dequantized weights, grown to the largest matrix seen: (n,)."""
    buf = _SCRATCH.get((device, dtype))
    if buf is None or buf.numel() < n:
        buf = _SCRATCH[(device, dtype)] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n]


# --- API ------------------------------------------------------------------------------------------------


def dequantize_gpu(
    w: torch.Tensor,
    qtype: GGMLQuantizationType,
    n_out: int,
    n_in: int,
    out: torch.Tensor | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The (n_out, n_in) matrix held in GGUF bytes w, written into `out` (contiguous, on w's device; its
    dtype wins over `dtype`). Float32 results are bit-exact with dsrun.quants.dequantize."""
    nbytes = _check_type(qtype, n_out, n_in)
    if w.dtype != torch.uint8 or not w.is_contiguous() or not nbytes <= w.numel() < nbytes + POOL_ALIGN:
        raise _bad_bytes(w, qtype, n_out, n_in, w.device)
    if out is None:
        out = torch.empty(n_out, n_in, dtype=dtype, device=w.device)
    if out.shape != (n_out, n_in) or not out.is_contiguous() or out.device != w.device:
        raise ValueError(f"out must be a contiguous ({n_out}, {n_in}) tensor on {w.device}")
    if not triton_available(w.device):
        return out.copy_(_dequant_torch(w, qtype, n_out, n_in))
    launch = _dequant_plan(qtype, n_out, n_in, out.dtype, w.device)
    launch(w, out, aligned=not (w.data_ptr() | out.data_ptr()) & 15)
    return out


def quantized_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    qtype: GGMLQuantizationType,
    n_out: int,
    n_in: int,
    *,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ W.T for the (n_out, n_in) matrix W held in GGUF bytes w (a pool row will do): (..., K) ->
    (..., N) in x's dtype (bf16, f16 or f32), accumulated in float32.

    Above FUSED_MAX_T tokens W is dequantized into `scratch` (1-D, x's dtype, at least N * K elements)
    or, by default, into a buffer shared by all calls on x's device, and cuBLAS multiplies in x's dtype
    (float32 stays IEEE: TF32 or bf16 put a 100-token Q4_K prefill past tau); and where split-K pays (few
    tokens on a GPU), partial sums go to a buffer of the call's shape: so calls on one device keep to one
    stream.
    """
    key = ("matmul", qtype, n_out, n_in, x.shape, x.dtype, x.device)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _MatmulPlan(qtype, n_out, n_in, x.shape, x.dtype, x.device)
    return plan(x, w, scratch)


class _SwigluPlan:
    """grouped_swiglu for one (qtypes, F, D, x shape, dtype, device, slot dtype, pool strides): the
    gate-and-up plan and the down plan, whose input (h) needs no checks."""

    def __init__(self, qtypes, n_ff, n_embd, shape, dtype, device, slot_dtype, strides):
        self.gate_up = _GroupedPlan(qtypes[:2], n_ff, n_embd, shape, dtype, device, slot_dtype, strides[:2])
        h_shape = (shape[0], n_ff)  # gate_up has checked shape
        self.down = _GroupedPlan(qtypes[2:], n_embd, n_ff, h_shape, dtype, device, slot_dtype, strides[2:])

    def __call__(self, x, gate, up, down, slots):
        self.gate_up.check_pools((gate, up))
        self.down.check_pools((down,))
        x, slots = self.gate_up.check(x, slots)
        h = self.gate_up.run(x, (gate, up), slots)  # (A, F)
        return self.down.run(h, (down,), slots)  # (A, D)


def slot_blocks(
    rows: torch.Tensor, slots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Assignments (row of x, slot) sorted by slot into blocks of BM rows, each block one slot's:
    (row_src (P,) the row of x each sorted row reads, -1 where it pads its block; block_slot (P / BM,);
    position (A,) where assignment a went; BM). BM grows with the rows per slot (16 to 64), so a prefill
    pads little and still reads each slot's weights once per 64 rows. Host tensors in, int32 out."""
    A = slots.numel()
    order = torch.argsort(slots, stable=True)  # (A,)
    held, counts = torch.unique_consecutive(slots[order], return_counts=True)  # (U,)
    per_slot = -(-A // max(1, len(held)))
    bm = min(64, max(16, 1 << (per_slot - 1).bit_length()))  # a power of two
    padded = (counts + bm - 1) // bm * bm  # (U,)
    shift = torch.repeat_interleave(torch.cumsum(padded - counts, 0) - (padded - counts), counts)  # (A,)
    position = torch.empty(A, dtype=torch.int32)
    position[order] = (torch.arange(A) + shift).int()  # sorted rows, moved past the padding before them
    row_src = torch.full((int(padded.sum()),), -1, dtype=torch.int32)  # (P,)
    row_src[position.long()] = rows.int()
    return row_src, torch.repeat_interleave(held, padded // bm).int(), position, bm


class _SortedPlan:
    """sorted_swiglu for one (qtypes, F, D, dtype, device, pool strides, BM): launches by block count."""

    def __init__(self, qtypes, n_ff, n_embd, dtype, device, strides, bm):
        self.qtypes, self.dtype, self.device, self.bm = qtypes, dtype, device, bm
        self.n_ff, self.n_embd = n_ff, n_embd
        shapes = ((n_ff, n_embd), (n_ff, n_embd), (n_embd, n_ff))
        for q, shape, stride in zip(qtypes, shapes, strides):
            _check_slot_type(q, *shape, stride)
        halves = ((qtypes[0], qtypes[1], strides[0], strides[1], n_ff, n_embd, True),
                  (qtypes[2], qtypes[2], strides[2], strides[2], n_embd, n_ff, False))  # fmt: skip
        self.consts = [
            dict(
                _pair_args(qa, qb, sa, sb, n_out, n_in),
                GLU=glu,
                GATHER=glu,  # gate and up read x's rows; down reads h's in their sorted order
                DOT_F32=dtype == torch.float32 or _INTERPRETED,
                BM=bm,
            )
            for qa, qb, sa, sb, n_out, n_in, glu in halves
        ]
        self.launches: dict[int, tuple[_Launch, _Launch]] = {}

    def _launches(self, n_blocks: int) -> tuple[_Launch, _Launch]:
        pair = self.launches.get(n_blocks)
        if pair is None:
            pair = self.launches[n_blocks] = tuple(
                _Launch(
                    _sorted_kernel,
                    consts,
                    lambda bn, n_out=consts["n_out"]: (n_blocks, triton.cdiv(n_out, bn)),
                    fp_fusion=True,
                    tune_key=(
                        "sorted",
                        self.qtypes,
                        consts["n_out"],
                        consts["n_in"],
                        self.bm,
                        self.dtype,
                        self.device,
                        consts["GLU"],
                    ),  # fmt: skip
                    configs=_SORTED_CONFIGS,
                )
                for consts in self.consts
            )
        return pair

    def __call__(self, x, pools, row_src, block_slot, position) -> torch.Tensor:
        shapes = ((self.n_ff, self.n_embd),) * 2 + ((self.n_embd, self.n_ff),)
        for pool, q, shape in zip(pools, self.qtypes, shapes):
            _check_pool(pool, q, *shape, self.device)
        P = row_src.numel()
        if max(x.shape[0], P) * max(self.n_ff, self.n_embd) >= 2**31:  # the kernel indexes in int32
            raise ValueError(f"{P} rows are too many for one sorted launch")
        index = torch.cat([row_src, block_slot, position]).to(self.device, non_blocking=True)
        src, blocks, pos = index.split([P, block_slot.numel(), position.numel()])
        gate_up, down = self._launches(block_slot.numel())
        h = torch.empty(P, self.n_ff, dtype=self.dtype, device=self.device)  # (P, F) sorted
        gate_up(x, pools[0], pools[1], src, blocks, h, aligned=not x.data_ptr() & 15)
        y = torch.empty(P, self.n_embd, dtype=self.dtype, device=self.device)  # (P, D) sorted
        down(h, pools[2], pools[2], src, blocks, y)
        return y.index_select(0, pos)  # (A, D) in the assignments' order


def _grouped(x, pools, slots, qtypes, n_out, n_in) -> torch.Tensor:
    strides = pools[0].stride(0), pools[-1].stride(0)
    key = ("grouped", qtypes, n_out, n_in, x.shape, x.dtype, x.device, slots.dtype, strides)
    plan = _PLANS.get(key)
    if plan is None:
        shape, dtype, device = x.shape, x.dtype, x.device
        plan = _PLANS[key] = _GroupedPlan(qtypes, n_out, n_in, shape, dtype, device, slots.dtype, strides)
    return plan(x, pools, slots)


def grouped_matmul(
    x: torch.Tensor,
    pool: torch.Tensor,
    slots: torch.Tensor,
    qtype: GGMLQuantizationType,
    n_out: int,
    n_in: int,
) -> torch.Tensor:
    """Row a of x times the matrix in slot slots[a] of `pool`: (A, K) -> (A, N) in x's dtype, all rows in
    one launch (a decode step's experts of one layer, one row each; a few rows per slot do too, each row
    reading its slot's weights, mostly from L2).

    pool (S, bytes) is new_pool's; slots (A,) int32 or int64 on x's device, each below S (not checked on a
    GPU: that would wait for it), or negative: that row reads no weights and comes out zero (an expert
    with no slot, in a step whose lookup ran on the device). Calls on one device keep to one stream (see
    quantized_matmul).
    """
    return _grouped(x, (pool,), slots, (qtype,), n_out, n_in)


def grouped_swiglu(
    x: torch.Tensor,
    gate_pool: torch.Tensor,
    up_pool: torch.Tensor,
    down_pool: torch.Tensor,
    slots: torch.Tensor,
    qtypes: tuple[GGMLQuantizationType, GGMLQuantizationType, GGMLQuantizationType],
    n_ff: int,
    n_embd: int,
) -> torch.Tensor:
    """down(silu(gate x) * up x) of each row with its slot's expert: (A, n_embd) -> (A, n_embd).

    Pools as grouped_matmul's: gate and up hold (n_ff, n_embd) matrices, down (n_embd, n_ff); qtypes are
    (gate, up, down). Two launches: gate and up in one, silu(gate x) * up x taken in float32 and rounded
    once to x's dtype, then down; where split-K pays (a few rows), each adds its reduction launch.
    """
    strides = gate_pool.stride(0), up_pool.stride(0), down_pool.stride(0)
    key = ("swiglu", qtypes, n_ff, n_embd, x.shape, x.dtype, x.device, slots.dtype, strides)
    plan = _PLANS.get(key)
    if plan is None:
        shape, dtype, device = x.shape, x.dtype, x.device
        plan = _PLANS[key] = _SwigluPlan(qtypes, n_ff, n_embd, shape, dtype, device, slots.dtype, strides)
    return plan(x, gate_pool, up_pool, down_pool, slots)


def sorted_swiglu(
    x: torch.Tensor,
    gate_pool: torch.Tensor,
    up_pool: torch.Tensor,
    down_pool: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
    qtypes: tuple[GGMLQuantizationType, GGMLQuantizationType, GGMLQuantizationType],
    n_ff: int,
    n_embd: int,
) -> torch.Tensor:
    """down(silu(gate x[rows[a]]) * up x[rows[a]]) with slot slots[a]'s expert, for each assignment a:
    (A, n_embd) in x's dtype. grouped_swiglu's product for many rows per slot (a prefill): the
    assignments are sorted by slot on the host (slot_blocks) and each weight tile is dequantized once per
    block of up to 64 rows, for tensor cores, where grouped_swiglu reads it once per row.

    x (T, n_embd) on the pools' device; rows, slots (A,) host integer tensors, 0 <= rows < T and
    0 <= slots < the pools' slot count (checked: the host has them); pools as grouped_swiglu's.
    """
    A = slots.numel()
    if rows.shape != (A,) or slots.dim() != 1 or rows.device.type != "cpu" or slots.device.type != "cpu":
        raise ValueError("rows and slots must be (A,) host tensors, one of each per assignment")
    if A and not (0 <= int(rows.min()) and int(rows.max()) < x.shape[0]):
        raise ValueError(f"rows must index x's {x.shape[0]} rows")
    if A and not (0 <= int(slots.min()) and int(slots.max()) < gate_pool.shape[0]):
        raise ValueError(f"slots must name one of the pools' {gate_pool.shape[0]} slots")
    if x.dim() != 2 or x.shape[1] != n_embd or not x.dtype.is_floating_point:
        raise ValueError(f"x must be float (T, {n_embd}); got {x.dtype} {tuple(x.shape)}")
    if A == 0 or not triton_available(x.device):  # grouped_swiglu's fallback takes each slot's rows at once
        return grouped_swiglu(
            x[rows.to(x.device)], gate_pool, up_pool, down_pool, slots.to(x.device), qtypes, n_ff, n_embd
        )
    row_src, block_slot, position, bm = slot_blocks(rows, slots)
    strides = gate_pool.stride(0), up_pool.stride(0), down_pool.stride(0)
    key = ("sorted", qtypes, n_ff, n_embd, x.dtype, x.device, strides, bm)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _SortedPlan(qtypes, n_ff, n_embd, x.dtype, x.device, strides, bm)
    x = x if x.is_contiguous() else x.contiguous()
    return plan(x, (gate_pool, up_pool, down_pool), row_src, block_slot, position)


# --- benchmark ------------------------------------------------------------------------------------------


def _time(fn, n_copies: int, device: torch.device) -> tuple[float, float]:
    """(kernel seconds, eager seconds) per call of fn(i), i cycling over the weight copies.

    Kernel time replays a CUDA graph of the calls, so it leaves out Python and launch overhead.
    """
    for i in range(n_copies):  # compile, autotune, allocate
        fn(i)
    reps = 50 if device.type == "cuda" else 3
    if device.type != "cuda":
        t = time.perf_counter()
        for i in range(reps):
            fn(i % n_copies)
        seconds = (time.perf_counter() - t) / reps
        return seconds, seconds
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for i in range(reps):
        fn(i % n_copies)
    end.record()
    torch.cuda.synchronize(device)
    eager = start.elapsed_time(end) / 1e3 / reps
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        fn(0)  # the graph's memory pool is warmed on its stream
        with torch.cuda.graph(graph, stream=stream):
            for i in range(reps):
                fn(i % n_copies)
    graph.replay()
    torch.cuda.synchronize(device)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3 / reps, eager


def _bench_device(device: str | torch.device) -> tuple[torch.device, int]:
    """The device with its index, and the bytes of weights that exceed its L2 cache twice (0 off CUDA)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    return device, 2 * l2


def _random_pool(n_slots: int, qtype: GGMLQuantizationType, n_out: int, n_in: int, device) -> torch.Tensor:
    """A pool whose every slot holds the same random valid matrix."""
    nbytes = matrix_nbytes(qtype, n_out, n_in)
    blocks = quants.random_blocks(qtype, nbytes // GGML_QUANT_SIZES[qtype][1], seed=0)
    pool = new_pool(n_slots, qtype, n_out, n_in, device)
    pool[:, :nbytes].copy_(torch.from_numpy(blocks).view(1, -1))
    return pool


def benchmark(
    qtype: GGMLQuantizationType, n_out: int, n_in: int, T: int, device: str | torch.device = "cuda"
) -> dict[str, float]:
    """Weight GB/s and microseconds of quantized_matmul against torch.matmul on the bf16 matrix.

    Both read from enough copies of the matrix to exceed the L2 cache, as experts do in a real step.
    Keys: quant_GBps, bf16_GBps (weight bytes over kernel time), quant_us, bf16_us, and the eager
    per-call times quant_eager_us, bf16_eager_us (Python and launches included).
    """
    device, beyond_l2 = _bench_device(device)
    nbytes = matrix_nbytes(qtype, n_out, n_in)
    n_q, n_b = (max(1, -(-beyond_l2 // size)) for size in (nbytes, 2 * n_out * n_in))
    pool = _random_pool(n_q, qtype, n_out, n_in, device)
    wb = dequantize_gpu(pool[0], qtype, n_out, n_in, dtype=torch.bfloat16).expand(n_b, -1, -1).contiguous()
    x = torch.randn(T, n_in, dtype=torch.bfloat16, device=device)  # (T, K)
    tq, eq = _time(lambda i: quantized_matmul(x, pool[i], qtype, n_out, n_in), n_q, device)
    tb, eb = _time(lambda i: x @ wb[i].T, n_b, device)
    return dict(
        quant_GBps=nbytes / tq / 1e9,
        bf16_GBps=wb[0].numel() * 2 / tb / 1e9,
        quant_us=tq * 1e6,
        bf16_us=tb * 1e6,
        quant_eager_us=eq * 1e6,
        bf16_eager_us=eb * 1e6,
    )


def benchmark_experts(
    qtypes: tuple[GGMLQuantizationType, ...],
    n_ff: int,
    n_embd: int,
    A: int,
    device: str | torch.device = "cuda",
) -> dict[str, float]:
    """Microseconds of one token's A experts (one row each, as in decode): grouped_swiglu on quantized
    slots, against a loop of per-expert swiglus of quantized_matmul ("loop") and of torch.matmul on bf16
    copies ("bf16"). Each reads from enough experts to exceed the L2 cache.

    Keys: grouped_us, loop_us, bf16_us (kernel time: a CUDA graph replayed) and grouped_eager_us,
    loop_eager_us, bf16_eager_us (Python and launches included).
    """
    device, beyond_l2 = _bench_device(device)
    shapes = ((n_ff, n_embd), (n_ff, n_embd), (n_embd, n_ff))  # gate, up, down
    expert_bytes = sum(matrix_nbytes(q, *s) for q, s in zip(qtypes, shapes))
    n_q, n_b = (max(1, -(-beyond_l2 // (A * size))) for size in (expert_bytes, 6 * n_ff * n_embd))
    pools = [_random_pool(n_q * A, q, *s, device) for q, s in zip(qtypes, shapes)]  # (S, bytes) each
    slots = [torch.arange(i * A, (i + 1) * A, dtype=torch.int32, device=device) for i in range(n_q)]
    dense = [torch.randn(n_b * A, *s, dtype=torch.bfloat16, device=device) / n_embd**0.5 for s in shapes]
    x = torch.randn(A, n_embd, dtype=torch.bfloat16, device=device)  # (A, D): the token once per expert
    token = x[:1]  # (1, D)

    def grouped(i: int) -> None:
        grouped_swiglu(x, *pools, slots[i], qtypes, n_ff, n_embd)

    def loop(i: int) -> None:
        for s in range(i * A, (i + 1) * A):
            gate, up, down = (p[s] for p in pools)
            h = F.silu(quantized_matmul(token, gate, qtypes[0], n_ff, n_embd))  # (1, F)
            h = h * quantized_matmul(token, up, qtypes[1], n_ff, n_embd)
            quantized_matmul(h, down, qtypes[2], n_embd, n_ff)  # (1, D)

    def bf16(i: int) -> None:
        for e in range(i * A, (i + 1) * A):
            gate, up, down = (w[e] for w in dense)
            (F.silu(token @ gate.T) * (token @ up.T)) @ down.T  # (1, D)

    r = {}
    for name, fn, n in (("grouped", grouped, n_q), ("loop", loop, n_q), ("bf16", bf16, n_b)):
        kernel, eager = _time(fn, n, device)
        r[f"{name}_us"], r[f"{name}_eager_us"] = kernel * 1e6, eager * 1e6
    return r


@contextlib.contextmanager
def _int8_x_setting(on: bool):
    """Plans made inside take (or not) int8 x, as DSRUN_GPU_INT8_X says (for comparing both in one run)."""
    before = os.environ.get("DSRUN_GPU_INT8_X")
    os.environ["DSRUN_GPU_INT8_X"] = "1" if on else "0"
    _PLANS.clear()
    try:
        yield
    finally:
        _PLANS.clear()
        if before is None:
            del os.environ["DSRUN_GPU_INT8_X"]
        else:
            os.environ["DSRUN_GPU_INT8_X"] = before


# DeepSeek-V3's matrices a decode token reads: q_a, q_b, kv_a, attn_output, shared or routed expert gate
# (up) and down, the dense layers' FFN, the output head.
V3_SHAPES = (
    (1536, 7168),
    (24576, 1536),
    (576, 7168),
    (7168, 16384),
    (2048, 7168),
    (7168, 2048),
    (18432, 7168),
    (7168, 18432),
    (129280, 7168),
)


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = "triton" if triton_available(device) else "torch fallback"
    print(f"quantized_matmul against bf16 torch.matmul on {device} ({path}), DeepSeek-V3 shapes")
    print("int8: x rounded to int8 (dp4a), float: the float kernel (DSRUN_GPU_INT8_X=0); weight GB/s")
    cols = ("int8_GBps", "float_GBps", "bf16_GBps", "int8_us", "float_us", "bf16_us")
    print(f"{'type':6} {'N x K':>12} {'T':>3} " + " ".join(f"{c:>11}" for c in cols))
    for qtype in (Q.Q4_K, Q.Q8_0):
        for n_out, n_in in V3_SHAPES:
            for T in (1, 4) if qtype == Q.Q4_K else (1,):
                r = dict.fromkeys(cols, float("nan"))  # int8: Q4_K only
                for on in (True, False) if qtype in INT8_X_TYPES else (False,):
                    with _int8_x_setting(on):
                        b = benchmark(qtype, n_out, n_in, T, device)
                    name = "int8" if on else "float"
                    r[f"{name}_GBps"], r[f"{name}_us"] = b["quant_GBps"], b["quant_us"]
                r["bf16_GBps"], r["bf16_us"] = b["bf16_GBps"], b["bf16_us"]
                row = " ".join(f"{r[c]:11.1f}" for c in cols)
                print(f"{qtype.name:6} {n_out:>6}x{n_in:<5} {T:3} {row}", flush=True)
    print()
    print("One token's A experts (swiglu, F x D = 2048 x 7168, one row each): grouped_swiglu with int8 and")
    print("float x, against a loop of bf16 torch.matmul swiglus; kernel microseconds (graph replay)")
    print(f"{'type':6} {'A':>3} {'int8_us':>10} {'float_us':>10} {'bf16_us':>10} {'int8_GBps':>10}")
    for qtype in (Q.Q4_K,):
        for A in (1, 8):
            us = {}
            for on in (True, False):
                with _int8_x_setting(on):
                    r = benchmark_experts((qtype,) * 3, 2048, 7168, A, device)
                us[on] = r["grouped_us"]
            gbps = A * 3 * matrix_nbytes(qtype, 2048, 7168) / us[True] / 1e3
            print(
                f"{qtype.name:6} {A:3} {us[True]:10.1f} {us[False]:10.1f} {r['bf16_us']:10.1f} {gbps:10.1f}"
            )


if __name__ == "__main__":
    main()
