"""The OpenAI wire format: one path from a request body to a chunk stream, folded two ways.

`parse_request` validates a chat or completions body into an `ApiRequest`; `open_stream` submits it to the
scheduler; `Reply` folds the chunks either into SSE events (`sse_events`) or the whole-reply JSON body
(`whole_reply`). The server and `dsrun batch` both go through here, so their replies are the same.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .errors import ContextLengthError, InvalidRequestError
from .generation import Chunk
from .sampling import SamplingParams
from .scheduler import QueueFullError, Request, Scheduler, Stream

ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes

# body field -> (type, lowest, highest); these go to SamplingParams under the same name
SAMPLING_FIELDS = {
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "top_k": (int, 0, None),  # llama.cpp's extensions to the OpenAI body
    "min_p": (float, 0.0, 1.0),
    "repeat_penalty": (float, 0.0, None),
    "presence_penalty": (float, -2.0, 2.0),
    "frequency_penalty": (float, -2.0, 2.0),
    "seed": (int, *SEED_RANGE),
}
# fields whose non-default values ask for something dsrun does not do: refused rather than ignored
UNSUPPORTED = {
    "tools": bool,
    "functions": bool,
    "logit_bias": bool,
    "suffix": bool,
    "echo": bool,
    "best_of": lambda v: v not in (None, 1),
    "response_format": lambda v: v is not None and not (isinstance(v, dict) and v.get("type") == "text"),
}
TYPE_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", dict: "an object"}


class ApiError(Exception):
    """An error reply: HTTP status plus OpenAI's {"error": {message, type, param, code}} body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param=None,
        code=None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ApiRequest:
    kind: str  # "chat" | "completion"
    request: Request
    stream: bool
    include_usage: bool
    model: str
    id: str
    created: int


def parse_request(kind: str, body: bytes | dict, engine, model_names: tuple[str, ...]) -> ApiRequest:
    """Validate a chat or completions body (raw JSON or parsed); ApiError(400/404) says what is wrong."""
    body = _json_object(body)
    for name, asks_for_unsupported in UNSUPPORTED.items():
        if asks_for_unsupported(body.get(name)):
            raise ApiError(
                400, f"'{name}' is not supported by dsrun", param=name, code="unsupported_parameter"
            )
    model = _field(body, "model", str, model_names[0])
    if model not in model_names:
        raise ApiError(
            404,
            f"the model '{model}' does not exist: this server runs {model_names[0]}",
            param="model",
            code="model_not_found",
        )
    if _field(body, "n", int, 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    stream = _field(body, "stream", bool, False)
    options = _field(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
    prompt = chat_prompt(body, engine) if kind == "chat" else completion_prompt(body, engine)
    room = max(engine.ctx - len(prompt), 1)  # a prompt that does not fit fails at submit, with its own error
    request = Request(
        prompt=prompt,
        params=_sampling_params(body),
        max_tokens=_max_tokens(body, kind, room),
        stop=_stop(body),
        top_logprobs=_top_logprobs(body, kind),
    )
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    return ApiRequest(
        kind=kind,
        request=request,
        stream=stream,
        include_usage=bool(options and _field(options, "include_usage", bool, False)),
        model=model_names[0],  # replies name the model that ran, as OpenAI's do
        id=prefix + uuid.uuid4().hex[:24],
        created=int(time.time()),
    )


def open_stream(scheduler: Scheduler, api: ApiRequest) -> Stream:
    """Submit to the scheduler; a prompt that cannot run or a full queue becomes an ApiError."""
    param = "messages" if api.kind == "chat" else "prompt"
    try:
        return scheduler.submit(api.request)
    except ContextLengthError as e:
        raise ApiError(400, str(e), param=param, code="context_length_exceeded") from e
    except InvalidRequestError as e:
        raise ApiError(400, str(e), param=param) from e
    except QueueFullError as e:
        raise ApiError(
            429,
            str(e),
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(e.retry_after)},
        ) from e


async def complete(scheduler: Scheduler, kind: str, body: bytes | dict, model_names: tuple[str, ...]):
    """A whole (non-streamed) reply: (status, body), errors included. What `dsrun batch` runs per line."""
    try:
        api = parse_request(kind, body, scheduler.engine, model_names)
        stream = open_stream(scheduler, api)
        return 200, await whole_reply(Reply(api, scheduler.engine.tokenizer), stream)
    except ApiError as e:
        return e.status, e.body()
    except Exception as e:  # the model failed, not the request
        return 500, ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error").body()


async def whole_reply(reply: Reply, stream: Stream) -> dict:
    try:
        async for chunk in stream:
            reply.add(chunk)
    finally:
        stream.cancel()  # no-op once finished; frees the sequence if we were cancelled
    return reply.whole()


async def sse_events(reply: Reply, stream: Stream) -> AsyncIterator[str]:
    """Server-sent events; a client leaving closes this generator, which cancels the sequence."""
    try:
        if reply.api.kind == "chat":
            yield sse(reply.envelope([reply.opening_piece()]))
        async for chunk in stream:
            for piece in reply.add(chunk):
                yield sse(reply.envelope([piece]))
        if reply.api.include_usage:
            yield sse(reply.envelope([], usage=reply.usage))
        yield "data: [DONE]\n\n"
    except Exception as e:  # the status line has gone out: report in-band, as OpenAI does
        yield sse(ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error").body())
    finally:
        stream.cancel()


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Reply:
    """Folds one request's chunks: each becomes choice pieces (SSE) and grows the whole reply."""

    def __init__(self, api: ApiRequest, tok):
        self.api, self.tok = api, tok
        self.text: list[str] = []
        self.logprobs: dict[str, list] | None = None
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.offset = 0  # characters of completion text so far (completions' text_offset)
        self.tokens = 0  # completion tokens so far, also when the reply is cut short

    def add(self, chunk: Chunk) -> list[dict]:
        self.tokens += len(chunk.tokens)
        pieces = []
        lp = self._logprobs(chunk)
        if chunk.text or lp:
            self.text.append(chunk.text)
            self.offset += len(chunk.text)
            pieces.append(self._piece(chunk.text, lp, None))
        if chunk.finish_reason:
            self.finish_reason, self.usage = chunk.finish_reason, chunk.usage
            pieces.append(self._piece("", None, chunk.finish_reason))
        return pieces

    def opening_piece(self) -> dict:
        return {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }

    def envelope(self, choices: list[dict], **extra) -> dict:
        obj = "chat.completion.chunk" if self.api.kind == "chat" else "text_completion"
        body = {
            "id": self.api.id,
            "object": obj,
            "created": self.api.created,
            "model": self.api.model,
            "choices": choices,
        }
        if self.api.include_usage:
            body["usage"] = None  # every chunk carries the key; the last one has the numbers
        return body | extra

    def whole(self) -> dict:
        text = "".join(self.text)
        if self.api.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text}
            obj = "text_completion"
        choice |= {"logprobs": self.logprobs, "finish_reason": self.finish_reason}
        return {
            "id": self.api.id,
            "object": obj,
            "created": self.api.created,
            "model": self.api.model,
            "choices": [choice],
            "usage": self.usage,
        }

    def _piece(self, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        if self.api.kind == "chat":
            delta = {"content": text} if text or logprobs else {}
            return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def _logprobs(self, chunk: Chunk) -> dict | None:
        """This chunk's logprobs in the route's shape; also appended to the whole reply's lists."""
        if self.api.request.top_logprobs is None or not chunk.logprobs:
            return None
        if self.api.kind == "chat":
            piece = {"content": [self._chat_entry(t) for t in chunk.logprobs]}
        else:
            piece = {
                "tokens": [self._token_text(t.token)[0] for t in chunk.logprobs],
                "token_logprobs": [t.logprob for t in chunk.logprobs],
                "top_logprobs": [{self._token_text(i)[0]: lp for i, lp in t.top} for t in chunk.logprobs],
                "text_offset": [self.offset] * len(chunk.logprobs),
            }
        self.logprobs = self.logprobs or {k: [] for k in piece}
        for key, values in piece.items():
            self.logprobs[key] += values
        return piece

    def _chat_entry(self, t) -> dict:
        def one(token: int, logprob: float) -> dict:
            text, raw = self._token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(raw)}

        return one(t.token, t.logprob) | {"top_logprobs": [one(i, lp) for i, lp in t.top]}

    def _token_text(self, token: int) -> tuple[str, bytes]:
        raw = self.tok.decode_bytes([token])
        return raw.decode("utf-8", errors="replace"), raw


# --- body fields ---


def _json_object(body: bytes | dict) -> dict:
    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _field(body: dict, name: str, kind: type, default):
    """body[name] checked against kind (bool is not an int; an int is a fine float); null means default."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise ApiError(400, f"'{name}' must be {TYPE_NAMES[kind]}", param=name)
    return value


def _in_range(body: dict, name: str, kind: type, lo, hi, default=None):
    value = _field(body, name, kind, default)
    if value is not None and not (
        (lo is None or value >= lo)
        and (hi is None or value <= hi)
        and (kind is not float or math.isfinite(value))
    ):
        bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ApiError(400, f"'{name}' must be {bounds}", param=name)
    return value


def _sampling_params(body: dict) -> SamplingParams:
    given = {name: _in_range(body, name, *spec) for name, spec in SAMPLING_FIELDS.items()}
    try:
        return SamplingParams(**{k: v for k, v in given.items() if v is not None})
    except InvalidRequestError as e:  # what the ranges above let through, e.g. top_p=0
        raise ApiError(400, str(e)) from e


def _max_tokens(body: dict, kind: str, room: int) -> int:
    name = (
        "max_completion_tokens"
        if kind == "chat" and body.get("max_completion_tokens") is not None
        else "max_tokens"
    )
    return min(_in_range(body, name, int, 1, None, room), room)  # generation also stops at the context end


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    return tuple(stop)


def _top_logprobs(body: dict, kind: str) -> int | None:
    if kind == "completion":
        return _in_range(body, "logprobs", int, 0, 5)
    top = _in_range(body, "top_logprobs", int, 0, 20)
    if not _field(body, "logprobs", bool, False):
        if top is not None:
            raise ApiError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        return None
    return top or 0


def chat_prompt(body: dict, engine) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    try:
        return engine.tokenizer.chat_tokens([_plain_message(m, i) for i, m in enumerate(messages)])
    except InvalidRequestError as e:
        raise ApiError(400, str(e), param="messages") from e


def _plain_message(m, i: int) -> dict:
    """A message whose content is a list of text parts gets them joined: the template wants a string."""
    if not isinstance(m, dict) or not isinstance(m.get("content"), list):
        return m
    parts = m["content"]
    if not all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts
    ):
        raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
    return m | {"content": "".join(p["text"] for p in parts)}


def completion_prompt(body: dict, engine) -> list[int]:
    """A string, a list of token ids, or a one-element list of either (several prompts would need n > 1)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return engine.tokenize(prompt)
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return prompt
    raise ApiError(
        400, "'prompt' must be a string or a list of token ids (one prompt per request)", param="prompt"
    )
