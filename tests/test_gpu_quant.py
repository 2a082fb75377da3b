"""dsrun.offload.gpu_quant against dsrun.quants, on random valid GGUF blocks.

Backends: "torch" (the fallback, always run), "cuda" (the Triton kernels on a GPU) and "interpreter"
(the same kernels run by Triton's interpreter on the CPU). Triton builds a kernel for the interpreter
only if TRITON_INTERPRET=1 is set when the kernel is defined, and the setting then holds for every
kernel in the process; so rather than set it here, test_triton_kernels_on_cpu_in_a_subprocess reruns
this file's interpreter cases in a child process with it set (or run `TRITON_INTERPRET=1 pytest
tests/test_gpu_quant.py` to see them one by one). Without Triton (CI) those cases skip.

Tolerances: the product is compared with the exact float64 product of x and dsrun.quants' weights,
per output element, as a fraction of mag = |x| @ |W|.T, which bounds every rounding error:
- bf16 x: 2^-7. Weights rounded to bf16 (tl.dot and cuBLAS paths) and the result rounded to bf16 cost
  at most half a bf16 step, 2^-8, each. The interpreter truncates to bf16 instead (a whole step): 2^-6.
  Seen: under 5e-3 in the interpreter.
- f32 x: 1e-5. Only float32 accumulation over at most 2048 terms; seen: under 4e-7.
- swiglu: gate and up as above; silu(g) * u is rounded once to x's dtype (bf16: 2^-8); down as above.
  assert_swiglu carries the first-order bound through silu, whose slope stays under 1.1.
- Where a kernel rounds x to int8 (gq.takes_int8_x: Q4_K, a few tokens), each input may also be off
  by its 32-block's amax times gq.int8_x_error (1/254 for bf16 x, 1/254^2 for f32 x, rounded twice):
  that times |W| is allowed on top (seen: under 2.5e-3 of mag in all).
Dequantizing to float32 is bit-exact (no fused multiply-add: gguf's roundings); to bf16 it is exact on
a GPU and within one bf16 step (2^-7 relative) in the interpreter, which truncates.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from dsrun import quants
from dsrun.errors import UnsupportedModelError
from dsrun.offload import gpu_quant as gq

Q = GGMLQuantizationType
HAS_TRITON = gq.triton is not None
if HAS_TRITON:
    import triton
TOL = {torch.bfloat16: 2**-7, torch.float32: 1e-5}

BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("torch-cuda", id="torch-cuda", marks=pytest.mark.gpu),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
    pytest.param("interpreter", id="interpreter"),
]
TRITON_BACKENDS = BACKENDS[2:]


@pytest.fixture(params=BACKENDS)
def device(request, monkeypatch) -> str:
    """The device the case runs on; the torch backends force the fallback even where Triton serves."""
    backend = request.param
    dev = "cuda" if "cuda" in backend else "cpu"
    if backend.startswith("torch"):
        monkeypatch.setattr(gq, "triton_available", lambda device="cuda": False)
        return dev
    if not HAS_TRITON:
        pytest.skip("triton is not installed (not a dsrun dependency)")
    if not gq.triton_available(dev):
        pytest.skip(
            "kernels are built for the interpreter here (TRITON_INTERPRET=1)"
            if dev == "cuda"
            else "interpreter cases run in test_triton_kernels_on_cpu_in_a_subprocess"
        )
    return dev


@pytest.fixture(autouse=True)
def fresh_plans(monkeypatch):
    """Plans cache a call shape's backend and split-K: each test makes its own. Kernels run untuned (a GPU
    would time four configs of each new shape); test_tuned_on_a_gpu tunes."""
    monkeypatch.setattr(gq, "_PLANS", {})
    monkeypatch.setenv("DSRUN_GPU_QUANT_AUTOTUNE", "0")


def matrix(qtype: GGMLQuantizationType, n_out: int, n_in: int, seed: int = 0):
    """Random valid GGUF bytes (flat uint8) of an (n_out, n_in) matrix and its float32 weights (N, K)."""
    blocks = quants.random_blocks(qtype, n_out * n_in // GGML_QUANT_SIZES[qtype][0], seed)
    return torch.from_numpy(blocks).reshape(-1), quants.dequantize(blocks, qtype, (n_out, n_in))


def tokens(T: int, n_in: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(T, n_in, generator=torch.Generator().manual_seed(seed)).to(dtype)  # (T, K)


def tolerance(y: torch.Tensor) -> float:
    truncated = y.dtype == torch.bfloat16 and y.device.type == "cpu" and gq.triton_available("cpu")
    return TOL[y.dtype] * (2 if truncated else 1)


def assert_within(y: torch.Tensor, exact: torch.Tensor, mag: torch.Tensor, tol: float, extra=0.0) -> None:
    """|y - exact| <= tol * mag + extra (an absolute allowance: int8 x), elementwise."""
    err = (y.cpu().double() - exact).abs()
    worst = (err / mag.clamp_min(1e-300)).max().item()
    assert (err <= tol * mag + extra).all(), f"worst error {worst:.2e} of the bound's magnitude"


def int8_x(qtypes: tuple, x: torch.Tensor, device: str, T: int | None = None) -> bool:
    """Whether the call rounds x to int8: gq.takes_int8_x, and for quantized_matmul (T tokens) a few."""
    return gq.takes_int8_x(qtypes, x.dtype, torch.device(device)) and (T is None or T < gq.DOT_FROM_T)


def int8_error(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each input's worst rounding error to int8 per 32 as the kernels round dtype x: (..., K)."""
    amax = x.abs().view(*x.shape[:-1], -1, 32).amax(-1)  # (..., K / 32)
    return (amax * gq.int8_x_error(dtype)).repeat_interleave(32, -1)  # (..., K)


def assert_product(y: torch.Tensor, x: torch.Tensor, ref: torch.Tensor, int8: bool = False) -> None:
    """y = x @ ref.T within TOL[x.dtype] of mag (see the module docstring), and with int8 x's rounding."""
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], ref.shape[0])
    dtype, x, ref = x.dtype, x.cpu().double(), ref.double()
    extra = int8_error(x, dtype) @ ref.abs().T if int8 else 0.0
    assert_within(y, x @ ref.T, x.abs() @ ref.abs().T, tolerance(y), extra)  # (..., N)


def assert_rows(y: torch.Tensor, x: torch.Tensor, refs: torch.Tensor, slots: list[int], int8=False) -> None:
    """Row a of y = x[a] @ refs[slots[a]].T, as assert_product: refs (S, N, K)."""
    assert y.dtype == x.dtype and y.shape == (x.shape[0], refs.shape[1])
    dtype, x, w = x.dtype, x.cpu().double(), refs[slots].double()  # (A, K), (A, N, K)
    exact = torch.einsum("ak,ank->an", x, w)
    extra = torch.einsum("ak,ank->an", int8_error(x, dtype), w.abs()) if int8 else 0.0
    assert_within(y, exact, torch.einsum("ak,ank->an", x.abs(), w.abs()), tolerance(y), extra)  # (A, N)


def assert_swiglu(y: torch.Tensor, x: torch.Tensor, gate, up, down, slots: list[int], int8=(False, False)):
    """Row a of y = down(silu(gate x) * up x) with slot slots[a]'s matrices (S, ...) each; see the module
    docstring. The first-order error of h = silu(g) * u, in units of the tolerance, is bounded by
    1.1 |u| |x| @ |G|.T + |silu g| |x| @ |U|.T + |h|; twice the bound covers the second-order terms.
    int8: whether gate-and-up and down round their inputs to int8, whose errors are carried alike."""
    assert y.dtype == x.dtype and y.shape == x.shape
    dtype, x = x.dtype, x.cpu().double()
    g, u, d = (w[slots].double() for w in (gate, up, down))  # (A, F, D), (A, F, D), (A, D, F)
    gx, ux = torch.einsum("ak,ank->an", x, g), torch.einsum("ak,ank->an", x, u)  # (A, F)
    mg, mu = (torch.einsum("ak,ank->an", x.abs(), w.abs()) for w in (g, u))
    silu = gx * torch.sigmoid(gx)
    h = silu * ux
    dh = 1.1 * ux.abs() * mg + silu.abs() * mu + h.abs()  # (A, F)
    exact = torch.einsum("af,adf->ad", h, d)  # (A, D)
    mag = torch.einsum("af,adf->ad", dh + h.abs(), d.abs())
    extra = 0.0
    if int8[0]:
        eg, eu = (torch.einsum("ak,ank->an", int8_error(x, dtype), w.abs()) for w in (g, u))  # (A, F)
        extra = torch.einsum("af,adf->ad", 1.1 * ux.abs() * eg + silu.abs() * eu, d.abs())
    if int8[1]:  # h's own rounding, with room for its error above
        extra = extra + torch.einsum("af,adf->ad", 1.1 * int8_error(h, dtype), d.abs())
    assert_within(y, exact, mag, 2 * tolerance(y), 2 * extra)


@pytest.mark.parametrize("T", [1, 3, 5, 16, 64])
@pytest.mark.parametrize("shape", [(64, 256), (192, 1024), (512, 2048)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0], ids=lambda t: t.name)
def test_matmul_matches_f32(device, qtype, shape, T):
    """T = 1, 3: the per-token GEMV loop; 5 (padded) and 16: its tl.dot form; 64: dequantize + matmul."""
    w, ref = matrix(qtype, *shape, seed=T)
    x = tokens(T, shape[1], torch.bfloat16)
    y = gq.quantized_matmul(x.to(device), w.to(device), qtype, *shape)
    assert_product(y, x, ref, int8_x((qtype,), x, device, T))


@pytest.mark.parametrize("T", [1, 5, 64])
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0], ids=lambda t: t.name)
def test_matmul_f32_tokens(device, qtype, T):
    w, ref = matrix(qtype, 96, 512, seed=T)
    x = tokens(T, 512, torch.float32)
    y = gq.quantized_matmul(x.to(device), w.to(device), qtype, 96, 512)
    assert_product(y, x, ref, int8_x((qtype,), x, device, T))


@pytest.mark.parametrize("device", TRITON_BACKENDS, indirect=True)
def test_a_matrix_larger_than_the_scratch_is_dequantized_in_slices_of_rows(device, monkeypatch):
    """A head of a vocabulary's rows would take GBs dequantized at once: three slices (one ragged)."""
    monkeypatch.setattr(gq, "_PLANS", {})
    monkeypatch.setattr(gq, "MAX_SCRATCH_BYTES", 40 * 512 * 2)  # 40 bf16 rows
    w, ref = matrix(Q.Q4_K, 96, 512, seed=3)
    x = tokens(gq.FUSED_MAX_T + 8, 512, torch.bfloat16)
    y = gq.quantized_matmul(x.to(device), w.to(device), Q.Q4_K, 96, 512)
    (plan,) = (p for key, p in gq._PLANS.items() if key[0] == "matmul")
    assert plan.slices == [(0, 40), (40, 80), (80, 96)]
    assert_product(y, x, ref)


@pytest.mark.parametrize(
    "qtype, n_in",
    [(Q.Q4_0, 512), (Q.Q5_K, 512), (Q.Q6_K, 512), (Q.Q8_0, 1408), (Q.Q4_0, 1408)],
    ids=lambda v: getattr(v, "name", str(v)),
)
@pytest.mark.parametrize("T", [1, 16])
def test_matmul_other_types_and_ragged_rows(device, qtype, n_in, T):
    """Q4_0/Q5_K/Q6_K, and rows of 32-weight blocks that end inside a 256-weight step (DeepSeek-V2-Lite)."""
    w, ref = matrix(qtype, 80, n_in, seed=T)
    x = tokens(T, n_in, torch.bfloat16)
    assert_product(gq.quantized_matmul(x.to(device), w.to(device), qtype, 80, n_in), x, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "qtype, shape",
    [(t, (48, 512)) for t in sorted(gq.QUANT_TYPES, key=lambda t: t.name)]
    + [(Q.Q8_0, (40, 1408)), (Q.Q4_0, (40, 1408))],
    ids=lambda v: getattr(v, "name", None) or f"{v[0]}x{v[1]}",
)
def test_dequantize_exact(device, qtype, shape, dtype):
    w, ref = matrix(qtype, *shape, seed=shape[0])
    out = gq.dequantize_gpu(w.to(device), qtype, *shape, dtype=dtype).cpu()
    assert out.dtype == dtype and out.shape == shape
    if dtype == torch.float32:
        assert torch.equal(out.view(torch.int32), ref.view(torch.int32))  # bits, so -0.0 counts
    elif device == "cpu" and gq.triton_available("cpu"):  # the interpreter truncates to bf16
        assert ((out.float() - ref).abs() <= 2**-7 * ref.abs()).all()
    else:
        assert torch.equal(out, ref.to(dtype))


@pytest.mark.parametrize("T", [2, 16])
@pytest.mark.parametrize("device", TRITON_BACKENDS, indirect=True)
def test_split_k(device, T, monkeypatch):
    """Three split-K parts over 8 steps (3 + 3 + 2), summed after the kernel."""
    monkeypatch.setattr(gq, "_split_k", lambda n_programs, n_steps, device: 3)
    w, ref = matrix(Q.Q4_K, 64, 2048, seed=T)
    x = tokens(T, 2048, torch.bfloat16)
    y = gq.quantized_matmul(x.to(device), w.to(device), Q.Q4_K, 64, 2048)
    assert_product(y, x, ref, int8_x((Q.Q4_K,), x, device, T))


@pytest.mark.parametrize("T", [1, 64])
def test_pool_rows(device, T):
    """Matrices used in place from rows of a slot pool, each padded to POOL_ALIGN bytes."""
    n_out, n_in = 64, 512
    nbytes = gq.matrix_nbytes(Q.Q4_K, n_out, n_in)
    pool = gq.new_pool(3, Q.Q4_K, n_out, n_in, device)
    assert pool.shape[1] % gq.POOL_ALIGN == 0 and pool.shape[1] >= nbytes
    refs = []
    for s in range(3):
        w, ref = matrix(Q.Q4_K, n_out, n_in, seed=s)
        pool[s, :nbytes].copy_(w)
        refs.append(ref)
    x = tokens(T, n_in, torch.bfloat16)
    for s in (2, 0, 1):
        y = gq.quantized_matmul(x.to(device), pool[s], Q.Q4_K, n_out, n_in)
        assert_product(y, x, refs[s], int8_x((Q.Q4_K,), x, device, T))


def test_leading_dims_scratch_and_empty(device):
    w, ref = matrix(Q.Q8_0, 64, 256)
    w = w.to(device)
    x = tokens(6, 256, torch.bfloat16).view(2, 3, 256)
    assert_product(gq.quantized_matmul(x.to(device), w, Q.Q8_0, 64, 256), x, ref)  # (2, 3, N)
    x = tokens(40, 256, torch.bfloat16)
    scratch = torch.empty(64 * 256 + 5, dtype=torch.bfloat16, device=device)
    assert_product(gq.quantized_matmul(x.to(device), w, Q.Q8_0, 64, 256, scratch=scratch), x, ref)
    assert gq.quantized_matmul(x[:0].to(device), w, Q.Q8_0, 64, 256).shape == (0, 64)


def slot_pool(qtype: GGMLQuantizationType, n_out: int, n_in: int, n_slots: int, device: str, seed: int = 0):
    """A pool of n_slots random matrices, and their float32 weights (S, N, K)."""
    nbytes = gq.matrix_nbytes(qtype, n_out, n_in)
    pool = gq.new_pool(n_slots, qtype, n_out, n_in, device)
    refs = []
    for s in range(n_slots):
        w, ref = matrix(qtype, n_out, n_in, seed=seed + s)
        pool[s, :nbytes].copy_(w)
        refs.append(ref)
    return pool, torch.stack(refs)


def case_id(v) -> str:
    """A swiglu case's id: its (gate, up, down) types joined, or the value."""
    return "-".join(t.name for t in v) if isinstance(v, tuple) else str(v)


def swiglu_pools(qtypes: tuple, n_ff: int, n_embd: int, n_slots: int, device: str):
    """Pools of random gate, up and down matrices ((F, D), (F, D), (D, F)) of these types, and their float32
    weights (S, ...) each."""
    shapes = ((n_ff, n_embd), (n_ff, n_embd), (n_embd, n_ff))
    return zip(
        *(slot_pool(q, *s, n_slots, device, seed=10 * i) for i, (q, s) in enumerate(zip(qtypes, shapes)))
    )


def slot_ids(A: int, n_slots: int, seed: int) -> list[int]:
    """Random slots with at least one repeated (A > 1): several rows of one expert."""
    ids = torch.randint(0, n_slots, (A,), generator=torch.Generator().manual_seed(seed)).tolist()
    return ids[:-1] + ids[:1] if A > 1 else ids


@pytest.mark.parametrize(
    "qtype, n_in, A",
    [(Q.Q4_K, 512, A) for A in (1, 3, 8, 64)] + [(Q.Q6_K, 512, 5), (Q.Q8_0, 1408, 8)],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_grouped_matmul_matches_f32(device, qtype, n_in, A):
    """Each row with its slot's matrix: one row per slot (decode), and up to 64 rows over 5 slots."""
    pool, refs = slot_pool(qtype, 40, n_in, 5, device, seed=A)
    slots = slot_ids(A, 5, seed=A)
    x = tokens(A, n_in, torch.bfloat16, seed=A)
    s = torch.tensor(slots, dtype=torch.int32, device=device)
    y = gq.grouped_matmul(x.to(device), pool, s, qtype, 40, n_in)
    assert_rows(y, x, refs, slots, int8_x((qtype,), x, device))


def test_grouped_matmul_f32_int64_slots_and_empty(device):
    pool, refs = slot_pool(Q.Q4_K, 48, 512, 3, device)
    x = tokens(4, 512, torch.float32)
    slots = [2, 0, 2, 1]
    s = torch.tensor(slots, device=device)  # int64
    y = gq.grouped_matmul(x.to(device), pool, s, Q.Q4_K, 48, 512)
    assert_rows(y, x, refs, slots, int8_x((Q.Q4_K,), x, device))
    assert gq.grouped_matmul(x[:0].to(device), pool, s[:0], Q.Q4_K, 48, 512).shape == (0, 48)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's sigmoid
@pytest.mark.parametrize(
    "qtypes, A, dtype",
    [
        ((Q.Q4_K,) * 3, 1, torch.bfloat16),
        ((Q.Q4_K,) * 3, 6, torch.bfloat16),
        ((Q.Q4_K, Q.Q6_K, Q.Q8_0), 6, torch.bfloat16),
        ((Q.Q4_K, Q.Q6_K, Q.Q8_0), 3, torch.float32),
    ],
    ids=case_id,
)
def test_grouped_swiglu_matches_f32(device, qtypes, A, dtype):
    """gate and up of one launch may differ in layout (Q4_K's 8 x 32 sub-blocks, Q6_K's 16 x 16)."""
    n_ff, n_embd = 256, 256
    pools, refs = swiglu_pools(qtypes, n_ff, n_embd, 4, device)
    slots = slot_ids(A, 4, seed=A)
    x = tokens(A, n_embd, dtype, seed=A)
    s = torch.tensor(slots, dtype=torch.int32, device=device)
    y = gq.grouped_swiglu(x.to(device), *pools, s, qtypes, n_ff, n_embd)
    assert_swiglu(y, x, *refs, slots, (int8_x(qtypes[:2], x, device), int8_x(qtypes[2:], x, device)))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("parts", [1, 3])
def test_grouped_swiglu_negative_slots_are_zero_rows(device, parts, monkeypatch):
    """A row whose slot is negative (an expert the device does not hold, looked up in a captured step)
    comes out zero, whole or split-K, and the other rows are as if it were not there."""
    monkeypatch.setattr(gq, "_split_k", lambda n_programs, n_steps, device: parts)
    n_ff, n_embd = 256, 1024
    pools, refs = swiglu_pools((Q.Q4_K,) * 3, n_ff, n_embd, 3, device)
    x = tokens(4, n_embd, torch.bfloat16, seed=3)
    s = torch.tensor([2, -1, 0, -1], dtype=torch.int32, device=device)
    y = gq.grouped_swiglu(x.to(device), *pools, s, (Q.Q4_K,) * 3, n_ff, n_embd).cpu()  # (4, D)
    assert (y[[1, 3]] == 0).all()
    assert_swiglu(y[[0, 2]], x[[0, 2]], *refs, [2, 0], (int8_x((Q.Q4_K,), x, device),) * 2)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("device", TRITON_BACKENDS, indirect=True)
def test_grouped_split_k(device, monkeypatch):
    """Split-K over gate and up's 4 steps (2 + 2), added up (with silu(g) * u) by the reduction kernel;
    down's single step stays whole."""
    monkeypatch.setattr(gq, "_split_k", lambda n_programs, n_steps, device: 3)
    n_ff, n_embd = 256, 1024
    pools, refs = swiglu_pools((Q.Q4_K,) * 3, n_ff, n_embd, 3, device)
    slots = [2, 0]
    x = tokens(2, n_embd, torch.bfloat16)
    s = torch.tensor(slots, dtype=torch.int32, device=device)
    int8 = int8_x((Q.Q4_K,), x, device)
    assert_rows(gq.grouped_matmul(x.to(device), pools[0], s, Q.Q4_K, n_ff, n_embd), x, refs[0], slots, int8)
    y = gq.grouped_swiglu(x.to(device), *pools, s, (Q.Q4_K,) * 3, n_ff, n_embd)
    assert_swiglu(y, x, *refs, slots, (int8, int8))


def assignments(A: int, T: int, n_slots: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefill's assignments (row of x, slot): rows in [0, T), slots skewed towards slot 0 and the last
    slot left out, so blocks come out full, ragged and absent."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, T, (A,), generator=g)
    slots = (torch.rand(A, generator=g) ** 3 * (n_slots - 1)).long()  # (A,) in [0, n_slots - 1)
    return rows, slots


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize(
    "qtypes, A, dtype",
    [
        ((Q.Q4_K,) * 3, 40, torch.bfloat16),
        ((Q.Q4_K, Q.Q6_K, Q.Q8_0), 200, torch.bfloat16),
        ((Q.Q4_K, Q.Q6_K, Q.Q8_0), 24, torch.float32),
    ],
    ids=case_id,
)
def test_sorted_swiglu_matches_f32(device, qtypes, A, dtype):
    """Many assignments per slot (a prefill), sorted into padded blocks and scattered back in order."""
    n_ff, n_embd = 256, 512
    pools, refs = swiglu_pools(qtypes, n_ff, n_embd, 5, device)
    rows, slots = assignments(A, A // 3, 5, seed=A)
    x = tokens(A // 3, n_embd, dtype, seed=A)
    y = gq.sorted_swiglu(x.to(device), *pools, rows, slots, qtypes, n_ff, n_embd)
    assert_swiglu(y, x[rows], *refs, slots.tolist())


def test_slot_blocks():
    """Each block holds one slot's rows then padding (-1); every assignment lands on a row reading its
    own row of x, in a block of its own slot; the block grows with the rows per slot."""
    rows, slots = assignments(300, 100, 5, seed=1)
    row_src, block_slot, position, bm = gq.slot_blocks(rows, slots)
    assert bm == 64 and row_src.numel() == bm * block_slot.numel()
    assert (row_src[position.long()] == rows).all()
    assert (block_slot[position.long() // bm] == slots).all()
    assert int((row_src >= 0).sum()) == 300
    blocks = row_src.view(-1, bm)  # (B, BM): live rows first in each block
    assert ((blocks >= 0).int().diff(dim=1) <= 0).all()
    assert gq.slot_blocks(torch.arange(4), torch.arange(4))[3] == 16  # one row per slot: the least


def test_sorted_swiglu_bad_arguments():
    pools = [gq.new_pool(2, Q.Q4_K, *s, "cpu") for s in ((256, 256), (256, 256), (256, 256))]
    x = torch.zeros(3, 256)
    with pytest.raises(ValueError, match="one of the pools' 2 slots"):
        gq.sorted_swiglu(x, *pools, torch.tensor([0]), torch.tensor([2]), (Q.Q4_K,) * 3, 256, 256)
    with pytest.raises(ValueError, match="x's 3 rows"):
        gq.sorted_swiglu(x, *pools, torch.tensor([3]), torch.tensor([0]), (Q.Q4_K,) * 3, 256, 256)
    with pytest.raises(ValueError, match="host tensors"):
        gq.sorted_swiglu(x, *pools, torch.tensor([0, 1]), torch.tensor([0]), (Q.Q4_K,) * 3, 256, 256)


def test_unaligned_tensors(device):
    """Tensors off a 16-byte boundary between aligned calls of the same shape: those go through Triton,
    which compiles for them, not to the kernel compiled for aligned ones."""
    w, ref = matrix(Q.Q8_0, 64, 512)
    x = tokens(3, 512, torch.bfloat16)

    def unaligned(t: torch.Tensor) -> torch.Tensor:
        buf = torch.zeros(t.numel() + 1, dtype=t.dtype, device=device)
        return buf[1:].view(t.shape).copy_(t)

    for xi, wi in ((x, w), (unaligned(x), w), (x, unaligned(w)), (x, w)):
        assert_product(gq.quantized_matmul(xi.to(device), wi.to(device), Q.Q8_0, 64, 512), x, ref)
    pool, refs = slot_pool(Q.Q8_0, 64, 512, 2, device)
    for xi in (x, unaligned(x), x):
        y = gq.grouped_matmul(xi.to(device), pool, torch.tensor([1, 0, 1], device=device), Q.Q8_0, 64, 512)
        assert_rows(y, x, refs, [1, 0, 1])


def test_plans_are_reused(device):
    """A call shape is planned once: later calls find everything in _PLANS."""
    w, _ = matrix(Q.Q4_K, 64, 512)
    pool, _ = slot_pool(Q.Q4_K, 64, 512, 2, device)
    x = tokens(2, 512, torch.bfloat16).to(device)
    s = torch.tensor([1, 0], device=device)
    first = (
        gq.quantized_matmul(x, w.to(device), Q.Q4_K, 64, 512),
        gq.grouped_matmul(x, pool, s, Q.Q4_K, 64, 512),
    )
    plans = dict(gq._PLANS)
    again = (
        gq.quantized_matmul(x, w.to(device), Q.Q4_K, 64, 512),
        gq.grouped_matmul(x, pool, s, Q.Q4_K, 64, 512),
    )
    assert gq._PLANS == plans and len(plans) == 2
    assert all(torch.equal(a, b) for a, b in zip(first, again))


class FakeKernel:
    """Stands for a JITFunction: records launches through Triton and straight to the compiled kernel."""

    arg_names = ["x", "out", "n", "FLAG", "BN"]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **options):
            self.calls.append(("triton", grid, args, options))
            return FakeCompiled(self)

        return launch


class FakeCompiled:
    def __init__(self, kernel: FakeKernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args: self.kernel.calls.append(("compiled", grid, args))


def test_launch_goes_straight_to_the_compiled_kernel(monkeypatch):
    monkeypatch.setattr(gq, "_INTERPRETED", False)
    k = FakeKernel()
    launch = gq._Launch(
        k, dict(n=10, FLAG=True), lambda bn: (10 // bn + 1, 2), fp_fusion=True, config=(4, 2, 3)
    )
    for tensors, aligned in (
        (("x1", "o1"), True),
        (("x2", "o2"), True),
        (("x3", "o3"), False),
        (("x4", "o4"), True),
    ):
        launch(*tensors, aligned=aligned)
    options = dict(num_warps=2, num_stages=3, enable_fp_fusion=True)
    assert k.calls == [
        ("triton", (3, 2, 1), ("x1", "o1", 10, True, 4), options),
        ("compiled", (3, 2, 1), ("x2", "o2", 10, True, 4)),
        ("triton", (3, 2, 1), ("x3", "o3", 10, True, 4), options),  # unaligned: Triton specializes anew
        ("compiled", (3, 2, 1), ("x4", "o4", 10, True, 4)),
    ]


def test_launch_tunes_once_per_key(monkeypatch):
    """The first launch of a tune key times every config; later launches, of any plan, take the fastest."""
    monkeypatch.setattr(gq, "_INTERPRETED", False)
    monkeypatch.setattr(gq, "_TUNED", {})
    monkeypatch.setattr(gq, "_capturing", lambda: False)
    monkeypatch.delenv("DSRUN_GPU_QUANT_AUTOTUNE", raising=False)
    k = FakeKernel()
    ms = {(16, 4): 3.0, (16, 8): 1.0, (32, 8): 2.0, (64, 8): 5.0}
    timed = []

    def bench(fn):
        fn()
        _, grid, args, options = k.calls[-1]
        timed.append(grid)
        return ms[args[-1], options["num_warps"]]

    monkeypatch.setattr(gq, "_bench", bench)
    for _ in range(2):  # two plans of one tune key
        launch = gq._Launch(k, dict(n=10, FLAG=False), lambda bn: (bn,), fp_fusion=True, tune_key=("k",))
        launch("x", "o")
        launch("x", "o")
    assert len(timed) == len(gq._CONFIGS) and gq._TUNED == {("k",): (16, 8, 3)}
    assert k.calls[-1] == ("compiled", (16, 1, 1), ("x", "o", 10, False, 16))


@pytest.mark.gpu
def test_tuned_on_a_gpu(monkeypatch):
    """First calls time every config (once per tune key), then run the fastest."""
    if not HAS_TRITON or not gq.triton_available("cuda"):
        pytest.skip("needs triton's GPU kernels")
    monkeypatch.delenv("DSRUN_GPU_QUANT_AUTOTUNE")
    monkeypatch.setattr(gq, "_TUNED", {})
    w, ref = matrix(Q.Q4_K, 256, 2048)
    x = tokens(1, 2048, torch.bfloat16)
    int8 = int8_x((Q.Q4_K,), x, "cuda", 1)
    for _ in range(2):
        assert_product(gq.quantized_matmul(x.cuda(), w.cuda(), Q.Q4_K, 256, 2048), x, ref, int8)
    n_ff, n_embd = 256, 512
    pools, refs = swiglu_pools((Q.Q4_K,) * 3, n_ff, n_embd, 3, "cuda")
    x = tokens(3, n_embd, torch.bfloat16)
    s = torch.tensor([2, 0, 2], device="cuda")
    for _ in range(2):
        y = gq.grouped_swiglu(x.cuda(), *pools, s, (Q.Q4_K,) * 3, n_ff, n_embd)
        assert_swiglu(y, x, *refs, [2, 0, 2], (int8, int8))
    assert [k[0] for k in gq._TUNED] == ["gemv", "grouped", "grouped"]
    assert all(c in gq._CONFIGS for c in gq._TUNED.values())


def test_grouped_bad_arguments():
    pool, _ = slot_pool(Q.Q4_K, 8, 256, 2, "cpu")
    x, s = torch.zeros(2, 256), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"\(A, 256\)"):
        gq.grouped_matmul(torch.zeros(2, 512), pool, s, Q.Q4_K, 8, 256)
    with pytest.raises(ValueError, match="int32 or int64"):
        gq.grouped_matmul(x, pool, s.float(), Q.Q4_K, 8, 256)
    with pytest.raises(ValueError, match=r"slots must be \(2,\)"):
        gq.grouped_matmul(x, pool, s[:1], Q.Q4_K, 8, 256)
    with pytest.raises(ValueError, match="new_pool"):
        gq.grouped_matmul(x, pool[:, :100], s, Q.Q4_K, 8, 256)  # rows cut short
    with pytest.raises(ValueError, match="new_pool"):
        gq.grouped_matmul(x, pool, s, Q.Q4_K, 16, 256)  # rows too small for the matrix
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        gq.grouped_matmul(x, pool, s, Q.IQ2_XXS, 8, 256)


def test_bad_arguments():
    w, _ = matrix(Q.Q4_K, 8, 256)
    x = torch.zeros(1, 256)
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        gq.quantized_matmul(x, w, Q.IQ2_XXS, 8, 256)
    with pytest.raises(ValueError, match="1152 bytes"):
        gq.quantized_matmul(x, w[:-1], Q.Q4_K, 8, 256)
    with pytest.raises(ValueError, match=r"\(\.\.\., 256\)"):
        gq.quantized_matmul(torch.zeros(1, 512), w, Q.Q4_K, 8, 256)


def compile_for_h100(kernel, pointers: dict[str, str], const: dict, **options):
    """Compile a kernel for sm_90 with Triton's bundled ptxas: no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {p.name: "constexpr" if p.name in const else pointers.get(p.name, "i32") for p in kernel.params}
    return triton.compile(
        ASTSource(kernel, sig, constexprs=const), target=GPUTarget("cuda", 90, 32), options=options
    )


@pytest.mark.slow
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0, Q.Q6_K], ids=lambda t: t.name)
def test_kernels_compile_for_h100(qtype):
    """What the interpreter cannot check: the kernels lower to PTX, with T = 1 and a single step taken as
    constants as Triton does for arguments equal to 1, the dot path on tensor cores and the int8-x path
    on dp4a; the grouped kernel alone, fused with Q4_K as its second matrix, and writing partial sums;
    x's rounding to int8; the reduction."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (not a dsrun dependency)")
    if gq.triton_available("cpu"):
        pytest.skip("kernels are built for the interpreter here (TRITON_INTERPRET=1)")
    args = gq._step_args(qtype)
    ptrs = {"x": "*bf16", "w": "*u8", "out": "*bf16", "xq": "*i32", "xd": "*fp32", "xs": "*fp32"}
    int8 = (False, True) if qtype in gq.INT8_X_TYPES else (False,)
    for const in (
        *(
            dict(
                args,
                BT=1,
                DOT=False,
                DOT_F32=False,
                INT8_X=i,
                LEVELS=1,
                KB=2,
                BN=32,
                T=1,
                n_steps=1,
                steps_per_part=1,
            )
            for i in int8
        ),
        *(dict(args, BT=4, DOT=False, DOT_F32=False, INT8_X=i, LEVELS=2, KB=16, BN=4) for i in int8),
        dict(args, BT=16, DOT=True, DOT_F32=False, INT8_X=False, LEVELS=1, KB=2, BN=32),
    ):
        words = {"w": "*i32"} if const["INT8_X"] else {}  # int8 x: the host passes Q4_K bytes as words
        compiled = compile_for_h100(
            gq._gemv_kernel, dict(ptrs, **words), const, num_warps=8, enable_fp_fusion=True
        )
        assert ("mma" in compiled.asm["ptx"]) == const["DOT"]
        assert ("dp4a" in compiled.asm["ptx"]) == const["INT8_X"]
    compile_for_h100(gq._dequant_kernel, ptrs, dict(args, BN=16), enable_fp_fusion=False)
    for levels in (1, 2):
        compile_for_h100(
            gq._quantize_x_kernel, ptrs, dict(LEVELS=levels, BN=8), num_warps=4, enable_fp_fusion=True
        )
    a, b = gq._step_args(qtype, "_A"), gq._step_args(Q.Q4_K, "_B")
    ptrs = dict(ptrs, wa="*u8", wb="*u8", slots="*i32")
    for glu, final in ((False, True), (True, True), (True, False)):
        for i in int8:
            const = dict(a, **b, GLU=glu, FINAL=final, INT8_X=i, LEVELS=1 + i, KB=8, BN=8)
            out = {"out": "*bf16" if final else "*fp32"}
            if i:
                out.update(wa="*i32", wb="*i32")
            compiled = compile_for_h100(
                gq._grouped_kernel, dict(ptrs, **out), const, num_warps=8, enable_fp_fusion=True
            )
            assert ("dp4a" in compiled.asm["ptx"]) == i
    ptrs = dict(ptrs, row_src="*i32", block_slot="*i32")
    for glu in (False, True):
        const = dict(a, **b, GLU=glu, GATHER=glu, DOT_F32=False, BM=16, BN=64)
        compiled = compile_for_h100(gq._sorted_kernel, ptrs, const, num_warps=4, enable_fp_fusion=True)
        assert "mma" in compiled.asm["ptx"]
    for glu in (False, True):
        const = dict(GLU=glu, BN=1024)
        compile_for_h100(
            gq._reduce_kernel, {"src": "*fp32", "out": "*bf16"}, const, num_warps=4, enable_fp_fusion=True
        )


@pytest.mark.slow
def test_triton_kernels_on_cpu_in_a_subprocess():
    """This file's interpreter cases, in a child with TRITON_INTERPRET=1 (see the module docstring)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (not a dsrun dependency)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs the interpreter cases itself")
    if torch.cuda.is_available():  # and an older Triton's interpreter may fail cases its GPU passes
        pytest.skip("the kernels run on this machine's GPU: the cuda cases test them")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-k", "interpreter", "-p", "no:cacheprovider"]
    run = subprocess.run(cmd, env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0 and "skipped" not in summary, run.stdout[-6000:] + run.stderr[-2000:]
