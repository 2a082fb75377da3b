"""`dsrun plan`: where every tensor and expert would go and the memory it needs, without loading weights.

Also where user settings and the machine meet the planner: budgets from flags, or from what the machine has
(`resolve_budgets`), and `plan_model`, shared with the engine and `dsrun doctor`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path

import psutil
from rich import box
from rich.console import Console
from rich.table import Table

from .cli import add_model_arguments, print_json
from .engine import PREFILL_CHUNK, resolve_model
from .errors import DsrunError, InvalidRequestError
from .gguf_file import GGUFFile
from .offload.planner import (
    Bandwidths,
    Budgets,
    DecodeCosts,
    ModelSizes,
    Plan,
    decode_time,
    format_size,
    head_width,
    layer_ranges,
    model_sizes,
    parse_gpu_mem,
    parse_size,
    plan,
)
from .offload.profile import read_profile

GIB = 1 << 30
COSTS_FILE = "decode-costs.json"  # in the cache dir: what `dsrun doctor -m` measured, per model and setting


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    for tier, typical in (("gpu", "1TB"), ("ram", "40GB"), ("disk", "3GB")):
        p.add_argument(
            f"--{tier}-bw",
            metavar="SIZE",
            default=None,
            help=f"{tier} read bandwidth per second for the speed estimate (default {typical}; "
            "dsrun doctor measures it)",
        )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    p = plan_model(
        args.model, ctx=args.ctx, gpus=args.gpus, gpu_mem=args.gpu_mem, ram=args.ram, placement=args.placement
    )
    remembered = remembered_costs(resolve_model(args.model), p, args.threads)
    measured_bw, costs = remembered if remembered else (Bandwidths(), None)
    given = {"gpu": args.gpu_bw, "ram": args.ram_bw, "nvme": args.disk_bw}
    bandwidths = dataclasses.replace(
        measured_bw, **{tier: parse_size(v) for tier, v in given.items() if v is not None}
    )
    if args.json:
        print_json(p.to_json() | decode_json(p, bandwidths, costs))
    else:
        print_plan(p, bandwidths, costs=costs)
    return 0


def plan_model(model, *, ctx=4096, gpus="auto", gpu_mem=None, ram=None, placement=None) -> Plan:
    """Plan a model (path or name) from its GGUF metadata alone."""
    f = GGUFFile(resolve_model(model))
    try:
        return plan_file(f, ctx=ctx, gpus=gpus, gpu_mem=gpu_mem, ram=ram, placement=placement)
    finally:
        f.close()


def plan_file(f: GGUFFile, *, ctx=4096, gpus="auto", gpu_mem=None, ram=None, placement=None) -> Plan:
    """Plan an open GGUF (the engine plans the file it has already opened)."""
    if not isinstance(ctx, int) or ctx < 1:
        raise InvalidRequestError(f"ctx must be a positive number of tokens, not {ctx!r}")
    profile = read_profile(placement) if placement else None
    sizes = model_sizes(f, ctx)
    sizes = dataclasses.replace(sizes, workspace_bytes=gpu_workspace_bytes(f, sizes))
    return plan(sizes, resolve_budgets(gpus, gpu_mem, ram), profile)


def gpu_workspace_bytes(f: GGUFFile, sizes: ModelSizes) -> int:
    """What a GPU holding layers allocates besides weights and KV cache, at most: a block of a prefill
    chunk's attention over the whole context (SDPA's math path holds a mask, an additive mask, scores and
    their softmax: 16 bytes a score; models.base.SCORES_BYTES bounds the block), the chunk's activations
    (eight float32 tensors of every head's widest row: queries, latents, outputs), the dequantize scratch
    of a layer's largest quantized matrix in float32 and bf16, and the two staging pools that stream cold
    experts in. Not in it: the CUDA context (~0.5 GiB), and the logits of every row of a chunk
    (`Engine.logits`; generation takes one row's). Measured on the H100: docs/benchmarks.md."""
    from .models.base import query_rows
    from .models.gguf_matrix import FLOAT_TYPES
    from .offload.device_slots import STAGE_BYTES
    from .offload.gpu_quant import MAX_SCRATCH_BYTES

    n_head = max(as_list(f.require("attention.head_count")))
    rows = min(PREFILL_CHUNK, sizes.ctx, query_rows(n_head, sizes.ctx))  # a block of them at a time
    quantized = [  # the layers' own: the head multiplies one row a generated token (many only in logits())
        t
        for name, t in f.tensors.items()
        if name.startswith("blk.") and len(t.shape) == 2 and t.qtype not in FLOAT_TYPES
    ]
    scratch = min(MAX_SCRATCH_BYTES, 4 * max((math.prod(t.shape) for t in quantized), default=0))
    layer_experts = max((layer.n_experts * layer.expert_bytes for layer in sizes.layers), default=0)
    staging = 2 * min(STAGE_BYTES, layer_experts)
    chunk = min(PREFILL_CHUNK, sizes.ctx)
    activations = 8 * chunk * n_head * head_width(f) * 4  # (T, H, widest) float32 tensors
    return 16 * rows * sizes.ctx * n_head + activations + 2 * scratch + staging


def as_list(value: int | list) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def resolve_budgets(gpus="auto", gpu_mem=None, ram=None) -> Budgets:
    """Budgets from the settings; what is not given comes from the free memory of this machine."""
    ids = parse_gpus(gpus)
    gpu_budgets = (
        parse_gpu_mem(gpu_mem, len(ids)) if gpu_mem is not None else [default_gpu_budget(i) for i in ids]
    )
    ram_budget = parse_size(ram) if ram is not None else default_ram_budget()
    return Budgets({f"cuda:{i}": b for i, b in zip(ids, gpu_budgets)}, ram_budget)


def parse_gpus(spec) -> list[int]:
    """GPU ids from "auto" (every GPU here), "none", a count ("2": cuda:0 and cuda:1), ids ("0,1"; "1," is
    cuda:1 alone), or a list of ids."""
    if spec is None or spec == "auto":
        return list(range(cuda_device_count()))
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        return list(range(int(spec)))
    if isinstance(spec, str) and spec.strip().lower() == "none":
        return []
    items = [i for i in spec.split(",") if i.strip()] if isinstance(spec, str) else list(spec)
    try:
        ids = [int(i) for i in items]
    except (TypeError, ValueError):
        ids = []
    if len(ids) != len(items) or min(ids, default=0) < 0 or len(set(ids)) != len(ids):
        raise DsrunError(
            f"cannot read {spec!r} as GPUs: give auto, none, a count such as 2, or ids such as 0,1"
        )
    return ids


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def with_headroom(available: int, total: int) -> int:
    """Leave max(1 GiB, 10 %) for what a plan does not count: the CUDA context and activations on a GPU; the
    OS, other processes and the page cache of mmap-served experts in RAM."""
    return max(0, available - max(GIB, total // 10))


def default_gpu_budget(index: int) -> int:
    import torch

    count = cuda_device_count()
    if index >= count:
        raise DsrunError(
            f"cuda:{index} is not on this machine (it has {count} GPUs): give a GPU memory budget "
            "(--gpu-mem, gpu_mem=) to plan for GPUs it does not have"
        )
    free, total = torch.cuda.mem_get_info(index)
    return with_headroom(free, total)


def default_ram_budget() -> int:
    vm = psutil.virtual_memory()
    return with_headroom(vm.available, vm.total)


def format_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e9:.1f} GB/s"


def print_plan(
    p: Plan, bandwidths: Bandwidths, console: Console | None = None, costs: DecodeCosts | None = None
) -> None:
    console = console or Console()
    console.print(model_needs(p))
    console.print(placement_table(p))
    if p.fits:
        console.print("[green]fits[/]: everything is held in GPU memory and RAM")
    else:
        console.print(
            f"[yellow]does not fit GPU memory and RAM[/]: {format_size(p.nvme_bytes)} of experts "
            "will be read from the model file on disk"
        )
    console.print(decode_line(p, bandwidths, costs))
    for note in p.notes:
        console.print(f"note: {note}")


def model_needs(p: Plan) -> str:
    s = p.sizes
    experts = (
        f"{s.experts_total} routed experts ({format_size(s.routed_expert_bytes)}, {s.experts_used} per token "
        "and layer)"
        if s.experts_total
        else "no routed experts"
    )
    return (
        f"[bold]{s.name}[/] at ctx {s.ctx} needs {format_size(s.resident_bytes)} of non-expert tensors, "
        f"{format_size(s.kv_cache_bytes)} of KV cache, {experts}"
    )


def placement_table(p: Plan) -> Table:
    table = Table(
        "device",
        "layers",
        "weights",
        "KV cache",
        "experts",
        "used",
        "budget",
        "read/token",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for column in table.columns[2:]:
        column.justify, column.no_wrap = "right", True
    for t in p.tiers:
        table.add_row(
            t.device,
            layer_ranges(t.layers) or "-",
            format_size(t.weight_bytes),
            format_size(t.kv_bytes),
            str(t.experts),
            format_size(t.used_bytes),
            "file" if t.budget_bytes is None else format_size(t.budget_bytes),
            format_size(t.read_bytes_per_token),
        )
    return table


# --- decode speed: the upper bound, and the speed expected from what `dsrun doctor -m` measured ----------


def decode_line(
    p: Plan, bandwidths: Bandwidths, costs: DecodeCosts | None, context_tokens: int | None = None
) -> str:
    bound = decode_time(p, bandwidths, context_tokens=context_tokens)
    where = ", ".join(
        f"{name} {format_rate(bw)}"
        for name, bw in (("GPU", bandwidths.gpu), ("RAM", bandwidths.ram), ("disk", bandwidths.nvme))
    )
    cache = "the KV cache full" if context_tokens is None else f"{context_tokens} tokens cached"
    if costs is None:
        return (
            f"expected decode: at most {bound.tokens_per_s:.1f} tokens/s from memory traffic alone with "
            f"{cache} ({where}); `dsrun doctor -m MODEL` measures what this machine reaches"
        )
    t = decode_time(p, bandwidths, costs, context_tokens=context_tokens)
    ms = {k: 1e3 * v for k, v in dataclasses.asdict(t).items()}
    return (
        f"expected decode ≈ {t.tokens_per_s:.1f} tok/s (at most {bound.tokens_per_s:.1f}) "
        f"with {cache}: per token {ms['weights_s']:.1f} ms weights, {ms['kv_s']:.1f} ms KV cache, "
        f"{ms['experts_s']:.1f} ms experts, "
        f"{ms['layers_s'] + ms['token_s']:.1f} ms fixed costs of the layers and step ({where})"
    )


def decode_json(
    p: Plan, bandwidths: Bandwidths, costs: DecodeCosts | None, context_tokens: int | None = None
) -> dict:
    expected = None if costs is None else decode_time(p, bandwidths, costs, context_tokens=context_tokens)
    return {
        "decode_expected_tokens_per_s": None if expected is None else round(expected.tokens_per_s, 2),
        "decode_at_most_tokens_per_s": round(
            decode_time(p, bandwidths, context_tokens=context_tokens).tokens_per_s, 2
        ),
        "decode_seconds": None if expected is None else expected.to_json(),
        "decode_costs": None if costs is None else dataclasses.asdict(costs),
        "bandwidths": dataclasses.asdict(bandwidths),
    }


def costs_key(path: Path, p: Plan, threads: int | None) -> str:
    """Measured costs hold for one model file, context, thread count, and layers on the CPU or on GPUs."""
    from .engine import default_threads
    from .offload.shards import model_key

    where = "gpu" if any(d.startswith("cuda") for d in p.layer_devices) else "cpu"
    return f"{model_key(path)}/ctx{p.sizes.ctx}/t{threads or default_threads()}/{where}"


def remember_costs(
    path: Path, p: Plan, threads: int | None, bandwidths: Bandwidths, costs: DecodeCosts, details: dict
) -> None:
    from .offload.shards import cache_root

    file = cache_root() / COSTS_FILE
    try:
        saved = json.loads(file.read_text())
    except (OSError, ValueError):
        saved = {}
    saved[costs_key(path, p, threads)] = {
        "model": path.name,
        "bandwidths": dataclasses.asdict(bandwidths),
        "costs": dataclasses.asdict(costs),
        "details": details,
    }
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(saved, indent=1, sort_keys=True, default=str))
    os.replace(tmp, file)


def remembered_costs(path: Path, p: Plan, threads: int | None) -> tuple[Bandwidths, DecodeCosts] | None:
    """The bandwidths and costs `dsrun doctor -m` measured for this model and setting, if it has."""
    from .offload.shards import cache_root

    try:
        saved = json.loads((cache_root() / COSTS_FILE).read_text())[costs_key(path, p, threads)]
        return Bandwidths(**saved["bandwidths"]), DecodeCosts(**saved["costs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
