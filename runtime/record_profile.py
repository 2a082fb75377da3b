"""`dsrun profile`: run prompts through a model and save how often each routed expert was chosen.

The file feeds the planner (`--placement PROFILE` on any command that loads a model, and `dsrun plan`),
which then puts the hottest experts on the GPUs from the first token on.
"""

from __future__ import annotations

import sys

from .cli import add_model_arguments, load_kwargs, print_json
from .errors import InvalidRequestError


def add_arguments(p) -> None:
    p.add_argument("prompts", nargs="*", help="prompts to run (default: one per line on stdin)")
    add_model_arguments(p)
    p.add_argument("-o", "--output", required=True, help="profile file to write (JSON)")
    p.add_argument("-n", "--max-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--json", action="store_true", help="print a summary object")


def read_prompts(args) -> list[str]:
    prompts = list(args.prompts)
    if not prompts and sys.stdin is not None and not sys.stdin.isatty():
        prompts = [line.strip() for line in sys.stdin if line.strip()]
    if not prompts:
        raise InvalidRequestError("no prompts: pass them as arguments or one per line on stdin")
    return prompts


def run(args) -> int:
    import dsrun
    from dsrun.offload.profile import write_profile

    prompts = read_prompts(args)
    eng = dsrun.load(args.model, **load_kwargs(args))
    tokens = 0
    for prompt in prompts:
        for chunk in eng.chat(
            [{"role": "user", "content": prompt}], max_tokens=args.max_tokens, temperature=0
        ):
            tokens += len(chunk.tokens)
    profile = eng.activation_profile()
    write_profile(profile, args.output)
    summary = {
        "output": args.output,
        "prompts": len(prompts),
        "generated_tokens": tokens,
        "routed": int(sum(map(sum, profile.counts))),
    }
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {args.output}: {summary['routed']} expert activations from {len(prompts)} prompts")
    eng.close()
    return 0
