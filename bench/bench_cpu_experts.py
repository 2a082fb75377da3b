"""Cold experts at memory speed? Each CPU expert backend on one DeepSeek-V2-Lite-shaped MoE layer (hidden
2048, 64 experts of width 1408, 6 used + 2 shared, Q4_K; the down projections fall back to Q8_0 as in
llama.cpp's quantizer, 1408 not being a multiple of 256), against the machine's memory read bandwidth
measured in the same run, and llama.cpp decoding the same GGUF.

For each backend: shard conversion time (first load) and reuse time (second load), time per layer call
at batch 1 (one token, 6 experts, best and median of --repeats calls over random experts), the expert
bytes that call stands for in the GGUF (what llama.cpp reads) and in the backend's own layout, each as
GB/s and as a share of the measured bandwidth (goal: >= 75% at batch 1), and the output's relative
error against the F32 dequant reference.
llama.cpp: decode tokens/s of the whole generated model and the GB/s of weights that implies (every
non-expert tensor but the embedding table, plus 6/64 of the experts, per token), and its time per MoE
layer from the difference with a 2-layer model (runs interleaved, best of --llama-repeats), of which its
routed experts' share is estimated by bytes; each backend's layer time is printed as a ratio to that.

The models are generated once (dsrun.synth) and kept in the bench cache directory; --experts-only needs
neither the default model's tokenizer nor llama.cpp. The machine is shared: numbers move by tens of
percent from run to run; the report says best and median.

    .venv/bin/python bench/bench_cpu_experts.py [--layers 4] [--repeats 40] [--threads 2]
        [--backends ggml,torch,ort,openvino] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from rich.console import Console
from rich.table import Table

from dsrun.bench import spawn
from dsrun.doctor import memory_read_bandwidth
from dsrun.gguf_file import GGUFFile
from dsrun.offload import shards
from dsrun.offload.cpu_experts import (
    CANDIDATES,
    DequantExperts,
    LayerShape,
    available_backends,
    default_threads,
    make_backend,
    write_synthetic_experts,
)
from dsrun.synth import synthesize

# the layer shape: down projections of width 1408 (not a multiple of 256) fall back to Q8_0
V2_LITE = LayerShape(n_expert=64, hidden=2048, ff=1408, top_k=6, qtypes=(Q.Q4_K, Q.Q4_K, Q.Q8_0))
REFERENCE_EXPERTS = 12  # experts the F32 reference loads for the accuracy check (64 would take 2.2 GB)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", help="a DeepSeek-V2-Lite-shaped GGUF (default: generate one)")
    p.add_argument("--layers", type=int, default=4, help="layers of the generated model (V2-Lite has 27)")
    p.add_argument(
        "--experts-only",
        action="store_true",
        help="generate only one layer's expert tensors (no tokenizer needed; no llama.cpp baseline)",
    )
    p.add_argument("--backends", default=",".join(CANDIDATES))
    p.add_argument("--repeats", type=int, default=40, help="timed layer calls per backend")
    p.add_argument("--tokens", type=int, default=1, help="tokens per call (1 = decode)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--decode-tokens", type=int, default=32, help="llama.cpp tokens decoded (0 = skip it)")
    p.add_argument("--llama-repeats", type=int, default=3, help="llama.cpp decode runs (best counts)")
    p.add_argument(
        "--compare-model",
        help="the same shapes with fewer MoE layers: llama.cpp's time per MoE layer is the difference "
        "(default with a generated model: a generated 2-layer one)",
    )
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def generated_model(layers: int | None) -> Path:
    """A V2-Lite-shaped Q4_K model of `layers` layers (None: one layer's experts only), made once."""
    name = f"deepseek-v2-lite-q4_k-{layers}l" if layers else "deepseek-v2-lite-experts"
    path = shards.cache_root() / "bench" / f"{name}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"generating {path} (once; minutes) ...")
        tmp = path.with_suffix(".tmp")
        if layers:
            synthesize(tmp, preset="deepseek-v2-lite", weight_type="Q4_K", n_layer=layers)
        else:
            write_synthetic_experts(tmp, V2_LITE, layers=(1,))
        tmp.rename(path)
    return path


def first_moe_layer(f: GGUFFile) -> int:
    return min(int(name.split(".")[1]) for name in f.tensors if name.endswith("ffn_gate_exps.weight"))


def routed_steps(shape: LayerShape, n: int, tokens: int, seed: int = 0, among: int | None = None):
    """n steps of (x, expert_ids, weights, active): each token picks K distinct experts at random."""
    g = torch.Generator().manual_seed(seed)
    pool = among or shape.n_expert
    for _ in range(n):
        x = torch.randn(tokens, shape.hidden, generator=g)
        ids = torch.stack([torch.randperm(pool, generator=g)[: shape.top_k] for _ in range(tokens)])
        weights = torch.softmax(torch.randn(tokens, shape.top_k, generator=g), -1)
        yield x, ids, weights, torch.ones_like(ids, dtype=torch.bool)


def expert_bytes(tensors) -> int:
    """GGUF bytes of one expert's three matrices."""
    return sum(t.nbytes // t.shape[0] for t in tensors)


def backend_expert_bytes(backend, layer: int, tensors) -> int:
    """Bytes of one expert in the backend's layout (what its kernels read): its shard's, or the GGUF's
    for a backend that reads the file's blocks in place."""
    if getattr(backend, "store", None) is None:
        return expert_bytes(tensors)
    (path,) = backend.store.root.rglob(f"{backend.name}-v{backend.version}/blk.{layer}.shard")
    arrays = shards.read_manifest(path)["arrays"].values()
    return sum(int(np.prod(a["shape"][1:])) * np.dtype(a["dtype"]).itemsize for a in arrays)


def measure_backend(name: str, tensors, layer: int, shape: LayerShape, reference, args) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="dsrun-bench-shards-"))
    try:
        backend = make_backend(name, threads=args.threads, cache_dir=cache)
        t0 = time.perf_counter()
        backend.load_layer(layer, *tensors)
        convert_s = time.perf_counter() - t0
        del backend  # the second load is a new process's: nothing kept but the shard on disk
        backend = make_backend(name, threads=args.threads, cache_dir=cache)
        t0 = time.perf_counter()
        backend.load_layer(layer, *tensors)
        reuse_s = time.perf_counter() - t0
        own_bytes = backend_expert_bytes(backend, layer, tensors)
        times = []
        for i, step in enumerate(routed_steps(shape, args.repeats + 3, args.tokens, seed=1)):
            t0 = time.perf_counter()
            backend.forward(layer, *step)
            if i >= 3:  # warm-up calls pay one-time costs
                times.append(time.perf_counter() - t0)
        errors = [
            float(
                (backend.forward(layer, *s) - reference.forward(layer, *s)).norm()
                / reference.forward(layer, *s).norm()
            )
            for s in routed_steps(shape, 5, args.tokens, seed=2, among=REFERENCE_EXPERTS)
        ]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {
        "convert_s": convert_s,
        "reuse_s": reuse_s,
        "best_s": min(times),
        "median_s": statistics.median(times),
        "own_expert_bytes": own_bytes,
        "rel_err": max(errors),
    }


def llama_cpp_seconds_per_token(models: list[Path], args) -> list[float]:
    """llama.cpp's decode time per token on each model, best of --llama-repeats rounds; the models take
    turns within a round so that load from other processes falls on both alike."""
    prompt, decode = list(range(100, 116)), list(range(200, 200 + args.decode_tokens))
    best = [math.inf] * len(models)
    for _ in range(args.llama_repeats):
        for i, model in enumerate(models):
            ns = argparse.Namespace(
                model=str(model), ctx=256, threads=args.threads, gpus=None, gpu_mem=None, ram=None
            )
            best[i] = min(best[i], spawn(ns, "llama.cpp", prompt, decode)["decode_s"] / len(decode))
    return best


def bytes_per_token(f: GGUFFile, shape: LayerShape, prefix: str = "", routed_only: bool = False) -> int:
    """Weight bytes a decode step reads from tensors named `prefix`...: K/E of each routed expert stack,
    all of every other matrix but the embedding table (one row a token)."""
    total = 0
    for name, t in f.tensors.items():
        routed = "_exps." in name
        if name.startswith(prefix) and name != "token_embd.weight" and (routed or not routed_only):
            total += t.nbytes * shape.top_k // shape.n_expert if routed else t.nbytes
    return total


def moe_layers(f: GGUFFile) -> int:
    return sum(name.endswith("ffn_gate_exps.weight") for name in f.tensors)


def measure_llama_cpp(model: Path, f: GGUFFile, layer: int, shape: LayerShape, args) -> dict:
    compare = Path(args.compare_model) if args.compare_model else (None if args.model else generated_model(2))
    s, *s_compare = llama_cpp_seconds_per_token([model] + ([compare] if compare else []), args)
    out = {"decode_tok_s": 1 / s, "bytes_per_token": bytes_per_token(f, shape)}
    out["bytes_per_s"] = out["bytes_per_token"] / s
    if compare is not None:
        fewer = moe_layers(f) - moe_layers(GGUFFile(compare))
        out["moe_layer_s"] = (s - s_compare[0]) / fewer
        layer_bytes = bytes_per_token(f, shape, f"blk.{layer}.")
        # the routed experts' share of the layer's time, if llama.cpp reads every byte equally fast
        out["routed_share"] = bytes_per_token(f, shape, f"blk.{layer}.", routed_only=True) / layer_bytes
        out["moe_layer_bytes"] = layer_bytes
    return out


def main() -> None:
    args = parse_args()
    args.threads = args.threads or default_threads()
    torch.set_num_threads(args.threads)
    model = Path(args.model) if args.model else generated_model(None if args.experts_only else args.layers)
    f = GGUFFile(model)
    layer = first_moe_layer(f)
    tensors = [f.tensor(f"blk.{layer}.ffn_{p}_exps.weight") for p in ("gate", "up", "down")]
    shape = LayerShape.from_tensors(*tensors, top_k=f.get("expert_used_count", V2_LITE.top_k))
    for t in tensors:  # read the layer once so every backend starts from the page cache
        np.asarray(t.data).sum(dtype=np.uint64)
    reference = DequantExperts(threads=args.threads)
    reference.load_layer(layer, *tensors, experts=list(range(REFERENCE_EXPERTS)))
    bandwidth = memory_read_bandwidth()
    results = {}
    for name in args.backends.split(","):
        if name not in available_backends():
            print(f"{name}: not importable here, skipped")
            continue
        try:
            results[name] = measure_backend(name, tensors, layer, shape, reference, args)
        except Exception as e:  # one backend failing here (an old runtime, a kernel missing) is a finding
            print(f"{name}: failed: {type(e).__name__}: {e}")
    bandwidth_after = memory_read_bandwidth()
    report = {
        "model": str(model),
        "layer": layer,
        "shape": shape.key(),
        "threads": args.threads,
        "tokens_per_call": args.tokens,
        "memory_read_bandwidth": [bandwidth, bandwidth_after],
        "experts_per_call": shape.top_k * args.tokens,  # at most: tokens may share experts
        "gguf_expert_bytes": expert_bytes(tensors),
        "backends": results,
    }
    if args.decode_tokens and "token_embd.weight" in f.tensors:
        report["llama_cpp"] = measure_llama_cpp(model, f, layer, shape, args)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)


def print_report(r: dict) -> None:
    console = Console(width=150)
    before, after = (b / 1e9 for b in r["memory_read_bandwidth"])
    bw = max(r["memory_read_bandwidth"])
    console.print(
        f"{r['shape']} layer {r['layer']} of {Path(r['model']).name}, {r['threads']} threads, "
        f"{r['tokens_per_call']} token(s) a call; memory read bandwidth {before:.1f} / {after:.1f} GB/s "
        "(before / after; shares use the higher)"
    )
    table = Table(
        "backend", "convert", "reuse", "best", "median", "GGUF GB/s", "share", "own GB/s", "share", "rel err"
    )
    for name, b in r["backends"].items():
        gguf = r["gguf_expert_bytes"] * r["experts_per_call"] / b["best_s"]
        own = b["own_expert_bytes"] * r["experts_per_call"] / b["best_s"]
        table.add_row(
            name,
            f"{b['convert_s']:.1f} s",
            f"{b['reuse_s'] * 1e3:.0f} ms",
            f"{b['best_s'] * 1e3:.2f} ms",
            f"{b['median_s'] * 1e3:.2f} ms",
            f"{gguf / 1e9:.1f}",
            f"{gguf / bw:.0%}",
            f"{own / 1e9:.1f}",
            f"{own / bw:.0%}",
            f"{b['rel_err']:.2%}",
        )
    console.print(table)
    if "llama_cpp" in r:
        lc = r["llama_cpp"]
        console.print(
            f"llama.cpp: {lc['decode_tok_s']:.1f} tok/s decoding the whole model, "
            f"{lc['bytes_per_token'] / 1e6:.0f} MB of weights a token: {lc['bytes_per_s'] / 1e9:.1f} GB/s, "
            f"{lc['bytes_per_s'] / bw:.0%} of the bandwidth"
        )
    if r.get("llama_cpp", {}).get("moe_layer_s", 0) <= 0 and "moe_layer_s" in r.get("llama_cpp", {}):
        console.print("llama.cpp per MoE layer: the deeper model was not slower; too noisy to tell")
    elif "moe_layer_s" in r.get("llama_cpp", {}):
        routed = lc["moe_layer_s"] * lc["routed_share"]
        layer_mb, layer_ms = lc["moe_layer_bytes"] / 1e6, lc["moe_layer_s"] * 1e3
        console.print(
            f"llama.cpp per MoE layer: {layer_ms:.2f} ms for {layer_mb:.0f} MB "
            f"({layer_mb / layer_ms:.1f} GB/s); its routed experts, {lc['routed_share']:.0%} of those bytes: "
            f"~{routed * 1e3:.2f} ms"
        )
        for name, b in r["backends"].items():
            console.print(
                f"  {name}: routed experts {b['best_s'] * 1e3:.2f} ms, {routed / b['best_s']:.2f}x llama.cpp"
            )


if __name__ == "__main__":
    main()
