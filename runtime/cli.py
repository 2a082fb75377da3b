"""`dsrun`: one dispatcher, subcommands imported only when used."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys

# subcommand -> (module that implements it with add_arguments(parser) and run(args), help line)
COMMANDS = {
    "run": ("dsrun.cli_run", "one-shot generation to stdout (prompt argument or stdin)"),
    "chat": ("dsrun.tui.app", "the terminal chat app with live memory and expert views"),
    "serve": ("dsrun.server", "OpenAI-compatible server on 127.0.0.1 and/or a Unix socket"),
    "batch": ("dsrun.batch", "an OpenAI Batch-format JSONL job, resumable"),
    "plan": ("dsrun.plan", "where every tensor and expert would go, without loading weights"),
    "doctor": ("dsrun.doctor", "what this machine has and how fast a model would run"),
    "bench": ("dsrun.bench", "prefill/decode tokens/s and memory, against llama.cpp in the same run"),
    "synth": ("dsrun.synth", "write a generated (random-weight) GGUF model for tests and benchmarks"),
    "profile": ("dsrun.record_profile", "record which experts a model routes to, for `--placement`"),
}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Flags every command that loads a model shares."""
    p.add_argument(
        "-m",
        "--model",
        default=os.environ.get("DSRUN_MODEL", "default"),
        help="GGUF path or installed model name (default: $DSRUN_MODEL or 'default')",
    )
    p.add_argument("--ctx", type=int, default=4096, help="context length in tokens")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--gpus", default="auto", help="'auto', 'none', a count, or ids like 0,1")
    p.add_argument("--gpu-mem", default=None, help="GPU memory budget per card, e.g. 24GiB or 24GiB,16GiB")
    p.add_argument("--ram", default=None, help="RAM budget for weights and experts, e.g. 64GiB")
    p.add_argument(
        "--placement",
        metavar="PROFILE",
        default=None,
        help="activation profile from `dsrun profile`: its hottest experts get the fastest memory",
    )
    p.add_argument(
        "--cpu-backend",
        default=None,
        help="CPU expert backend: auto, dequant, torch, ort, openvino or ggml "
        "(default: $DSRUN_CPU_BACKEND, else the fastest measured here)",
    )


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_kwargs(args) -> dict:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temp,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repeat_penalty": args.repeat_penalty,
        "seed": args.seed,
        "stop": args.stop,
    }


def load_kwargs(args) -> dict:
    return {
        "ctx": args.ctx,
        "threads": args.threads,
        "gpus": args.gpus,
        "gpu_mem": args.gpu_mem,
        "ram": args.ram,
        "cpu_backend": args.cpu_backend,
        "placement": args.placement,
    }


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsrun", description="Run large MoE LLMs from GGUF on one workstation."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_line) in COMMANDS.items():
        p = sub.add_parser(name, help=help_line, description=help_line)
        if name == wanted:  # import only the module of the command being run
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help", "--debug"):
        argv = ["run", *argv]  # a bare `dsrun "prompt"` runs the prompt
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .errors import DsrunError

    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args) or 0
    except DsrunError as e:
        if args.debug:
            raise
        print(f"dsrun: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def print_json(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False))


def entry() -> None:
    """The `dsrun` command: main's exit code, even where a Ctrl+C lands once main is done. Python puts
    SIGINT's default action back while it tears down (an engine's memory can take a while), so a late
    Ctrl+C would kill a finished job instead of letting it end with its code."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    entry()
