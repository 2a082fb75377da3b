"""Hybrid placement benchmark: (a) every routed expert on the CPU, (b) a static split like llama.cpp's
`--n-cpu-moe N` (the last layers' experts on the GPU, as many whole layers as fit, never moving), and
(c) dsrun's planner with the hot-expert cache, on skewed and on uniform routing.

The model is generated (`dsrun synth`) with real DeepSeek layer shapes and Q4_K experts (written as random
bits: `--random-expert-blocks`). Skewed routing is synthesized on purpose: Zipf exponent 1.2 over experts
and locality 0.8 (consecutive tokens share experts). Uniform routing runs the same file with its routers
replaced in memory by random ones (no popularity, no locality): one file, so a disk that holds one
real-shaped model is enough. Decode feeds the model its own greedy tokens after a warm-up, so the cache
sees the temporal locality a real generation has. Every configuration runs the same token ids.

With `--llama-bench PATH` (a CUDA build of llama.cpp's llama-bench) the same file runs in llama.cpp with
every expert on the CPU (`-ot exps=CPU`) and with `--n-cpu-moe N` for each N given, same prompt and
generation lengths; pick N so that llama.cpp's GPU part fits the same budget (the report has the most
memory each GPU held during each llama.cpp run).

Several GPUs: `--gpus 1,2` runs each dsrun configuration on the first one and on the first two GPUs (the
budget is per card), and `--llama-run 2:ARGS` runs llama-bench on two (e.g. `-ncmoe 3 -ts 7/3`: its
layers split 7:3 so that each card stays within the budget).

    python bench/bench_hybrid.py --preset deepseek-v3 --layers 6 --set n_dense_lead=1 --gpu-mem 24GiB \
        --llama-bench ./llama-bench --n-cpu-moe 3 --out results.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import torch

import dsrun
from dsrun.bench import profiled_decode
from dsrun.offload.placed import Counters
from dsrun.offload.planner import Plan
from dsrun.synth import synthesize

CONFIGS = ("all-cpu", "static", "dsrun-cache")


def make_model(args) -> Path:
    path = Path(args.dir) / f"{args.preset}-{args.layers}L-{args.type}-skewed.gguf"
    if not path.exists():  # written under another name first: an interrupted run leaves no bad file
        t0 = time.perf_counter()
        partial = path.with_suffix(".partial")
        synthesize(
            partial,
            preset=args.preset,
            n_layer=args.layers,
            weight_type=args.type,
            skew=1.2,
            locality=0.8,
            seed=1,
            random_expert_blocks=args.type in ("Q4_K", "Q8_0"),
            **dict(args.set),
        )
        partial.rename(path)
        size, seconds = path.stat().st_size / 2**30, time.perf_counter() - t0
        print(f"synthesized {path.name}: {size:.2f} GiB in {seconds:.0f} s", flush=True)
    return path


def uniform_routers(eng, seed: int = 7) -> None:
    """Random router rows at the file's scale and no selection bias: experts equally likely, no locality."""
    g = torch.Generator().manual_seed(seed)
    for ffn in eng.offload.routers.values():
        w = ffn.ffn_gate_inp  # (E, D)
        ffn.ffn_gate_inp = (torch.randn(w.shape, generator=g) * w.float().std().cpu()).to(w.device, w.dtype)
        if getattr(ffn, "exp_probs_b", None) is not None:
            ffn.exp_probs_b = torch.zeros_like(ffn.exp_probs_b)


def llama_runs(args) -> dict[str, tuple[int, list[str]]]:
    """name -> (GPUs it sees, extra llama-bench arguments): `--n-cpu-moe N` on one GPU (with the
    all-CPU run beside them), and each `--llama-run G:ARGS` on G GPUs."""
    runs = {}
    if args.n_cpu_moe:
        runs["all-cpu"] = (1, ["-ot", "exps=CPU"])
        runs |= {f"n-cpu-moe {n}": (1, ["-ncmoe", str(n)]) for n in args.n_cpu_moe}
    for spec in args.llama_run:
        gpus, sep, extra = spec.partition(":")
        if not sep or not gpus.isdigit():
            raise SystemExit(f"--llama-run takes GPUS:ARGS (like '2:-ncmoe 3 -ts 7/3'), not {spec!r}")
        runs[f"{gpus} GPU {extra}"] = (int(gpus), extra.split())
    return runs


def llama_bench(args, path: Path) -> dict:
    """llama.cpp's own numbers on the same file: tokens/s of pp (prefill) and tg (decode), and the most
    memory each GPU it saw held."""
    out = {}
    for name, (gpus, extra) in llama_runs(args).items():
        cmd = [
            args.llama_bench,
            "-m",
            str(path),
            "-ngl",
            "99",
            "-p",
            args.prefill,
            "-n",
            str(args.decode),
        ]
        cmd += ["-r", "1", "-o", "json", *extra]
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(map(str, range(gpus))))
        with GPUMemoryPeaks(gpus) as peaks:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            out[name] = {"error": done.stderr[-2000:]}
        else:
            rows = json.loads(done.stdout)
            out[name] = {
                (f"prefill_tok_s/{r['n_prompt']}" if r["n_prompt"] else "decode_tok_s"): round(r["avg_ts"], 2)
                for r in rows
            }
        out[name]["gpu_peak_gib"] = peaks.gib()
        print(f"llama.cpp {name:24s} {out[name]}", flush=True)
    return out


class GPUMemoryPeaks:
    """The most memory each of the first n GPUs held above what it held at the start, sampled every
    0.2 s from the driver's count (so another process's use shows)."""

    def __init__(self, n: int):
        self.n = n if torch.cuda.is_available() else 0
        self.stop = threading.Event()

    def used(self) -> list[int]:
        return [total - free for free, total in map(torch.cuda.mem_get_info, range(self.n))]

    def sample(self) -> None:
        while not self.stop.wait(0.2):
            self.peak = [max(a, b) for a, b in zip(self.peak, self.used())]

    def __enter__(self):
        self.base = self.peak = self.used()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def gib(self) -> list[float]:
        return [round((peak - base) / 2**30, 2) for peak, base in zip(self.peak, self.base)]


def reshape_plan(plan: Plan, config: str, slots: dict[str, int]) -> None:
    """Rewrite which experts start on the GPUs: none, or on each GPU whole trailing layers of its own
    (static, `slots` per GPU), or the plan's own."""
    keys = sorted(plan.expert_devices)
    if config == "all-cpu":
        chosen = set()
    elif config == "static":  # --n-cpu-moe N: the first N MoE layers on the CPU, the rest whole on the GPU
        by_layer: dict[int, list] = {}
        for key in keys:
            by_layer.setdefault(key[0], []).append(key)
        chosen, room = set(), dict(slots)
        for layer in sorted(by_layer, reverse=True):
            gpu = plan.layer_devices[layer]
            if len(by_layer[layer]) <= room[gpu]:
                chosen.update(by_layer[layer])
                room[gpu] -= len(by_layer[layer])
    else:
        return
    for key in keys:
        plan.expert_devices[key] = plan.layer_devices[key[0]] if key in chosen else "cpu"


def cpu_experts_in_ram(eng) -> None:
    """Every expert not on the GPU in the CPU backend, as llama.cpp keeps a static split's CPU experts."""
    for layer, home in eng.offload.homes.items():
        home.keep_in_ram(
            [e for (lay, e), d in eng.plan.expert_devices.items() if lay == layer and d == "cpu"]
        )


def load(path: Path, config: str, args, n_gpus: int = 1):
    eng = dsrun.load(
        path,
        ctx=args.ctx,
        gpus=list(range(n_gpus)),
        gpu_mem=args.gpu_mem,
        ram=args.ram,
        cpu_backend=args.cpu_backend,
        offload_options=gpu_options(args, n_gpus),
    )
    if config == "dsrun-cache":
        return eng
    pools = {p.name: p for p in eng.offload.slots.values()}
    for pool in pools.values():
        for key in list(pool.slot_of):  # start over with the configuration's own placement
            pool.drop(*key)
    reshape_plan(eng.plan, config, {name: p.n_slots for name, p in pools.items()})
    cpu_experts_in_ram(eng)
    for (layer, e), device in eng.plan.expert_devices.items():
        if device in pools and pools[device].free:
            eng.offload.promote(pools[device], layer, e)
    eng.offload.policy.max_moves = 0  # static placements never move
    eng.offload.counters = Counters()  # count from the configuration's own start
    return eng


def gpu_options(args, n_gpus: int = 1) -> dict:
    """--cpu-as-gpu runs the GPU code paths with CPU tensors, to try the benchmark without CUDA."""
    if not args.cpu_as_gpu:
        return {}
    return {"device_map": {f"cuda:{i}": "cpu" for i in range(n_gpus)}, "quantized_slots": True}


def gib(n: int) -> float:
    return round(n / 2**30, 2)


def gpu_memory(planned: dict) -> dict:
    """Per planned GPU: its budget, what the plan counted, and the most torch allocated and reserved."""
    for device, row in planned.items():
        if torch.cuda.is_available() and device.startswith("cuda"):
            row["torch_peak_allocated_gib"] = gib(torch.cuda.max_memory_allocated(device))
            row["torch_peak_reserved_gib"] = gib(torch.cuda.max_memory_reserved(device))
    return planned


def greedy_tokens(eng, prompt: list[int], n: int) -> tuple[list[int], float]:
    """n greedy tokens after the prompt, and the decode seconds they took."""
    from dsrun.models.base import Batch

    cache = eng.model.new_cache()
    logits = eng.model.forward(Batch.single(prompt, cache))
    out = []
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(logits[-1].argmax())
        out.append(tok)
        logits = eng.model.forward(Batch.single([tok], cache))
    sync()
    return out, time.perf_counter() - t0


def prefill_seconds(eng, tokens: list[int]) -> float:
    """A prompt's prefill in the engine's chunks (as `Engine.generate` feeds it)."""
    from dsrun.engine import PREFILL_CHUNK
    from dsrun.models.base import Batch

    cache = eng.model.new_cache()
    sync()
    t0 = time.perf_counter()
    for i in range(0, len(tokens), PREFILL_CHUNK):
        eng.model.forward(Batch.single(tokens[i : i + PREFILL_CHUNK], cache))
    sync()
    return time.perf_counter() - t0


def prefill_run(eng, prompts: list[list[int]]) -> dict:
    """tokens/s of each prompt's prefill, each after one untimed run of the same length (kernels compile
    and tune on their first shapes, as llama-bench warms up), and where its cold assignments ran."""
    out = {}
    c = eng.offload.counters
    for tokens in prompts:
        prefill_seconds(eng, tokens)
        eng.offload.wait_idle()
        before = (c.cpu_assignments, c.streamed_assignments, c.device_assignments, c.cpu_expert_s)
        seconds = prefill_seconds(eng, tokens)
        after = (c.cpu_assignments, c.streamed_assignments, c.device_assignments, c.cpu_expert_s)
        cpu, streamed, device, cpu_s = (b - a for a, b in zip(before, after))
        out[len(tokens)] = {
            "tok_s": round(len(tokens) / seconds, 1),
            "assignments": {"gpu": device, "streamed": streamed, "cpu": cpu},
            "cpu_expert_s": round(cpu_s, 4),
            "seconds": round(seconds, 4),
        }
    out["stream_cost"] = eng.stats()["experts"]["stream_cost"]
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_config(
    path: Path,
    config: str,
    routing: str,
    args,
    prompt: list[int],
    long_prompts: list[list[int]],
    n_gpus: int = 1,
) -> dict:
    with GPUMemoryPeaks(n_gpus) as peaks:
        result = measure_config(path, config, routing, args, prompt, long_prompts, n_gpus)
    result["gpu_peak_gib"] = peaks.gib()  # all the process added on each card, as llama.cpp's are counted
    return result


def measure_config(path, config, routing, args, prompt, long_prompts, n_gpus) -> dict:
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        torch.cuda.reset_peak_memory_stats(i)
    eng = load(path, config, args, n_gpus)
    memory = {
        t.device: {"budget_gib": gib(t.budget_bytes), "planned_gib": gib(t.used_bytes)}
        for t in eng.plan.tiers
        if t.tier == "gpu"
    }
    if routing == "uniform":
        uniform_routers(eng)
    warm, _ = greedy_tokens(eng, prompt, args.warmup)  # the cache learns from this generation
    eng.offload.wait_idle()
    tokens, decode_s = greedy_tokens(eng, prompt + warm, args.decode)
    profile = None
    if args.profile:  # more tokens, with the step's time split
        extra = prompt + warm + tokens
        profile = profiled_decode(eng, lambda: greedy_tokens(eng, extra, args.profile)[1], args.profile)
    prefill = prefill_run(eng, long_prompts)
    stats = eng.stats()["experts"]
    result = {
        "decode_tok_s": round(args.decode / decode_s, 2),
        "prefill_tok_s": {n: r["tok_s"] for n, r in prefill.items() if n != "stream_cost"},
        "prefill": prefill,
        "hit_rate": round(stats["hit_rate"] or 0.0, 3),
        "gpu_experts": sum(c.isdigit() for row in stats["placement"] for c in row),  # a GPU's index
        "experts_total": stats["total"],
        "promotions": stats["promotions"],
        "backend": eng.offload.homes[eng.offload.layers[0]].backend.name,
        "decode_path": eng.stats()["decode"],
        "layer_devices": eng.plan.layer_devices,
        "gpu_memory": gpu_memory(memory),
        "profile_ms_per_token": profile,
        "tokens": tokens,
    }
    eng.close()
    return result


def parity(path: Path, args, prompt: list[int]) -> dict:
    """The GPU placement against dsrun's all-CPU F32 path, as CONTRACT.md compares two dsrun paths."""
    cpu = dsrun.load(path, ctx=args.ctx, gpus=[], cpu_backend="dequant")
    ref = cpu.logits(prompt)
    cpu.close()
    gpu = dsrun.load(
        path,
        ctx=args.ctx,
        gpus=[0],
        gpu_mem=args.gpu_mem,
        ram=args.ram,
        cpu_backend="dequant",
        offload_options=gpu_options(args),
    )
    ours = gpu.logits(prompt)
    gpu.close()
    top2 = np.sort(ref, axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    return {
        "max_abs_dlogit": float(np.abs(ours - ref).max()),
        "argmax_equal": bool((ours.argmax(-1) == ref.argmax(-1)).all()),
        "min_margin_where_argmax_differs": float(margin[ours.argmax(-1) != ref.argmax(-1)].min())
        if (ours.argmax(-1) != ref.argmax(-1)).any()
        else None,
    }


def parse_set(item: str) -> tuple[str, int | float | str]:
    key, _, value = item.partition("=")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="deepseek-v2-lite")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--set", type=parse_set, action="append", default=[], help="FIELD=VALUE spec override")
    p.add_argument("--type", default="Q4_K")
    p.add_argument("--dir", default="/tmp")
    p.add_argument("--gpu-mem", default="24GiB")
    p.add_argument("--ram", default=None)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--cpu-backend", default=None)
    p.add_argument("--warmup", type=int, default=32)
    p.add_argument("--decode", type=int, default=48)
    p.add_argument("--prefill", default="256", help="prompt lengths for prefill, comma-separated")
    p.add_argument("--routings", default="skewed,uniform")
    p.add_argument(
        "--configs", default=",".join(CONFIGS), help="dsrun configurations to run (none: only llama.cpp)"
    )
    p.add_argument("--parity", action="store_true", help="also compare GPU and CPU logits")
    p.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench built with CUDA")
    p.add_argument(
        "--n-cpu-moe", type=int, action="append", default=[], help="llama.cpp static splits to run on 1 GPU"
    )
    p.add_argument(
        "--llama-run",
        action="append",
        default=[],
        help="GPUS:ARGS, a llama-bench run on the first GPUS GPUs with ARGS (e.g. '2:-ncmoe 3 -ts 7/3')",
    )
    p.add_argument("--gpus", default="1", help="GPU counts to run dsrun's configurations on, e.g. 1,2")
    p.add_argument("--out", default=None)
    p.add_argument(
        "--profile", type=int, default=0, help="decode this many more tokens, time split per token"
    )
    p.add_argument(
        "--graphs", default="on", help="on, off or on,off: decode replayed from CUDA graphs, eagerly, or both"
    )
    p.add_argument("--cpu-as-gpu", action="store_true", help="no CUDA: put the GPU tier's tensors on the CPU")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 40000, 16).tolist()
    long_prompts = [rng.integers(100, 40000, int(n)).tolist() for n in args.prefill.split(",")]
    report = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "args": vars(args),
        "results": {},
    }
    path = make_model(args)
    report["model_bytes"] = path.stat().st_size
    if args.llama_bench:
        report["llama.cpp"] = llama_bench(args, path)
    routings = args.routings.split(",")
    gpu_counts = [int(n) for n in args.gpus.split(",")]
    for routing, config, graphs, n_gpus in itertools.product(
        routings, [c for c in args.configs.split(",") if c], args.graphs.split(","), gpu_counts
    ):
        os.environ["DSRUN_CUDA_GRAPHS"] = "1" if graphs == "on" else "0"
        r = run_config(path, config, routing, args, prompt, long_prompts, n_gpus)
        name = f"{routing}/{config}" + ("" if graphs == "on" else "/eager")
        name += "" if gpu_counts == [1] else f"/{n_gpus}gpu"
        report["results"][name] = r
        print(
            f"{name:28s} decode {r['decode_tok_s']:7.2f} tok/s  prefill {r['prefill_tok_s']}"
            f" tok/s  hit {r['hit_rate']:.3f}  gpu experts {r['gpu_experts']}/{r['experts_total']}"
            f"  promotions {r['promotions']}  ({r['backend']})  GPU peaks {r['gpu_peak_gib']} GiB"
            f"  memory {r['gpu_memory']}"
            f"  profile {r['profile_ms_per_token']}",
            flush=True,
        )
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
    if args.parity:
        report["parity"] = parity(path, args, prompt)
        print(f"parity: {report['parity']}", flush=True)
    res = report["results"]
    for routing in routings:
        if f"{routing}/static" in res and f"{routing}/dsrun-cache" in res:
            ratio = res[f"{routing}/dsrun-cache"]["decode_tok_s"] / res[f"{routing}/static"]["decode_tok_s"]
            report[f"decode_ratio_cache_vs_static/{routing}"] = round(ratio, 3)
            print(f"{routing}: dsrun cache / static split decode = {ratio:.2f}x", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
