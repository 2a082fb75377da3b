"""`dsrun serve` as a real process on the default model, driven by the official openai client.

One server (TCP on port 0 plus a Unix socket, audit log on) serves most tests; a second one with
--api-key and a tiny queue covers auth, loading and 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import httpx
import openai
import pytest

MODEL_CTX = 512  # small enough that context_length_exceeded is cheap to provoke
THREADS = os.environ.get("DSRUN_TEST_THREADS", "2")  # as conftest sets for the test process itself


class Server:
    def __init__(self, tmp_path, *extra: str):
        self.socket = str(tmp_path / "dsrun.sock")
        self.audit = tmp_path / "audit.jsonl"
        self.log = tmp_path / "server.log"
        args = ["serve", "--port", "0", "--socket", self.socket, "--ctx", str(MODEL_CTX)]
        with open(self.log, "wb") as log:
            cmd = [sys.executable, "-m", "dsrun.cli", *args, "--threads", THREADS, *extra]
            # exact dense path: prefix reuse re-runs only a prompt's last token, and ggml's quantized
            # kernels can round that one step apart from a full prefill at near-ties (README: prefix cache)
            env = os.environ | {"DSRUN_DENSE": "torch"}
            self.proc = subprocess.Popen(cmd, stderr=log, stdout=log, env=env)
        self.port = int(self.wait_for_log(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_for_log(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log.read_text())
            if m:
                return m
            assert self.proc.poll() is None, f"server exited: {self.log.read_text()}"
            time.sleep(0.1)
        raise TimeoutError(f"no '{pattern}' in the server log: {self.log.read_text()}")

    def wait_ready(self) -> None:
        self.wait_for_log(r"loaded in")

    def client(self, uds: bool = False, **kw) -> openai.OpenAI:
        http = httpx.Client(transport=httpx.HTTPTransport(uds=self.socket)) if uds else None
        base = "http://localhost/v1" if uds else f"{self.url}/v1"
        return openai.OpenAI(
            base_url=base, api_key=kw.pop("api_key", "none"), max_retries=0, http_client=http
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    s = Server(tmp, "--audit-log", str(tmp / "audit.jsonl"))
    s.wait_ready()
    yield s
    s.stop()
    assert s.proc.returncode in (0, -signal.SIGTERM), s.log.read_text()  # uvicorn re-raises SIGTERM when done
    assert not os.path.exists(s.socket), "the Unix socket file was left behind"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """Started without waiting for the model, so the first test can see it loading."""
    s = Server(
        tmp_path_factory.mktemp("keyed"), "--api-key", "sekrit", "--max-running", "2", "--max-queue", "1"
    )
    yield s
    s.stop()


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def greedy_chat(client, text: str, max_tokens: int = 8) -> str:
    r = client.chat.completions.create(
        model="default", messages=chat(text), max_tokens=max_tokens, temperature=0
    )
    return r.choices[0].message.content


# --- transports ---


def test_models_and_health_over_tcp_and_unix_socket(server):
    assert stat.S_IMODE(os.stat(server.socket).st_mode) == 0o600
    for uds in (False, True):
        models = server.client(uds).models.list().data
        assert len(models) == 1 and models[0].id.startswith("SmolLM2")
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_chat_whole_and_streamed_agree_over_both_transports(server):
    whole = server.client().chat.completions.create(
        model="default", messages=chat("Name a colour."), max_tokens=8, temperature=0
    )
    assert whole.object == "chat.completion" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 8 and whole.usage.prompt_tokens > 0
    chunks = list(
        server.client(uds=True).chat.completions.create(
            model="default",
            messages=chat("Name a colour."),
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stop_and_max_tokens(server):
    c = server.client()
    full = c.completions.create(model="default", prompt="1, 2, 3, 4,", max_tokens=6, temperature=0)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 6
    text = full.choices[0].text
    stop = text.strip()[-2:]  # something it is sure to produce, past the start
    cut = c.completions.create(
        model="default", prompt="1, 2, 3, 4,", max_tokens=6, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    streamed = c.completions.create(
        model="default", prompt="1, 2, 3, 4,", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(ch.choices[0].text for ch in streamed) == text


def test_a_seed_reproduces_a_sampled_reply(server):
    c = server.client()
    runs = [
        c.chat.completions.create(
            model="default", messages=chat("Invent a word."), max_tokens=8, temperature=1.0, seed=1234
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_logprobs_in_both_routes(server):
    c = server.client()
    r = c.chat.completions.create(
        model="default", messages=chat("Hi"), max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert content[0].logprob == content[0].top_logprobs[0].logprob  # greedy picks the likeliest
    r = c.completions.create(model="default", prompt="Hello", max_tokens=3, temperature=0, logprobs=1)
    assert len(r.choices[0].logprobs.token_logprobs) == 3 and len(r.choices[0].logprobs.top_logprobs[0]) == 1


# --- errors ---

BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"max_tokens": 4}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": chat("hi"), "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": chat("hi"), "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": chat("hi"), "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"messages": chat("hi"), "stop": 3}, 400, "stop"),
    (
        "/v1/chat/completions",
        {"messages": chat("hi"), "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    ("/v1/chat/completions", {"messages": chat("hi"), "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": chat("hi"), "model": "gpt-9"}, 404, "model"),
    ("/v1/completions", {"prompt": 7}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "word " * MODEL_CTX}, 400, "prompt"),
    ("/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_error_bodies(server, route, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + route, content=content)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_context_length_exceeded_through_the_client(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(
            model="default", messages=chat("word " * MODEL_CTX), max_tokens=2
        )
    assert e.value.code == "context_length_exceeded"


# --- concurrency ---


def test_sixteen_concurrent_streams_match_the_single_stream_answers(server):
    questions = ["Name a fruit.", "Name a planet.", "Name a river.", "Name a tree."]
    alone = {q: greedy_chat(server.client(), q) for q in questions}

    async def one(client, q):
        stream = await client.chat.completions.create(
            model="default", messages=chat(q), max_tokens=8, temperature=0, stream=True
        )
        return q, "".join([c.choices[0].delta.content or "" async for c in stream])

    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        return await asyncio.gather(*(one(client, q) for q in questions * 4))

    for q, text in asyncio.run(all_at_once()):
        assert text == alone[q], q


def scheduler_stats(server) -> dict:
    return httpx.get(f"{server.url}/stats").json()["scheduler"]


def scheduler_when(server, done, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while not done(st := scheduler_stats(server)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return st


def test_clients_leaving_mid_reply_free_their_sequences(server):
    body = {"messages": chat("Count from one to two hundred."), "max_tokens": 300}
    url = f"{server.url}/v1/chat/completions"
    before = scheduler_stats(server)
    with socket.create_connection(("127.0.0.1", server.port)) as raw:  # a whole-reply client that gives up
        data = json.dumps(body).encode()
        raw.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (len(data), data)
        )
        scheduler_when(server, lambda st: st["admitted"] > before["admitted"])
    with httpx.Client(timeout=60) as http, contextlib.ExitStack() as streams:
        for _ in range(10):
            lines = streams.enter_context(http.stream("POST", url, json=body | {"stream": True})).iter_lines()
            assert next(line for line in lines if line).startswith("data: ")
    st = scheduler_when(server, lambda st: st["running"] == 0)
    assert st["running"] == 0 and st["queue_length"] == 0
    assert st["cancelled"] - before["cancelled"] == 11
    assert greedy_chat(server.client(), "Still there?", max_tokens=2)


def test_metrics_and_audit_log(server):
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "requests_total",
        "prompt_tokens_total",
        "generation_tokens_total",
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_count",
        "queue_length",
        "running_sequences",
        "memory_bytes",
    ):
        assert f"dsrun_{name}" in text
    assert 'dsrun_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'le="+Inf"' in text
    lines = [json.loads(line) for line in server.audit.read_text().splitlines()]
    chats = [a for a in lines if a["route"] == "/v1/chat/completions" and a["status"] == 200]
    assert chats and all(a["prompt_tokens"] > 0 and a["latency_s"] > 0 for a in chats)
    assert {"time", "client", "route", "status", "completion_tokens"} <= set(lines[0])
    assert not any("prompt" in a for a in lines), "prompt text is logged only with --audit-prompts"


def test_stats_carry_engine_and_scheduler_numbers(server):
    st = httpx.get(f"{server.url}/stats").json()
    assert st["model"].startswith("SmolLM2") and st["memory"]["tiers"]
    assert st["tokens_per_s"]["decode"] > 0 and st["ttft_s"] > 0
    assert st["scheduler"]["generated_tokens"] > 0


# --- the --api-key server ---


def test_health_is_503_while_loading_then_200(keyed):
    r = httpx.get(f"{keyed.url}/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    r = httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": "Bearer sekrit"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
    keyed.wait_ready()
    assert httpx.get(f"{keyed.url}/health").status_code == 200


def test_api_key_is_required_on_v1_routes(keyed):
    keyed.wait_ready()
    for key in ("none", "sekri", "sekrit2"):
        with pytest.raises(openai.AuthenticationError):
            keyed.client(api_key=key).models.list()
    assert httpx.post(f"{keyed.url}/v1/completions", json={"prompt": "x"}).status_code == 401
    assert keyed.client(uds=True, api_key="sekrit").models.list().data


def test_a_full_queue_answers_429_with_retry_after(keyed):
    keyed.wait_ready()

    async def post(http):
        body = {"prompt": "Once upon a time", "max_tokens": 40}
        return await http.post("/v1/completions", json=body, headers={"Authorization": "Bearer sekrit"})

    async def burst():
        async with httpx.AsyncClient(base_url=keyed.url, timeout=120) as http:
            return await asyncio.gather(*(post(http) for _ in range(5)))

    replies = asyncio.run(burst())
    refused = [r for r in replies if r.status_code == 429]
    assert refused and all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert refused[0].json()["error"]["type"] == "rate_limit_error"
    assert sum(r.status_code == 200 for r in replies) >= 3
