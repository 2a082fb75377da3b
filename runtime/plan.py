"""`dsrun plan`: where every tensor and expert would go and the memory it needs, without loading weights.

Also where user settings and the machine meet the planner: budgets from flags, or from what the machine has
(`resolve_budgets`), and `plan_model`, shared with the engine and `dsrun doctor`.
"""

from __future__ import annotations

import argparse
import dataclasses

import psutil
from rich import box
from rich.console import Console
from rich.table import Table

from .cli import add_model_arguments, print_json
from .engine import resolve_model
from .errors import DsrunError, InvalidRequestError
from .gguf_file import GGUFFile
from .offload.planner import (
    Bandwidths,
    Budgets,
    Plan,
    decode_tokens_per_s,
    format_size,
    layer_ranges,
    model_sizes,
    parse_gpu_mem,
    parse_size,
    plan,
)
from .offload.profile import read_profile

GIB = 1 << 30


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
    given = {"gpu": args.gpu_bw, "ram": args.ram_bw, "nvme": args.disk_bw}
    bandwidths = Bandwidths(**{tier: parse_size(v) for tier, v in given.items() if v is not None})
    if args.json:
        print_json(
            p.to_json()
            | {
                "decode_tokens_per_s": round(decode_tokens_per_s(p, bandwidths), 2),
                "bandwidths": dataclasses.asdict(bandwidths),
            }
        )
    else:
        print_plan(p, bandwidths)
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
    return plan(model_sizes(f, ctx), resolve_budgets(gpus, gpu_mem, ram), profile)


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


def print_plan(p: Plan, bandwidths: Bandwidths, console: Console | None = None) -> None:
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
    tps = decode_tokens_per_s(p, bandwidths)
    console.print(
        f"expected decode: at most {tps:.1f} tokens/s from memory traffic alone with the KV cache full "
        f"(GPU {format_rate(bandwidths.gpu)}, RAM {format_rate(bandwidths.ram)}, "
        f"disk {format_rate(bandwidths.nvme)})"
    )
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
