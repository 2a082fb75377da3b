"""`dsrun doctor`: what this machine has (CPU features, cores, RAM and its bandwidth, GPUs, disk, backends)
and, with -m, how a model would run on it.

The measurements (`memory_read_bandwidth`, `host_to_device_bandwidth`, `gpu_memory_bandwidth`,
`disk_read_bandwidth`) return bytes/s, best of a few repetitions, and are reused by the bench.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import mmap
import os
import platform
import re
import shutil
import subprocess
import time
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
from .offload.planner import Bandwidths, Plan, decode_tokens_per_s, format_size
from .plan import format_rate, plan_model, print_plan

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
    p, problem = None, None
    if args.model is not None:
        try:
            p = plan_model(args.model)
        except DsrunError as e:  # a model that cannot run here is a finding, not a doctor failure
            problem = str(e)
        report["plan"] = plan_verdict(args.model, p, problem, bandwidths)
    if args.json:
        print_json(report)
        return 0
    console = Console()
    print_report(report, console)
    if p is not None:
        print_plan(p, bandwidths, console)
    elif problem is not None:
        console.print(f"[red]{args.model} cannot run here[/]: {problem}")
    return 0


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


def plan_verdict(model: str, p: Plan | None, problem: str | None, bandwidths: Bandwidths) -> dict:
    """The model's plan on this machine's free memory (without the per-expert placement) and its decode
    estimate at the measured bandwidths, or why it cannot run."""
    if p is None:
        return {"model": model, "fits": False, "error": problem}
    verdict = {key: value for key, value in p.to_json().items() if key != "placement"}
    return verdict | {
        "decode_tokens_per_s": round(decode_tokens_per_s(p, bandwidths), 2),
        "bandwidths": dataclasses.asdict(bandwidths),
    }


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
