"""`dsrun bench`: prefill and decode speed and peak memory, dsrun against llama.cpp on the same GGUF.

Each side runs in its own subprocess on the same token ids and thread count, so peak RSS is its own and
neither warms the other's page cache more than the first does (the file is read once before both).
After them, the decode speed `dsrun doctor -m` expects for the same setting is measured and printed
beside dsrun's (planner.decode_time; measured / predicted is the model's error on this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

from .cli import add_model_arguments, print_json

PROMPT = (
    "Mixture-of-Experts language models route every token to a few experts out of many. "
    "Explain, step by step, why this makes decoding bound by memory bandwidth, and what a runtime can do "
    "about it when the experts do not fit in GPU memory. "
)


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for prefill")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded one at a time")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp baseline")
    p.add_argument(
        "--no-predict",
        action="store_true",
        help="skip the decode speed predicted from this machine's measurements (dsrun doctor -m)",
    )
    p.add_argument("--dequant", action="store_true", help="also measure dequantization MB/s per quant type")
    p.add_argument(
        "--profile",
        action="store_true",
        help="split dsrun's decode time per token: GPU work, CPU experts, waits, launches, the rest",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", choices=["dsrun", "llama.cpp"], help=argparse.SUPPRESS)


def bench_tokens(model: str, n_prompt: int) -> list[int]:
    """The prompt's ids repeated to length, from llama.cpp's tokenizer so both sides see the same ids."""
    from .engine import resolve_model
    from .gguf_file import GGUFFile
    from .tokenizer import Tokenizer

    path = resolve_model(model)
    ids = Tokenizer(path, GGUFFile(path)).encode(PROMPT, add_bos=False, special=False)
    return (ids * (n_prompt // len(ids) + 1))[:n_prompt]


def worker_dsrun(args, prompt: list[int], decode: list[int]) -> dict:
    import dsrun
    from dsrun.models.base import Batch

    t0 = time.perf_counter()
    eng = dsrun.load(
        args.model,
        ctx=args.ctx,
        threads=args.threads,
        gpus=args.gpus,
        gpu_mem=args.gpu_mem,
        ram=args.ram,
        placement=args.placement,
        cpu_backend=args.cpu_backend,
    )
    load_s = time.perf_counter() - t0
    cache = eng.model.new_cache()
    t0 = time.perf_counter()
    eng.model.forward(Batch.single(prompt, cache))
    prefill_s = time.perf_counter() - t0
    before = eng.offload.counters.cpu_assignments if eng.offload else 0

    def run_decode() -> float:
        t0 = time.perf_counter()
        for tok in decode:
            eng.model.forward(Batch.single([tok], cache))
        return time.perf_counter() - t0

    if args.profile:
        profile = profiled_decode(eng, run_decode, len(decode))
        decode_s = profile.pop("seconds")
    else:
        decode_s = run_decode()
    result = {"load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s, "stats": eng.stats()}
    if args.profile:
        result["profile_ms_per_token"] = profile
    if eng.offload:  # one token a step: each CPU assignment reads its whole expert once
        homes = eng.offload.homes.values()
        per_expert = sum(h.source.expert_bytes() for h in homes) / len(homes)
        result["cpu_expert_bytes"] = (eng.offload.counters.cpu_assignments - before) * per_expert
    return result


def profiled_decode(eng, run_decode, n: int) -> dict:
    """Run a decode (`run_decode()` returns its seconds) and split its time per token, in ms: where CUDA
    graphs replayed it, the GPU time of the dense and expert graphs, the host's launches, waits for the GPU,
    CPU experts and the rest; on the eager path, the CPU experts and the rest."""
    from .decode_graph import StepTimes

    decoder = getattr(eng, "decoder", None)
    if decoder is not None:
        decoder.times = StepTimes()  # events around each graph: a few microseconds a step
    cpu0 = eng.offload.counters.cpu_expert_s if eng.offload else 0.0
    seconds = run_decode()
    times = decoder.times if decoder is not None else None
    if decoder is not None:
        decoder.times = None
    if times is not None and times.steps:
        return {"seconds": seconds, "path": "cuda graphs", **times.per_token_ms()}
    cpu = eng.offload.counters.cpu_expert_s - cpu0 if eng.offload else 0.0
    ms = 1e3 / max(1, n)
    return {
        "seconds": seconds,
        "path": "eager",
        "total": round(seconds * ms, 3),
        "cpu_experts": round(cpu * ms, 3),
        "rest": round((seconds - cpu) * ms, 3),
    }


def worker_llama_cpp(args, prompt: list[int], decode: list[int]) -> dict:
    import llama_cpp

    from .engine import default_threads, resolve_model

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        str(resolve_model(args.model)),
        n_ctx=args.ctx,
        n_batch=max(512, len(prompt)),
        n_ubatch=max(512, len(prompt)),
        n_threads=args.threads or default_threads(),
        n_threads_batch=args.threads or default_threads(),
        n_gpu_layers=0,
        verbose=False,
        flash_attn=False,
        type_k=0,
        type_v=0,
    )
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for tok in decode:
        llm.eval([tok])
    decode_s = time.perf_counter() - t0
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s}


def run_worker(args) -> int:
    spec = json.loads(sys.stdin.read())
    fn = worker_dsrun if args.worker == "dsrun" else worker_llama_cpp
    out = fn(args, spec["prompt"], spec["decode"])
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))
    return 0


def spawn(args, side: str, prompt: list[int], decode: list[int]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "dsrun.cli",
        "bench",
        "--worker",
        side,
        "-m",
        str(args.model),
        "--ctx",
        str(args.ctx),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    for flag, value in (
        ("--gpus", args.gpus),
        ("--gpu-mem", args.gpu_mem),
        ("--ram", args.ram),
        ("--placement", args.placement),
        ("--cpu-backend", args.cpu_backend),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    if args.profile and side == "dsrun":
        cmd.append("--profile")
    proc = subprocess.run(
        cmd, input=json.dumps({"prompt": prompt, "decode": decode}), capture_output=True, text=True
    )
    if proc.returncode != 0:
        from .errors import DsrunError

        raise DsrunError(f"the {side} benchmark failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(r: dict, n_prompt: int, n_decode: int) -> dict:
    out = {
        "load_s": round(r["load_s"], 3),
        "prefill_tok_s": round(n_prompt / r["prefill_s"], 2),
        "decode_tok_s": round(n_decode / r["decode_s"], 2),
        "peak_rss_mib": round(r["peak_rss_bytes"] / 2**20, 1),
    }
    if r.get("cpu_expert_bytes"):
        out["cpu_expert_read_gb_s"] = round(r["cpu_expert_bytes"] / r["decode_s"] / 1e9, 2)
    if "profile_ms_per_token" in r:
        out["profile_ms_per_token"] = r["profile_ms_per_token"]
    return out


def expert_bandwidth_share(results: dict) -> dict | None:
    """CPU experts' bytes read per second of decode against this machine's measured RAM read bandwidth.
    The decode time includes everything else a step does, so this is a floor on the experts' own rate."""
    rate = results["dsrun"].get("cpu_expert_read_gb_s")
    if not rate:
        return None
    from .doctor import memory_read_bandwidth

    ram = memory_read_bandwidth() / 1e9
    return {"cpu_expert_read_gb_s": rate, "ram_read_gb_s": round(ram, 1), "share": round(rate / ram, 3)}


def warm_page_cache(path) -> bool:
    """Read the model file once where it fits in half the free RAM, so that neither side's first prefill
    pays for reading it from disk (the side run first would, and a cold prefill took 5-30x longer on
    the dev box). Returns whether it read the file."""
    import psutil

    if os.path.getsize(path) > psutil.virtual_memory().available // 2:
        return False
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass
    return True


def run(args) -> int:
    if args.worker:
        return run_worker(args)
    from .engine import resolve_model

    warmed = warm_page_cache(resolve_model(args.model))
    prompt = bench_tokens(args.model, args.prompt_tokens)
    decode = bench_tokens(args.model, args.decode_tokens + 7)[7:]  # other ids than the prompt's head
    results = {"dsrun": summarize(spawn(args, "dsrun", prompt, decode), len(prompt), len(decode))}
    results["page_cache_warmed"] = warmed
    if not args.no_llama_cpp:
        results["llama.cpp"] = summarize(spawn(args, "llama.cpp", prompt, decode), len(prompt), len(decode))
        ours, ref = results["dsrun"], results["llama.cpp"]
        results["ratio"] = {
            k: round(ours[k] / ref[k], 3) for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_mib")
        }
    share = expert_bandwidth_share(results)
    if share:
        results["expert_bandwidth"] = share
    if not args.no_predict:
        results["prediction"] = predict(args, len(prompt), len(decode), results["dsrun"]["decode_tok_s"])
    if args.dequant:
        results["dequant_mb_s"] = dequant_speeds()
    report = {"model": str(args.model), "prompt_tokens": len(prompt), "decode_tokens": len(decode), **results}
    if args.json:
        print_json(report)
    else:
        print_report(report)
    return 0


def predict(args, n_prompt: int, n_decode: int, measured: float) -> dict:
    """The decode speed `dsrun doctor -m` would expect for this run (the same plan, threads and backend, the
    cache holding the prompt and half the decoded tokens on average), measured here after the runs."""
    import dataclasses

    from .doctor import decode_costs, plan_bandwidths
    from .engine import resolve_model
    from .offload.planner import decode_time
    from .plan import plan_model

    path = resolve_model(args.model)
    p = plan_model(
        path, ctx=args.ctx, gpus=args.gpus, gpu_mem=args.gpu_mem, ram=args.ram, placement=args.placement
    )
    bandwidths = plan_bandwidths(p, path)
    context = n_prompt + n_decode // 2
    costs, details = decode_costs(
        path, p, bandwidths, context=context, threads=args.threads, cpu_backend=args.cpu_backend
    )
    expected = decode_time(p, bandwidths, costs, context_tokens=context)
    return {
        "decode_tok_s": round(expected.tokens_per_s, 2),
        "at_most_tok_s": round(decode_time(p, bandwidths, context_tokens=context).tokens_per_s, 2),
        "measured_over_predicted": round(measured / expected.tokens_per_s, 3),
        "context_tokens": context,
        "seconds": expected.to_json(),
        "costs": dataclasses.asdict(costs),
        "bandwidths": dataclasses.asdict(bandwidths),
        "measurements": details,
    }


def dequant_speeds() -> dict:
    from .quants import SUPPORTED, dequant_speed

    return {q.name: round(dequant_speed(q), 1) for q in sorted(SUPPORTED, key=lambda q: q.value)}


def print_report(report: dict) -> None:
    table = Table(
        title=f"dsrun bench: {report['model']} ({report['prompt_tokens']} prompt, "
        f"{report['decode_tokens']} decode tokens)"
    )
    sides = [s for s in ("dsrun", "llama.cpp", "ratio") if s in report]
    table.add_column("metric")
    for s in sides:
        table.add_column(s + (" (dsrun / llama.cpp)" if s == "ratio" else ""), justify="right")
    for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_mib", "load_s"):
        table.add_row(key, *[str(report[s].get(key, "")) for s in sides])
    console = Console()
    console.print(table)
    if not report.get("page_cache_warmed", True):
        console.print(
            "the model file is larger than half the free RAM: not read ahead, so prefill may read the disk"
        )
    if "expert_bandwidth" in report:
        eb = report["expert_bandwidth"]
        console.print(
            f"CPU experts read {eb['cpu_expert_read_gb_s']} GB/s over the decode: {100 * eb['share']:.0f}% "
            f"of the {eb['ram_read_gb_s']} GB/s this machine reads (decode time includes all of a step)"
        )
    if "profile_ms_per_token" in report["dsrun"]:
        prof = dict(report["dsrun"]["profile_ms_per_token"])
        path = prof.pop("path")
        console.print(
            f"dsrun decode per token ({path}), ms: " + ", ".join(f"{k} {v}" for k, v in prof.items())
        )
    if "prediction" in report:
        pr = report["prediction"]
        ms = {k: 1e3 * v for k, v in pr["seconds"].items() if k.endswith("_s")}
        console.print(
            f"predicted decode ≈ {pr['decode_tok_s']} tok/s (at most {pr['at_most_tok_s']}), measured "
            f"{report['dsrun']['decode_tok_s']}: measured / predicted = {pr['measured_over_predicted']}\n"
            f"  per token: {ms['weights_s']:.2f} ms weights, {ms['kv_s']:.2f} ms KV cache, "
            f"{ms['experts_s']:.2f} ms experts, {ms['layers_s']:.2f} ms layers' fixed costs, "
            f"{ms['token_s']:.2f} ms the step's ({pr['context_tokens']} tokens cached)"
        )
    if "dequant_mb_s" in report:
        dq = Table(title="dequantization, MB/s of GGUF data")
        dq.add_column("type")
        dq.add_column("MB/s", justify="right")
        for k, v in report["dequant_mb_s"].items():
            dq.add_row(k, str(v))
        console.print(dq)
