"""The placement policy on made-up sizes (no tensors), activation profiles, and `dsrun plan` on real files."""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
from gguf import GGUFWriter

from dsrun import plan as plan_cmd
from dsrun.errors import DsrunError, MemoryBudgetError, ModelFormatError
from dsrun.gguf_file import GGUFFile
from dsrun.offload.planner import (
    Bandwidths,
    Budgets,
    DecodeCosts,
    LayerSizes,
    ModelSizes,
    decode_time,
    decode_tokens_per_s,
    layer_ranges,
    model_sizes,
    parse_gpu_mem,
    parse_size,
    plan,
)
from dsrun.offload.profile import ActivationProfile, read_profile, write_profile

GIB = 1 << 30


def moe_sizes(n_layers=4, n_experts=8, expert_bytes=100, resident=1000, kv_per_token=10, ctx=10, dense=0):
    """`dense` leading dense layers, then MoE layers; every number small enough to count by hand."""
    layers = [LayerSizes(resident, kv_bytes_per_token=kv_per_token)] * dense + [
        LayerSizes(resident, n_experts, expert_bytes, kv_per_token)
    ] * (n_layers - dense)
    return ModelSizes(
        "made-up.gguf", 12345, ctx, tuple(layers), input_bytes=50, output_bytes=50, experts_used=2
    )


RESIDENT_4 = 4 * (1000 + 10 * 10) + 100  # four layers' weights and KV cache, plus embedding and head


def experts_on(p, device):
    return sorted(le for le, d in p.expert_devices.items() if d == device)


# --- sizes and settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (1234, 1234),
        ("1234", 1234),
        ("24GiB", 24 * GIB),
        ("24G", 24 * GIB),
        ("24 gib", 24 * GIB),
        ("512MiB", 512 << 20),
        ("1.5GB", 1_500_000_000),
        ("2TB", 2 * 10**12),
        ("0.5k", 512),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("garbage", ["", "lots", "24 GiBs", "-1GiB", "1e9", -5, None, True, "1.5.2GB"])
def test_parse_size_refuses_garbage_with_an_example(garbage):
    with pytest.raises(DsrunError, match="24GiB"):
        parse_size(garbage)


def test_gpu_mem_one_size_for_all_or_one_per_gpu():
    assert parse_gpu_mem("24GiB", 2) == [24 * GIB, 24 * GIB]
    assert parse_gpu_mem("24GiB,16GiB", 2) == [24 * GIB, 16 * GIB]
    assert parse_gpu_mem(["1GiB", 5], 2) == [GIB, 5]
    with pytest.raises(DsrunError, match="3 sizes for 2 GPUs"):
        parse_gpu_mem("1G,2G,3G", 2)


def test_parse_gpus():
    assert plan_cmd.parse_gpus("2") == [0, 1]
    assert plan_cmd.parse_gpus(0) == []
    assert plan_cmd.parse_gpus("none") == []
    assert plan_cmd.parse_gpus("1,3") == [1, 3]
    assert plan_cmd.parse_gpus("1,") == [1]
    assert plan_cmd.parse_gpus([2]) == [2]
    for bad in ("0,0", "a,b", "-1,2"):
        with pytest.raises(DsrunError, match="cannot read"):
            plan_cmd.parse_gpus(bad)


def test_layer_ranges():
    assert layer_ranges([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert layer_ranges([]) == ""


# --- placement --------------------------------------------------------------------------------------------


def test_without_a_profile_experts_spread_evenly_over_layers():
    sizes = moe_sizes()
    p = plan(sizes, Budgets({"cuda:0": RESIDENT_4 + 6 * 100}, ram=0))
    on_gpu = experts_on(p, "cuda:0")
    assert len(on_gpu) == 6
    per_layer = [sum(1 for layer, _ in on_gpu if layer == i) for i in range(4)]
    assert per_layer == [2, 2, 1, 1]  # round-robin: every layer gets one before any gets a second
    assert p.tier("cuda:0").free_bytes == 0


def test_with_a_profile_the_hottest_experts_go_first():
    sizes = moe_sizes()
    counts = [[0] * 8 for _ in range(4)]
    hot = [(2, 5), (0, 7), (3, 1)]
    for rank, (layer, expert) in enumerate(hot):
        counts[layer][expert] = 100 - rank
    profile = ActivationProfile("made-up.gguf", 12345, tuple(map(tuple, counts)))
    p = plan(sizes, Budgets({"cuda:0": RESIDENT_4 + 3 * 100}, ram=10 * 100), profile)
    assert experts_on(p, "cuda:0") == sorted(hot)
    assert len(experts_on(p, "cpu")) == 10
    assert len(experts_on(p, "disk")) == 32 - 3 - 10
    assert p.notes and "disk" in p.notes[0]


def test_layers_split_over_gpus_in_proportion_to_memory():
    sizes = moe_sizes(n_layers=8, n_experts=4)
    per_layer = 1000 + 10 * 10
    p = plan(sizes, Budgets({"cuda:0": 6 * per_layer + 2000, "cuda:1": 2 * per_layer + 700}, ram=GIB))
    assert p.layer_devices == ["cuda:0"] * 6 + ["cuda:1"] * 2  # contiguous ranges, 3:1 as the budgets
    assert p.tier("cuda:0").layers == list(range(6))
    for (layer, _), device in p.expert_devices.items():
        assert device in (p.layer_devices[layer], "cpu")  # never on another layer's GPU


def test_too_small_a_budget_says_what_is_missing_and_by_how_much():
    sizes = moe_sizes()
    with pytest.raises(MemoryBudgetError) as e:
        plan(sizes, Budgets({"cuda:0": RESIDENT_4 // 2, "cuda:1": 1000}, ram=GIB))
    message = str(e.value)
    assert "cuda:0 needs 3.3 KiB for the non-expert tensors of layers 0-2" in message
    assert "cuda:1" in message and "layers" in message and "KV cache at ctx 10" in message
    assert "short" in message and "--gpu-mem" in message


def test_each_gpu_keeps_a_forwards_workspace_out_of_its_experts_room():
    """A budget is all dsrun allocates on a GPU: the workspace comes off each GPU that holds layers (and
    not off RAM), leaving fewer experts there; a budget short of it says so."""
    sizes = moe_sizes(n_layers=8, n_experts=4)
    budgets = Budgets({"cuda:0": 6 * 1100 + 2000, "cuda:1": 2 * 1100 + 700}, ram=GIB)
    without = plan(sizes, budgets)
    p = plan(dataclasses.replace(sizes, workspace_bytes=300), budgets)
    assert [t.workspace_bytes for t in p.tiers] == [300, 300, 0, 0]
    assert p.tier("cuda:0").experts == without.tier("cuda:0").experts - 3  # 3 experts of 100 bytes
    assert all(t.used_bytes <= t.budget_bytes for t in p.tiers[:2])
    with pytest.raises(MemoryBudgetError, match=r"workspace \(2.0 KiB\)"):
        plan(dataclasses.replace(sizes, workspace_bytes=2048), budgets)


def test_without_gpus_the_resident_part_must_fit_ram():
    sizes = moe_sizes()
    p = plan(sizes, Budgets({}, ram=RESIDENT_4 + 32 * 100))
    assert p.fits and p.layer_devices == ["cpu"] * 4
    assert p.tier("cpu").experts == 32
    with pytest.raises(MemoryBudgetError, match=r"cpu needs .* 100 B short"):
        plan(sizes, Budgets({}, ram=RESIDENT_4 - 100))


def test_plan_json_has_the_contract_shape_and_sums():
    sizes = moe_sizes(n_layers=5, dense=1)
    p = plan(sizes, Budgets({"cuda:0": RESIDENT_4 + 1100 + 5 * 100, "cuda:1": 3000}, ram=5 * 100))
    out = json.loads(json.dumps(p.to_json()))
    assert {"model", "ctx", "fits", "experts_total", "kv_cache_bytes", "tiers", "nvme_bytes", "notes"} <= set(
        out
    )
    assert out["experts_total"] == 32 and out["kv_cache_bytes"] == 5 * 10 * 10
    assert [t["device"] for t in out["tiers"]] == ["cuda:0", "cuda:1", "cpu", "disk"]
    assert [t["tier"] for t in out["tiers"]] == ["gpu", "gpu", "ram", "nvme"]
    for t in out["tiers"]:
        assert {"tier", "device", "budget_bytes", "used_bytes", "experts"} <= set(t)
        assert t["budget_bytes"] is None or t["used_bytes"] <= t["budget_bytes"]
    assert sum(t["experts"] for t in out["tiers"]) == out["experts_total"]
    assert sum(t["used_bytes"] for t in out["tiers"]) == (
        sizes.resident_bytes + sizes.kv_cache_bytes + sizes.routed_expert_bytes
    )
    assert out["fits"] == (out["nvme_bytes"] == 0)
    assert sum(len(ids) for devices in out["placement"].values() for ids in devices.values()) == 32


def test_dense_model_has_no_experts_anywhere():
    p = plan(moe_sizes(dense=4), Budgets({"cuda:0": GIB}, ram=GIB))
    assert p.fits and p.expert_devices == {}
    assert p.to_json()["experts_total"] == 0
    assert all(t.experts == 0 for t in p.tiers)


def test_decode_estimate_is_bytes_per_token_over_bandwidth():
    sizes = moe_sizes(n_layers=1, n_experts=4, kv_per_token=0)
    p = plan(sizes, Budgets({}, ram=1100 + 2 * 100))  # two experts in RAM, two on disk, two used per token
    assert p.tier("cpu").read_bytes_per_token == pytest.approx(
        1000 + 50 + 2 * 0.5 * 100
    )  # layer, head, experts
    assert p.tier("disk").read_bytes_per_token == pytest.approx(2 * 0.5 * 100)
    bandwidths = Bandwidths(gpu=1, ram=1150, nvme=100)
    assert decode_tokens_per_s(p, bandwidths) == pytest.approx(1 / (1150 / 1150 + 100 / 100))


def test_expected_decode_time_counts_each_kind_at_its_efficiency_plus_fixed_costs():
    sizes = moe_sizes(n_layers=2, n_experts=4, kv_per_token=10, ctx=10, dense=1)  # one dense, one MoE layer
    p = plan(sizes, Budgets({}, ram=GIB))
    costs = DecodeCosts(
        cpu_weights=0.5, cpu_kv=0.25, cpu_experts=0.8, dense_layer_s=0.01, moe_layer_s=0.03, token_s=0.002
    )
    t = decode_time(p, Bandwidths(ram=1000), costs, context_tokens=4)
    assert t.weights_s == pytest.approx((2 * 1000 + 50) / (1000 * 0.5))  # two layers and the head
    assert t.kv_s == pytest.approx(2 * 4 * 10 / (1000 * 0.25))  # two layers' rows of 4 cached tokens
    assert t.experts_s == pytest.approx(2 * 100 / (1000 * 0.8))  # two of the MoE layer's experts
    assert t.layers_s == pytest.approx(0.01 + 0.03) and t.token_s == 0.002
    assert t.total_s == pytest.approx(4.1 + 0.32 + 0.25 + 0.04 + 0.002)
    assert decode_tokens_per_s(p, Bandwidths(ram=1000), costs, context_tokens=4) == pytest.approx(1 / 4.712)
    # without costs, and the cache full, it is the plan's bytes per token over the bandwidth
    bound = decode_time(p, Bandwidths(ram=1000))
    assert bound.total_s == pytest.approx(p.tier("cpu").read_bytes_per_token / 1000)
    assert bound.kv_s == pytest.approx(2 * 10 * 10 / 1000) and bound.layers_s == 0


def test_expected_decode_time_on_gpu_ram_and_disk():
    sizes = moe_sizes(n_layers=1, n_experts=4, kv_per_token=0)
    # the layer and two experts on the GPU, one expert in RAM, one on disk
    p = plan(sizes, Budgets({"cuda:0": 1100 + 2 * 100}, ram=100))
    assert [p.tier(d).experts for d in ("cuda:0", "cpu", "disk")] == [2, 1, 1]
    costs = DecodeCosts(gpu_weights=0.5, gpu_experts=0.8, cpu_weights=0.1, cpu_experts=0.25, moe_layer_s=1.0)
    t = decode_time(p, Bandwidths(gpu=2000, ram=100, nvme=10), costs)
    assert t.weights_s == pytest.approx(1050 / (2000 * 0.5))  # the RAM's efficiency for weights is unused
    # each expert is routed to half the time (two of four): GPU 2 x 50 bytes, RAM 50, disk 50 at its rate
    assert t.experts_s == pytest.approx(100 / (2000 * 0.8) + 50 / (100 * 0.25) + 50 / 10)
    assert t.layers_s == 1.0 and t.kv_s == 0


# --- activation profiles ----------------------------------------------------------------------------------


def test_profile_round_trip(tmp_path):
    profile = ActivationProfile("m.gguf", 99, ((), (3, 0, 5)))
    write_profile(profile, tmp_path / "p.json")
    assert read_profile(tmp_path / "p.json") == profile


@pytest.mark.parametrize(
    "obj, complaint",
    [
        ([], "format"),
        ({"format": "dsrun-activation-profile", "version": 7}, "version 7"),
        ({"format": "dsrun-activation-profile", "version": 1, "model": "m", "file_bytes": -1}, "file_bytes"),
        (
            {
                "format": "dsrun-activation-profile",
                "version": 1,
                "model": "m",
                "file_bytes": 1,
                "counts": [[1.5]],
            },
            "layer 0",
        ),
    ],
)
def test_profile_validation_names_the_problem(tmp_path, obj, complaint):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(DsrunError, match=complaint):
        read_profile(path)


def test_unreadable_profiles(tmp_path):
    with pytest.raises(DsrunError, match="not found"):
        read_profile(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DsrunError, match="cannot read"):
        read_profile(tmp_path / "bad.json")


def test_a_profile_of_another_model_is_refused_and_of_another_file_noted():
    sizes = moe_sizes(n_layers=2, n_experts=2)
    budgets = Budgets({}, ram=GIB)
    with pytest.raises(DsrunError, match="3 experts in layer 1"):
        plan(sizes, budgets, ActivationProfile("x.gguf", 1, ((1, 1), (1, 1, 1))))
    with pytest.raises(DsrunError, match="has 1 layers"):
        plan(sizes, budgets, ActivationProfile("x.gguf", 1, ((1, 1),)))
    p = plan(sizes, budgets, ActivationProfile("other-quant.gguf", 1, ((1, 1), (1, 1))))
    assert "other-quant.gguf" in p.notes[0]


# --- sizes from GGUF files --------------------------------------------------------------------------------


def write_tiny_deepseek2(path, n_experts=4, kv_lora=16, rope=8, block_count=2):
    """Two layers, the first dense, the second with routed and shared experts: F32 zeros."""
    w = GGUFWriter(path, "deepseek2")
    w.add_block_count(block_count)
    w.add_uint32("deepseek2.attention.kv_lora_rank", kv_lora)
    w.add_uint32("deepseek2.rope.dimension_count", rope)
    w.add_uint32("deepseek2.expert_used_count", 2)
    tensors = {
        "token_embd.weight": (32, 8),
        "output_norm.weight": (8,),
        "output.weight": (32, 8),
        "blk.0.attn_norm.weight": (8,),
        "blk.0.ffn_up.weight": (16, 8),
        "blk.1.attn_norm.weight": (8,),
        "blk.1.ffn_gate_inp.weight": (n_experts, 8),
        "blk.1.exp_probs_b.bias": (n_experts,),
        "blk.1.ffn_up_shexp.weight": (16, 8),
        "blk.1.ffn_gate_exps.weight": (n_experts, 4, 8),
        "blk.1.ffn_up_exps.weight": (n_experts, 4, 8),
        "blk.1.ffn_down_exps.weight": (n_experts, 8, 4),
    }
    for name, shape in tensors.items():
        w.add_tensor(name, np.zeros(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_model_sizes_of_a_moe_gguf(tmp_path):
    write_tiny_deepseek2(tmp_path / "tiny.gguf")
    f = GGUFFile(tmp_path / "tiny.gguf")
    sizes = model_sizes(f, ctx=100)
    f.close()
    dense, moe = sizes.layers
    assert (dense.n_experts, dense.resident_bytes) == (0, (8 + 16 * 8) * 4)
    assert (moe.n_experts, moe.expert_bytes) == (4, 3 * 4 * 8 * 4)  # gate, up, down of one expert, F32
    assert moe.resident_bytes == (8 + 4 * 8 + 4 + 16 * 8) * 4  # norm, router, bias, shared expert
    assert moe.kv_bytes_per_token == (16 + 8) * 4  # MLA: kv_lora_rank + rope dims, F32
    assert sizes.kv_cache_bytes == 100 * 2 * (16 + 8) * 4
    assert (sizes.input_bytes, sizes.output_bytes) == (32 * 8 * 4, (8 + 32 * 8) * 4)
    assert sizes.experts_total == 4 and sizes.experts_used == 2 and not sizes.tied_embeddings


def test_a_tensor_beyond_block_count_is_a_format_error(tmp_path):
    write_tiny_deepseek2(tmp_path / "bad.gguf", block_count=1)
    f = GGUFFile(tmp_path / "bad.gguf")
    with pytest.raises(ModelFormatError, match="blk.1.* only 1 layers"):
        model_sizes(f, ctx=100)
    f.close()


def test_model_sizes_of_the_default_model(default_gguf):
    f = GGUFFile(default_gguf)
    sizes = model_sizes(f, ctx=4096)
    total = sum(t.nbytes for t in f.tensors.values())
    f.close()
    assert len(sizes.layers) == 30 and sizes.experts_total == 0
    assert all(layer.kv_bytes_per_token == 2 * 3 * 64 * 4 for layer in sizes.layers)  # 3 KV heads of 64, F32
    assert sizes.resident_bytes == total
    assert sizes.tied_embeddings  # SmolLM2 has no output.weight: the logits read token_embd


def plan_args(*argv):
    parser = argparse.ArgumentParser()
    plan_cmd.add_arguments(parser)
    return parser.parse_args(argv)


def test_plan_command_for_gpus_this_machine_does_not_have(default_gguf, capsys):
    assert (
        plan_cmd.run(plan_args("-m", str(default_gguf), "--gpus", "2", "--gpu-mem", "24GiB", "--json")) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["experts_total"] == 0 and out["ctx"] == 4096
    gpus = [t for t in out["tiers"] if t["tier"] == "gpu"]
    assert [g["device"] for g in gpus] == ["cuda:0", "cuda:1"]
    assert all(g["budget_bytes"] == 24 * GIB and g["layers"] for g in gpus)
    assert sorted(i for g in gpus for i in g["layers"]) == list(range(30))
    assert out["decode_at_most_tokens_per_s"] > 0
    assert out["decode_expected_tokens_per_s"] is None  # nothing measured for GPUs this machine lacks


def test_plan_command_prints_a_table(default_gguf, capsys):
    assert plan_cmd.run(plan_args("-m", str(default_gguf), "--gpus", "none", "--ram", "4GiB")) == 0
    out = capsys.readouterr().out
    assert "cpu" in out and "0-29" in out and "fits" in out and "expected decode" in out


@pytest.mark.gpu
def test_default_budgets_come_from_the_gpus_here():
    budgets = plan_cmd.resolve_budgets()
    assert budgets.gpus and all(b > 0 for b in budgets.gpus.values()) and budgets.ram > 0
