"""Generated MoE models: random-weight GGUFs of every architecture dsrun runs, tiny to full layer shapes.

`synthesize(path, arch, ...)` writes a file llama.cpp and dsrun both load: deepseek2 (either MLA layout,
with or without q-LoRA, softmax or sigmoid + exp_probs_b + expert groups, optional YaRN), qwen3moe,
qwen2moe, or Mixtral (arch `llama` with experts). The tokenizer is the default model's (SmolLM2), so
prompts tokenize as usual. `dsrun synth` is the command-line face of it.

Files are written tensor by tensor and each tensor in row chunks (at most CHUNK_FLOATS floats at a
time), so a DeepSeek-V3-shaped layer (256 experts x 44 M parameters) never sits in memory whole.
F32 and F16 are converted in numpy; every quantized type goes through ggml's own quantizer
(`ggml_quantize_chunk` from llama.cpp's libggml-base, the function llama.cpp's quantize tool calls),
chunk by chunk, so the bytes are exactly what llama.cpp would write. Rows whose length is not a
multiple of the type's block fall back to Q8_0 (or F16 when not a multiple of 32); norms, biases and
routers stay F32, as llama.cpp's quantizer keeps them.

Scales keep activations O(1): matrices are uniform with variance 1 / fan-in, norm weights near 1,
embeddings unit-variance, and the output head gives logits with a standard deviation of about 3.

Routing structure (how `skew` and `locality` work), built from three fixed unit directions in the
model space: u0, and an orthonormal context basis U of CONTEXT_DIMS directions, both orthogonal:
- Every token embedding carries EMBD_BIAS * sqrt(D) along u0, so each normalized hidden state x has
  x . u0 of about S0 * sqrt(D) for every token. Router row e gets b_e / (S0 sqrt(D)) along u0, adding
  the logit offset b_e = -skew * ln(rank_e + 1) (centered), rank_e a per-layer random permutation of
  the experts: softmax/sigmoid scores then favour experts by a Zipf-like law with exponent `skew`.
- In every layer one attention head (MLA) or the heads of KV group 0 (GQA) read only u0 on one RoPE
  pair whose speed is near CONTEXT_THETA rad/token, so their query and key are the same constant
  vector at every position and the score is CONTEXT_AMPLITUDE * cos(theta (t - s)): a soft window
  over the last ~1 / (theta sqrt(amplitude)) = 5 tokens (echoing every 2 pi / theta = 63 tokens, as
  RoPE angles wrap). Their output columns write the windowed average of values into U only.
  The U part of x therefore drifts slowly from token to token.
- Router rows are sqrt(1 - locality) * (random, orthogonal to u0 and U) + sqrt(locality) * (random
  in U), scaled for unit-variance logits: at locality 1 a token's experts follow the window average,
  so consecutive tokens mostly reuse experts; at 0 they are independent from token to token.
Token embeddings and output rows are orthogonal to u0 and U so neither part biases the logits, and
every other matrix reading the residual stream is orthogonal to u0, so the constant reaches nothing
but the routers and the context heads. Measured on a 3-layer qwen3moe (16 experts, 2 used, n_embd
128) over 400 random tokens: skew 0 gives the busiest expert 8% of assignments (uniform: 6%), skew
1.5 gives it 46% (Zipf's law with exponent 1.5 over 16 experts: 46%); consecutive tokens share 12%
of their experts at locality 0 (chance: 12.5%) and 59-78% at locality 1.

router="hash" replaces all that for well-conditioned tests: each token id gets, per MoE layer, its own
K experts (drawn by popularity, within topk_group groups), and its embedding carries HASH_CODE along
an orthonormal code direction of each; router rows are those codes. A token's experts then win by a
wide margin at any position, so rounding (llama.cpp's quantized activations, another summation order)
cannot flip a routing decision, as it can with soft routers' close calls.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType

from .errors import InvalidRequestError
from .quants import random_weight_blocks

Q = GGMLQuantizationType
ARCHS = ("deepseek2", "qwen3moe", "qwen2moe", "mixtral")
GGUF_ARCH = {"mixtral": "llama"}  # Mixtral is llama with experts in GGUF
WEIGHT_TYPES = {  # name -> (ggml type, general.file_type)
    "F32": (Q.F32, LlamaFileType.ALL_F32),
    "F16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "Q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q5_0": (Q.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "Q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "Q6_K": (Q.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "Q5_K": (Q.Q5_K, LlamaFileType.MOSTLY_Q5_K_S),
    "Q4_K": (Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    "Q3_K": (Q.Q3_K, LlamaFileType.MOSTLY_Q3_K_S),
    "Q2_K": (Q.Q2_K, LlamaFileType.MOSTLY_Q2_K),
}
CHUNK_FLOATS = 1 << 24  # floats generated and encoded at a time (64 MB)
QUANT_THREADS = os.cpu_count() or 1
PARALLEL_FLOATS = 1 << 20  # chunks smaller than this per thread are quantized on one

EMBD_BIAS = 0.5  # embeddings' constant part along u0, times sqrt(D)
S0 = 0.4  # expected x . u0 of a normalized hidden state, times sqrt(D) (rms of h grows over layers)
CONTEXT_DIMS = 4  # directions the windowed-average channel writes
CONTEXT_THETA = 0.1  # target RoPE speed (rad/token) of the context heads' pair
CONTEXT_AMPLITUDE = 4.0  # their score amplitude: window width ~ 1 / (theta sqrt(amplitude))
CONTEXT_SHARE = 0.5  # norm of the U part of the residual, times sqrt(D), summed over layers
OUTPUT_GAIN = 3.0  # logit standard deviation
HASH_CODE = 12.0  # hash routing: a token embedding's length along each of its experts' codes
HASH_LOGIT = 3.0  # hash routing: router logit of a token's own experts (the others sit near 0)
QLORA_LIFT = 3.0  # q_a row 0 reads u0 this strongly, so the context query survives the q_a norm


@dataclass(frozen=True)
class Spec:
    """Shapes and options of a generated model; fields not used by `arch` are ignored."""

    arch: str = "deepseek2"
    n_layer: int = 2
    n_embd: int = 256
    n_head: int = 4
    n_ctx: int = 4096
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    n_expert: int = 8
    n_expert_used: int = 2
    n_ff_exp: int = 256  # routed expert width
    # GQA architectures (qwen3moe, qwen2moe, mixtral)
    n_head_kv: int = 2
    head_dim: int = 64
    n_ff_shexp: int = 512  # qwen2moe shared expert width
    # deepseek2
    n_ff: int = 512  # leading dense layers' FFN width
    n_dense_lead: int = 1
    n_expert_shared: int = 1  # shared experts, each n_ff_exp wide
    q_lora_rank: int = 0  # 0: plain attn_q
    kv_lora_rank: int = 64
    qk_nope_dim: int = 32
    qk_rope_dim: int = 16
    v_head_dim: int = 32
    mla_layout: str = "split"  # "split": attn_k_b + attn_v_b; "kv_b": one attn_kv_b (older files)
    gating: str = "softmax"  # "softmax" (V2) or "sigmoid" (V3, with exp_probs_b)
    n_group: int = 1  # expert groups; topk_group of them kept per token
    topk_group: int = 1
    weights_norm: bool = False
    weights_scale: float = 1.0
    yarn_factor: float = 0.0  # 0: no RoPE scaling
    yarn_orig_ctx: int = 4096
    yarn_mscale_all_dim: float = 0.0  # the GGUF stores 0.1 x this as yarn_log_multiplier

    def check(self) -> None:
        bad = []
        if self.arch not in ARCHS:
            bad.append(f"arch must be one of {', '.join(ARCHS)}")
        if not 0 < self.n_expert_used <= self.n_expert:
            bad.append("n_expert_used must be between 1 and n_expert")
        if self.n_group > 1 and (self.n_expert % self.n_group or self.n_expert // self.n_group < 2):
            bad.append("n_group must divide n_expert into groups of at least 2")
        if self.n_group > 1 and not 0 < self.topk_group < self.n_group:
            bad.append("topk_group must be between 1 and n_group - 1 (llama.cpp asserts it)")
        if self.n_group > 1 and self.topk_group * self.n_expert // self.n_group < self.n_expert_used:
            bad.append("the kept groups must hold at least n_expert_used experts")
        if self.arch != "deepseek2" and self.n_head % self.n_head_kv:
            bad.append("n_head must be a multiple of n_head_kv")
        if self.mla_layout not in ("split", "kv_b") or self.gating not in ("softmax", "sigmoid"):
            bad.append("mla_layout is 'split' or 'kv_b'; gating is 'softmax' or 'sigmoid'")
        if self.qk_rope_dim % 2 or self.head_dim % 2:
            bad.append("rope and head dims must be even")
        if bad:
            raise InvalidRequestError("bad synth spec: " + "; ".join(bad))


PRESETS: dict[str, dict] = {
    # the real per-layer shapes; pick the layer count with n_layer
    "deepseek-v3": dict(
        arch="deepseek2",
        n_layer=61,
        n_embd=7168,
        n_head=128,
        n_ctx=163840,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_dim=128,
        qk_rope_dim=64,
        v_head_dim=128,
        n_ff=18432,
        n_dense_lead=3,
        n_expert=256,
        n_expert_used=8,
        n_ff_exp=2048,
        n_expert_shared=1,
        gating="sigmoid",
        n_group=8,
        topk_group=4,
        weights_norm=True,
        weights_scale=2.5,
        yarn_factor=40.0,
        yarn_orig_ctx=4096,
        yarn_mscale_all_dim=1.0,
    ),
    "deepseek-v2-lite": dict(
        arch="deepseek2",
        n_layer=27,
        n_embd=2048,
        n_head=16,
        n_ctx=163840,
        q_lora_rank=0,
        kv_lora_rank=512,
        qk_nope_dim=128,
        qk_rope_dim=64,
        v_head_dim=128,
        n_ff=10944,
        n_dense_lead=1,
        n_expert=64,
        n_expert_used=6,
        n_ff_exp=1408,
        n_expert_shared=2,
        gating="softmax",
        weights_norm=False,
        weights_scale=1.0,
        yarn_factor=40.0,
        yarn_orig_ctx=4096,
        yarn_mscale_all_dim=0.707,
    ),
    "qwen3-30b-a3b": dict(
        arch="qwen3moe",
        n_layer=48,
        n_embd=2048,
        n_head=32,
        n_head_kv=4,
        head_dim=128,
        n_ctx=40960,
        n_expert=128,
        n_expert_used=8,
        n_ff_exp=768,
        rope_base=1000000.0,
    ),
    "qwen1.5-moe-a2.7b": dict(
        arch="qwen2moe",
        n_layer=24,
        n_embd=2048,
        n_head=16,
        n_head_kv=16,
        head_dim=128,
        n_ctx=8192,
        n_expert=60,
        n_expert_used=4,
        n_ff_exp=1408,
        n_ff_shexp=5632,
        rope_base=1000000.0,
    ),
    "mixtral-8x7b": dict(
        arch="mixtral",
        n_layer=32,
        n_embd=4096,
        n_head=32,
        n_head_kv=8,
        head_dim=128,
        n_ctx=32768,
        n_expert=8,
        n_expert_used=2,
        n_ff_exp=14336,
        rope_base=1000000.0,
        norm_eps=1e-5,
    ),
}


# --- ggml's quantizer -------------------------------------------------------------------------------


def _ggml_base() -> ctypes.CDLL:
    from dsrun.offload.backend_ggml import ggml_lib_dir

    lib_dir = ggml_lib_dir()
    if lib_dir is None:
        raise InvalidRequestError("quantized synth models need llama-cpp-python (its libggml-base)")
    lib = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return lib


_GGML: list[ctypes.CDLL] = []


def encode(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 rows (n, cols) in a GGUF type's bytes, quantized blocks by ggml itself.

    Large chunks are split over QUANT_THREADS threads: ctypes drops the GIL, and K-quant quantization
    (~15 M floats/s a core) is what a real-shaped file spends its time on."""
    if qtype == Q.F32:
        return rows
    if qtype == Q.F16:
        return rows.astype(np.float16)
    if not _GGML:
        _GGML.append(_ggml_base())
    block, type_size = GGML_QUANT_SIZES[qtype]
    n, cols = rows.shape
    out = np.empty(n * cols // block * type_size, dtype=np.uint8)
    src = np.ascontiguousarray(rows, dtype=np.float32)

    def quantize(span: np.ndarray) -> int:  # rows span[0] .. span[-1]; ggml offsets dst from `start`
        first, count = int(span[0]), len(span)
        return _GGML[0].ggml_quantize_chunk(
            int(qtype), src.ctypes.data, out.ctypes.data, first * cols, count, cols, None
        )

    threads = min(QUANT_THREADS, max(1, rows.size // PARALLEL_FLOATS), n)
    with ThreadPoolExecutor(threads) as pool:
        written = sum(pool.map(quantize, np.array_split(np.arange(n), threads)))
    assert written == out.nbytes
    return out


def tensor_type(name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """A tensor's stored type: vectors and routers F32; rows that do not split into blocks fall back."""
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
        return Q.F32
    cols = shape[-1]
    if cols % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    return Q.Q8_0 if cols % 32 == 0 else Q.F16


def nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * type_size


# --- what goes in the file ---------------------------------------------------------------------------

Fill = Callable[[np.random.Generator, int, int, int], np.ndarray]  # (rng, first row, end row, cols) -> rows


@dataclass
class Planned:
    name: str
    shape: tuple[int, ...]  # numpy order; rows are the product of all but the last dim
    fill: Fill


class Generator:
    """Decides every tensor's values; each chunk of rows is seeded by (seed, name, first row)."""

    def __init__(self, spec: Spec, router: str, skew: float, locality: float, seed: int, n_vocab: int):
        self.s, self.hash, self.skew, self.locality, self.seed = spec, router == "hash", skew, locality, seed
        D, E = spec.n_embd, spec.n_expert
        lead = spec.n_dense_lead if spec.arch == "deepseek2" else 0
        self.moe_layers = {layer: j for j, layer in enumerate(range(lead, spec.n_layer))}
        n_codes = E * len(self.moe_layers) if self.hash else 0
        if CONTEXT_DIMS + 1 + n_codes > D:
            raise InvalidRequestError(
                f"hash routing needs n_embd >= {CONTEXT_DIMS + 1 + n_codes} (experts x layers)"
            )
        basis, _ = np.linalg.qr(self.rng("directions").standard_normal((D, CONTEXT_DIMS + 1 + n_codes)))
        basis = basis.astype(np.float32)
        self.u0 = basis[:, 0]  # (D,) the direction every token carries
        self.U = basis[:, 1 : CONTEXT_DIMS + 1]  # (D, c) the windowed-context directions
        self.codes = basis[:, CONTEXT_DIMS + 1 :].reshape(D, -1, E)  # (D, MoE layers, E) hash routing
        self.special = basis  # directions token parts and output rows are kept clear of
        self.popularity = {layer: self.log_popularity(layer) for layer in self.moe_layers}
        self.assigned = {layer: self.hash_experts(layer, n_vocab) for layer in self.moe_layers if self.hash}
        # rms of a hidden state per unit of token noise: the codes a hash-routed token carries add to it
        codes = HASH_CODE**2 * spec.n_expert_used * len(self.assigned) / D
        self.rms_h = math.sqrt(1 + EMBD_BIAS**2 + codes)

    def rng(self, *key) -> np.random.Generator:
        return np.random.default_rng([self.seed, *(zlib.crc32(str(k).encode()) for k in key)])

    # generic fills

    @staticmethod
    def uniform(rng: np.random.Generator, n: int, cols: int, std: float) -> np.ndarray:
        return rng.uniform(-math.sqrt(3) * std, math.sqrt(3) * std, size=(n, cols)).astype(np.float32)

    def linear(self, fan_in: int) -> Fill:
        return lambda rng, r0, r1, cols: self.uniform(rng, r1 - r0, cols, 1 / math.sqrt(fan_in))

    def reader(self) -> Fill:
        """A matrix reading the residual stream, blind to u0: the constant every token carries would
        otherwise leak into values and FFN outputs and bias routing with skew 0."""

        def fill(rng, r0, r1, cols):
            rows = self.uniform(rng, r1 - r0, cols, 1 / math.sqrt(cols))
            return rows - np.outer(rows @ self.u0, self.u0)

        return fill

    @staticmethod
    def norm(rng, r0, r1, cols) -> np.ndarray:
        return 1.0 + 0.1 * rng.uniform(-1, 1, size=(r1 - r0, cols)).astype(np.float32)

    def off_special(self, rows: np.ndarray) -> np.ndarray:
        """Rows with their u0 and U components removed."""
        return rows - (rows @ self.special) @ self.special.T

    # structured fills

    def token_embd(self, rng, r0, r1, cols) -> np.ndarray:
        rows = self.off_special(rng.standard_normal((r1 - r0, cols)).astype(np.float32))
        for layer, experts in self.assigned.items():  # hash routing: each token carries its experts' codes
            chosen = np.zeros((r1 - r0, self.s.n_expert), np.float32)  # (n, E)
            np.put_along_axis(chosen, experts[r0:r1], HASH_CODE, axis=1)
            rows += chosen @ self.codes[:, self.moe_layers[layer]].T
        return rows + EMBD_BIAS * math.sqrt(cols) * self.u0

    def log_popularity(self, layer: int) -> np.ndarray:
        """(E,) log-share of each expert: -skew ln(rank + 1), ranks a random permutation per layer."""
        ranks = np.empty(self.s.n_expert)
        ranks[self.rng("popularity", layer).permutation(self.s.n_expert)] = np.arange(self.s.n_expert)
        offsets = -self.skew * np.log(ranks + 1)
        return offsets - offsets.mean()

    def hash_experts(self, layer: int, n_vocab: int) -> np.ndarray:
        """(V, K) each token's experts: drawn without replacement by popularity (Gumbel top-k), from
        topk_group groups drawn the same way, so the group limit never drops one of them."""
        s, rng = self.s, self.rng("hash", layer)
        keys = self.popularity[layer] + rng.gumbel(size=(n_vocab, s.n_expert))  # (V, E)
        if s.n_group > 1:
            share = np.exp(self.popularity[layer]).reshape(s.n_group, -1).sum(-1)  # (G,)
            group_keys = np.log(share) + rng.gumbel(size=(n_vocab, s.n_group))  # (V, G)
            dropped = np.argsort(-group_keys, axis=1)[:, s.topk_group :]  # (V, G - topk_group)
            grouped = keys.reshape(n_vocab, s.n_group, -1)  # (V, G, Eg)
            np.put_along_axis(grouped, dropped[..., None], -np.inf, axis=1)
        return np.argsort(-keys, axis=1)[:, : s.n_expert_used]

    def output(self, rng, r0, r1, cols) -> np.ndarray:
        gain = OUTPUT_GAIN * self.rms_h / math.sqrt(1 + EMBD_BIAS**2)  # the token part shrinks as rms_h grows
        return self.off_special(self.uniform(rng, r1 - r0, cols, gain / math.sqrt(cols)))

    def router(self, layer: int) -> Fill:
        offsets = self.popularity[layer]
        if self.hash:
            gain = HASH_LOGIT * self.rms_h / HASH_CODE  # a token's own experts score HASH_LOGIT, others ~0
            return lambda rng, r0, r1, cols: gain * self.codes[:, self.moe_layers[layer], r0:r1].T

        def fill(rng, r0, r1, cols):
            D = cols
            token = self.off_special(self.uniform(rng, r1 - r0, D, 1 / math.sqrt(D)))
            context = rng.standard_normal((r1 - r0, CONTEXT_DIMS)).astype(np.float32) @ self.U.T
            # x's U part is CONTEXT_SHARE sqrt(D) / rms(h) long, and rms(h) = EMBD_BIAS / S0
            context *= EMBD_BIAS / (S0 * CONTEXT_SHARE * math.sqrt(D))
            rows = math.sqrt(1 - self.locality) * token + math.sqrt(self.locality) * context
            return rows + (offsets[r0:r1, None] / (S0 * math.sqrt(D))).astype(np.float32) * self.u0

        return fill

    def context_rows(self, base: Fill, rows: dict[int, np.ndarray], zero: range | list[int]) -> Fill:
        """`base` with the given rows replaced: `rows` maps row -> vector, `zero` rows become 0."""

        def fill(rng, r0, r1, cols):
            out = base(rng, r0, r1, cols)
            for r in zero:
                if r0 <= r < r1:
                    out[r - r0] = 0
            for r, vec in rows.items():
                if r0 <= r < r1:
                    out[r - r0] = vec
            return out

        return fill

    def context_output(self, fan_in: int, n_cols: int, layer: int) -> Fill:
        """attn_output (D, H*Dv): the first n_cols columns (the context heads) write into U only."""
        D, L = self.s.n_embd, self.s.n_layer
        mix = self.rng("context_mix", layer).standard_normal((CONTEXT_DIMS, n_cols)).astype(np.float32)
        # a windowed mean of ~5 unit-variance values has per-dim rms ~0.45; L layers add in quadrature
        gain = CONTEXT_SHARE * math.sqrt(D) / (0.45 * math.sqrt(CONTEXT_DIMS * L))
        write = gain * (self.U @ mix) / math.sqrt(n_cols)  # (D, n_cols)

        def fill(rng, r0, r1, cols):
            out = self.uniform(rng, r1 - r0, cols, 1 / math.sqrt(fan_in))
            out[:, :n_cols] = write[r0:r1]
            return out

        return fill

    def context_pair(self, dim: int, neox: bool) -> tuple[int, int]:
        """The two dims (within a rope section of `dim`) of the pair turning nearest CONTEXT_THETA."""
        speeds = self.s.rope_base ** (-np.arange(0, dim, 2) / dim)
        i = int(np.argmin(np.abs(np.log(speeds / CONTEXT_THETA))))
        return (i, i + dim // 2) if neox else (2 * i, 2 * i + 1)

    def context_gain(self, kq_scale: float) -> float:
        """Weight on u0 that makes a constant q and k of equal size score CONTEXT_AMPLITUDE."""
        return math.sqrt(CONTEXT_AMPLITUDE / kq_scale) / (S0 * math.sqrt(self.s.n_embd))


def plan(spec: Spec, g: Generator) -> list[Planned]:
    """Every tensor of the model, in file order."""
    D, V = spec.n_embd, len(_vocab_tokens())
    out = [Planned("token_embd.weight", (V, D), g.token_embd)]
    layer_plan = _deepseek2_layer if spec.arch == "deepseek2" else _gqa_layer
    for i in range(spec.n_layer):
        out += layer_plan(spec, g, i)
    out += [Planned("output_norm.weight", (D,), g.norm), Planned("output.weight", (V, D), g.output)]
    return out


def _moe(spec: Spec, g: Generator, p: str, i: int) -> list[Planned]:
    D, E, F = spec.n_embd, spec.n_expert, spec.n_ff_exp
    out = [
        Planned(f"{p}ffn_gate_inp.weight", (E, D), g.router(i)),
        Planned(f"{p}ffn_gate_exps.weight", (E, F, D), g.reader()),
        Planned(f"{p}ffn_up_exps.weight", (E, F, D), g.reader()),
        Planned(f"{p}ffn_down_exps.weight", (E, D, F), g.linear(F)),
    ]
    if spec.arch == "deepseek2" and spec.gating == "sigmoid":  # V3's selection bias: moves soft choices
        std = 0.01 if g.hash else 0.1  # and leaves hash routing's wide margins wide

        def bias(rng, r0, r1, c):
            return g.uniform(rng, 1, c, std)

        out.append(Planned(f"{p}exp_probs_b.bias", (E,), bias))
    shared = {"deepseek2": F * spec.n_expert_shared, "qwen2moe": spec.n_ff_shexp}.get(spec.arch, 0)
    if shared:
        out += _swiglu(g, p, "_shexp", D, shared)
    if spec.arch == "qwen2moe":
        out.append(Planned(f"{p}ffn_gate_inp_shexp.weight", (D,), g.reader()))
    return out


def _swiglu(g: Generator, p: str, suffix: str, D: int, F: int) -> list[Planned]:
    return [
        Planned(f"{p}ffn_gate{suffix}.weight", (F, D), g.reader()),
        Planned(f"{p}ffn_up{suffix}.weight", (F, D), g.reader()),
        Planned(f"{p}ffn_down{suffix}.weight", (D, F), g.linear(F)),
    ]


def _deepseek2_layer(s: Spec, g: Generator, i: int) -> list[Planned]:
    p, D, H = f"blk.{i}.", s.n_embd, s.n_head
    C, P, R, Dv, Qr = s.kv_lora_rank, s.qk_nope_dim, s.qk_rope_dim, s.v_head_dim, s.q_lora_rank
    kq_scale = 1 / math.sqrt(P + R)
    pair, _ = g.context_pair(R, neox=False)
    head0 = range(P + R)  # head 0 is the context head: its query reads only u0, on one rope pair
    out = [Planned(f"{p}attn_norm.weight", (D,), g.norm)]
    if Qr:
        lift = QLORA_LIFT / (S0 * math.sqrt(D)) * g.u0  # q_a output 0 is ~QLORA_LIFT for every token
        q_row = np.zeros(Qr, np.float32)
        q_row[0] = math.sqrt(CONTEXT_AMPLITUDE / kq_scale) / QLORA_LIFT
        out += [
            Planned(f"{p}attn_q_a.weight", (Qr, D), g.context_rows(g.reader(), {0: lift}, [])),
            Planned(f"{p}attn_q_a_norm.weight", (Qr,), g.norm),
            Planned(
                f"{p}attn_q_b.weight",
                (H * (P + R), Qr),
                g.context_rows(g.linear(Qr), {P + pair: q_row}, head0),
            ),
        ]
    else:
        q_row = g.context_gain(kq_scale) * g.u0
        out.append(
            Planned(
                f"{p}attn_q.weight", (H * (P + R), D), g.context_rows(g.reader(), {P + pair: q_row}, head0)
            )
        )
    k_row = g.context_gain(kq_scale) * g.u0  # the shared rope key is constant on the context pair
    out += [
        Planned(
            f"{p}attn_kv_a_mqa.weight",
            (C + R, D),
            g.context_rows(g.reader(), {C + pair: k_row}, [C + pair + 1]),
        ),
        Planned(f"{p}attn_kv_a_norm.weight", (C,), g.norm),
    ]
    if s.mla_layout == "kv_b":
        out.append(Planned(f"{p}attn_kv_b.weight", (H * (P + Dv), C), g.linear(C)))
    else:
        out += [
            Planned(f"{p}attn_k_b.weight", (H, C, P), g.linear(C)),  # contracted over C in the naive form
            Planned(f"{p}attn_v_b.weight", (H, Dv, C), g.linear(C)),
        ]
    out += [
        Planned(f"{p}attn_output.weight", (D, H * Dv), g.context_output(H * Dv, Dv, i)),
        Planned(f"{p}ffn_norm.weight", (D,), g.norm),
    ]
    if i < s.n_dense_lead:
        return out + _swiglu(g, p, "", D, s.n_ff)
    return out + _moe(s, g, p, i)


def _gqa_layer(s: Spec, g: Generator, i: int) -> list[Planned]:
    p, D, H, G, Dh = f"blk.{i}.", s.n_embd, s.n_head, s.n_head_kv, s.head_dim
    neox = s.arch != "mixtral"
    group = H // G  # q heads reading KV head 0: together the context heads
    d, d2 = g.context_pair(Dh, neox)
    kq_scale = 1 / math.sqrt(Dh)
    row = g.context_gain(kq_scale) * g.u0
    q_rows = {h * Dh + d: row for h in range(group)}
    out = [
        Planned(f"{p}attn_norm.weight", (D,), g.norm),
        Planned(f"{p}attn_q.weight", (H * Dh, D), g.context_rows(g.reader(), q_rows, range(group * Dh))),
        Planned(f"{p}attn_k.weight", (G * Dh, D), g.context_rows(g.reader(), {d: row}, range(Dh))),
        Planned(f"{p}attn_v.weight", (G * Dh, D), g.reader()),
    ]
    if s.arch == "qwen2moe":  # biases, zero on the context heads so their q and k stay constant

        def bias(rng, r0, r1, c):
            return g.uniform(rng, r1 - r0, c, 0.1)

        out += [
            Planned(f"{p}attn_q.bias", (H * Dh,), _zero_cols(bias, range(group * Dh))),
            Planned(f"{p}attn_k.bias", (G * Dh,), _zero_cols(bias, range(Dh))),
            Planned(f"{p}attn_v.bias", (G * Dh,), bias),
        ]
    if s.arch == "qwen3moe":  # the normalized context q/k are one-hot: these weights set the amplitude
        weight = math.sqrt(CONTEXT_AMPLITUDE / math.sqrt(Dh))
        out += [Planned(f"{p}attn_{n}_norm.weight", (Dh,), _set_cols(g.norm, {d: weight})) for n in "qk"]
    out += [
        Planned(f"{p}attn_output.weight", (D, H * Dh), g.context_output(H * Dh, group * Dh, i)),
        Planned(f"{p}ffn_norm.weight", (D,), g.norm),
    ]
    return out + _moe(s, g, p, i)


def _zero_cols(base: Fill, cols: range) -> Fill:
    return _set_cols(base, dict.fromkeys(cols, 0.0))


def _set_cols(base: Fill, values: dict[int, float]) -> Fill:
    """A vector fill (one row) with some entries fixed."""

    def fill(rng, r0, r1, c):
        out = base(rng, r0, r1, c)
        for col, v in values.items():
            out[:, col] = v
        return out

    return fill


# --- writing -----------------------------------------------------------------------------------------


class Streamed:
    """One tensor produced chunk by chunk: GGUFWriter.write_tensor_data needs only nbytes and tofile()."""

    def __init__(self, t: Planned, qtype: GGMLQuantizationType, g: Generator, random_blocks: bool = False):
        self.t, self.qtype, self.g = t, qtype, g
        self.nbytes = nbytes(t.shape, qtype)
        self.random_blocks = random_blocks  # bits drawn directly, at the fill's 1/sqrt(fan-in) spread

    def chunks(self) -> Iterator[np.ndarray]:
        cols = self.t.shape[-1]
        rows = math.prod(self.t.shape[:-1])
        step = max(1, CHUNK_FLOATS // cols)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            rng = self.g.rng(self.t.name, r0)
            if self.random_blocks:
                n_blocks = (r1 - r0) * cols // GGML_QUANT_SIZES[self.qtype][0]
                yield random_weight_blocks(self.qtype, n_blocks, 1 / math.sqrt(cols), rng).reshape(-1)
            else:
                yield encode(self.t.fill(rng, r0, r1, cols), self.qtype)

    def tofile(self, fp) -> None:
        for chunk in self.chunks():
            fp.write(np.ascontiguousarray(chunk).data)


def _vocab_tokens() -> list:
    return _tokenizer_reader().fields["tokenizer.ggml.tokens"].contents()


_READER: list[GGUFReader] = []


def _tokenizer_reader() -> GGUFReader:
    """The default model's GGUF, whose tokenizer every generated model copies."""
    if not _READER:
        from .engine import resolve_model

        _READER.append(GGUFReader(resolve_model("default")))
    return _READER[0]


def _write_metadata(w: GGUFWriter, s: Spec, weight_type: str) -> None:
    from .gguf_convert import copy_metadata

    a = GGUF_ARCH.get(s.arch, s.arch)
    w.add_name(f"dsrun synth {s.arch}")
    w.add_file_type(int(WEIGHT_TYPES[weight_type][1]))
    w.add_quantization_version(2)
    copy_metadata(_tokenizer_reader(), w, skip=lambda k: not k.startswith("tokenizer."))
    keys = {
        "context_length": s.n_ctx,
        "embedding_length": s.n_embd,
        "block_count": s.n_layer,
        "attention.head_count": s.n_head,
        "attention.layer_norm_rms_epsilon": s.norm_eps,
        "rope.freq_base": s.rope_base,
        "expert_count": s.n_expert,
        "expert_used_count": s.n_expert_used,
    }
    if s.arch == "deepseek2":
        split = s.mla_layout == "split"
        keys |= {
            "feed_forward_length": s.n_ff,
            "leading_dense_block_count": s.n_dense_lead,
            "expert_feed_forward_length": s.n_ff_exp,
            "expert_shared_count": s.n_expert_shared,
            "attention.q_lora_rank": s.q_lora_rank,
            "attention.kv_lora_rank": s.kv_lora_rank,
            "rope.dimension_count": s.qk_rope_dim,
            # the split layout is MQA over the latent; the older one is plain MHA
            "attention.head_count_kv": 1 if split else s.n_head,
            "attention.key_length": s.kv_lora_rank + s.qk_rope_dim
            if split
            else s.qk_nope_dim + s.qk_rope_dim,
            "attention.value_length": s.kv_lora_rank if split else s.v_head_dim,
            "expert_gating_func": {"softmax": 1, "sigmoid": 2}[s.gating],
            "expert_weights_norm": s.weights_norm,
            "expert_weights_scale": s.weights_scale,
            "expert_group_count": s.n_group,
            "expert_group_used_count": s.topk_group,
        }
        if split:
            keys |= {
                "attention.key_length_mla": s.qk_nope_dim + s.qk_rope_dim,
                "attention.value_length_mla": s.v_head_dim,
            }
        if s.yarn_factor:
            keys |= {
                "rope.scaling.type": "yarn",
                "rope.scaling.factor": s.yarn_factor,
                "rope.scaling.original_context_length": s.yarn_orig_ctx,
                "rope.scaling.yarn_log_multiplier": 0.1 * s.yarn_mscale_all_dim,
            }
    else:
        keys |= {
            "attention.head_count_kv": s.n_head_kv,
            "attention.key_length": s.head_dim,
            "attention.value_length": s.head_dim,
            "rope.dimension_count": s.head_dim,
            "feed_forward_length": s.n_ff_exp,
            "expert_feed_forward_length": s.n_ff_exp,
        }
        if s.arch == "qwen2moe":
            keys["expert_shared_feed_forward_length"] = s.n_ff_shexp
    for key, value in keys.items():
        _add_typed(w, f"{a}.{key}", value)


def _add_typed(w: GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    else:
        w.add_string(key, value)


def make_spec(arch: str | None = None, *, preset: str | None = None, **overrides) -> Spec:
    """A Spec from a preset (or the tiny defaults) with fields overridden."""
    if preset is not None and preset not in PRESETS:
        raise InvalidRequestError(f"unknown preset '{preset}': one of {', '.join(PRESETS)}")
    base = dict(PRESETS[preset]) if preset else {}
    if arch is not None:
        base["arch"] = arch
    known = {f.name for f in fields(Spec)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InvalidRequestError(f"unknown synth option(s): {', '.join(unknown)}")
    spec = replace(Spec(**base), **overrides)
    spec.check()
    return spec


def synthesize(
    path: str | Path,
    arch: str | None = None,
    *,
    preset: str | None = None,
    weight_type: str = "F32",
    router: str = "soft",
    skew: float = 0.0,
    locality: float = 0.0,
    seed: int = 0,
    random_expert_blocks: bool = False,
    **dims,
) -> Path:
    """Write a random-weight MoE GGUF of `arch` (or the preset's) to `path`; see the module docstring.

    `dims` override Spec fields (n_layer, n_embd, n_expert, mla_layout, gating, ...). `router` is
    "soft" (continuous, context-dependent routing) or "hash" (each token id has its own experts, chosen
    by a wide margin). `skew` is the Zipf exponent of expert popularity (0 = uniform); `locality` in
    [0, 1] how much consecutive tokens share experts (soft routers only). `random_expert_blocks` writes
    routed experts (Q4_K or Q8_0) as random bits at the same spread instead of quantizing floats: a
    real-shaped benchmark file in a minute instead of an hour; routing, set by the routers, is unchanged.
    """
    spec = make_spec(arch, preset=preset, **dims)
    if weight_type not in WEIGHT_TYPES:
        raise InvalidRequestError(f"weight type '{weight_type}' is not one of {', '.join(WEIGHT_TYPES)}")
    if skew < 0 or not 0 <= locality <= 1:
        raise InvalidRequestError("skew must be >= 0 and locality between 0 and 1")
    if router not in ("soft", "hash") or (router == "hash" and locality):
        raise InvalidRequestError("router is 'soft' or 'hash', and locality applies to soft routers only")
    qtype = WEIGHT_TYPES[weight_type][0]
    g = Generator(spec, router, skew, locality, seed, len(_vocab_tokens()))
    tensors = [
        Streamed(t, tensor_type(t.name, t.shape, qtype), g, random_expert_blocks and "_exps." in t.name)
        for t in plan(spec, g)
    ]
    path = Path(path)
    w = GGUFWriter(str(path), GGUF_ARCH.get(spec.arch, spec.arch))
    _write_metadata(w, spec, weight_type)
    for t in tensors:
        w.add_tensor_info(t.t.name, t.t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in tensors:
        w.write_tensor_data(t)
    w.close()
    return path


# --- command line ------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("-o", "--output", required=True, help="GGUF file to write")
    p.add_argument("--arch", choices=ARCHS, help="architecture (default: the preset's, or deepseek2)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="real layer shapes of a known model")
    p.add_argument("--layers", type=int, default=None, help="number of layers (n_layer)")
    p.add_argument("--type", default="F32", choices=list(WEIGHT_TYPES), help="weight type")
    p.add_argument("--router", choices=("soft", "hash"), default="soft", help="routing structure")
    p.add_argument(
        "--random-expert-blocks",
        action="store_true",
        help="write routed experts (Q4_K/Q8_0) as random bits, not quantized floats: big files fast",
    )
    p.add_argument("--skew", type=float, default=0.0, help="Zipf exponent of expert popularity (0 = uniform)")
    p.add_argument("--locality", type=float, default=0.0, help="0..1: consecutive tokens sharing experts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any shape/option field, e.g. --set n_expert=64 --set mla_layout=kv_b",
    )


def _parse_sets(items: list[str]) -> dict:
    types = {f.name: f.type for f in fields(Spec)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise InvalidRequestError(f"--set wants FIELD=VALUE with a field of: {', '.join(types)}")
        kind = types[key]
        if kind == "bool":
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = {"int": int, "float": float}.get(kind, str)(value)
    return out


def run(args) -> int:
    overrides = _parse_sets(args.set)
    if args.layers is not None:
        overrides["n_layer"] = args.layers
    t0 = time.perf_counter()
    path = synthesize(
        args.output,
        args.arch,
        preset=args.preset,
        weight_type=args.type,
        router=args.router,
        skew=args.skew,
        locality=args.locality,
        seed=args.seed,
        random_expert_blocks=args.random_expert_blocks,
        **overrides,
    )
    size = path.stat().st_size
    print(f"wrote {path} ({size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")
    return 0
