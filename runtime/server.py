"""`dsrun serve`: the OpenAI-compatible server, over TCP and/or a Unix socket (mode 0600).

The sockets are bound before the model loads, so clients can poll /health (503 until ready). Requests go
through `openai_api` into the continuous-batching `Scheduler`; one ASGI wrapper counts every response
for /metrics and writes the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import socket
import stat
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from .cli import add_model_arguments, load_kwargs
from .errors import DsrunError
from .openai_api import ROUTES, ApiError, Reply, open_stream, parse_request, sse_events, whole_reply

KNOWN_ROUTES = ("/health", "/metrics", "/stats", "/v1/models", *ROUTES)


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="TCP address (default 127.0.0.1: this machine only)")
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help="TCP port; 0 picks a free one (default 8080, or no TCP when --socket is given)",
    )
    p.add_argument(
        "--socket", default=None, help="also (or only) serve on this Unix socket, created mode 0600"
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("DSRUN_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $DSRUN_API_KEY)",
    )
    p.add_argument("--audit-log", default=None, help="append one JSON line per request to this file")
    p.add_argument("--audit-prompts", action="store_true", help="include prompt text in the audit log")
    p.add_argument("--max-running", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 429")


class ServerState:
    """What the routes share: the engine once loaded, counters, the audit log."""

    def __init__(self, args):
        self.args = args
        self.engine = None
        self.scheduler = None
        self.load_error: str | None = None
        self.model_names: tuple[str, ...] = ()
        self.responses: Counter[tuple[str, int]] = Counter()  # (route, status) -> count
        self.audit = open(args.audit_log, "a", encoding="utf-8") if args.audit_log else None
        self.on_load_failure = lambda: None

    @property
    def ready(self) -> bool:
        return self.scheduler is not None

    def load(self) -> None:
        """Runs in a thread: the server answers /health (503) meanwhile."""
        import dsrun

        from .scheduler import Scheduler

        try:
            engine = dsrun.load(self.args.model, **load_kwargs(self.args))
        except Exception as e:
            self.load_error = str(e) if isinstance(e, DsrunError) else f"{type(e).__name__}: {e}"
            print(f"dsrun: error: {self.load_error}", file=sys.stderr, flush=True)
            self.on_load_failure()
            return
        self.model_names = (engine.name, self.args.model)
        self.engine = engine
        self.scheduler = Scheduler(engine, max_running=self.args.max_running, max_queue=self.args.max_queue)
        print(f"dsrun: {engine.name} loaded in {engine.load_seconds:.1f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        """At lifespan shutdown, which runs before uvicorn re-raises a SIGTERM it caught."""
        if self.args.socket and os.path.exists(self.args.socket):
            os.unlink(self.args.socket)
        if self.scheduler:
            self.scheduler.close()
            self.engine.close()
        if self.audit:
            self.audit.close()

    def record(self, scope: dict, info: dict, seconds: float) -> None:
        """Count one finished response and write its audit line."""
        route = scope["path"] if scope["path"] in KNOWN_ROUTES else "other"
        self.responses[(route, info["status"])] += 1
        if not self.audit:
            return
        reply, client = info.get("reply"), scope.get("client")
        line = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "client": f"{client[0]}:{client[1]}" if client and client[0] else "unix",
            "method": scope["method"],
            "route": scope["path"],
            "status": info["status"],
            "complete": info.get("complete", False),  # false when the client left mid-reply
            "prompt_tokens": len(reply.api.request.prompt) if reply else None,
            "completion_tokens": reply.tokens if reply else None,
            "latency_s": round(seconds, 4),
        }
        if "prompt" in info:
            line["prompt"] = info["prompt"]
        self.audit.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.audit.flush()


class Observe:
    """ASGI wrapper: notes each response's status and completion, then hands it to ServerState.record."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        info = scope["dsrun"] = {"status": 500}
        t0 = time.perf_counter()

        async def observed_send(message):
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                info["complete"] = True
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.state.record(scope, info, time.perf_counter() - t0)


def create_app(state: ServerState):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=state.load, name="dsrun-load", daemon=True).start()
        yield
        state.close()

    app = FastAPI(title="dsrun", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = "no such route" if e.status_code == 404 else str(e.detail)
        return JSONResponse(
            ApiError(e.status_code, f"{message}: {request.method} {request.url.path}").body(),
            status_code=e.status_code,
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        error = ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    def require_ready(request: Request) -> None:
        """Auth first (nothing leaks to strangers), then the model must be loaded."""
        key = state.args.api_key
        given = request.headers.get("authorization", "")
        if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(
                401, "a valid API key is required: send 'Authorization: Bearer KEY'", code="invalid_api_key"
            )
        if not state.ready:
            message = state.load_error or "the model is still loading: retry shortly"
            raise ApiError(
                503, message, type="server_error", code="model_loading", headers={"Retry-After": "2"}
            )

    @app.get("/health")
    async def health():
        if state.ready:
            return {"status": "ok", "model": state.engine.name}
        status = "error" if state.load_error else "loading"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)

    @app.get("/v1/models")
    async def models(request: Request):
        require_ready(request)
        created = int(state.engine.path.stat().st_mtime)
        card = {"id": state.engine.name, "object": "model", "created": created, "owned_by": "dsrun"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    async def completions(request: Request):
        require_ready(request)
        api = parse_request(ROUTES[request.url.path], await request.body(), state.engine, state.model_names)
        info = request.scope["dsrun"]
        if state.args.audit_prompts:
            info["prompt"] = state.engine.detokenize(api.request.prompt)
        stream = open_stream(state.scheduler, api)
        reply = info["reply"] = Reply(api, state.engine.tokenizer)
        if api.stream:  # the background cancel covers a client gone before the first event
            return StreamingResponse(
                sse_events(reply, stream),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
                background=BackgroundTask(stream.cancel),
            )
        body = await unless_disconnected(request, whole_reply(reply, stream))
        return JSONResponse(body) if body is not None else JSONResponse({}, status_code=499)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(state), media_type="text/plain; version=0.0.4")

    @app.get("/stats")
    async def stats():
        if not state.ready:
            return JSONResponse({"status": "loading", "error": state.load_error}, status_code=503)
        sched = state.scheduler.stats()
        # the engine's own rates count only work done outside the scheduler
        live = {"tokens_per_s": sched["tokens_per_s"]}
        if sched["ttft_s"] is not None:
            live["ttft_s"] = sched["ttft_s"]
        return state.engine.stats() | live | {"scheduler": sched, "server": server_stats(state)}

    return Observe(app, state)


async def unless_disconnected(request, work):
    """Await `work`, or cancel it (which cancels its sequence) and return None if the client leaves first."""

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    watch.cancel()
    if not task.done():
        task.cancel()
        return None
    return task.result()


def server_stats(state: ServerState) -> dict:
    return {
        "responses": [{"route": r, "status": s, "count": n} for (r, s), n in sorted(state.responses.items())]
    }


# --- /metrics: the Prometheus text format, written by hand (prometheus_client is not a dependency) ---


def render_metrics(state: ServerState) -> str:
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples) -> None:
        out.extend((f"# HELP dsrun_{name} {help_text}", f"# TYPE dsrun_{name} {kind}"))
        out.extend(f"dsrun_{name}{_labels(labels)} {value}" for labels, value in samples)

    def histogram(name: str, help_text: str, snap: dict) -> None:
        samples = [({"le": le}, n) for le, n in snap["buckets"]]
        out.extend((f"# HELP dsrun_{name} {help_text}", f"# TYPE dsrun_{name} histogram"))
        out.extend(f"dsrun_{name}_bucket{_labels(labels)} {n}" for labels, n in samples)
        out.extend((f"dsrun_{name}_sum {snap['sum']}", f"dsrun_{name}_count {snap['count']}"))

    metric("model_loaded", "gauge", "1 once the model is loaded", [({}, int(state.ready))])
    metric(
        "requests_total",
        "counter",
        "HTTP responses by route and status",
        [({"route": r, "status": s}, n) for (r, s), n in sorted(state.responses.items())],
    )
    if not state.ready:
        return "\n".join(out) + "\n"
    s, e = state.scheduler.stats(), state.engine.stats()
    metric("prompt_tokens_total", "counter", "prompt tokens of admitted requests", [({}, s["prompt_tokens"])])
    metric("generation_tokens_total", "counter", "tokens generated", [({}, s["generated_tokens"])])
    metric(
        "prefix_cache_hits_total", "counter", "requests that reused a cached prefix", [({}, s["prefix_hits"])]
    )
    metric(
        "prefix_cache_reused_tokens_total",
        "counter",
        "prompt tokens not recomputed thanks to prefix reuse",
        [({}, s["prefix_reused_tokens"])],
    )
    histogram("time_to_first_token_seconds", "from submission to the first token", s["ttft_seconds"])
    histogram(
        "inter_token_latency_seconds", "between successive tokens of one sequence", s["inter_token_seconds"]
    )
    metric("queue_length", "gauge", "requests waiting for a running slot", [({}, s["queue_length"])])
    metric("running_sequences", "gauge", "sequences being decoded", [({}, s["running"])])
    metric(
        "kv_cache_bytes",
        "gauge",
        "KV cache memory",
        [({"use": "running"}, s["kv_bytes_running"]), ({"use": "prefix"}, s["prefix_cache"]["bytes"])],
    )
    memory = e.get("memory", {})
    metric(
        "memory_bytes",
        "gauge",
        "memory used per tier and device",
        [
            ({"tier": t.get("tier"), "device": t.get("device")}, t.get("used_bytes", 0))
            for t in memory.get("tiers", [])
        ],
    )
    metric("rss_bytes", "gauge", "resident memory of the server process", [({}, memory.get("rss_bytes", 0))])
    hit_rate = (e.get("experts") or {}).get("hit_rate")
    if hit_rate is not None:
        metric(
            "expert_cache_hit_rate", "gauge", "share of expert uses served from a fast tier", [({}, hit_rate)]
        )
    return "\n".join(out) + "\n"


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _escape(label_value: str) -> str:
    return label_value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# --- sockets ---


def tcp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise DsrunError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock.listen(128)
    return sock


def unix_socket(path: str) -> socket.socket:
    """Bound under umask 0177, so the socket is 0600 from the moment it exists; a stale one is replaced."""
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise DsrunError(f"{path} exists and is not a socket: choose another --socket path")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(path) == 0:
                raise DsrunError(f"another server is listening on {path}")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def open_sockets(args) -> tuple[list[socket.socket], list[str]]:
    sockets, urls = [], []
    if args.port is not None or not args.socket:
        sock = tcp_socket(args.host, 8080 if args.port is None else args.port)
        host = f"[{args.host}]" if ":" in args.host else args.host
        sockets.append(sock)
        urls.append(f"http://{host}:{sock.getsockname()[1]}")
    if args.socket:
        sockets.append(unix_socket(args.socket))
        urls.append(f"unix:{os.path.abspath(args.socket)}")
    return sockets, urls


def run(args) -> int:
    import uvicorn

    state = ServerState(args)
    sockets, urls = open_sockets(args)
    server = uvicorn.Server(
        uvicorn.Config(create_app(state), log_level="warning", timeout_graceful_shutdown=3)
    )
    state.on_load_failure = lambda: setattr(server, "should_exit", True)
    for url in urls:
        print(f"dsrun: listening on {url}", file=sys.stderr, flush=True)
    server.run(sockets=sockets)
    return 1 if state.load_error else 0
