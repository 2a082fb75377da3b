"""The one parity runner: llama.cpp against dsrun on the same GGUF, as CONTRACT.md defines "matches".

llama.cpp runs in a subprocess (a malformed file can abort it with GGML_ASSERT) with an F32 KV cache,
flash attention off and every logit kept:

    refs = reference(path, prompts, n_greedy=32)      # one subprocess for all prompts
    report = compare(eng.logits(prompt), refs[0].logits, tau)
    assert report.ok, report
    assert greedy_parting(ours_greedy(eng, prompt, 32), refs[0], tau, eng.tokenizer.eog_ids) is None

`reference_logits(path, tokens)` and `reference_greedy(path, tokens, n)` are the one-prompt shorthands.
`incremental_logits` and `batched_logits` run dsrun's own cache paths for comparison with its full
forward.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

F32_TAU = 1e-3  # CONTRACT.md: F32 weights agree to 1e-3 at every position


@dataclass
class Reference:
    """llama.cpp's answers for one prompt."""

    logits: np.ndarray  # (n, V) float32, one row per prompt position
    greedy: list[int] = field(default_factory=list)  # argmax continuation, one token at a time
    margins: list[float] = field(default_factory=list)  # top-1 minus top-2 logit before each greedy token


def reference(path: str | Path, prompts: list[list[int]], n_greedy: int = 0) -> list[Reference]:
    """llama.cpp's logits for each prompt, and its greedy continuation of n_greedy tokens."""
    n_ctx = max(len(p) for p in prompts) + n_greedy + 8
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ref.npz"
        request = {
            "path": str(path),
            "prompts": prompts,
            "n_greedy": n_greedy,
            "n_ctx": n_ctx,
            "out": str(out),
        }
        proc = subprocess.run(
            [sys.executable, __file__], input=json.dumps(request), capture_output=True, text=True, timeout=600
        )
        if proc.returncode != 0:
            raise RuntimeError(f"llama.cpp failed on {path} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        data = np.load(out)
        return [
            Reference(data[f"logits{i}"], data[f"greedy{i}"].tolist(), data[f"margins{i}"].tolist())
            for i in range(len(prompts))
        ]


def reference_logits(path: str | Path, tokens: list[int]) -> np.ndarray:
    return reference(path, [tokens])[0].logits


def reference_greedy(path: str | Path, tokens: list[int], n: int) -> Reference:
    return reference(path, [tokens], n_greedy=n)[0]


@dataclass
class Report:
    max_abs: float  # max |ours - ref| over every position and vocab entry
    tau: float
    n_positions: int
    n_checked: int  # positions where llama.cpp's top-two margin exceeds 2 tau
    argmax_mismatches: list[int]  # checked positions whose argmax differs

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tau and not self.argmax_mismatches

    def __str__(self) -> str:
        return (
            f"max |dlogit| {self.max_abs:.3g} (tau {self.tau:g}); argmax differs at {self.argmax_mismatches} "
            f"of {self.n_checked}/{self.n_positions} positions outside near-ties"
        )


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit per row: (n, V) -> (n,)."""
    top = np.partition(logits, -2, axis=-1)[..., -2:]  # (n, 2)
    return top[..., 1] - top[..., 0]


def compare(ours: np.ndarray, ref: np.ndarray, tau: float) -> Report:
    """CONTRACT.md's agreement between two (n, V) logit arrays, `ref` being llama.cpp's."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    clear = top2_margin(ref) > 2 * tau
    differs = ours.argmax(-1) != ref.argmax(-1)
    return Report(
        max_abs=float(np.abs(ours.astype(np.float64) - ref).max()),
        tau=tau,
        n_positions=len(ref),
        n_checked=int(clear.sum()),
        argmax_mismatches=np.flatnonzero(clear & differs).tolist(),
    )


def greedy_parting(ours: list[int], ref: Reference, tau: float, stop_ids=frozenset()) -> str | None:
    """None when dsrun's greedy tokens equal llama.cpp's, or part only at a near-tie (margin <= 2 tau);
    otherwise where and how they part. dsrun stops on an end-of-generation token, which it does not
    return; llama.cpp's list keeps going, so a shorter `ours` must end where llama.cpp picked a stop id."""
    for i, (a, b) in enumerate(zip(ours, ref.greedy)):
        if a != b:
            if ref.margins[i] <= 2 * tau:
                return None
            return (
                f"greedy parts at token {i}: ours {a}, llama.cpp {b}, its margin {ref.margins[i]:.3g} > 2 tau"
            )
    n = len(ours)
    if n < len(ref.greedy) and ref.greedy[n] not in stop_ids and ref.margins[n] > 2 * tau:
        return f"dsrun stopped after {n} tokens; llama.cpp continued with {ref.greedy[n]}"
    return None


def ours_greedy(eng, tokens: list[int], n: int) -> list[int]:
    """dsrun's greedy continuation through its public generate()."""
    return [t for chunk in eng.generate(tokens, max_tokens=n, temperature=0) for t in chunk.tokens]


def incremental_logits(model, tokens: list[int]) -> np.ndarray:
    """One token at a time through a growing cache: (n, V)."""
    import torch

    from dsrun.models.base import Batch

    cache = model.new_cache()
    rows = [model.forward(Batch.single([t], cache, all_logits=True)) for t in tokens]
    return torch.cat(rows).numpy()


def batched_logits(model, prompts: list[list[int]]) -> list[np.ndarray]:
    """All prompts in one step, each with its own cache: one (n_i, V) array per prompt."""
    import torch

    from dsrun.models.base import Batch, Seq

    seqs, start = [], 0
    for p in prompts:
        seqs.append(Seq(model.new_cache(), start, len(p)))
        start += len(p)
    tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long)
    logits = model.forward(Batch(tokens=tokens, seqs=seqs)).numpy()
    return [logits[s.rows] for s in seqs]


def _llama_cpp_worker(request: dict) -> None:
    """Runs in the subprocess: evaluate every prompt from an empty cache, then decode greedily."""
    import llama_cpp

    llm = llama_cpp.Llama(
        request["path"],
        n_ctx=request["n_ctx"],
        n_batch=request["n_ctx"],
        n_ubatch=request["n_ctx"],
        logits_all=True,
        type_k=0,  # GGML_TYPE_F32
        type_v=0,
        flash_attn=False,
        n_threads=1,  # tiny models on a shared 2-core box: a second spinning thread makes it ~7x slower
        n_threads_batch=1,
        n_gpu_layers=0,
        verbose=False,
    )
    out = {}
    for i, prompt in enumerate(request["prompts"]):
        llm.reset()
        llm.eval(prompt)
        out[f"logits{i}"] = np.array(llm.scores[: len(prompt)], dtype=np.float32)
        greedy, margins = [], []
        for _ in range(request["n_greedy"]):
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            token = int(row.argmax())
            greedy.append(token)
            margins.append(float(top2_margin(row[None])[0]))
            llm.eval([token])
        out[f"greedy{i}"] = np.array(greedy, dtype=np.int64)
        out[f"margins{i}"] = np.array(margins, dtype=np.float64)
    np.savez(request["out"], **out)


if __name__ == "__main__":
    _llama_cpp_worker(json.loads(sys.stdin.read()))
