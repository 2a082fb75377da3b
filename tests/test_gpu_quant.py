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


def matrix(qtype: GGMLQuantizationType, n_out: int, n_in: int, seed: int = 0):
    """Random valid GGUF bytes (flat uint8) of an (n_out, n_in) matrix and its float32 weights (N, K)."""
    blocks = quants.random_blocks(qtype, n_out * n_in // GGML_QUANT_SIZES[qtype][0], seed)
    return torch.from_numpy(blocks).reshape(-1), quants.dequantize(blocks, qtype, (n_out, n_in))


def tokens(T: int, n_in: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(T, n_in, generator=torch.Generator().manual_seed(seed)).to(dtype)  # (T, K)


def assert_product(y: torch.Tensor, x: torch.Tensor, ref: torch.Tensor) -> None:
    """y = x @ ref.T within TOL[x.dtype] of mag (see the module docstring)."""
    truncated = y.dtype == torch.bfloat16 and y.device.type == "cpu" and gq.triton_available("cpu")
    tol = TOL[y.dtype] * (2 if truncated else 1)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], ref.shape[0])
    x, ref = x.cpu().double(), ref.double()
    exact = x @ ref.T  # (..., N)
    mag = x.abs() @ ref.abs().T  # (..., N)
    err = (y.cpu().double() - exact).abs()
    worst = (err / mag.clamp_min(1e-300)).max().item()
    assert (err <= tol * mag).all(), f"worst error {worst:.2e} of |x| @ |W|.T"


@pytest.mark.parametrize("T", [1, 3, 5, 16, 64])
@pytest.mark.parametrize("shape", [(64, 256), (192, 1024), (512, 2048)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0], ids=lambda t: t.name)
def test_matmul_matches_f32(device, qtype, shape, T):
    """T = 1, 3: the per-token GEMV loop; 5 (padded) and 16: its tl.dot form; 64: dequantize + matmul."""
    w, ref = matrix(qtype, *shape, seed=T)
    x = tokens(T, shape[1], torch.bfloat16)
    assert_product(gq.quantized_matmul(x.to(device), w.to(device), qtype, *shape), x, ref)


@pytest.mark.parametrize("T", [1, 5, 64])
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0], ids=lambda t: t.name)
def test_matmul_f32_tokens(device, qtype, T):
    w, ref = matrix(qtype, 96, 512, seed=T)
    x = tokens(T, 512, torch.float32)
    assert_product(gq.quantized_matmul(x.to(device), w.to(device), qtype, 96, 512), x, ref)


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
    monkeypatch.setattr(gq, "_split_k", lambda n_out, n_steps, device: 3)
    w, ref = matrix(Q.Q4_K, 64, 2048, seed=T)
    x = tokens(T, 2048, torch.bfloat16)
    assert_product(gq.quantized_matmul(x.to(device), w.to(device), Q.Q4_K, 64, 2048), x, ref)


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
        assert_product(gq.quantized_matmul(x.to(device), pool[s], Q.Q4_K, n_out, n_in), x, refs[s])


def test_leading_dims_scratch_and_empty(device):
    w, ref = matrix(Q.Q8_0, 64, 256)
    w = w.to(device)
    x = tokens(6, 256, torch.bfloat16).view(2, 3, 256)
    assert_product(gq.quantized_matmul(x.to(device), w, Q.Q8_0, 64, 256), x, ref)  # (2, 3, N)
    x = tokens(40, 256, torch.bfloat16)
    scratch = torch.empty(64 * 256 + 5, dtype=torch.bfloat16, device=device)
    assert_product(gq.quantized_matmul(x.to(device), w, Q.Q8_0, 64, 256, scratch=scratch), x, ref)
    assert gq.quantized_matmul(x[:0].to(device), w, Q.Q8_0, 64, 256).shape == (0, 64)


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
    constants as Triton does for arguments equal to 1, and the dot path on tensor cores."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (not a dsrun dependency)")
    if gq.triton_available("cpu"):
        pytest.skip("kernels are built for the interpreter here (TRITON_INTERPRET=1)")
    args = gq._step_args(qtype)
    ptrs = {"x": "*bf16", "w": "*u8", "out": "*bf16"}
    for const in (
        dict(args, BT=1, DOT=False, DOT_F32=False, BN=32, T=1, n_steps=1, steps_per_part=1),
        dict(args, BT=4, DOT=False, DOT_F32=False, BN=16),
        dict(args, BT=16, DOT=True, DOT_F32=False, BN=32),
    ):
        compiled = compile_for_h100(gq._gemv_kernel, ptrs, const, num_warps=8, enable_fp_fusion=True)
        assert ("mma" in compiled.asm["ptx"]) == const["DOT"]
    compile_for_h100(gq._dequant_kernel, ptrs, dict(args, BN=16), enable_fp_fusion=False)


@pytest.mark.slow
def test_triton_kernels_on_cpu_in_a_subprocess():
    """This file's interpreter cases, in a child with TRITON_INTERPRET=1 (see the module docstring)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (not a dsrun dependency)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs the interpreter cases itself")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-k", "interpreter", "-p", "no:cacheprovider"]
    run = subprocess.run(cmd, env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0 and "skipped" not in summary, run.stdout[-6000:] + run.stderr[-2000:]
