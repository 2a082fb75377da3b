"""Where a large batch computes its cold experts: on the CPU, or streamed to the GPU and computed there,
split between the two so that both finish soonest.

A decode step gives each cold expert a row or two: the CPU reads the expert once at memory speed and the
GPU could do no better, having to read it over PCIe first. A prefill chunk gives an expert hundreds of
rows: the CPU is then bound by arithmetic while the GPU computes them in the time the copy takes. The
choice is made per MoE layer from rates measured while running (the CPU backend's bytes/s on light
steps, its flops/s on heavy ones, and the stream's bytes/s), starting from conservative guesses.

Plain Python over numbers, testable without tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

LIGHT_ROWS = 2.0  # rows per expert up to which a CPU step is read-bound: it measures bandwidth
EMA = 0.3  # weight of a new measurement


@dataclass
class StreamCost:
    cpu_bytes_per_s: float = 20e9
    cpu_flops_per_s: float = 0.5e12
    stream_bytes_per_s: float = 10e9
    min_rows: int = 32  # fewer tokens never stream: a guess wrong at decode costs every step

    def cpu_seconds(self, n_bytes: float, flops: float) -> float:
        return max(n_bytes / self.cpu_bytes_per_s, flops / self.cpu_flops_per_s)

    def stream_seconds(self, n_bytes: float) -> float:
        return n_bytes / self.stream_bytes_per_s

    def stream_count(self, tokens: int, rows: list[int], expert_bytes: float, row_flops: float) -> int:
        """How many of a layer's cold experts to stream to the GPU, taken busiest first (`rows`: each cold
        expert's rows, descending), while the CPU computes the others at the same time: the count that
        ends both sides soonest. None below min_rows tokens."""
        if tokens < self.min_rows:
            return 0
        left = sum(rows)
        best, best_s = 0, self.cpu_seconds(len(rows) * expert_bytes, left * row_flops)
        for k, r in enumerate(rows, 1):
            left -= r
            both = max(
                self.stream_seconds(k * expert_bytes),
                self.cpu_seconds((len(rows) - k) * expert_bytes, left * row_flops),
            )
            if both < best_s:
                best, best_s = k, both
        return best

    def observe_cpu(self, rows_per_expert: float, n_bytes: float, flops: float, seconds: float) -> None:
        if seconds <= 0 or n_bytes <= 0:
            return
        if rows_per_expert <= LIGHT_ROWS:
            self.cpu_bytes_per_s = _ema(self.cpu_bytes_per_s, n_bytes / seconds)
        else:  # the read still takes its share: what is left is arithmetic
            compute = max(seconds - n_bytes / self.cpu_bytes_per_s, 1e-3 * seconds)
            self.cpu_flops_per_s = _ema(self.cpu_flops_per_s, flops / compute)

    def observe_stream(self, n_bytes: float, seconds: float) -> None:
        if seconds > 0 and n_bytes > 0:
            self.stream_bytes_per_s = _ema(self.stream_bytes_per_s, n_bytes / seconds)


def _ema(old: float, new: float) -> float:
    return (1 - EMA) * old + EMA * new
