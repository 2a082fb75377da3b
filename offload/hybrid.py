"""Turn a loaded model into a hybrid one: each MoE layer's routed experts placed by the planner's plan,
computed where they live, and cached on GPUs by the hot-expert policy."""

from __future__ import annotations

import torch

from dsrun.gguf_file import GGUFFile
from dsrun.models.gguf_matrix import DeviceMatrix, GGUFMatrix
from dsrun.models.moe import MoEFFN

from .cpu_experts import CPUExperts, make_backend
from .device_slots import DeviceExpertSlots, SlotLayout
from .placed import ExpertFile, HomeExperts, Offload
from .planner import Plan


class PlacedExperts:
    """Stands in for a MoE layer's ExpertWeights: the layer's assignments go to the Offload scheduler."""

    def __init__(self, offload: Offload, layer: int, n_expert: int):
        self.offload, self.layer, self.n_expert = offload, layer, n_expert

    def run(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.offload.run(self.layer, x, expert_ids, weights)


def model_tensors(obj, seen: set[int] | None = None):
    """Every weight (tensor or GGUF matrix) a model object holds (blocks, their parts, lists of them),
    each once; the placed experts are the Offload's and are not walked."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (PlacedExperts, Offload)):
        return
    seen.add(id(obj))
    if isinstance(obj, (torch.Tensor, GGUFMatrix, DeviceMatrix)):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from model_tensors(item, seen)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("dsrun.models"):
        for value in vars(obj).values():
            yield from model_tensors(value, seen)


def weight_bytes_by_device(model) -> dict[str, int]:
    """Bytes of the model's own (non-placed) tensors per device: "cpu", "cuda:0", ..."""
    out: dict[str, int] = {}
    for t in model_tensors(model):
        key = "cpu" if t.device.type == "cpu" else str(t.device)
        out[key] = out.get(key, 0) + t.nbytes
    return out


def moe_layers(model) -> dict[int, MoEFFN]:
    """Each block's MoE feed-forward, found by type so every architecture is covered."""
    found = {}
    for i, block in enumerate(model.blocks):
        for value in vars(getattr(block, "block", block)).values():  # inside an OnDevice wrapper
            if isinstance(value, MoEFFN):
                found[i] = value
    return found


def attach_offload(
    model,
    f: GGUFFile,
    plan: Plan,
    *,
    backend: CPUExperts | None = None,
    device_map: dict[str, str] | None = None,
    background: bool = True,
    quantized_slots: bool | None = None,
) -> Offload | None:
    """Replace every MoE layer's experts by placed ones. `device_map` maps a planned GPU ("cuda:0") to
    the device that holds its slots (tests map it to "cpu"); `quantized_slots` forces slots to keep (or
    not) the file's quant types, by default kept on CUDA where the kernels take them. Returns None for a
    dense model."""
    layers = moe_layers(model)
    if not layers:
        return None
    backend = backend or make_backend("dequant")
    homes, slots = {}, {}
    pools: dict[str, DeviceExpertSlots] = {}
    for layer in layers:
        source = ExpertFile(f, layer)
        where = [plan.expert_devices.get((layer, e), "disk") for e in range(source.n_expert)]
        # a backend on the mapped file also keeps GPU experts: a demoted one then runs at RAM speed
        home = ("cpu", "cuda") if backend.maps_file else ("cpu",)
        homes[layer] = HomeExperts(source, backend, [e for e, d in enumerate(where) if d.startswith(home)])
        gpu = plan.layer_devices[layer]
        if gpu.startswith("cuda"):
            if gpu not in pools:
                device = torch.device((device_map or {}).get(gpu, gpu))
                layout = SlotLayout.for_experts(source, device, quantized_slots)
                pools[gpu] = make_pool(plan, gpu, layout, source.n_expert, len(model.blocks), device)
            slots[layer] = pools[gpu]
    offload = Offload(homes, slots, background=background)
    for layer, ffn in layers.items():
        offload.routers[layer] = ffn
        ffn.experts = PlacedExperts(offload, layer, homes[layer].source.n_expert)
    for (layer, e), device in plan.expert_devices.items():  # the planned GPU experts start resident
        pool = slots.get(layer)
        if device.startswith("cuda") and pool is not None and pool.free:
            offload.promote(pool, layer, e)
    return offload


def make_pool(
    plan: Plan, gpu: str, layout: SlotLayout, n_expert: int, n_layers: int, device: torch.device
) -> DeviceExpertSlots:
    """As many slots as the GPU's budget holds once its resident tensors and KV cache are in.

    A slot may cost more than the expert's bytes in the file (the plan counts those) when it holds
    dequantized weights: the pool is sized in slot bytes, and the plan's GPU experts fill it hottest first.
    """
    tier = plan.tier(gpu)
    free = tier.budget_bytes - tier.fixed_bytes
    n_slots = max(1, min(free // layout.slot_bytes(), sum(d == gpu for d in plan.layer_devices) * n_expert))
    while True:
        try:
            return DeviceExpertSlots(device, n_slots, layout, n_layers, n_expert, name=gpu)
        except torch.OutOfMemoryError:
            if n_slots == 1:
                raise
            n_slots //= 2  # the budget overstated what is free: hold fewer experts, never fail the load
