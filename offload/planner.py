"""Placement policy: which device holds each layer's resident tensors, its KV cache, and each routed expert.

Plain Python over byte counts and activation counts, no tensors: unit-tested with made-up sizes. The engine
turns a `Plan` into copies and mmaps; `dsrun plan` prints it.

Devices, fastest first: GPUs ("cuda:N", tier "gpu"), RAM ("cpu", tier "ram"), and the model file itself read
through mmap ("disk", tier "nvme", unbounded). "Resident" means everything but routed experts: embeddings,
attention, norms, dense FFNs, shared experts, routers. Those and the KV cache must sit on a GPU (on RAM when
there is none); routed experts fill what is left, hottest first.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import DsrunError, MemoryBudgetError, ModelFormatError

if TYPE_CHECKING:
    from ..gguf_file import GGUFFile
    from .profile import ActivationProfile

F32_BYTES = 4  # the KV cache is F32, as in the llama.cpp parity reference

# "24G" and "24GiB" are binary (as in `free -g` and docker), "24GB" is decimal
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1} | {
    unit: (1000 if unit.endswith("b") and not unit.endswith("ib") else 1024) ** power
    for power, prefix in enumerate("kmgt", start=1)
    for unit in (prefix, f"{prefix}i", f"{prefix}ib", f"{prefix}b")
}

_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.")
_ROUTED_EXPERT_TENSOR = re.compile(r"^blk\.\d+\.ffn_\w+_exps\.(weight|bias)$")  # (n_expert, ...) stacks


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as "24GiB", "512MiB", "1.5GB", "24G" (binary), "100"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE_RE.match(value) if isinstance(value, str) else None
    if m is None or m[2].lower() not in _SIZE_UNITS:
        raise DsrunError(
            f"cannot read {value!r} as a memory size: give bytes or a number with a unit, "
            "e.g. 24GiB, 512MiB, 1.5GB"
        )
    return int(float(m[1]) * _SIZE_UNITS[m[2].lower()])


def parse_gpu_mem(value: int | str | list, n_gpus: int) -> list[int]:
    """One budget per GPU from one size for all, a list, or a comma-separated string ("24GiB,16GiB")."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    sizes = [parse_size(v) for v in items]
    if len(sizes) == 1:
        return sizes * n_gpus
    if len(sizes) != n_gpus:
        raise DsrunError(f"gpu_mem gives {len(sizes)} sizes for {n_gpus} GPUs: give one size, or one per GPU")
    return sizes


def format_size(n: float) -> str:
    for unit, name in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(n) >= unit:
            return f"{n / unit:.1f} {name}"
    return f"{int(n)} B"


def layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{first}-{last}" if last > first else f"{first}" for first, last in runs)


# --- what a model needs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSizes:
    resident_bytes: int  # every tensor of the layer but the routed experts
    n_experts: int = 0  # routed experts; 0 in a dense layer
    expert_bytes: int = 0  # one routed expert: its share of the layer's *_exps tensors
    kv_bytes_per_token: int = 0


@dataclass(frozen=True)
class ModelSizes:
    name: str
    file_bytes: int
    ctx: int
    layers: tuple[LayerSizes, ...]
    input_bytes: int = 0  # token_embd: one row is read per token
    output_bytes: int = 0  # output projection, final norm and the other global tensors
    tied_embeddings: bool = False  # no output.weight: the logits read the whole token_embd
    experts_used: int = 0  # routed experts each token goes through in each MoE layer (top-k)
    # on each GPU that holds layers, what a forward allocates besides weights and KV cache (a prefill
    # chunk's activations, scratch, staging): a budget is all dsrun allocates there
    workspace_bytes: int = 0

    @property
    def experts_total(self) -> int:
        return sum(layer.n_experts for layer in self.layers)

    @property
    def resident_bytes(self) -> int:
        return self.input_bytes + self.output_bytes + sum(layer.resident_bytes for layer in self.layers)

    @property
    def routed_expert_bytes(self) -> int:
        return sum(layer.n_experts * layer.expert_bytes for layer in self.layers)

    @property
    def kv_cache_bytes(self) -> int:
        return self.ctx * sum(layer.kv_bytes_per_token for layer in self.layers)

    @property
    def head_read_bytes(self) -> int:
        """Bytes the logits read per token."""
        return self.output_bytes + (self.input_bytes if self.tied_embeddings else 0)


def gqa_kv_bytes_per_token(n_head_kv: int, key_length: int, value_length: int, elem_bytes=F32_BYTES) -> int:
    """One layer's K and V rows for one token (llama-like attention, grouped KV heads)."""
    return n_head_kv * (key_length + value_length) * elem_bytes


def mla_kv_bytes_per_token(kv_lora_rank: int, rope_dim: int, elem_bytes=F32_BYTES) -> int:
    """One layer's cache for one token under MLA (deepseek2): the compressed KV row and the rope key."""
    return (kv_lora_rank + rope_dim) * elem_bytes


def kv_bytes_per_token(f: GGUFFile, n_layers: int) -> list[int]:
    """Each layer's KV cache bytes per token, by the architecture's kind of cache."""
    if f.arch == "deepseek2":
        per_layer = mla_kv_bytes_per_token(
            f.require("attention.kv_lora_rank"), f.require("rope.dimension_count")
        )
        return [per_layer] * n_layers
    n_head = f.require("attention.head_count")
    key_length = f.get("attention.key_length", _head_dim(f))
    value_length = f.get("attention.value_length", _head_dim(f))
    heads_kv = _per_layer(f.get("attention.head_count_kv", n_head), n_layers)  # a list on some arches
    return [gqa_kv_bytes_per_token(h, key_length, value_length) for h in heads_kv]


def head_width(f: GGUFFile) -> int:
    """A head's widest row: under MLA the latent and rope parts (the cached row, and the query with k_b
    folded in), else the key length."""
    if f.arch == "deepseek2":
        return int(f.require("attention.kv_lora_rank")) + int(f.require("rope.dimension_count"))
    return int(f.get("attention.key_length", _head_dim(f)))


def _head_dim(f: GGUFFile) -> int:
    return f.require("embedding_length") // _first(f.require("attention.head_count"))


def _per_layer(value: int | list, n_layers: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else [int(value)] * n_layers


def _first(value: int | list) -> int:
    return int(value[0]) if isinstance(value, list) else int(value)


def model_sizes(f: GGUFFile, ctx: int) -> ModelSizes:
    """What each layer holds, from the file's tensor table and metadata; reads no weights."""
    n_layers = int(f.require("block_count"))
    layer_of = {name: int(m[1]) for name in f.tensors if (m := _LAYER_TENSOR.match(name))}
    beyond = [name for name, i in layer_of.items() if i >= n_layers]
    if beyond:
        raise ModelFormatError(f"{f.path.name} has {beyond[0]} but only {n_layers} layers (block_count)")
    resident, n_experts, expert_bytes = [0] * n_layers, [0] * n_layers, [0] * n_layers
    input_bytes = output_bytes = 0
    for name, t in f.tensors.items():
        i = layer_of.get(name)
        if i is None and name.startswith("token_embd."):
            input_bytes += t.nbytes
        elif i is None:
            output_bytes += t.nbytes
        elif _ROUTED_EXPERT_TENSOR.match(name):
            n_experts[i] = t.shape[0]
            expert_bytes[i] += t.nbytes // t.shape[0]
        else:
            resident[i] += t.nbytes
    kv = kv_bytes_per_token(f, n_layers)
    return ModelSizes(
        name=f.path.name,
        file_bytes=f.file_bytes,
        ctx=ctx,
        layers=tuple(LayerSizes(*sizes) for sizes in zip(resident, n_experts, expert_bytes, kv)),
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        tied_embeddings="output.weight" not in f.tensors,
        experts_used=int(f.get("expert_used_count", 0)) if any(n_experts) else 0,
    )


# --- budgets and the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budgets:
    gpus: dict[str, int]  # "cuda:N" -> bytes, in the order layers are split over them
    ram: int


@dataclass
class Tier:
    tier: str  # "gpu" | "ram" | "nvme"
    device: str  # "cuda:N" | "cpu" | "disk"
    budget_bytes: int | None  # None: unbounded (the model file itself)
    layers: list[int] = field(default_factory=list)  # layers whose resident tensors and KV cache live here
    weight_bytes: int = 0  # resident tensors
    kv_bytes: int = 0
    workspace_bytes: int = 0
    experts: int = 0
    expert_bytes: int = 0
    read_bytes_per_token: float = 0.0  # expected bytes a decode step reads here, KV cache full

    @property
    def fixed_bytes(self) -> int:
        """Everything but the routed experts: what their room is the budget less."""
        return self.weight_bytes + self.kv_bytes + self.workspace_bytes

    @property
    def used_bytes(self) -> int:
        return self.fixed_bytes + self.expert_bytes

    @property
    def free_bytes(self) -> float:
        return math.inf if self.budget_bytes is None else self.budget_bytes - self.used_bytes

    def to_json(self) -> dict:
        return {
            "tier": self.tier,
            "device": self.device,
            "budget_bytes": self.budget_bytes,
            "used_bytes": self.used_bytes,
            "experts": self.experts,
            "layers": self.layers,
            "weight_bytes": self.weight_bytes,
            "kv_bytes": self.kv_bytes,
            "workspace_bytes": self.workspace_bytes,
            "expert_bytes": self.expert_bytes,
            "read_bytes_per_token": round(self.read_bytes_per_token),
        }


@dataclass
class Plan:
    """Where everything goes. A Plan always runs; `fits` says whether it runs without reading experts from
    disk (everything in GPU memory and RAM), which is what decode speed hinges on."""

    sizes: ModelSizes
    tiers: list[Tier]  # the GPUs in order, then "cpu", then "disk"
    layer_devices: list[str]  # per layer: where its resident tensors and KV cache live
    expert_devices: dict[tuple[int, int], str]  # (layer, expert) -> device
    notes: list[str] = field(default_factory=list)

    def tier(self, device: str) -> Tier:
        return next(t for t in self.tiers if t.device == device)

    @property
    def nvme_bytes(self) -> int:
        return self.tier("disk").expert_bytes

    @property
    def fits(self) -> bool:
        return self.nvme_bytes == 0

    def to_json(self) -> dict:
        """A JSON-ready dict: the CONTRACT.md `dsrun plan --json` object and more."""
        placement: dict[str, dict[str, list[int]]] = {}
        for (layer, expert), device in sorted(self.expert_devices.items()):
            placement.setdefault(str(layer), {}).setdefault(device, []).append(expert)
        return {
            "model": self.sizes.name,
            "ctx": self.sizes.ctx,
            "fits": self.fits,
            "experts_total": self.sizes.experts_total,
            "experts_used": self.sizes.experts_used,
            "kv_cache_bytes": self.sizes.kv_cache_bytes,
            "resident_bytes": self.sizes.resident_bytes,
            "routed_expert_bytes": self.sizes.routed_expert_bytes,
            "nvme_bytes": self.nvme_bytes,
            "tiers": [t.to_json() for t in self.tiers],
            "placement": placement,  # layer -> device -> expert ids
            "notes": self.notes,
        }


def plan(sizes: ModelSizes, budgets: Budgets, profile: ActivationProfile | None = None) -> Plan:
    """Resident tensors and KV cache on the GPUs (contiguous layer ranges in proportion to their budgets; RAM
    when there is no GPU), then routed experts hottest first into what is left on the GPU that holds their
    layer, then RAM, then the file on disk. Raises MemoryBudgetError when the resident part does not fit."""
    notes: list[str] = []
    shares = activation_shares(sizes, profile, notes)
    tiers = {device: Tier("gpu", device, budget) for device, budget in budgets.gpus.items()}
    tiers["cpu"] = Tier("ram", "cpu", budgets.ram)
    tiers["disk"] = Tier("nvme", "disk", None)
    layer_devices = split_layers(sizes, budgets.gpus)
    hold_resident(sizes, layer_devices, tiers)
    check_resident_fits(sizes, tiers.values())
    expert_devices = place_experts(sizes, expert_order(sizes, shares), layer_devices, tiers)
    count_reads_per_token(sizes, layer_devices, expert_devices, shares, tiers)
    notes += placement_notes(sizes, tiers)
    return Plan(sizes, list(tiers.values()), layer_devices, expert_devices, notes)


def activation_shares(
    sizes: ModelSizes, profile: ActivationProfile | None, notes: list[str]
) -> list[list[float]]:
    """Per layer, per routed expert: the share of the layer's routings it gets (even without a profile)."""
    if profile is not None:
        check_profile(sizes, profile, notes)
    counts = profile.counts if profile is not None else [()] * len(sizes.layers)
    return [_shares(c, layer.n_experts) for c, layer in zip(counts, sizes.layers)]


def _shares(counts: tuple[int, ...], n_experts: int) -> list[float]:
    total = sum(counts)
    return [c / total for c in counts] if total else [1 / n_experts for _ in range(n_experts)]


def check_profile(sizes: ModelSizes, profile: ActivationProfile, notes: list[str]) -> None:
    if len(profile.counts) != len(sizes.layers):
        raise DsrunError(
            f"the activation profile of {profile.model} has {len(profile.counts)} layers but {sizes.name} "
            f"has {len(sizes.layers)}: record a profile on this model"
        )
    for i, (counts, layer) in enumerate(zip(profile.counts, sizes.layers)):
        if len(counts) != layer.n_experts:
            raise DsrunError(
                f"the activation profile of {profile.model} has {len(counts)} experts in layer {i} but "
                f"{sizes.name} has {layer.n_experts}: record a profile on this model"
            )
    if (profile.model, profile.file_bytes) != (sizes.name, sizes.file_bytes):
        # another quant of the same model routes alike, so the profile is still worth using
        notes.append(f"the activation profile was recorded on {profile.model} ({profile.file_bytes} bytes)")


def split_layers(sizes: ModelSizes, gpus: dict[str, int]) -> list[str]:
    """Each layer's device: contiguous ranges, each GPU's share of resident bytes and KV cache in proportion
    to its budget (a layer goes where the middle of its bytes falls); "cpu" for every layer without GPUs."""
    if not gpus:
        return ["cpu"] * len(sizes.layers)
    total_budget = sum(gpus.values()) or 1
    ends = list(itertools.accumulate(budget / total_budget for budget in gpus.values()))
    weights = [layer.resident_bytes + sizes.ctx * layer.kv_bytes_per_token for layer in sizes.layers]
    total = (sizes.input_bytes + sum(weights) + sizes.output_bytes) or 1
    names, devices, before = list(gpus), [], sizes.input_bytes
    for w in weights:
        middle = (before + w / 2) / total
        devices.append(names[next((g for g, end in enumerate(ends) if middle < end), len(names) - 1)])
        before += w
    return devices


def hold_resident(sizes: ModelSizes, layer_devices: list[str], tiers: dict[str, Tier]) -> None:
    """Put each layer's resident tensors and KV cache on its device, the embedding with the first layer and
    the output head with the last."""
    for i, (layer, device) in enumerate(zip(sizes.layers, layer_devices)):
        tiers[device].layers.append(i)
        tiers[device].weight_bytes += layer.resident_bytes
        tiers[device].kv_bytes += sizes.ctx * layer.kv_bytes_per_token
    tiers[layer_devices[0]].weight_bytes += sizes.input_bytes
    tiers[layer_devices[-1]].weight_bytes += sizes.output_bytes
    for device in set(layer_devices):
        if tiers[device].tier == "gpu":
            tiers[device].workspace_bytes = sizes.workspace_bytes


def check_resident_fits(sizes: ModelSizes, tiers) -> None:
    short = [t for t in tiers if t.free_bytes < 0]
    if short:
        problems = [
            f"{t.device} needs {format_size(t.used_bytes)} for the non-expert tensors of layers "
            f"{layer_ranges(t.layers)} ({format_size(t.weight_bytes)}) and their KV cache at ctx {sizes.ctx} "
            f"({format_size(t.kv_bytes)})"
            + (f" and a forward's workspace ({format_size(t.workspace_bytes)})" if t.workspace_bytes else "")
            + f" but its budget is {format_size(t.budget_bytes)}: "
            f"{format_size(-t.free_bytes)} short"
            for t in short
        ]
        raise MemoryBudgetError(
            "; ".join(problems) + ". Raise the budget (--gpu-mem, --ram), lower the context (--ctx), "
            "or spread the layers over more GPUs."
        )


def expert_order(sizes: ModelSizes, shares: list[list[float]]) -> list[tuple[int, int]]:
    """(layer, expert) hottest first; ties (all of them without a profile) in round-robin order over the
    layers, so a partial fill spreads evenly."""
    moe = [i for i, layer in enumerate(sizes.layers) if layer.n_experts]
    widest = max((sizes.layers[i].n_experts for i in moe), default=0)
    round_robin = [(i, e) for e in range(widest) for i in moe if e < sizes.layers[i].n_experts]
    return sorted(round_robin, key=lambda le: -shares[le[0]][le[1]])  # stable: ties keep round-robin order


def place_experts(
    sizes: ModelSizes, order: list[tuple[int, int]], layer_devices: list[str], tiers: dict[str, Tier]
) -> dict[tuple[int, int], str]:
    """Each expert on its layer's GPU if there is room (no GPU-to-GPU hop mid-layer), else RAM, else disk."""
    placed = {}
    for layer, expert in order:
        nbytes = sizes.layers[layer].expert_bytes
        candidates = dict.fromkeys((layer_devices[layer], "cpu"))  # one entry when the layer is on "cpu"
        device = next((d for d in candidates if tiers[d].free_bytes >= nbytes), "disk")
        tiers[device].experts += 1
        tiers[device].expert_bytes += nbytes
        placed[(layer, expert)] = device
    return placed


def count_reads_per_token(
    sizes: ModelSizes,
    layer_devices: list[str],
    expert_devices: dict[tuple[int, int], str],
    shares: list[list[float]],
    tiers: dict[str, Tier],
) -> None:
    """Expected bytes one decode step reads per device: all resident weights, the whole KV cache (its size
    at the end of the context), and each expert weighted by how often it is routed to."""
    for layer, device in zip(sizes.layers, layer_devices):
        tiers[device].read_bytes_per_token += layer.resident_bytes + sizes.ctx * layer.kv_bytes_per_token
    tiers[layer_devices[-1]].read_bytes_per_token += sizes.head_read_bytes
    for (layer, expert), device in expert_devices.items():
        routed = sizes.experts_used * shares[layer][expert]
        tiers[device].read_bytes_per_token += routed * sizes.layers[layer].expert_bytes


def placement_notes(sizes: ModelSizes, tiers: dict[str, Tier]) -> list[str]:
    notes = []
    disk = tiers["disk"]
    if disk.experts:
        notes.append(
            f"{disk.experts} of {sizes.experts_total} routed experts ({format_size(disk.expert_bytes)}) "
            "do not fit GPU memory and RAM: they are read from the model file on disk through mmap, and "
            f"decode reads about {format_size(disk.read_bytes_per_token)} per token from the disk"
        )
    idle = [t.device for t in tiers.values() if t.tier == "gpu" and not t.layers]
    if idle:
        notes.append(f"{', '.join(idle)} got no layer: its budget is too small a share of the total")
    return notes


# --- speed ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bandwidths:
    """Read bandwidth per tier in bytes/s: typical defaults; `dsrun doctor` measures this machine's."""

    gpu: float = 1.0e12  # a 4090-class card's own memory
    ram: float = 40e9  # dual-channel DDR5
    nvme: float = 3e9  # a PCIe 4 NVMe drive, sequential


@dataclass(frozen=True)
class DecodeCosts:
    """What a decode step costs besides streaming its bytes at full bandwidth, measured on a machine by
    `dsrun doctor -m MODEL` (runtime/doctor.py). An efficiency is the share of its tier's bandwidth that
    the kernel reading those bytes reaches (its marginal rate: the kernel's fixed cost per call is in the
    layer costs). The defaults, no loss and no fixed cost, give the memory-traffic upper bound."""

    cpu_weights: float = 1.0  # dense weights in RAM: ggml's mat-vec over their GGUF blocks
    cpu_experts: float = 1.0  # routed experts in RAM: the CPU expert backend
    cpu_kv: float = 1.0  # the F32 KV cache in RAM: attention
    gpu_weights: float = 1.0  # dense weights in GPU memory
    gpu_experts: float = 1.0  # routed experts in GPU slots
    gpu_kv: float = 1.0  # the KV cache in GPU memory
    dense_layer_s: float = 0.0  # fixed seconds of a layer without routed experts: dispatch, per-call costs
    moe_layer_s: float = 0.0  # of a layer with routed experts: also routing, expert calls, device syncs
    token_s: float = 0.0  # per step besides the layers: embedding, the head's call, bookkeeping

    def efficiency(self, tier: str, kind: str) -> float:
        """kind: "weights" | "kv" | "experts"; tier: "gpu" | "ram" | "nvme"."""
        if tier in ("gpu", "ram"):
            return getattr(self, f"{'cpu' if tier == 'ram' else 'gpu'}_{kind}")
        return 1.0  # the disk: its read rate is the bound


UPPER_BOUND = DecodeCosts()


@dataclass(frozen=True)
class DecodeTime:
    """Seconds of one decode step by what they are spent on."""

    weights_s: float  # non-expert weights, the head included
    kv_s: float
    experts_s: float
    layers_s: float  # fixed costs of the layers
    token_s: float

    @property
    def total_s(self) -> float:
        return self.weights_s + self.kv_s + self.experts_s + self.layers_s + self.token_s

    @property
    def tokens_per_s(self) -> float:
        return 1 / self.total_s if self.total_s else math.inf

    def to_json(self) -> dict:
        parts = ("weights_s", "kv_s", "experts_s", "layers_s", "token_s", "total_s")
        return {k: round(getattr(self, k), 6) for k in parts} | {"tokens_per_s": round(self.tokens_per_s, 2)}


def decode_time(
    plan: Plan,
    bandwidths: Bandwidths,
    costs: DecodeCosts = UPPER_BOUND,
    *,
    context_tokens: int | None = None,
) -> DecodeTime:
    """One decode step with `context_tokens` in the KV cache (default: the context full):

        sum over tiers and kinds (weights, KV cache, experts) of bytes / (bandwidth * efficiency)
        + dense layers * dense_layer_s + MoE layers * moe_layer_s + token_s

    Bytes are what the plan counts (the GGUF's tensor bytes, experts weighted by how often they are
    routed to); devices run one after another, as layers do."""
    sizes = plan.sizes
    n = sizes.ctx if context_tokens is None else context_tokens
    weights, kv = dict.fromkeys(plan.layer_devices, 0.0), dict.fromkeys(plan.layer_devices, 0.0)
    for layer, device in zip(sizes.layers, plan.layer_devices):
        weights[device] += layer.resident_bytes
        kv[device] += n * layer.kv_bytes_per_token
    weights[plan.layer_devices[-1]] += sizes.head_read_bytes
    seconds = {"weights": 0.0, "kv": 0.0, "experts": 0.0}
    for t in plan.tiers:
        # the plan counts the KV cache full: what is left of its total after weights and cache are experts
        full_kv = sizes.ctx * sum(
            layer.kv_bytes_per_token for layer, d in zip(sizes.layers, plan.layer_devices) if d == t.device
        )
        read = {
            "weights": weights.get(t.device, 0.0),
            "kv": kv.get(t.device, 0.0),
            "experts": max(0.0, t.read_bytes_per_token - weights.get(t.device, 0.0) - full_kv),
        }
        for kind, nbytes in read.items():
            if nbytes:
                seconds[kind] += nbytes / (getattr(bandwidths, t.tier) * costs.efficiency(t.tier, kind))
    n_moe = sum(1 for layer in sizes.layers if layer.n_experts)
    layers_s = (len(sizes.layers) - n_moe) * costs.dense_layer_s + n_moe * costs.moe_layer_s
    return DecodeTime(seconds["weights"], seconds["kv"], seconds["experts"], layers_s, costs.token_s)


def decode_tokens_per_s(
    plan: Plan,
    bandwidths: Bandwidths,
    costs: DecodeCosts = UPPER_BOUND,
    *,
    context_tokens: int | None = None,
) -> float:
    """Decode tokens/s: with measured costs the expected speed, without them the upper bound from memory
    traffic alone (each device's bytes per token at its tier's bandwidth, compute and latency ignored)."""
    return decode_time(plan, bandwidths, costs, context_tokens=context_tokens).tokens_per_s
