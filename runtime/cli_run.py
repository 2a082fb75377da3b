"""`dsrun run`: one prompt in, the answer streamed to stdout."""

from __future__ import annotations

import sys
import time

from .cli import add_model_arguments, add_sampling_arguments, load_kwargs, print_json, sampling_kwargs
from .errors import InvalidRequestError


def add_arguments(p) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt; read from stdin when omitted and piped")
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--raw", action="store_true", help="complete the text as given, without the chat template")
    p.add_argument("--system", default=None, help="system prompt for the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise InvalidRequestError("no prompt: pass it as an argument or pipe it on stdin")
    return sys.stdin.read()


def run(args) -> int:
    import dsrun

    prompt = read_prompt(args)
    if not prompt.strip():
        raise InvalidRequestError("the prompt is empty")
    eng = dsrun.load(args.model, **load_kwargs(args))
    if args.raw:
        chunks = eng.generate(prompt, **sampling_kwargs(args))
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        chunks = eng.chat(messages, **sampling_kwargs(args))
    t0 = time.perf_counter()
    parts, last = [], None
    for chunk in chunks:
        parts.append(chunk.text)
        last = chunk
        if not args.json:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    if args.json:
        print_json(
            {
                "model": eng.name,
                "text": "".join(parts),
                "finish_reason": last.finish_reason,
                "usage": last.usage,
                "seconds": round(time.perf_counter() - t0, 3),
                "tokens_per_s": eng.stats()["tokens_per_s"],
            }
        )
    else:
        sys.stdout.write("\n")
    eng.close()
    return 0
