"""Qwen1.5/Qwen2-MoE (GGUF arch `qwen2moe`): the Qwen3-MoE model with q/k/v biases instead of q/k norms,
top-k softmax weights left unnormalized, and a shared expert scaled by sigmoid(ffn_gate_inp_shexp . x).

Both differences in tensors are picked up from the file by the shared model; only the routing differs.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsrun.gguf_file import GGUFFile

from . import qwen3moe
from .qwen3moe import Model

__all__ = ["Config", "Model"]


@dataclass(frozen=True)
class Config(qwen3moe.Config):
    @classmethod
    def from_gguf(cls, f: GGUFFile, *, norm_top_k: bool = False) -> Config:
        return super().from_gguf(f, norm_top_k=norm_top_k)  # llama.cpp never renormalizes qwen2moe
