"""`dsrun doctor` on this machine, and its parsers on made-up /proc and /sys files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from dsrun import bench, doctor
from dsrun.cli import main
from dsrun.gguf_file import GGUFFile
from dsrun.offload.planner import Bandwidths, DecodeCosts
from dsrun.plan import plan_model
from dsrun.synth import synthesize


def test_doctor_json_reports_this_machine_and_plans_the_default_model(capsys):
    assert main(["doctor", "--json", "-m", "default"]) == 0
    report = json.loads(capsys.readouterr().out)
    cpu = report["cpu"]
    flags_here = set(doctor.cpuinfo_fields().get("flags", "").split())
    for flag in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile"):
        assert cpu["flags"][flag] == (flag in flags_here)
    assert cpu["logical_cores"] >= cpu["usable_cores"] >= 1
    assert report["memory"]["read_bandwidth"] > 1e9
    assert report["disk"]["read_bandwidth"] > 0 and report["disk"]["free_bytes"] > 0
    assert report["backends"]["torch"]["available"]
    verdict = report["plan"]
    assert verdict["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and verdict["fits"]
    assert "placement" not in verdict
    assert verdict["decode_at_most_tokens_per_s"] > verdict["decode_expected_tokens_per_s"] > 0
    costs, measured = verdict["decode_costs"], verdict["decode_measurements"]
    assert 0 < costs["cpu_weights"] <= 1 and 0 < costs["cpu_kv"] <= 1 and costs["cpu_experts"] == 1
    assert costs["dense_layer_s"] > 0 and costs["moe_layer_s"] == 0  # a dense model
    assert set(measured["cpu_weights"]) >= {"Q4_1"} and measured["layers"]["stand_in"].startswith("llama-")
    # `dsrun plan` expects the same speed from what the doctor measured and remembered
    assert main(["plan", "-m", "default", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["decode_expected_tokens_per_s"] == verdict["decode_expected_tokens_per_s"]
    assert planned["decode_costs"] == costs


def test_doctor_prints_a_report(capsys):
    doctor.print_report(
        {
            "cpu": {
                "model": "Test CPU",
                "physical_cores": 8,
                "logical_cores": 16,
                "usable_cores": 2,
                "flags": {"avx2": True, "amx_tile": False},
                "numa_nodes": [{"node": 0, "cpus": "0-15"}],
            },
            "memory": {"total_bytes": 1 << 34, "available_bytes": 1 << 33, "read_bandwidth": 4e10},
            "gpus": [],
            "disk": {"error": "the default model is not installed"},
            "backends": {
                "torch": {"available": True, "version": "2.13", "cuda": None},
                "llama_cpp": {"available": False, "error": "ModuleNotFoundError: llama_cpp"},
            },
        }
    )
    out = capsys.readouterr().out
    for text in (
        "Test CPU",
        "no amx_tile",
        "16.0 GiB total",
        "40.0 GB/s",
        "none usable",
        "not installed",
        "ModuleNotFoundError",
    ):
        assert text in out


def test_cpuinfo_and_numa_parsing(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\n"
    )
    assert doctor.cpuinfo_fields(str(cpuinfo))["model name"] == "Some CPU"
    assert doctor.cpuinfo_fields(str(tmp_path / "none")) == {}
    for n in (1, 0, 10):
        node = tmp_path / f"node{n}"
        node.mkdir()
        (node / "cpulist").write_text(f"{n * 8}-{n * 8 + 7}\n")
        (node / "meminfo").write_text(f"Node {n} MemTotal:       1024 kB\nNode {n} MemFree:  1 kB\n")
    nodes = doctor.numa_nodes(tmp_path)
    assert [n["node"] for n in nodes] == [0, 1, 10]
    assert nodes[1] == {"node": 1, "cpus": "8-15", "memory_bytes": 1024 * 1024}


def test_disk_read_bandwidth_of_a_file(tmp_path: Path):
    path = tmp_path / "blob"
    path.write_bytes(b"\1" * (20 << 20))
    assert doctor.disk_read_bandwidth(path) > 0


def test_stand_in_of_a_moe_model_and_its_layer_costs(tmp_path: Path):
    """The stand-in keeps what decides a layer's fixed cost (architecture, layer kinds, experts, top-k,
    routing, quant type) at a tiny width; its MoE layers cost more than its dense one."""
    path = synthesize(
        tmp_path / "v3ish.gguf",
        "deepseek2",
        weight_type="Q8_0",
        n_layer=4,
        n_dense_lead=2,
        n_expert=16,
        n_expert_used=3,
        q_lora_rank=32,
        gating="sigmoid",
        n_group=4,
        topk_group=2,
    )
    f = GGUFFile(path)
    spec = doctor.stand_in_spec(f)
    assert (
        spec["arch"] == "deepseek2" and spec["weight_type"] == "Q8_0" and spec["n_embd"] == doctor.TINY_WIDTH
    )
    assert (spec["n_layer"], spec["n_dense_lead"], spec["n_expert"], spec["n_expert_used"]) == (2, 1, 16, 3)
    assert (spec["gating"], spec["n_group"], spec["topk_group"], spec["q_lora_rank"] > 0) == (
        "sigmoid",
        4,
        2,
        True,
    )
    p = plan_model(path, gpus="none")
    fixed, details = doctor.fixed_costs(f, p, DecodeCosts(), Bandwidths(), 1, "dequant")
    f.close()
    assert fixed["moe_layer_s"] > fixed["dense_layer_s"] > 0 and fixed["token_s"] >= 0
    assert details["stand_in"].startswith("deepseek2-")
    assert doctor.stand_in_model(GGUFFile(path)).name == details["stand_in"]  # made once, then reused


def test_bench_prediction_for_its_setting():
    """`dsrun bench` predicts for its own thread count and cache length, and divides the measured speed."""
    args = argparse.Namespace(
        model="default",
        ctx=256,
        threads=1,
        gpus="none",
        gpu_mem=None,
        ram=None,
        placement=None,
        cpu_backend=None,
    )
    pr = bench.predict(args, 32, 16, measured=10.0)
    assert pr["context_tokens"] == 40 and pr["measurements"]["threads"] == 1
    assert pr["at_most_tok_s"] > pr["decode_tok_s"] > 0
    assert pr["measured_over_predicted"] == pytest.approx(10.0 / pr["decode_tok_s"], rel=0.01)
    assert pr["seconds"]["total_s"] == pytest.approx(1 / pr["decode_tok_s"], rel=0.01)


@pytest.mark.gpu
def test_gpu_measurements():
    gpu = doctor.gpu_info()[0]
    assert gpu["device"] == "cuda:0" and gpu["memory_bytes"] >= gpu["free_bytes"] > 0
    assert gpu["memory_bandwidth"] > gpu["host_to_device_bandwidth"] > 1e9


def test_bench_reports_the_cpu_experts_read_rate():
    """The worker's count of CPU expert bytes becomes a rate over the decode time; no experts, no rate."""
    from dsrun.bench import summarize

    worker = {"load_s": 1.0, "prefill_s": 2.0, "decode_s": 4.0, "peak_rss_bytes": 2**30}
    assert "cpu_expert_read_gb_s" not in summarize(worker, 10, 8)
    rates = summarize(worker | {"cpu_expert_bytes": 20e9}, 10, 8)
    assert rates["cpu_expert_read_gb_s"] == 5.0 and rates["decode_tok_s"] == 2.0


def test_bench_reads_the_model_file_once_where_it_fits(tmp_path, monkeypatch):
    """Both sides of `dsrun bench` start from a warm page cache, unless the file would crowd out RAM."""
    import psutil

    from dsrun.bench import warm_page_cache

    path = tmp_path / "m.gguf"
    path.write_bytes(b"x" * (40 << 20))
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    assert warm_page_cache(path) and opened.count(path) == 1
    small = psutil.virtual_memory()._replace(available=50 << 20)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: small)
    assert not warm_page_cache(path) and opened.count(path) == 1
