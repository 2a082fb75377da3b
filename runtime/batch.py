"""`dsrun batch IN.jsonl -o OUT.jsonl`: an OpenAI Batch-format job run through the scheduler, resumable.

Requests run concurrently; each result is appended to OUT as one whole line (one write, then fsync), so a
killed job leaves at most one torn line at the end, which the next run cuts away. A re-run skips every
request OUT already answers. Replies are what the server would send: both go through `openai_api`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .cli import add_model_arguments, load_kwargs, print_json
from .errors import DsrunError
from .openai_api import ROUTES, complete

LINE_ERROR_ID = "batch_line_"  # + input line number: the id of a line that is not a runnable request
PLAIN_PROGRESS_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal


def add_arguments(p) -> None:
    p.add_argument("input", help="JSONL of {custom_id, method, url, body} requests")
    p.add_argument("-o", "--output", required=True, help="JSONL results; appended to, so a re-run resumes")
    add_model_arguments(p)
    p.add_argument("--max-running", type=int, default=16, help="requests decoded together")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


@dataclass(frozen=True)
class Job:
    custom_id: str
    kind: str  # "chat" | "completion"
    body: dict


@dataclass(frozen=True)
class LineError:
    line_no: int
    custom_id: str | None
    code: str
    message: str


def parse_line(line_no: int, raw: str, seen: set[str]) -> Job | LineError:
    """One input line as a request, or what is wrong with it; `seen` collects custom_ids so far."""

    def bad(code: str, message: str, custom_id=None) -> LineError:
        return LineError(line_no, custom_id, code, f"line {line_no}: {message}")

    try:
        item = json.loads(raw)
    except json.JSONDecodeError as e:
        return bad("invalid_json", f"not valid JSON ({e})")
    if not isinstance(item, dict):
        return bad("invalid_request", "must be a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return bad("missing_custom_id", "needs a non-empty string 'custom_id'")
    if custom_id in seen:
        return bad("duplicate_custom_id", f"custom_id '{custom_id}' was used by an earlier line", custom_id)
    seen.add(custom_id)
    if item.get("method", "POST") != "POST":
        return bad("invalid_method", f"method must be POST, not {item.get('method')!r}", custom_id)
    if item.get("url") not in ROUTES:
        return bad("invalid_url", f"url {item.get('url')!r} is not one of {', '.join(ROUTES)}", custom_id)
    if not isinstance(item.get("body"), dict):
        return bad("invalid_body", "'body' must be a JSON object", custom_id)
    return Job(custom_id, ROUTES[item["url"]], item["body"])


def read_done(out: Path) -> tuple[set[str], set[str]]:
    """(custom_ids answered, ids of line errors written) in OUT, after cutting away a torn last line."""
    if not out.exists():
        return set(), set()
    data = out.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) < len(data):  # killed mid-write: the line was never complete
        with open(out, "r+b") as f:
            f.truncate(len(whole))
    answered, line_errors = set(), set()
    for n, line in enumerate(whole.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            item = json.loads(line)
            is_line_error = item["id"].startswith(LINE_ERROR_ID)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DsrunError(
                f"{out} line {n} is not a batch result ({e}): is it the right output file?"
            ) from e
        if is_line_error:
            line_errors.add(item["id"])
        else:
            answered.add(item["custom_id"])
    return answered, line_errors


class Output:
    """Appends whole lines; each is one write then fsync, so it is either fully on disk or absent."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, obj: dict) -> None:
        data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
        while data:
            data = data[os.write(self.fd, data) :]
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def result_line(job: Job, status: int, body: dict) -> dict:
    response = {"status_code": status, "request_id": f"req_{uuid.uuid4().hex[:24]}", "body": body}
    return {
        "id": f"batch_req_{uuid.uuid4().hex[:24]}",
        "custom_id": job.custom_id,
        "response": response,
        "error": None,
    }


def error_line(e: LineError) -> dict:
    return {
        "id": f"{LINE_ERROR_ID}{e.line_no}",
        "custom_id": e.custom_id,
        "response": None,
        "error": {"code": e.code, "message": e.message},
    }


@dataclass
class Tally:
    total: int
    skipped: int
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    def add(self, status: int, body: dict | None) -> None:
        usage = (body or {}).get("usage") or {}
        self.prompt_tokens += usage.get("prompt_tokens", 0)
        self.completion_tokens += usage.get("completion_tokens", 0)
        if status == 200:
            self.succeeded += 1
        else:
            self.failed += 1

    def tokens_per_s(self) -> float:
        return self.completion_tokens / max(time.perf_counter() - self.t0, 1e-9)

    def eta_s(self) -> float | None:
        left = self.total - self.skipped - self.done
        return (time.perf_counter() - self.t0) / self.done * left if self.done else None


class Progress:
    """On a terminal a rich bar (done/total, tokens/s, ETA); otherwise a plain line now and then."""

    def __init__(self, tally: Tally):
        self.tally = tally
        self.bar = None
        self.last_line = time.perf_counter()
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("batch"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.1f} tok/s"),
                TimeRemainingColumn(),
                transient=True,
            )
            self.task = self.bar.add_task("batch", total=tally.total, completed=tally.skipped, rate=0.0)
            self.bar.start()

    def update(self) -> None:
        t = self.tally
        if self.bar is not None:
            self.bar.update(self.task, completed=t.skipped + t.done, rate=t.tokens_per_s())
        elif time.perf_counter() - self.last_line >= PLAIN_PROGRESS_EVERY:
            self.last_line = time.perf_counter()
            eta = t.eta_s()
            eta_text = f"{eta:.0f}s" if eta is not None else "?"
            print(
                f"dsrun batch: {t.skipped + t.done}/{t.total} done, {t.tokens_per_s():.1f} tok/s, "
                f"ETA {eta_text}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


async def run_jobs(scheduler, jobs: list[Job], out: Output, tally: Tally, progress: Progress, names) -> None:
    """All jobs through the scheduler, at most two per running slot in flight so it never refuses one."""
    slots = asyncio.Semaphore(2 * scheduler.max_running)

    async def one(job: Job) -> None:
        async with slots:
            status, body = await complete(scheduler, job.kind, job.body, names)
            while status == 429:  # a finished request can hold its slot until the next step: wait, not fail
                await asyncio.sleep(0.05)
                status, body = await complete(scheduler, job.kind, job.body, names)
        out.write(result_line(job, status, body))
        tally.add(status, body)
        progress.update()

    tasks = [asyncio.ensure_future(one(job)) for job in jobs]
    try:
        await asyncio.gather(*tasks)
    finally:  # Ctrl+C: stop what is still running; finished lines are already on disk
        for t in tasks:
            t.cancel()


def plan(lines: list[str], answered: set[str], written_errors: set[str]):
    """(jobs to run, line errors to write, how many lines OUT already answers)."""
    seen: set[str] = set()
    jobs, errors, skipped = [], [], 0
    for line_no, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        parsed = parse_line(line_no, raw, seen)
        if isinstance(parsed, LineError):
            done, todo = f"{LINE_ERROR_ID}{line_no}" in written_errors, errors
        else:
            done, todo = parsed.custom_id in answered, jobs
        if done:
            skipped += 1
        else:
            todo.append(parsed)
    return jobs, errors, skipped


def run(args) -> int:
    import dsrun

    from .scheduler import Scheduler

    t_start = time.perf_counter()
    source, out_path = Path(args.input), Path(args.output)
    if not source.is_file():
        raise DsrunError(f"input file not found: {source}")
    answered, written_errors = read_done(out_path)
    jobs, errors, skipped = plan(source.read_text(encoding="utf-8").splitlines(), answered, written_errors)
    tally = Tally(total=len(jobs) + len(errors) + skipped, skipped=skipped)
    out = Output(out_path)
    for e in errors:
        out.write(error_line(e))
    tally.failed += len(errors)
    interrupted = False
    if jobs:
        engine = dsrun.load(args.model, **load_kwargs(args))
        # room for every request in flight plus finished ones the scheduler has not reaped yet
        scheduler = Scheduler(engine, max_running=args.max_running, max_queue=2 * args.max_running)
        tally.t0 = time.perf_counter()  # tokens/s and ETA count from when the model is ready
        progress = Progress(tally)
        try:
            asyncio.run(run_jobs(scheduler, jobs, out, tally, progress, (engine.name, args.model)))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            progress.close()
            scheduler.close()
            engine.close()
    out.close()
    report(args, tally, time.perf_counter() - t_start, interrupted)
    return 130 if interrupted else 0


def report(args, t: Tally, wall: float, interrupted: bool) -> None:
    """wall counts the model load too; tokens/s counts from when the model was ready."""
    rate = t.tokens_per_s()
    summary = {
        "input": args.input,
        "output": args.output,
        "total": t.total,
        "succeeded": t.succeeded,
        "failed": t.failed,
        "skipped": t.skipped,
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(rate, 2),
        "interrupted": interrupted,
    }
    if args.json:
        print_json(summary)
        return
    state = "interrupted (run again to resume)" if interrupted else "done"
    print(
        f"dsrun batch {state}: {t.succeeded} succeeded, {t.failed} failed, {t.skipped} already done; "
        f"{t.completion_tokens} tokens in {wall:.1f}s ({rate:.1f} tok/s) -> {args.output}",
        file=sys.stderr,
    )
