"""`dsrun doctor` on this machine, and its parsers on made-up /proc and /sys files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsrun import doctor
from dsrun.cli import main


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
    assert verdict["decode_tokens_per_s"] > 0
    assert "placement" not in verdict


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


@pytest.mark.gpu
def test_gpu_measurements():
    gpu = doctor.gpu_info()[0]
    assert gpu["device"] == "cuda:0" and gpu["memory_bytes"] >= gpu["free_bytes"] > 0
    assert gpu["memory_bandwidth"] > gpu["host_to_device_bandwidth"] > 1e9
