"""One sequence being generated: its cache, sampler, and how sampled tokens become text chunks.

Both `Engine.generate` (one sequence) and the server's continuous batcher (many) drive the same object, so
stop strings, max_tokens and usage behave identically everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .sampling import Sampler, SamplingParams
from .tokenizer import TextStream, Tokenizer


@dataclass
class Chunk:
    text: str
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" on the last chunk
    usage: dict | None = None  # prompt/completion/total token counts on the last chunk
    logprobs: list | None = None  # one TokenLogprob per token in .tokens, when a request asks for them


class Generation:
    def __init__(
        self,
        tok: Tokenizer,
        prompt: list[int],
        cache,
        params: SamplingParams,
        max_tokens: int,
        stop: tuple[str, ...],
        ctx: int,
    ):
        self.tok, self.prompt, self.cache = tok, prompt, cache
        self.sampler = Sampler(params)
        self.max_tokens = max_tokens
        self.stop = tuple(s for s in stop if s)
        self.ctx = ctx
        self.history = list(prompt)  # the penalties look at prompt and output alike
        self.completion: list[int] = []
        self.text = TextStream(tok)
        self.held = ""  # text that may be the start of a stop string
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def accept(self, token: int) -> Chunk:
        """Take one sampled token; returns the chunk it produces (the final one once done)."""
        if token in self.tok.eog_ids:
            return self._finish("stop")
        self.completion.append(token)
        self.history.append(token)
        self.held += self.text.push(token)
        hit = self._first_stop()
        if hit is not None:
            self.held = self.held[:hit]
            return self._finish("stop", [token])
        if len(self.completion) >= self.max_tokens or len(self.prompt) + len(self.completion) >= self.ctx:
            self.held += self.text.flush()
            return self._finish("length", [token])
        keep = self._stop_prefix_len()
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return Chunk(out, [token])

    def usage(self) -> dict:
        n_prompt, n_out = len(self.prompt), len(self.completion)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    def _finish(self, reason: str, tokens: list[int] | None = None) -> Chunk:
        self.finish_reason = reason
        text, self.held = self.held, ""
        return Chunk(text, tokens or [], reason, self.usage())

    def _first_stop(self) -> int | None:
        hits = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of held text that could still grow into a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.held)), best, -1):
                if self.held.endswith(s[:n]):
                    best = n
                    break
        return best
