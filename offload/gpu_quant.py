"""GGUF-quantized matrices used in place on the GPU: x @ W.T straight from the file's blocks.

A GPU expert slot can hold an expert's GGUF bytes instead of a bf16 copy (Q4_K is 3.5x smaller). Up to
FUSED_MAX_T tokens, one Triton kernel reads each weight byte once and dequantizes in registers (decode is
bound by weight bandwidth); for more tokens a Triton kernel dequantizes into a reused bf16 scratch and
cuBLAS multiplies (prefill is bound by compute, where cuBLAS wins). Without Triton for a device, the same
calls run `dsrun.quants.dequantize` and a float32 matmul, so callers work everywhere.

Kernels walk a row in steps of 256 weights, each seen as a tile (BN, S, W): S sub-blocks of W weights
with one scale (and min) each; weight k = 256 * step + W * s + i is scale * q - min, computed in gguf's
order, so `dequantize_gpu` to float32 is bit-exact with `dsrun.quants.dequantize`.

Legend: T tokens, N output rows (n_out), K input width (n_in), BN rows per program, BT tokens per program
(padded), S sub-blocks per step, W weights per sub-block, P split-K parts.
"""

from __future__ import annotations

import functools
import os
import time

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from dsrun import quants
from dsrun.errors import ModelFormatError, UnsupportedModelError

try:
    import triton
    import triton.language as tl
    from triton.runtime.jit import JITFunction
except ImportError:  # not a dsrun dependency: CUDA installs bring it with torch
    triton = tl = None
    _INTERPRETED = False

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
DOT_FROM_T = 4  # from this many tokens the fused kernel uses tl.dot (tokens padded to 16); tune on H100
POOL_ALIGN = 256  # slot rows start 256-byte aligned, so every slot's loads vectorize alike
_DEQUANT_BN = 16  # rows per program of the dequantize kernel
_GEMV_BN = 32  # rows per program of the fused kernel when not autotuned

_jit = triton.jit if triton else (lambda fn: fn)
_C = tl.constexpr if tl else int  # kernels may read module globals only as constexprs
_Q4_0, _Q8_0, _Q4_K, _Q5_K, _Q6_K = (_C(int(t)) for t in (Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K))


# --- kernels --------------------------------------------------------------------------------------------


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
        q = tl.load(w + b3 + 34 * s3 + 2 + i, mask=m3, other=0).to(tl.int8, bitcast=True)
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
    return q.to(tl.float32), scale, mn


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
    BN: tl.constexpr,
):
    """out[part] (T, N) = x (T, K) @ W.T over this part's steps: one program per BN rows and part."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)  # (BN,)
    part = tl.program_id(1)
    rmask = rows < n_out
    row_off = rows * row_bytes  # int32 offsets (_flat checks the sizes): half the address registers
    t = tl.arange(0, BT)  # (BT,)
    kk = W * tl.arange(0, S)[:, None] + tl.arange(0, W)[None, :]  # (S, W): offsets in a step
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    first = part * steps_per_part
    for step in range(first, tl.minimum(first + steps_per_part, n_steps)):
        q, scale, mn = _tile(w, row_off, rmask, step, n_in, QTYPE, S, W, SB)
        k = step * 256 + kk  # (S, W)
        if DOT:  # enough tokens for tensor cores: dequantize the tile, one (BT, 256) x (256, BN) dot
            xk = step * 256 + tl.arange(0, S * W)  # (S * W,)
            xmask = (t[:, None] < T) & (xk < n_in)[None, :]
            xt = tl.load(x + t[:, None] * n_in + xk[None, :], mask=xmask, other=0.0)  # (BT, S * W)
            v = q * scale[:, :, None]
            if HAS_MIN:
                v = v - mn[:, :, None]
            v = tl.reshape(v.to(xt.dtype), (BN, S * W))  # (BN, S * W)
            if DOT_F32:  # f32 inputs, or the interpreter (whose bf16 dot is wrong): exact f32 products
                acc += tl.dot(xt.to(tl.float32), tl.trans(v.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(xt, tl.trans(v))
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


if triton:
    _INTERPRETED = not isinstance(_dequant_kernel, JITFunction)  # TRITON_INTERPRET=1 at import
    _gemv_tuned = triton.autotune(
        [
            triton.Config({"BN": bn}, num_warps=nw, num_stages=ns)
            for bn, nw, ns in ((16, 4, 3), (16, 8, 3), (32, 8, 3), (64, 8, 3))  # none spill on sm_90
        ],
        key=["n_out", "n_in", "QTYPE", "BT"],
    )(_gemv_kernel)


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
    functions here. Fill a slot with `pool[s, :matrix_nbytes(...)].copy_(raw_bytes)`."""
    return torch.empty(
        n_slots, pool_stride(qtype, n_out, n_in), dtype=torch.uint8, device=device
    )  # (S, bytes)


def _flat(w: torch.Tensor, qtype: GGMLQuantizationType, n_out: int, n_in: int) -> torch.Tensor:
    """w checked as qtype's bytes of an (n_out, n_in) matrix and viewed 1-D, pool padding allowed."""
    if qtype not in QUANT_TYPES:
        names = ", ".join(sorted(t.name for t in QUANT_TYPES))
        raise UnsupportedModelError(
            f"{qtype.name} weights cannot stay quantized on the GPU; supported: {names}"
        )
    if n_in % GGML_QUANT_SIZES[qtype][0]:
        raise ModelFormatError(f"a {qtype.name} row of {n_in} weights is not a whole number of blocks")
    nbytes = matrix_nbytes(qtype, n_out, n_in)
    if n_out * n_in >= 2**31:  # the kernels index in int32
        raise ValueError(f"a ({n_out}, {n_in}) matrix is too large for the GPU quant kernels (2^31 weights)")
    if w.dtype != torch.uint8 or not w.is_contiguous() or not nbytes <= w.numel() < nbytes + POOL_ALIGN:
        raise ValueError(
            f"expected the {nbytes} bytes of a {qtype.name} ({n_out}, {n_in}) matrix as a contiguous uint8"
            f" tensor (a pool row may add padding); got {w.dtype} of shape {tuple(w.shape)}"
        )
    return w.view(-1)


def _dequant_torch(w: torch.Tensor, qtype: GGMLQuantizationType, n_out: int, n_in: int) -> torch.Tensor:
    """The fallback: float32 (N, K) on w's device through dsrun.quants (on the CPU)."""
    raw = w[: matrix_nbytes(qtype, n_out, n_in)].cpu().numpy()
    return quants.dequantize(raw, qtype, (n_out, n_in)).to(w.device)


def _step_args(qtype: GGMLQuantizationType) -> dict:
    """The kernels' constexprs for qtype."""
    s, w, has_min = _LAYOUTS[qtype]
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return dict(QTYPE=int(qtype), S=s, W=w, SB=STEP // block_size * type_size, HAS_MIN=has_min)


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
    w = _flat(w, qtype, n_out, n_in)
    if out is None:
        out = torch.empty(n_out, n_in, dtype=dtype, device=w.device)
    if out.shape != (n_out, n_in) or not out.is_contiguous() or out.device != w.device:
        raise ValueError(f"out must be a contiguous ({n_out}, {n_in}) tensor on {w.device}")
    if not triton_available(w.device):
        return out.copy_(_dequant_torch(w, qtype, n_out, n_in))
    row_bytes = matrix_nbytes(qtype, 1, n_in)
    grid = (triton.cdiv(n_out, _DEQUANT_BN), triton.cdiv(n_in, STEP))
    # No fused multiply-add: scale * q - min then rounds exactly as dsrun.quants does.
    _dequant_kernel[grid](
        w, out, n_out, n_in, row_bytes, **_step_args(qtype), BN=_DEQUANT_BN, enable_fp_fusion=False
    )
    return out


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_k(n_out: int, n_steps: int, device: torch.device) -> int:
    """Split-K parts: a decode GEMV has too few row blocks to keep every SM streaming weights."""
    if device.type != "cuda":
        return 1
    parts = 4 * _sm_count(device.index or 0) // triton.cdiv(n_out, _GEMV_BN)
    return max(1, min(parts, n_steps // 4))  # each part at least 4 steps


def _autotune() -> bool:
    return not _INTERPRETED and os.environ.get("DSRUN_GPU_QUANT_AUTOTUNE", "1") != "0"


def _gemv(
    x: torch.Tensor, w: torch.Tensor, qtype: GGMLQuantizationType, n_out: int, n_in: int
) -> torch.Tensor:
    """The fused kernel: (T, K) -> (T, N) in x's dtype."""
    T = x.shape[0]
    n_steps = triton.cdiv(n_in, STEP)
    per = triton.cdiv(n_steps, _split_k(n_out, n_steps, x.device))
    parts = triton.cdiv(n_steps, per)
    out = torch.empty(T, n_out, dtype=x.dtype, device=x.device)  # (T, N)
    if parts == 1:
        dst = out
    else:  # float32 partial sums, added up after the kernel: deterministic, unlike atomics
        dst = torch.empty(parts, T, n_out, dtype=torch.float32, device=x.device)  # (P, T, N)
    dot = T >= DOT_FROM_T
    args = dict(
        _step_args(qtype),
        BT=16 if dot else triton.next_power_of_2(T),
        DOT=dot,
        DOT_F32=x.dtype == torch.float32 or _INTERPRETED,
        enable_fp_fusion=True,  # said outright: Triton 3.9 warns that its default will change
    )
    kernel = _gemv_tuned if _autotune() else _gemv_kernel
    if not _autotune():
        args.update(BN=_GEMV_BN, num_warps=8)

    def grid(meta):
        return triton.cdiv(n_out, meta["BN"]), parts

    row_bytes = matrix_nbytes(qtype, 1, n_in)
    kernel[grid](x, w, dst, T, n_out, n_in, row_bytes, n_steps, per, T * n_out, **args)
    if parts > 1:
        out.copy_(dst.sum(0))
    return out


_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _scratch(device: torch.device, dtype: torch.dtype, n_out: int, n_in: int) -> torch.Tensor:
    """A per-(device, dtype) buffer for dequantized weights, grown to the largest matrix seen: (N, K)."""
    buf = _SCRATCH.get((device, dtype))
    if buf is None or buf.numel() < n_out * n_in:
        buf = _SCRATCH[(device, dtype)] = torch.empty(n_out * n_in, dtype=dtype, device=device)
    return buf[: n_out * n_in].view(n_out, n_in)


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
    or, by default, into a buffer shared by all calls on x's device: safe on one stream only.
    """
    w = _flat(w, qtype, n_out, n_in)
    if x.shape[-1] != n_in or x.device != w.device or not x.is_floating_point():
        raise ValueError(
            f"x must be float (..., {n_in}) on {w.device}; got {x.dtype} {tuple(x.shape)} on {x.device}"
        )
    x2 = x.reshape(-1, n_in).contiguous()  # (T, K)
    T = x2.shape[0]
    if T == 0:
        out = x2.new_empty(0, n_out)
    elif not triton_available(x.device):
        out = (x2.float() @ _dequant_torch(w, qtype, n_out, n_in).T).to(x.dtype)  # (T, N)
    elif T <= FUSED_MAX_T:
        out = _gemv(x2, w, qtype, n_out, n_in)
    else:
        if scratch is None:
            wd = _scratch(x.device, x.dtype, n_out, n_in)
        else:
            wd = scratch[: n_out * n_in].view(n_out, n_in)  # (N, K)
        out = x2 @ dequantize_gpu(w, qtype, n_out, n_in, out=wd).T  # (T, N)
    return out.view(*x.shape[:-1], n_out)


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


def benchmark(
    qtype: GGMLQuantizationType, n_out: int, n_in: int, T: int, device: str | torch.device = "cuda"
) -> dict[str, float]:
    """Weight GB/s and microseconds of quantized_matmul against torch.matmul on the bf16 matrix.

    Both read from enough copies of the matrix to exceed the L2 cache, as experts do in a real step.
    Keys: quant_GBps, bf16_GBps (weight bytes over kernel time), quant_us, bf16_us, and the eager
    per-call times quant_eager_us, bf16_eager_us (Python and launches included).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    nbytes = matrix_nbytes(qtype, n_out, n_in)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0

    def copies(size: int) -> int:
        return max(1, -(-2 * l2 // size))

    n_q, n_b = copies(nbytes), copies(2 * n_out * n_in)
    blocks = quants.random_blocks(qtype, nbytes // GGML_QUANT_SIZES[qtype][1], seed=0)
    pool = new_pool(n_q, qtype, n_out, n_in, device)
    pool[:, :nbytes].copy_(torch.from_numpy(blocks).view(1, -1))
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


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = "triton" if triton_available(device) else "torch fallback"
    print(f"quantized_matmul against bf16 torch.matmul on {device} ({path}), DeepSeek-V3 expert shapes")
    cols = ("quant_GBps", "bf16_GBps", "quant_us", "bf16_us", "quant_eager_us", "bf16_eager_us")
    print(f"{'type':6} {'N x K':>10} {'T':>4} " + " ".join(f"{c:>14}" for c in cols) + f" {'speedup':>8}")
    for qtype in (Q.Q4_K, Q.Q8_0):
        for n_out, n_in in ((2048, 7168), (7168, 2048)):
            for T in (1, 4, 16, 64, 512):
                r = benchmark(qtype, n_out, n_in, T, device)
                row = " ".join(f"{r[c]:14.1f}" for c in cols)
                print(f"{qtype.name:6} {n_out:>5}x{n_in:<4} {T:4} {row} {r['bf16_us'] / r['quant_us']:7.2f}x")


if __name__ == "__main__":
    main()
