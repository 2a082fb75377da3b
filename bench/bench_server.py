"""Server throughput under concurrency, and what prefix reuse does to a second chat turn's first token.

Starts `dsrun serve` on a free port, then:
  1. N concurrent streams (N = 1, 4, 8, 16), each up to --max-tokens tokens: aggregate generated tokens/s,
     and its ratio to the single-stream figure measured in the same run (goal: >= 2.5x at 8 streams);
  2. a chat's first turn, its second turn (which continues the first: its KV is reused), and the same
     second turn with a different first message (nothing to reuse): time to first token of each.

    .venv/bin/python bench/bench_server.py [-m MODEL] [--max-tokens 64] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

TOPICS = [
    "a lighthouse",
    "a dragon",
    "the moon",
    "a baker",
    "a robot",
    "a river",
    "an old map",
    "a violin",
    "a storm",
    "a garden",
    "a train",
    "a fox",
    "a clock",
    "a mountain",
    "a ship",
    "a library",
]
RULES = "\n".join(
    f"{i}. Answer rule {i}: be concise, be accurate, cite sources where you can." for i in range(1, 31)
)


def start_server(model: str, threads: int | None, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "dsrun.cli", "serve", "-m", model, "--port", "0", "--max-running", "16"]
    cmd += ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        text = log.read_text()
        port = re.search(r"listening on http://127\.0\.0\.1:(\d+)", text)
        if port and "loaded in" in text:
            return proc, f"http://127.0.0.1:{port.group(1)}"
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{text}")
        time.sleep(0.2)
    raise SystemExit("the server did not start in time")


async def stream_chat(http: httpx.AsyncClient, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat: time to first token, tokens generated, the text."""
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, text, usage = None, [], None
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    ttft = ttft or time.perf_counter() - t0
                    text.append(choice["delta"]["content"])
    return {"ttft": ttft, "tokens": usage["completion_tokens"], "text": "".join(text)}


async def concurrency_level(url: str, n: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        t0 = time.perf_counter()
        runs = await asyncio.gather(
            *(
                stream_chat(
                    http, [{"role": "user", "content": f"Write a long story about {TOPICS[i]}."}], max_tokens
                )
                for i in range(n)
            )
        )
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in runs)
    return {
        "streams": n,
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "ttft_p50": statistics.median(r["ttft"] for r in runs),
    }


async def second_turn(url: str) -> dict:
    first = [{"role": "system", "content": RULES}, {"role": "user", "content": "What is a lighthouse for?"}]
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        turn1 = await stream_chat(http, first, 16)
        follow = [
            {"role": "assistant", "content": turn1["text"]},
            {"role": "user", "content": "And who keeps it?"},
        ]
        turn2 = await stream_chat(http, first + follow, 16)
        cold = [
            {"role": "system", "content": "Cold. " + RULES},
            *first[1:],
            *follow,
        ]  # differs from token ~3 on
        cold2 = await stream_chat(http, cold, 16)
        stats = (await http.get("/stats")).json()["scheduler"]
    return {
        "turn1": turn1["ttft"],
        "turn2": turn2["ttft"],
        "cold2": cold2["ttft"],
        "reused_tokens": stats["prefix_reused_tokens"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="default")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--threads", type=int, default=None, help="the server's CPU threads (1 on a busy machine)"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(args.model, args.threads, Path(tmp) / "server.log")
        try:
            asyncio.run(concurrency_level(url, 1, 8))  # warm-up: first-call allocations
            levels = [asyncio.run(concurrency_level(url, n, args.max_tokens)) for n in (1, 4, 8, 16)]
            reuse = asyncio.run(second_turn(url))
        finally:
            proc.terminate()
            proc.wait()
    base = levels[0]["tok_s"]
    print(f"{'streams':>7} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'x 1-stream':>10} {'TTFT p50 s':>10}")
    for lv in levels:
        print(
            f"{lv['streams']:>7} {lv['tokens']:>7} {lv['wall_s']:>7.2f} {lv['tok_s']:>7.1f} "
            f"{lv['tok_s'] / base:>10.2f} {lv['ttft_p50']:>10.3f}"
        )
    print(
        f"\nTTFT first turn {reuse['turn1']:.3f}s, second turn (prefix reused) {reuse['turn2']:.3f}s, "
        f"same second turn with nothing to reuse {reuse['cold2']:.3f}s; "
        f"prompt tokens reused in total: {reuse['reused_tokens']}"
    )


if __name__ == "__main__":
    main()
