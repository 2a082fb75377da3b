"""`dsrun batch`: bad lines become error lines, and a job killed at random moments resumes exactly."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from dsrun.batch import LINE_ERROR_ID, parse_line, plan, read_done

THREADS = os.environ.get("DSRUN_TEST_THREADS", "2")  # as conftest sets for the test process itself
TOPICS = ["a " + w for w in "fruit planet river tree bird metal colour city dance tool".split()]
BAD_LINES = [
    "{this is not json",
    json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}),  # no custom_id
    json.dumps({"custom_id": "chat-0", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}),
    json.dumps({"custom_id": "emb", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}),
    json.dumps(
        {"custom_id": "n2", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "n": 2}}
    ),
]
ERROR_CODES = {"invalid_json", "missing_custom_id", "duplicate_custom_id", "invalid_url"}


def requests() -> list[dict]:
    """Twenty temperature-0 requests, chat and completions alternating."""
    out = []
    for i, topic in enumerate(TOPICS):
        chat = {
            "messages": [{"role": "user", "content": f"Name {topic}."}],
            "max_tokens": 6,
            "temperature": 0,
        }
        out.append({"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions", "body": chat})
        text = {"prompt": f"A short list of {topic}s:", "max_tokens": 6, "temperature": 0}
        out.append({"custom_id": f"text-{i}", "method": "POST", "url": "/v1/completions", "body": text})
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    path = tmp_path_factory.mktemp("batch") / "in.jsonl"
    lines = [json.dumps(r) for r in requests()]
    lines[3:3] = BAD_LINES[:2]
    lines[9:9] = BAD_LINES[2:]
    path.write_text("\n".join(lines) + "\n")
    return path


def start(job, out, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dsrun.cli", "batch", str(job), "-o", str(out), "--max-running", "4"]
    cmd += ["--threads", THREADS, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def lines_of(out) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def line_count(out) -> int:
    """Lines started so far, a torn last one included."""
    return len(out.read_bytes().splitlines()) if out.exists() else 0


def answers(out) -> dict[str, tuple]:
    """custom_id -> what a temperature-0 reply must reproduce: status, text, finish_reason, usage."""
    result = {}
    for item in lines_of(out):
        if item["response"] is None:
            continue
        body = item["response"]["body"]
        choice = (body.get("choices") or [{}])[0]
        text = choice.get("text", (choice.get("message") or {}).get("content"))
        result[item["custom_id"]] = (
            item["response"]["status_code"],
            text,
            choice.get("finish_reason"),
            json.dumps(body.get("usage")),
        )
    return result


@pytest.fixture(scope="module")
def reference(job, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out.jsonl"
    p = start(job, out, "--json")
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr.decode()
    return out, json.loads(stdout)


def test_an_uninterrupted_job_answers_every_line(reference):
    out, summary = reference
    items = lines_of(out)
    assert summary["total"] == len(items) == 25
    assert summary["succeeded"] == 20 and summary["failed"] == 5 and summary["completion_tokens"] > 0
    errors = [i for i in items if i["error"]]
    assert {e["error"]["code"] for e in errors} == ERROR_CODES
    assert all(e["response"] is None and e["error"]["message"].startswith("line ") for e in errors)
    failing = next(i for i in items if i["custom_id"] == "n2")
    assert failing["response"]["status_code"] == 400 and failing["response"]["body"]["error"]["param"] == "n"
    ok = [i for i in items if i["response"] and i["response"]["status_code"] == 200]
    assert len({i["custom_id"] for i in ok}) == 20


def test_killed_and_rerun_every_request_once_with_the_same_answers(job, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    rng = random.Random(int(time.time()))
    for round_no in range(4):
        p = start(job, out)
        seen = line_count(out)
        deadline = time.monotonic() + 120
        while line_count(out) <= seen and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.8))
        if round_no == 3:  # Ctrl+C stops cleanly, with a resumable file
            p.send_signal(signal.SIGINT)
            assert p.wait(timeout=60) in (0, 130)
        else:
            p.kill()
            p.wait()
    p = start(job, out)
    _, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr.decode()
    items = lines_of(out)  # every line parses
    ids = [i["id"] for i in items]
    assert len(ids) == len(set(ids)) == 25
    results = [i["custom_id"] for i in items if not i["id"].startswith(LINE_ERROR_ID)]
    assert len(results) == len(set(results)) == 21  # twenty requests and the failing one
    assert answers(out) == answers(reference[0])


def test_a_torn_last_line_is_cut_away(tmp_path):
    out = tmp_path / "out.jsonl"
    whole = [{"id": "batch_req_1", "custom_id": "a"}, {"id": f"{LINE_ERROR_ID}4", "custom_id": None}]
    out.write_text("".join(json.dumps(w) + "\n" for w in whole) + '{"id": "batch_req_2", "cus')
    assert read_done(out) == ({"a"}, {f"{LINE_ERROR_ID}4"})
    assert out.read_text().endswith("}\n") and len(out.read_text().splitlines()) == 2


def test_plan_skips_what_is_done_and_flags_bad_lines():
    lines = [json.dumps(r) for r in requests()[:3]] + ["", "nope", json.dumps(requests()[0])]
    jobs, errors, skipped = plan(lines, answered={"chat-0"}, written_errors={f"{LINE_ERROR_ID}5"})
    assert [j.custom_id for j in jobs] == ["text-0", "chat-1"]
    assert skipped == 2  # chat-0 answered; line 5 already reported
    assert [e.code for e in errors] == ["duplicate_custom_id"]
    assert parse_line(
        1, json.dumps({"custom_id": "x", "method": "GET", "url": "/v1/completions"}), set()
    ).code == ("invalid_method")


def test_a_ctrl_c_while_the_command_shuts_down_keeps_its_exit_code():
    """The interrupt-and-rerun test's race, made certain: SIGINT arrives while the interpreter tears down
    module globals (an engine's, say), after Python has put back SIGINT's default action; the command
    still ends with main's code instead of killed by the signal."""
    script = (
        "import os, signal, time, dsrun.cli as cli\n"
        "class Late:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(0.2)\n"
        "late = Late()\n"
        "cli.main = lambda argv=None: 0\n"
        "cli.entry()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
