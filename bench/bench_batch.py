"""A batch job's throughput against the same requests run one by one (goal: >= 2x).

Both runs share one loaded engine: first every request alone through `Engine.generate`, then the whole job
through `dsrun batch`'s own path (scheduler, fsynced output). Temperature 0, so the answers must agree.

    .venv/bin/python bench/bench_batch.py [-m MODEL] [-n 200] [--max-tokens 16] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import dsrun
from dsrun.batch import Output, Progress, Tally, plan, run_jobs
from dsrun.openai_api import ROUTES, parse_request
from dsrun.scheduler import Scheduler

SUBJECTS = ["cats", "rivers", "bread", "stars", "trains", "music", "winter", "bees", "ships", "paper"]


def make_requests(n: int, max_tokens: int) -> list[dict]:
    """Chat and completions alternating, each with its own prompt."""
    out = []
    for i in range(n):
        subject = f"{SUBJECTS[i % len(SUBJECTS)]} (note {i})"
        if i % 2:
            url, body = "/v1/completions", {"prompt": f"Three facts about {subject}:"}
        else:
            url, body = (
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": f"Describe {subject}."}]},
            )
        body |= {"max_tokens": max_tokens, "temperature": 0}
        out.append({"custom_id": f"r{i}", "method": "POST", "url": url, "body": body})
    return out


def one_by_one(engine, requests: list[dict]) -> tuple[float, int, dict[str, str]]:
    names = (engine.name,)
    t0, tokens, texts = time.perf_counter(), 0, {}
    for r in requests:
        req = parse_request(ROUTES[r["url"]], r["body"], engine, names).request
        chunks = list(engine.generate(req.prompt, max_tokens=req.max_tokens, temperature=0, stop=req.stop))
        texts[r["custom_id"]] = "".join(c.text for c in chunks)
        tokens += chunks[-1].usage["completion_tokens"]
    return time.perf_counter() - t0, tokens, texts


def as_batch(engine, requests: list[dict], out_path: Path) -> tuple[float, int, dict[str, str]]:
    jobs, _, _ = plan([json.dumps(r) for r in requests], set(), set())
    scheduler = Scheduler(engine, max_running=16, max_queue=16)
    out, tally = Output(out_path), Tally(total=len(jobs), skipped=0)
    t0 = time.perf_counter()
    try:
        asyncio.run(run_jobs(scheduler, jobs, out, tally, Progress(tally), (engine.name,)))
    finally:
        scheduler.close()
        out.close()
    wall = time.perf_counter() - t0
    texts = {}
    for line in out_path.read_text().splitlines():
        item = json.loads(line)
        choice = item["response"]["body"]["choices"][0]
        texts[item["custom_id"]] = choice.get("text", (choice.get("message") or {}).get("content"))
    return wall, tally.completion_tokens, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="default")
    ap.add_argument("-n", type=int, default=200, help="requests in the job")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (1 on a busy machine)")
    args = ap.parse_args()
    engine = dsrun.load(args.model, threads=args.threads)
    requests = make_requests(args.n, args.max_tokens)
    alone = one_by_one(engine, requests)
    with tempfile.TemporaryDirectory() as tmp:
        batched = as_batch(engine, requests, Path(tmp) / "out.jsonl")
    same = sum(alone[2][k] == batched[2].get(k) for k in alone[2])
    print(f"{'run':>11} {'requests':>8} {'tokens':>7} {'wall s':>7} {'req/s':>6} {'tok/s':>6}")
    for name, (wall, tokens, _) in (("one by one", alone), ("batch", batched)):
        print(f"{name:>11} {args.n:>8} {tokens:>7} {wall:>7.1f} {args.n / wall:>6.2f} {tokens / wall:>6.1f}")
    print(f"batch / one by one: {alone[0] / batched[0]:.2f}x; identical answers: {same}/{args.n}")


if __name__ == "__main__":
    main()
