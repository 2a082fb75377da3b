"""Pieces every architecture shares: the step batch, the KV cache, norms, RoPE and cached attention.

Legend: T tokens in a step (all sequences), n tokens of one sequence, N cached positions,
H query heads, G KV heads, D head dim, V vocab.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsrun.gguf_file import GGUFFile
from dsrun.quants import dequantize

from .gguf_matrix import GGUFMatrix, linear, load_matrix


@dataclass
class Seq:
    """One sequence's share of a step: rows [start, start + n) of the batch, appended to `cache`."""

    cache: KVCache
    start: int
    n: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.n)


@dataclass
class Batch:
    """A step over several sequences at once: their new tokens laid end to end."""

    tokens: torch.Tensor  # (T,) int64
    seqs: list[Seq]
    out_rows: torch.Tensor | None = None  # rows whose logits are wanted; None means every row

    def positions(self) -> torch.Tensor:
        """Absolute position of every row: each sequence continues where its cache ends."""
        return torch.cat([s.cache.positions(s.n) for s in self.seqs])  # (T,)

    @classmethod
    def single(cls, tokens: list[int] | torch.Tensor, cache: KVCache, all_logits: bool = False) -> Batch:
        t = torch.as_tensor(tokens, dtype=torch.long)
        out = None if all_logits else torch.tensor([len(t) - 1])
        return cls(tokens=t, seqs=[Seq(cache, 0, len(t))], out_rows=out)


class KVCache:
    """Per-layer tensors that grow by whole tokens; capacity doubles so appends stay amortized O(1)."""

    def __init__(self, n_layers: int, dtype: torch.dtype = torch.float32):
        self.n = 0  # tokens committed (visible to attention in later steps)
        self.dtype = dtype
        self.layers: list[list[torch.Tensor] | None] = [None] * n_layers

    def append(self, layer: int, *parts: torch.Tensor) -> list[torch.Tensor]:
        """Write this step's rows after the committed ones; return each part's full (N, ...) view."""
        n_new = parts[0].shape[0]
        need = self.n + n_new
        bufs = self.layers[layer]
        if bufs is None or bufs[0].shape[0] < need:
            cap = max(need, 2 * (bufs[0].shape[0] if bufs else 16))
            grown = [p.new_empty((cap, *p.shape[1:]), dtype=self.dtype) for p in parts]
            if bufs is not None:
                for g, b in zip(grown, bufs):
                    g[: self.n] = b[: self.n]
            self.layers[layer] = bufs = grown
        for b, p in zip(bufs, parts):
            b[self.n : need] = p
        return [b[:need] for b in bufs]

    def positions(self, n_new: int) -> torch.Tensor:
        """Where the next n_new tokens go: (n_new,)."""
        return torch.arange(self.n, self.n + n_new)

    def commit(self, n_new: int) -> None:
        self.n += n_new

    def truncate(self, n: int) -> None:
        """Forget positions from n on (prefix reuse keeps the shared head of a prompt)."""
        self.n = min(self.n, n)

    def bytes_per_token(self) -> int:
        return sum(b[0].numel() * b.element_size() for bufs in self.layers if bufs for b in bufs)

    def used_bytes(self) -> int:
        return self.n * self.bytes_per_token()

    def allocated_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for bufs in self.layers if bufs for b in bufs)


class PreNormBlock:
    """x + attn(norm x), then + ffn(norm x): a layer whose subclass sets cfg, attn_norm, attn, ffn_norm and
    ffn. `pos` is the architecture's position encoding, handed through to its attention."""

    def __call__(self, x: torch.Tensor, batch: Batch, layer: int, *pos) -> torch.Tensor:
        eps = self.cfg.norm_eps
        x = x + self.attn(rms_norm(x, self.attn_norm, eps), batch, layer, *pos)
        return x + self.ffn(rms_norm(x, self.ffn_norm, eps))


class LanguageModel:
    """What every architecture shares: embeddings, the loop of blocks over a Batch, the logits head.

    A subclass builds its blocks through `make_block(cfg, f, i)` and says in `block_args` what each block
    takes besides (x, batch, layer): its position encoding.
    """

    def __init__(self, cfg, f: GGUFFile, make_block):
        self.cfg = cfg
        self.token_embd = load_linear(f, "token_embd.weight")  # (V, D)
        self.blocks = [make_block(cfg, f, i) for i in range(cfg.n_layer)]
        self.output_norm = load_weight(f, "output_norm.weight")
        output = load_linear(f, "output.weight") if "output.weight" in f.tensors else None
        self.output = self.token_embd if output is None else output  # (V, D), tied when absent

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layer)

    def block_args(self, batch: Batch) -> tuple:
        raise NotImplementedError

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits (rows of out_rows, V) for the batch; every sequence's cache grows by its tokens."""
        extra = self.block_args(batch)
        with device_scope(self.token_embd.device):
            x = embed(self.token_embd, batch.tokens)  # (T, D)
        for i, block in enumerate(self.blocks):
            x = block(x, batch, i, *extra)
        for s in batch.seqs:
            s.cache.commit(s.n)
        if batch.out_rows is not None:
            x = x[batch.out_rows]
        x = x.to(self.output.device)  # the last block may sit on another GPU than the head
        with device_scope(x.device):
            return linear(rms_norm(x, self.output_norm, self.cfg.norm_eps), self.output)  # (rows, V)


def load_weight(f: GGUFFile, name: str) -> torch.Tensor:
    """A tensor from the file, dequantized to float32 in numpy order (out_features, in_features)."""
    info = f.tensor(name)
    return dequantize(info.data, info.qtype, info.shape, name=name)


def load_linear(f: GGUFFile, name: str) -> torch.Tensor | GGUFMatrix:
    """A projection's weight: left quantized for ggml where the file has it quantized, else float32."""
    matrix = load_matrix(f.tensor(name))
    return load_weight(f, name) if matrix is None else matrix


def embed(table, tokens: torch.Tensor) -> torch.Tensor:
    """Rows of a float table, or of a quantized one (GGUFMatrix, DeviceMatrix): (T, D)."""
    return table[tokens] if isinstance(table, torch.Tensor) else table.rows(tokens)


def maybe_weight(f: GGUFFile, name: str) -> torch.Tensor | None:
    return load_weight(f, name) if name in f.tensors else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, as one fused op (six on their own)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rope_inv_freq(dim: int, base: float, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # (D/2,)
    if freq_factors is not None:  # llama3-style per-frequency divisors (the rope_freqs tensor)
        inv = inv / freq_factors.to(torch.float64)
    return inv


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0, mscale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin per row and frequency; `scale` is the linear position scale, `mscale` YaRN's magnitude."""
    ang = (positions.to(inv_freq.device, torch.float64) * scale)[:, None] * inv_freq[None, :]  # (T, D/2)
    return (torch.cos(ang) * mscale).float(), (torch.sin(ang) * mscale).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """Rotate (T, H, D) by position: ggml's NORM mode pairs (2i, 2i+1), NEOX pairs (i, i + D/2). Each
    pair is a complex number turned by cos + i sin: one multiply where real arithmetic takes eight ops."""
    turn = torch.complex(cos, sin)[:, None, :]  # (T, 1, D/2)
    if neox:
        x1, x2 = x.float().chunk(2, dim=-1)  # (T, H, D/2) each
        r = torch.complex(x1, x2) * turn
        return torch.cat([r.real, r.imag], dim=-1)  # (T, H, D)
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (T, H, D/2)
    return torch.view_as_real(pairs * turn).flatten(-2)  # (T, H, D)


def causal_mask(
    start: int | torch.Tensor, n: int, total: int, device: torch.device | None = None
) -> torch.Tensor:
    """(n, N) boolean: the row at position start + i sees cached positions 0 .. start + i. `start` may be a
    0-d tensor on the device (a captured step reads its position there)."""
    q_pos = (torch.arange(n, device=device) + start)[:, None]
    return torch.arange(total, device=device)[None, :] <= q_pos


# the most a block of new rows' float32 attention scores (H, rows, N) takes: a long prompt's rows go in
# blocks, so a GPU's workspace does not grow with prompt chunk times context (dsrun.plan counts it)
SCORES_BYTES = 256 << 20


def query_rows(n_head: int, n_keys: int) -> int:
    """Rows of a query block whose scores over n_keys positions stay within SCORES_BYTES."""
    return max(1, SCORES_BYTES // (4 * n_head * n_keys))


def by_query_blocks(attention, q: torch.Tensor, n_keys: int, start: int | torch.Tensor) -> torch.Tensor:
    """attention(q_block, keys it sees, block start) over blocks of q's rows (n, H, ...), each reading
    only the cached positions it can see (causal); q whole where it fits, or where start is on the device
    (a recorded decode step)."""
    n, H = q.shape[:2]
    rows = query_rows(H, n_keys)
    if n <= rows or torch.is_tensor(start):
        return attention(q, n_keys, start)
    blocks = [attention(q[i : i + rows], min(n_keys, start + i + rows), start + i) for i in range(0, n, rows)]
    return torch.cat(blocks)  # (n, H, ...)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of one sequence's new rows over its cache.

    q (n, H, Dk); k (N, G, Dk); v (N, G, Dv) with H a multiple of G; returns (n, H, Dv).
    """
    return by_query_blocks(
        lambda qb, n_keys, s: attend_block(qb, k[:n_keys], v[:n_keys], s, scale), q, k.shape[0], start
    )


def attend_block(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor, scale: float
) -> torch.Tensor:
    """attend for rows whose scores fit at once."""
    n, H, G = q.shape[0], q.shape[1], k.shape[1]
    # one new row sees the whole cache: no mask (but a start on the device is a captured step over a
    # cache of fixed length, not yet written past it); grouped-query heads map in the kernel
    whole = n == 1 and not torch.is_tensor(start)
    if whole and q.device.type == "cpu":
        return attend_one_row(q, k, v, scale)
    mask = None if whole else causal_mask(start, n, k.shape[0], q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=mask,
        scale=scale,
        enable_gqa=G != H,
    )  # (H, n, Dv)
    return out.transpose(0, 1)  # (n, H, Dv)


def attend_one_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One new row over the whole cache as two batched matmuls and a softmax: on a CPU, SDPA's dispatch
    costs about twice that at this size, 30-60 times a decode step.

    q (1, H, Dk); k (N, G, Dk); v (N, G, Dv), head h reading group h // (H/G); returns (1, H, Dv).
    """
    H, G = q.shape[1], k.shape[1]
    qg = q[0].view(G, H // G, -1)  # (G, H/G, Dk)
    p = torch.softmax(torch.bmm(qg, k.permute(1, 2, 0)) * scale, dim=-1)  # (G, H/G, N)
    return torch.bmm(p, v.transpose(0, 1)).view(1, H, -1)  # (1, H, Dv)


def default_attn_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


# --- devices: the layers of a model split over GPUs ---------------------------------------------------


class OnDevice:
    """A block pinned to a device: its tensor inputs move there first, so layers can sit on different GPUs
    (activations pass from one to the next) with no change to the architecture's code. The block runs
    with its GPU current: Triton launches on the current device's stream, whatever the tensors' device.

    `move` carries the inputs across: a recorded decode step (runtime/decode_graph.py) replaces it, as its
    graphs are cut where the device changes."""

    def __init__(self, block, device: torch.device):
        self.block, self.device = block, device
        self.move = to_device

    def __call__(self, *args):
        with device_scope(self.device):
            return self.block(*self.move(args, self.device))


def to_device(args: tuple, device: torch.device) -> tuple:
    """Every tensor of `args` (and of tuples in it) on `device`; other values as they are."""
    return tuple(_to_device(a, device) for a in args)


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        return to_device(value, device)
    return value


def device_scope(device: torch.device | str):
    """`device` made current while its work is launched, if it is a GPU."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def move_tensors(obj, device: torch.device, memo: dict) -> None:
    """Move every tensor attribute of a model object (and of its parts and lists) to `device` in place.

    Only objects defined in dsrun.models are walked: placed experts belong to the offload layer. `memo`
    keeps one moved copy per (tensor, device), so a tensor shared by two attributes (tied embeddings)
    stays shared.
    """
    if isinstance(obj, list):
        for i, value in enumerate(obj):
            obj[i] = _moved(value, device, memo)
    else:
        for name, value in list(vars(obj).items()):
            moved = _moved(value, device, memo)
            if moved is not value:  # configs are frozen and hold no tensors: leave them be
                setattr(obj, name, moved)


def _moved(value, device: torch.device, memo: dict):
    if isinstance(value, (torch.Tensor, GGUFMatrix)):
        key = (id(value), device)
        if key not in memo:
            memo[key] = (value, value.to(device))  # the original is kept so its id is not reused
        return memo[key][1]
    if isinstance(value, list) or type(value).__module__.startswith("dsrun.models"):
        move_tensors(value, device, memo)
    return value


HEAD = ("output_norm", "output")  # the model's tensors after its last block; the others feed the first


def place_model(model, layer_devices: list[str]) -> None:
    """Blocks to their planned devices, the output head with the last block and the model's other
    tensors (embeddings, RoPE frequencies: the blocks' inputs) with the first."""
    memo: dict = {}
    first, last = torch.device(layer_devices[0]), torch.device(layer_devices[-1])
    for name, value in list(vars(model).items()):
        if isinstance(value, (torch.Tensor, GGUFMatrix)):
            setattr(model, name, _moved(value, last if name in HEAD else first, memo))
    for i, block in enumerate(model.blocks):
        device = torch.device(layer_devices[i])
        move_tensors(block, device, memo)
        model.blocks[i] = OnDevice(block, device)
