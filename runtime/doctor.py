"""`dsrun doctor`: what this machine has (CPU features, cores, RAM and its bandwidth, GPUs, disk, backends)
and, with -m, how a model would run on it.

The measurements (`memory_read_bandwidth`, `host_to_device_bandwidth`, `gpu_memory_bandwidth`,
`disk_read_bandwidth`) return bytes/s, best of a few repetitions, and are reused by the bench.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import math
import mmap
import os
import platform
import re
import shutil
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from rich import box
from rich.console import Console
from rich.table import Table

from .cli import print_json
from .engine import resolve_model
from .errors import DsrunError
from .gguf_file import GGUFFile
from .offload.planner import Bandwidths, DecodeCosts, Plan, format_size
from .plan import decode_json, format_rate, plan_model, print_plan, remember_costs

# /proc/cpuinfo names of the features the CPU expert kernels care about
CPU_FLAGS = "avx2 avx512f avx512bw avx512_vnni avx_vnni avx512_bf16 amx_tile amx_bf16 amx_int8".split()
NODE_ROOT = Path("/sys/devices/system/node")
DISK_SAMPLE_BYTES = 1 << 30  # read at most this much of the model file
MIN_DISK_SAMPLE_BYTES = 64 << 20  # a smaller read times the disk's latency more than its sequential rate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m",
        "--model",
        default=None,
        help="also plan this model (GGUF path or name) on this machine with the measured speeds",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    report = collect(args.model)
    bandwidths = measured_bandwidths(report)
    p, problem, costs = None, None, None
    if args.model is not None:
        try:
            p = plan_model(args.model)
        except DsrunError as e:  # a model that cannot run here is a finding, not a doctor failure
            problem = str(e)
        details = None
        if p is not None:
            costs, details = expected_costs(args.model, p, bandwidths)
        report["plan"] = plan_verdict(args.model, p, problem, bandwidths, costs, details)
    if args.json:
        print_json(report)
        return 0
    console = Console()
    print_report(report, console)
    if p is not None:
        print_plan(p, bandwidths, console, costs=costs)
        if costs is None:
            console.print(f"[yellow]the expected speed was not measured[/]: {details['error']}")
    elif problem is not None:
        console.print(f"[red]{args.model} cannot run here[/]: {problem}")
    return 0


def expected_costs(model: str, p: Plan, bandwidths: Bandwidths) -> tuple[DecodeCosts | None, dict]:
    """decode_costs for the model, remembered for `dsrun plan`; a failure is reported, never fatal."""
    path = resolve_model(model)
    try:
        costs, details = decode_costs(path, p, bandwidths)
    except Exception as e:  # a backend that breaks on this machine is a finding, not a doctor failure
        return None, {"error": f"{type(e).__name__}: {e}"}
    remember_costs(path, p, None, bandwidths, costs, details)
    return costs, details


def collect(model: str | None = None) -> dict:
    """What this machine has; the disk measured is the one holding `model` (the default model without)."""
    return {
        "cpu": cpu_info(),
        "memory": memory_info(),
        "gpus": gpu_info(),
        "disk": disk_info(model),
        "backends": backend_versions(),
    }


# --- CPU and RAM ------------------------------------------------------------------------------------------


def cpu_info() -> dict:
    fields = cpuinfo_fields()
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "usable_cores": usable_cores(),
        "flags": {flag: flag in flags for flag in CPU_FLAGS},
        "numa_nodes": numa_nodes(),
    }


def cpuinfo_fields(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's `key: value` lines; empty where there is no /proc/cpuinfo."""
    try:
        first = Path(path).read_text().split("\n\n")[0]
    except OSError:
        return {}
    return {
        key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())
    }


def usable_cores() -> int:
    """Cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def numa_nodes(root: Path = NODE_ROOT) -> list[dict]:
    nodes = sorted(root.glob("node[0-9]*"), key=lambda d: int(d.name[4:]))
    return [
        {"node": int(d.name[4:]), "cpus": _read(d / "cpulist"), "memory_bytes": _node_memory(d)}
        for d in nodes
    ]


def _node_memory(node: Path) -> int | None:
    m = re.search(r"MemTotal:\s+(\d+) kB", _read(node / "meminfo") or "")
    return int(m[1]) * 1024 if m else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def memory_info() -> dict:
    vm = psutil.virtual_memory()
    return {
        "total_bytes": vm.total,
        "available_bytes": vm.available,
        "read_bandwidth": memory_read_bandwidth(),
    }


def memory_read_bandwidth(nbytes: int = 512 << 20, reps: int = 5) -> float:
    """Bytes/s summing a buffer far larger than the caches, one slice per usable core (one core alone cannot
    saturate the memory controllers)."""
    buf = mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)  # fewer page faults: filling the buffer takes half the time
    data = np.frombuffer(buf, dtype=np.float64)
    data.fill(1.0)  # touch every page, or reads would all hit the one shared zero page
    slices = np.array_split(data, usable_cores())
    with ThreadPoolExecutor(len(slices)) as pool:  # numpy sums release the GIL
        return best_rate(lambda: list(pool.map(np.sum, slices)), nbytes, reps)


def best_rate(step, nbytes: int, reps: int) -> float:
    """nbytes / the fastest of `reps` timed calls of step(), after one untimed warm-up call."""
    step()
    fastest = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        step()
        fastest = min(fastest, time.perf_counter() - start)
    return nbytes / fastest


# --- GPUs -------------------------------------------------------------------------------------------------


def gpu_info() -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [describe_gpu(i) for i in range(torch.cuda.device_count())]


def describe_gpu(index: int) -> dict:
    import torch

    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    device = f"cuda:{index}"
    return {
        "device": device,
        "name": props.name,
        "memory_bytes": total,
        "free_bytes": free,
        "compute_capability": f"{props.major}.{props.minor}",
        "pcie": pcie_link(index, props),
        "host_to_device_bandwidth": host_to_device_bandwidth(device),
        "memory_bandwidth": gpu_memory_bandwidth(device),
    }


def pcie_link(index: int, props) -> str | None:
    """The GPU's PCIe link now and at most ("32.0 GT/s PCIe x16, max ..."), from sysfs, else nvidia-smi."""
    if hasattr(props, "pci_bus_id"):
        sysfs = Path(
            f"/sys/bus/pci/devices/{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:"
            f"{props.pci_device_id:02x}.0"
        )
        link = [
            _read(sysfs / f"{kind}_link_{what}") for kind in ("current", "max") for what in ("speed", "width")
        ]
        if all(link):
            return "{} x{}, max {} x{}".format(*link)
    query = "pcie.link.gen.current,pcie.link.width.current,pcie.link.gen.max,pcie.link.width.max"
    try:
        out = subprocess.run(
            ["nvidia-smi", "-i", str(index), f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    link = [v.strip() for v in out.split(",")]
    return "Gen{} x{}, max Gen{} x{}".format(*link) if len(link) == 4 else None


def host_to_device_bandwidth(device: str = "cuda:0", nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Bytes/s copying pinned host memory to the GPU: the rate experts can be uploaded at."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def upload():
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)

    return best_rate(upload, nbytes, reps)


def gpu_memory_bandwidth(device: str = "cuda:0", nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Bytes/s of the GPU's own memory: a device-to-device copy reads and writes every byte once."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        torch.cuda.synchronize(device)

    return best_rate(copy, 2 * nbytes, reps)


# --- disk -------------------------------------------------------------------------------------------------


def disk_info(model: str | None) -> dict:
    """Free space and read speed where the model lives (the default model's folder without one)."""
    try:
        path = resolve_model(model or "default")
    except DsrunError as e:
        return {"error": str(e)}
    usage = shutil.disk_usage(path.parent)
    return {
        "path": str(path.parent),
        "free_bytes": usage.free,
        "total_bytes": usage.total,
        "read_file": str(path),
        "read_bytes": min(path.stat().st_size, DISK_SAMPLE_BYTES),
        "read_bandwidth": disk_read_bandwidth(path, DISK_SAMPLE_BYTES),
        "page_cache_dropped": hasattr(os, "posix_fadvise"),
    }


def disk_read_bandwidth(
    path: str | Path, max_bytes: int = DISK_SAMPLE_BYTES, max_seconds: float = 1.0
) -> float:
    """Bytes/s reading a file from its start in 8 MiB blocks. Its cached pages are dropped first
    (posix_fadvise DONTNEED) so the page cache does not answer for the disk; but the kernel keeps pages that
    another process has mapped (a model being served): a rate near RAM bandwidth means the cache answered."""
    block = bytearray(8 << 20)
    done = 0
    with open(path, "rb", buffering=0) as fh:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        while done < max_bytes and time.perf_counter() - start < max_seconds:
            n = fh.readinto(block)
            if not n:
                break
            done += n
        elapsed = time.perf_counter() - start
    return done / elapsed if elapsed > 0 else 0.0


# --- backends ---------------------------------------------------------------------------------------------

BACKEND_DETAILS = {
    "torch": lambda torch: {"cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()},
    "onnxruntime": lambda ort: {"providers": ort.get_available_providers()},
    "openvino": lambda ov: {},
    "llama_cpp": lambda llama_cpp: {},
}


def backend_versions() -> dict[str, dict]:
    """Each backend's version and details, or why it cannot be imported."""
    report = {}
    for name, details in BACKEND_DETAILS.items():
        try:
            module = importlib.import_module(name)
        except Exception as e:  # absent, or built for another CPU or CUDA: report it, never fail the doctor
            report[name] = {"available": False, "error": f"{type(e).__name__}: {e}"}
            continue
        report[name] = {"available": True, "version": getattr(module, "__version__", None), **details(module)}
    return report


# --- a model on this machine ------------------------------------------------------------------------------


def measured_bandwidths(report: dict) -> Bandwidths:
    """The planner's tier bandwidths from what was measured here (the slowest GPU); defaults for the rest
    and for a disk timed on too small a file."""
    disk = report["disk"]
    measured = {
        "gpu": min((g["memory_bandwidth"] for g in report["gpus"]), default=None),
        "ram": report["memory"]["read_bandwidth"],
        "nvme": disk["read_bandwidth"] if disk.get("read_bytes", 0) >= MIN_DISK_SAMPLE_BYTES else None,
    }
    return Bandwidths(**{tier: bw for tier, bw in measured.items() if bw})


def plan_verdict(
    model: str,
    p: Plan | None,
    problem: str | None,
    bandwidths: Bandwidths,
    costs: DecodeCosts | None = None,
    details: dict | None = None,
) -> dict:
    """The model's plan on this machine's free memory (without the per-expert placement), its decode speed
    at the measured bandwidths (at most, and expected from the measured costs), or why it cannot run."""
    if p is None:
        return {"model": model, "fits": False, "error": problem}
    verdict = {key: value for key, value in p.to_json().items() if key != "placement"}
    return verdict | decode_json(p, bandwidths, costs) | {"decode_measurements": details}


def plan_bandwidths(p: Plan, path: Path) -> Bandwidths:
    """The tier bandwidths a plan uses, measured (RAM always; the GPUs holding layers, the slowest; the disk
    when experts are read from it); defaults for the rest."""
    measured = {"ram": memory_read_bandwidth()}
    gpus = {d for d in p.layer_devices if d.startswith("cuda")}
    if gpus:
        measured["gpu"] = min(gpu_memory_bandwidth(d) for d in gpus)
    if p.tier("disk").experts:
        measured["nvme"] = disk_read_bandwidth(path)
    return Bandwidths(**measured)


# --- human output -----------------------------------------------------------------------------------------


def print_report(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(show_header=False, box=box.SIMPLE, pad_edge=False)
    for label, value in report_rows(report):
        table.add_row(f"[bold]{label}[/]", value)
    console.print(table)


def report_rows(report: dict) -> list[tuple[str, str]]:
    cpu, mem, disk = report["cpu"], report["memory"], report["disk"]
    have = [flag for flag, present in cpu["flags"].items() if present]
    lack = [flag for flag, present in cpu["flags"].items() if not present]
    rows = [
        ("CPU", cpu["model"]),
        (
            "cores",
            f"{cpu['physical_cores']} physical, {cpu['logical_cores']} logical, "
            f"{cpu['usable_cores']} usable by this process",
        ),
        ("features", " ".join(have) + (f"  [dim](no {' '.join(lack)})[/]" if lack else "")),
        (
            "NUMA",
            ", ".join(f"node {n['node']}: cpus {n['cpus']}" for n in cpu["numa_nodes"]) or "not reported",
        ),
        (
            "RAM",
            f"{format_size(mem['total_bytes'])} total, {format_size(mem['available_bytes'])} available, "
            f"reads at {format_rate(mem['read_bandwidth'])}",
        ),
    ]
    rows += [
        (
            g["device"],
            f"{g['name']}, {format_size(g['memory_bytes'])} ({format_size(g['free_bytes'])} free), "
            f"compute {g['compute_capability']}, PCIe {g['pcie'] or 'unknown'}, host→GPU "
            f"{format_rate(g['host_to_device_bandwidth'])} pinned, memory "
            f"{format_rate(g['memory_bandwidth'])}",
        )
        for g in report["gpus"]
    ] or [("GPUs", "none usable by torch")]
    rows.append(("disk", disk_summary(disk)))
    for name, b in report["backends"].items():
        extra = f" (CUDA {b['cuda']})" if b.get("cuda") else ""
        rows.append((name, f"{b['version']}{extra}" if b["available"] else f"[dim]{b['error']}[/]"))
    return rows


def disk_summary(disk: dict) -> str:
    if "error" in disk:
        return disk["error"]
    return (
        f"{disk['path']}: {format_size(disk['free_bytes'])} free, "
        f"reads at {format_rate(disk['read_bandwidth'])} (timed on {format_size(disk['read_bytes'])})"
    )


# --- what a decode step costs here: the expected speed ------------------------------------------------------

TINY_WIDTH = 256  # model width of the stand-in: a multiple of every quant block, bytes next to nothing
TINY_VOCAB = 256
TINY_STEPS = 24  # decode steps timed on the stand-in (after a few untimed)
KV_SAMPLE_BYTES = 512 << 20  # at most this much F32 cache is allocated to time attention over
TINY_CONTEXT = 16  # cached tokens of the attention call that stands for its fixed cost
BYTES_PER_CALL = 8 << 20  # the dense mat-vec benchmark reads at least this much per call


def decode_costs(
    path: str | Path,
    p: Plan,
    bandwidths: Bandwidths,
    *,
    context: int | None = None,
    threads: int | None = None,
    cpu_backend: str | None = None,
) -> tuple[DecodeCosts, dict]:
    """Measure here what the expected decode speed of the model at `path` (planned as `p`) needs with
    `context` tokens cached (default: the plan's context, full), and how it was measured.

    Efficiencies: the rate, beyond each call's fixed cost, of the kernels that read the plan's bytes (ggml's
    mat-vec on the dense weights' quant types, the CPU expert backend on the model's expert shape, attention
    over an F32 cache, a GPU's mat-vec), over the tier's measured bandwidth. Fixed costs: each kind of layer
    timed in decode steps of a stand-in model of the same architecture and layer kinds but TINY_WIDTH wide,
    loaded and run by dsrun as the model would be; its few bytes are taken off at the measured rates."""
    import torch

    from .engine import default_threads

    threads = threads or default_threads()
    context = context or p.sizes.ctx
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    f = GGUFFile(path)
    try:
        details: dict = {"threads": threads, "context": context}
        measured = {}
        backend = None
        if any(layer.n_experts for layer in p.sizes.layers):
            from .engine import cpu_expert_backend

            backend = cpu_expert_backend(f, cpu_backend, threads).name
            details["cpu_backend"] = backend
        if "cpu" in p.layer_devices:
            measured["cpu_weights"], details["cpu_weights"] = dense_efficiency(f, bandwidths.ram, threads)
            measured["cpu_kv"] = attention_rate(f, len(p.sizes.layers), context) / bandwidths.ram
        if p.tier("cpu").experts:
            rate, per_call = backend_rate(backend, expert_shape(f), threads)
            measured["cpu_experts"] = rate / bandwidths.ram
            details["cpu_experts"] = {"bytes_per_s": round(rate), "seconds_per_call": per_call}
        gpu = next((d for d in p.layer_devices if d.startswith("cuda")), None)
        if gpu is not None:
            gpu_rates = gpu_efficiencies(f, p, gpu, bandwidths.gpu)
            measured |= gpu_rates
            details["gpu"] = {k: round(v, 3) for k, v in gpu_rates.items()}
        costs = DecodeCosts(**{k: min(1.0, max(v, 1e-3)) for k, v in measured.items()})
        fixed, details["layers"] = fixed_costs(f, p, costs, bandwidths, threads, backend)
        return dataclasses.replace(costs, **fixed), details
    finally:
        f.close()
        torch.set_num_threads(threads_before)


def dense_weight_types(f: GGUFFile) -> Counter:
    """Bytes of the matrices that are not routed experts, by quant type."""
    by_type: Counter = Counter()
    for name, t in f.tensors.items():
        if len(t.shape) >= 2 and not re.match(r"^blk\.\d+\.ffn_\w+_exps\.", name):
            by_type[t.qtype] += t.nbytes
    return by_type


def dense_efficiency(f: GGUFFile, ram_bandwidth: float, threads: int) -> tuple[float, dict]:
    """The share of RAM bandwidth reached on the model's dense matrices: each of its (at most three) main
    types timed, the rest at the main type's rate, averaged by their bytes (time, not rate, adds up)."""
    by_type = dense_weight_types(f)
    width = int(f.require("embedding_length"))
    rates = {q: dense_rate(q, width, threads) for q, _ in by_type.most_common(3)}
    main = rates[by_type.most_common(1)[0][0]]
    seconds = sum(nbytes / rates.get(q, main) for q, nbytes in by_type.items())
    efficiency = sum(by_type.values()) / seconds / ram_bandwidth
    return efficiency, {q.name: round(rate) for q, rate in rates.items()}


def dense_rate(qtype, width: int, threads: int) -> float:
    """Bytes/s of GGUF data a decode mat-vec of this type reads: ggml's kernels on the blocks as they are
    (dsrun's dense path), float types in float32 through torch (twice the bytes of F16)."""
    from gguf import GGML_QUANT_SIZES

    from .models.gguf_matrix import FLOAT_TYPES
    from .offload.backend_ggml import ggml
    from .offload.cpu_experts import LayerShape

    block, type_size = GGML_QUANT_SIZES[qtype]
    if qtype in FLOAT_TYPES or ggml() is None:
        return torch_matvec_rate(width) * type_size / block / 4
    d = max(block, width // block * block)
    per_matrix = d * d * type_size // block
    shape = LayerShape(1 << 20, d, d, max(1, math.ceil(BYTES_PER_CALL / (3 * per_matrix))), (qtype,) * 3)
    return backend_rate("ggml", shape, threads)[0]


def torch_matvec_rate(width: int, nbytes: int = 192 << 20) -> float:
    """Bytes/s of float32 weights torch's mat-vec reads, cycling through matrices far beyond the caches."""
    import torch
    import torch.nn.functional as F

    weights = [torch.randn(width, width) for _ in range(max(2, nbytes // (4 * width * width)))]
    x = torch.randn(1, width)
    return best_rate(lambda: [F.linear(x, w) for w in weights], 4 * width * width * len(weights), 5)


def expert_shape(f: GGUFFile):
    from .offload.cpu_experts import LayerShape

    gate = next(t for name, t in f.tensors.items() if name.endswith("ffn_gate_exps.weight"))
    layer = gate.name.split(".")[1]
    up, down = (f.tensor(f"blk.{layer}.ffn_{p}_exps.weight") for p in ("up", "down"))
    return LayerShape.from_tensors(gate, up, down, top_k=int(f.get("expert_used_count", 1)))


def backend_rate(name: str, shape, threads: int) -> tuple[float, float]:
    """(bytes/s a CPU expert backend reads beyond its fixed cost per call, that fixed cost in seconds): one
    decode call of `shape` (K experts) timed against the same call on experts TINY_WIDTH wide, with the
    backend's own micro-benchmark (offload/cpu_experts.py)."""
    from .offload.cpu_experts import LayerShape, make_backend, synthetic_layer, time_layer

    tiny = LayerShape(2 * shape.top_k, TINY_WIDTH, TINY_WIDTH, shape.top_k, shape.qtypes)
    seconds, expert_bytes = [], 0
    for s in (shape, tiny):
        layer = synthetic_layer(s)
        backend = make_backend(name, threads=threads, use_shards=False)
        backend.load_layer(0, *layer)
        seconds.append(time_layer(backend, s, layer[0].shape[0]))
        expert_bytes = expert_bytes or sum(t.nbytes for t in layer) // layer[0].shape[0]
        del backend, layer
    return shape.top_k * expert_bytes / max(seconds[0] - seconds[1], 1e-9), seconds[1]


def attention_rate(f: GGUFFile, n_layers: int, context: int) -> float:
    """Bytes/s of F32 KV cache a decode row's attention reads at `context` cached tokens, beyond the cost of
    a call over a few tokens: one cache per layer (as much of the model's as KV_SAMPLE_BYTES holds, in
    turn), dsrun's attention functions, the model's heads (grouped heads repeated, MLA reading its latent
    row as key and value). The rate falls with the context, so it is measured at the one predicted for."""
    import torch

    from .models.base import attend
    from .offload.planner import kv_bytes_per_token

    per_token = kv_bytes_per_token(f, 1)[0]
    n_caches = max(1, min(n_layers, KV_SAMPLE_BYTES // (per_token * context)))
    n_head = int(_first(f.require("attention.head_count")))
    if f.arch == "deepseek2":
        from .models.deepseek2 import attend_latent

        latent, rope = int(f.require("attention.kv_lora_rank")), int(f.require("rope.dimension_count"))
        q = torch.randn(1, n_head, latent + rope)  # (1, H, C+R)

        def cache(n: int):
            return [torch.randn(n, latent + rope) for _ in range(n_caches)]  # (N, C+R) each

        def step(caches):
            return [attend_latent(q, kv, latent, kv.shape[0] - 1, 0.1) for kv in caches]
    else:
        n_kv = int(_first(f.get("attention.head_count_kv", n_head)))
        dk = int(f.get("attention.key_length", int(f.require("embedding_length")) // n_head))
        dv = int(f.get("attention.value_length", dk))
        q = torch.randn(1, n_head, dk)  # (1, H, Dk)

        def cache(n: int):
            return [(torch.randn(n, n_kv, dk), torch.randn(n, n_kv, dv)) for _ in range(n_caches)]

        def step(caches):
            return [attend(q, k, v, k.shape[0] - 1, 0.1) for k, v in caches]

    few, full = cache(TINY_CONTEXT), cache(context)
    seconds = [1 / best_rate(lambda c=c: step(c), 1, 3) for c in (few, full)]  # the best of 3 calls each
    return n_caches * per_token * (context - TINY_CONTEXT) / max(seconds[1] - seconds[0], 1e-9)


def _first(value):
    return value[0] if isinstance(value, list) else value


def gpu_efficiencies(f: GGUFFile, p: Plan, device: str, bandwidth: float) -> dict[str, float]:
    """gpu_weights, gpu_kv and (with experts planned on a GPU) gpu_experts. Matrices of a type gpu_quant's
    kernels take stay in their GGUF bytes on a GPU (its own benchmark, at decode's one row); others are
    float32 there (torch's mat-vec, which reads 4 bytes a weight); the KV cache is float32."""
    from gguf import GGML_QUANT_SIZES

    from .offload import gpu_quant

    f32_rate = gpu_matvec_rate(device, "float32")

    def rate(qtype, n_out: int, n_in: int) -> float:  # bytes/s of GGUF data
        if qtype in gpu_quant.QUANT_TYPES:
            return gpu_quant.benchmark(qtype, n_out, n_in, 1, device)["quant_GBps"] * 1e9
        block, type_size = GGML_QUANT_SIZES[qtype]
        return f32_rate * type_size / block / 4

    dense = dense_weight_types(f)
    width = int(f.require("embedding_length"))
    rates = {q: rate(q, width, width) for q, _ in dense.most_common(3)}
    main = rates[dense.most_common(1)[0][0]]
    seconds = sum(n / rates.get(q, main) for q, n in dense.items())
    out = {"gpu_weights": sum(dense.values()) / seconds / bandwidth, "gpu_kv": f32_rate / bandwidth}
    if any(t.tier == "gpu" and t.experts for t in p.tiers):
        shape = expert_shape(f)
        matrices = list(zip(shape.qtypes, ((shape.ff, shape.hidden),) * 2 + ((shape.hidden, shape.ff),)))
        nbytes = [
            n_out * n_in * GGML_QUANT_SIZES[q][1] // GGML_QUANT_SIZES[q][0] for q, (n_out, n_in) in matrices
        ]
        seconds = sum(n / rate(q, *dims) for n, (q, dims) in zip(nbytes, matrices))
        out["gpu_experts"] = sum(nbytes) / seconds / bandwidth
    return out


def gpu_matvec_rate(device: str, dtype: str, nbytes: int = 1 << 30, width: int = 8192) -> float:
    """Bytes/s of `dtype` weights a GPU mat-vec reads (matrices of 128 MiB and more: the launch latency is
    small beside their time; 1 GiB of them, beyond any L2 cache)."""
    import torch
    import torch.nn.functional as F

    dt = getattr(torch, dtype)
    n = max(2, nbytes // (width * width * dt.itemsize))
    weights = [torch.randn(width, width, device=device).to(dt) for _ in range(n)]
    x = torch.randn(1, width, device=device).to(dt)

    def step():
        for w in weights:
            F.linear(x, w)
        torch.cuda.synchronize(device)

    return best_rate(step, width * width * dt.itemsize * n, 5)


# the stand-in model: the same architecture and layer kinds, tiny -------------------------------------------


def stand_in_model(f: GGUFFile) -> Path | None:
    """A generated GGUF with the model's architecture, layer kinds (a leading dense layer, MoE layers),
    expert count, top-k, routing and quant types, TINY_WIDTH wide; kept in the cache dir and reused.
    None for an architecture neither `dsrun synth` nor write_tiny_llama makes."""
    from .offload.shards import cache_root

    spec = stand_in_spec(f)
    if spec is None:
        return None
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root() / "stand-ins" / f"{f.arch}-{digest}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        if spec["arch"] == "llama":
            write_tiny_llama(tmp, spec)
        else:
            from .synth import synthesize

            synthesize(tmp, **spec)
        os.replace(tmp, path)
    return path


def stand_in_spec(f: GGUFFile) -> dict | None:
    """`dsrun synth` options for the stand-in of a MoE model, or write_tiny_llama's for a dense llama."""
    from .synth import WEIGHT_TYPES

    n_expert = int(f.get("expert_count", 0) or 0)
    dense = dense_weight_types(f).most_common(1)
    if f.arch == "llama" and not n_expert:
        types = {
            name.split(".", 2)[-1] if name.startswith("blk.") else name: t.qtype.name
            for name, t in f.tensors.items()
            if len(t.shape) == 2 and (name.startswith("blk.0.") or not name.startswith("blk."))
        }
        n_head = int(_first(f.require("attention.head_count")))
        n_kv = int(_first(f.get("attention.head_count_kv", n_head)))
        return {
            "arch": "llama",
            "types": types,
            "n_head_kv": 4 if n_kv == n_head else min(n_kv, 2),
            "norm_eps": float(f.get("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_base": float(f.get("rope.freq_base", 10000.0)),
        }
    arch = {"deepseek2": "deepseek2", "qwen3moe": "qwen3moe", "qwen2moe": "qwen2moe", "llama": "mixtral"}.get(
        f.arch
    )
    if arch is None or not n_expert:
        return None
    shape = expert_shape(f)
    weight_type = shape.qtypes[0].name if shape.qtypes[0].name in WEIGHT_TYPES else None
    weight_type = weight_type or (dense[0][0].name if dense and dense[0][0].name in WEIGHT_TYPES else "Q8_0")
    spec = {
        "arch": arch,
        "weight_type": weight_type,
        "n_embd": TINY_WIDTH,
        "n_head": 4,
        "n_ctx": 4096,
        "n_expert": n_expert,
        "n_expert_used": shape.top_k,
        "n_ff_exp": TINY_WIDTH,
        "n_layer": 2,
    }
    if arch == "deepseek2":
        lead = min(1, int(f.get("leading_dense_block_count", 0)))
        spec |= {
            "n_layer": lead + 1,
            "n_dense_lead": lead,
            "n_ff": TINY_WIDTH,
            "n_expert_shared": int(f.get("expert_shared_count", 0)),
            "q_lora_rank": 64 if f.get("attention.q_lora_rank") else 0,
            "kv_lora_rank": 64,
            "qk_nope_dim": 32,
            "qk_rope_dim": 16,
            "v_head_dim": 32,
            "mla_layout": "kv_b" if "blk.0.attn_kv_b.weight" in f.tensors else "split",
            "gating": "sigmoid" if f.get("expert_gating_func", 0) == 2 else "softmax",
            "n_group": max(1, int(f.get("expert_group_count", 1))),
            "topk_group": max(1, int(f.get("expert_group_used_count", 1))),
            "weights_norm": bool(f.get("expert_weights_norm", False)),
        }
    else:
        n_head = int(_first(f.require("attention.head_count")))
        n_kv = int(_first(f.get("attention.head_count_kv", n_head)))
        spec |= {"n_head_kv": 4 if n_kv == n_head else 2, "head_dim": 64, "n_ff_shexp": TINY_WIDTH}
    return spec


def write_tiny_llama(path: Path, spec: dict) -> None:
    """A dense llama GGUF TINY_WIDTH wide, two layers, each matrix in the type the model's has (float types
    as F32, which dsrun runs them in); random weights, no tokenizer (the stand-in is fed token ids)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    from .models.gguf_matrix import FLOAT_TYPES
    from .synth import encode

    d, n_head, head_dim = TINY_WIDTH, 4, TINY_WIDTH // 4
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(4096)
    w.add_embedding_length(d)
    w.add_feed_forward_length(d)
    w.add_head_count(n_head)
    w.add_head_count_kv(spec["n_head_kv"])
    w.add_layer_norm_rms_eps(spec["norm_eps"])
    w.add_rope_freq_base(spec["rope_base"])
    w.add_vocab_size(TINY_VOCAB)

    def matrix(name: str, rows: int, cols: int, like: str) -> None:
        qtype = GGMLQuantizationType[spec["types"].get(like, "F32")]
        if qtype in FLOAT_TYPES or cols % GGML_QUANT_SIZES[qtype][0]:
            qtype = GGMLQuantizationType.F32
        values = rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)
        data = encode(values, qtype)
        w.add_tensor(name, data.reshape(rows, -1), raw_dtype=None if qtype.name == "F32" else qtype)

    kv = spec["n_head_kv"] * head_dim
    matrix("token_embd.weight", TINY_VOCAB, d, "token_embd.weight")
    if "output.weight" in spec["types"]:
        matrix("output.weight", TINY_VOCAB, d, "output.weight")
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    for i in range(2):
        for name, rows, cols in (
            ("attn_q", d, d),
            ("attn_k", kv, d),
            ("attn_v", kv, d),
            ("attn_output", d, d),
            ("ffn_gate", d, d),
            ("ffn_up", d, d),
            ("ffn_down", d, d),
        ):
            matrix(f"blk.{i}.{name}.weight", rows, cols, f"{name}.weight")
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(d, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class TimedBlock:
    """A model block that records how long each call took (CPU time to return: on a GPU, its launches)."""

    def __init__(self, block):
        self.block, self.seconds = block, []

    def __call__(self, *args):
        start = time.perf_counter()
        out = self.block(*args)
        self.seconds.append(time.perf_counter() - start)
        return out


def fixed_costs(
    f: GGUFFile, p: Plan, costs: DecodeCosts, bandwidths: Bandwidths, threads: int, backend: str | None
) -> tuple[dict, dict]:
    """dense_layer_s, moe_layer_s and token_s from decode steps of the stand-in model, loaded by dsrun with
    the model's CPU expert backend, on the CPU or on the GPU as the model's layers are; the stand-in's own
    bytes (at the measured rates) are taken off."""
    import statistics

    import torch

    from .engine import load
    from .models.base import Batch

    path = stand_in_model(f)
    if path is None:
        return {}, {"skipped": f"no stand-in model for architecture {f.arch}: layer costs not counted"}
    gpus = sorted({int(d.split(":")[1]) for d in p.layer_devices if d.startswith("cuda")})
    eng = load(
        path,
        ctx=512,
        threads=threads,
        gpus=gpus,
        gpu_mem=stand_in_gpu_budget(path, gpus) if gpus and p.tier("cpu").experts else None,
        cpu_backend=backend,
    )
    try:
        model, sizes = eng.model, eng.plan.sizes
        timed = [TimedBlock(b) for b in model.blocks]
        model.blocks[:] = timed
        cache = model.new_cache()
        model.forward(Batch.single(list(range(1, 17)), cache))
        steps = []
        for i in range(TINY_STEPS + 4):
            for b in timed:
                b.seconds.clear()
            start = time.perf_counter()
            logits = model.forward(Batch.single([17 + i % 200], cache))
            if logits.is_cuda:
                torch.cuda.synchronize(logits.device)
            if i >= 4:  # the first steps fill caches and pools
                steps.append((time.perf_counter() - start, [b.seconds[0] for b in timed]))
    finally:
        eng.close()

    def own_bytes_s(layer, device: str, experts: bool) -> float:
        tier = "ram" if device == "cpu" else "gpu"
        bw = getattr(bandwidths, tier)
        s = layer.resident_bytes / (bw * costs.efficiency(tier, "weights"))
        if experts:
            s += sizes.experts_used * layer.expert_bytes / (bw * costs.efficiency(tier, "experts"))
        return s

    devices = eng.plan.layer_devices
    per_kind: dict[bool, list[float]] = {False: [], True: []}
    for _, blocks in steps:
        for layer, device, seconds in zip(sizes.layers, devices, blocks):
            moe = bool(layer.n_experts)
            per_kind[moe].append(max(0.0, seconds - own_bytes_s(layer, device, moe)))
    head_tier = "ram" if devices[-1] == "cpu" else "gpu"
    head_s = sizes.head_read_bytes / (getattr(bandwidths, head_tier) * costs.efficiency(head_tier, "weights"))
    token_s = statistics.median(max(0.0, total - sum(blocks) - head_s) for total, blocks in steps)
    fixed = {"token_s": token_s}
    for moe, key in ((False, "dense_layer_s"), (True, "moe_layer_s")):
        if per_kind[moe]:
            fixed[key] = statistics.median(per_kind[moe])
    return fixed, {"stand_in": path.name, "steps": len(steps)} | {k: round(v, 7) for k, v in fixed.items()}


def stand_in_gpu_budget(path: Path, gpus: list[int]) -> str:
    """A GPU budget that holds the stand-in's layers but not its experts, as the model's plan has experts
    in RAM: the stand-in then runs its MoE layers the hybrid way."""
    from .plan import plan_model

    p = plan_model(path, ctx=512, gpus=gpus, gpu_mem="1TiB", ram="1TiB")
    need = max(t.weight_bytes + t.kv_bytes for t in p.tiers if t.tier == "gpu")
    return str(need + (1 << 20))
