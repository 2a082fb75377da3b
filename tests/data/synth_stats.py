"""Writes stats_synthetic_deepseek_2gpu.json: a made-up but realistic `Engine.stats()` of a DeepSeek-V3
Q4_K_M on 2 x 24 GiB GPUs, 256 GiB RAM and NVMe (58 MoE layers x 256 experts), for the TUI's snapshot
tests. Not recorded from a run: the sizes follow DeepSeek-V3's shapes, the routing is a Zipf law per layer.

    .venv/bin/python tests/data/synth_stats.py
"""

import json
from pathlib import Path

import numpy as np

GIB = 1 << 30
LAYERS, EXPERTS, FIRST_MOE_LAYER = 58, 256, 3
EXPERT_BYTES = 24_772_608  # gate+up+down of one 7168x2048 expert at Q4_K_M
GPU_PER_LAYER, RAM_PER_LAYER = 24, 170  # per layer: hottest on a GPU, next pinned in RAM


def main() -> None:
    rng = np.random.default_rng(7)
    zipf = 1 / np.arange(1, EXPERTS + 1) ** 0.9
    hotness = np.stack([rng.permutation(zipf) for _ in range(LAYERS)])  # (L, E)
    placement, gpu_share = [], []
    for layer, heat in enumerate(hotness):
        rank = np.empty(EXPERTS, int)
        rank[np.argsort(-heat)] = np.arange(EXPERTS)
        gpu = "0" if layer < LAYERS // 2 else "1"  # layers split across the GPUs like their attention
        placement.append(
            "".join(
                gpu if r < GPU_PER_LAYER else "r" if r < GPU_PER_LAYER + RAM_PER_LAYER else "n" for r in rank
            )
        )
        gpu_share.append(heat[rank < GPU_PER_LAYER].sum() / heat.sum())
    n_gpu_experts = GPU_PER_LAYER * LAYERS // 2
    n_ram, n_nvme = RAM_PER_LAYER * LAYERS, (EXPERTS - GPU_PER_LAYER - RAM_PER_LAYER) * LAYERS

    def gpu(i: int) -> dict:
        weights, kv, experts = int(5.2 * GIB), int(1.4 * GIB), n_gpu_experts * EXPERT_BYTES
        return {
            "tier": "gpu",
            "device": f"cuda:{i}",
            "budget_bytes": 24 * GIB,
            "used_bytes": weights + kv + experts + int(0.6 * GIB),
            "weights_bytes": weights,
            "experts_bytes": experts,
            "kv_bytes": kv,
            "experts": n_gpu_experts,
        }

    ram_weights, ram_experts = int(1.9 * GIB), n_ram * EXPERT_BYTES
    stats = {
        "_comment": "SYNTHESIZED by tests/data/synth_stats.py, not recorded from a run",
        "model": "DeepSeek-V3-Q4_K_M",
        "arch": "deepseek2",
        "ctx": 8192,
        "load_seconds": 48.3,
        "ttft_s": 0.92,
        "memory": {
            "rss_bytes": ram_weights + ram_experts + int(3.1 * GIB),
            "file_bytes": 404_430_000_000,
            "weights_bytes": 2 * int(5.2 * GIB) + ram_weights + EXPERT_BYTES * LAYERS * EXPERTS,
            "tiers": [
                gpu(0),
                gpu(1),
                {
                    "tier": "ram",
                    "device": "cpu",
                    "budget_bytes": 256 * GIB,
                    "used_bytes": ram_weights + ram_experts,
                    "weights_bytes": ram_weights,
                    "experts_bytes": ram_experts,
                    "kv_bytes": 0,
                    "experts": n_ram,
                },
                {
                    "tier": "nvme",
                    "device": "disk",
                    "budget_bytes": None,
                    "used_bytes": n_nvme * EXPERT_BYTES,
                    "resident_bytes": int(0.38 * n_nvme * EXPERT_BYTES),
                    "experts": n_nvme,
                },
            ],
        },
        "experts": {
            "total": LAYERS * EXPERTS,
            "hit_rate": round(float(np.mean(gpu_share)), 4),
            "promotions_per_s": 3.5,
            "first_layer": FIRST_MOE_LAYER,
            "placement": placement,
            "hotness": [[round(float(h), 2) for h in row / row.max()] for row in hotness],
        },
        "tokens_per_s": {"prefill": 61.4, "decode": 7.8},
        "timings": {"prefill_tokens": 1228, "prefill_s": 20.0, "decode_tokens": 390, "decode_s": 50.0},
    }
    out = Path(__file__).with_name("stats_synthetic_deepseek_2gpu.json")
    out.write_text(json.dumps(stats, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
