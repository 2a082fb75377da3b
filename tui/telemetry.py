"""The stats schema the TUI renders, parsed in one place from `Engine.stats()` or a server's `GET /stats`.

Every key is optional: a missing one parses to None (or empty) and the views leave that part out, so an
engine that reports less still renders. The full schema, as the hybrid engine is to report it:

    {
      "model": "DeepSeek-V3-Q4_K_M", "arch": "deepseek2", "ctx": 4096, "load_seconds": 41.2,
      "ttft_s": 0.84,                        # time to first token of the latest request
      "memory": {
        "rss_bytes": int,                    # process resident set size
        "file_bytes": int,                   # GGUF size on disk
        "weights_bytes": int,                # all weights, every tier
        "tiers": [                           # one entry per device, in this order: GPUs, RAM, NVMe
          {"tier": "gpu" | "ram" | "nvme",
           "device": "cuda:0" | "cpu" | "disk",
           "budget_bytes": int | null,       # what this tier may use (--gpu-mem, --ram); null: unbounded
           "used_bytes": int,                # everything dsrun holds there (>= the three parts below)
           "weights_bytes": int,             # dense weights: attention, norms, embeddings, shared experts
           "experts_bytes": int,             # routed experts resident here (RAM: pinned host copies)
           "kv_bytes": int,                  # KV cache on this device
           "resident_bytes": int,            # nvme only: of used_bytes (experts mapped from the file),
                                             #   how many the OS page cache holds right now
           "experts": int}                   # routed experts placed on this tier
        ]
      },
      "experts": {
        "total": int,                        # routed experts over all MoE layers
        "hit_rate": float | null,            # 0..1: expert uses served from a GPU, since load
        "promotions_per_s": float | null,    # experts moved to a faster tier per second, recent average
        "first_layer": int,                  # block index of placement row 0 (dense layers come first)
        "placement": ["0011r…n", …],         # one string per MoE layer, one char per expert:
                                             #   "0".."9" GPU index, "r" RAM, "n" NVMe
        "hotness": [[0.0 .. 1.0, …], …]      # layers x experts: recent routing frequency, 1 = hottest
      },
      "tokens_per_s": {"prefill": float | null, "decode": float | null},
      "timings": {...}                       # raw counters, not rendered
    }
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

HISTORY_LEN = 120  # samples kept per time series: one minute at the 2 Hz poll


@dataclass(frozen=True)
class Tier:
    tier: str  # "gpu" | "ram" | "nvme"
    device: str  # "cuda:0" | "cpu" | "disk"
    used_bytes: int = 0
    budget_bytes: int | None = None
    weights_bytes: int | None = None
    experts_bytes: int | None = None
    kv_bytes: int | None = None
    resident_bytes: int | None = None
    experts: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> Tier:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    @property
    def label(self) -> str:
        """`GPU 0`, `RAM`, `NVMe`: how a person names the device."""
        if self.tier == "gpu":
            return f"GPU {self.device.rpartition(':')[2]}"
        return {"ram": "RAM", "nvme": "NVMe"}.get(self.tier, self.device)


@dataclass(frozen=True)
class Telemetry:
    model: str = ""
    arch: str = ""
    ctx: int | None = None
    rss_bytes: int | None = None
    weights_bytes: int | None = None
    tiers: tuple[Tier, ...] = ()
    experts_total: int = 0
    hit_rate: float | None = None
    promotions_per_s: float | None = None
    first_layer: int = 0
    placement: tuple[str, ...] = ()
    hotness: np.ndarray | None = None  # (layers, experts) float32, or None when not reported
    prefill_tps: float | None = None
    decode_tps: float | None = None
    ttft_s: float | None = None

    @classmethod
    def from_stats(cls, stats: dict) -> Telemetry:
        memory = stats.get("memory") or {}
        experts = stats.get("experts") or {}
        speed = stats.get("tokens_per_s") or {}
        hotness = experts.get("hotness")
        return cls(
            model=stats.get("model") or "",
            arch=stats.get("arch") or "",
            ctx=stats.get("ctx"),
            rss_bytes=memory.get("rss_bytes"),
            weights_bytes=memory.get("weights_bytes"),
            tiers=tuple(Tier.from_dict(t) for t in memory.get("tiers") or ()),
            experts_total=experts.get("total") or 0,
            hit_rate=experts.get("hit_rate"),
            promotions_per_s=experts.get("promotions_per_s"),
            first_layer=experts.get("first_layer") or 0,
            placement=tuple(experts.get("placement") or ()),
            hotness=np.asarray(hotness, dtype=np.float32) if hotness else None,
            prefill_tps=speed.get("prefill"),
            decode_tps=speed.get("decode"),
            ttft_s=stats.get("ttft_s"),
        )

    @property
    def gpus(self) -> tuple[Tier, ...]:
        return tuple(t for t in self.tiers if t.tier == "gpu")


@dataclass
class History:
    """Recent values of the series the views plot: `decode` tokens/s and one per device label."""

    series: dict[str, deque] = field(default_factory=dict)

    def push(self, t: Telemetry) -> None:
        samples = {"decode": t.decode_tps}
        # per device its used bytes; NVMe's mapped bytes never move, what the page cache holds does
        samples |= {x.label: x.resident_bytes if x.tier == "nvme" else x.used_bytes for x in t.tiers}
        for name, value in samples.items():
            self.series.setdefault(name, deque(maxlen=HISTORY_LEN)).append(value or 0)

    def __getitem__(self, name: str) -> list[float]:
        return list(self.series.get(name, ()))


def human_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def human_rate(x: float | None, unit: str) -> str:
    return "–" if x is None else f"{x:.1f} {unit}"
