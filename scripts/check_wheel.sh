#!/usr/bin/env bash
# Build shrink's wheel, install it into a new virtual environment with the pinned CPU torch, and, from a
# folder outside the repository with an empty shrink cache, run a kernel call and a decoding step from it
# (both compiled from the installed files alone). CI runs this; it takes a few minutes (two compilations).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PYTHON=${PYTHON:-python3}
pip() { "$1" -m pip --disable-pip-version-check -q "${@:2}"; }
pip .venv/bin/python wheel --no-deps -w "$WORK/dist" .
"$PYTHON" -m venv "$WORK/venv"
pip "$WORK/venv/bin/python" install torch==2.13.0
pip "$WORK/venv/bin/python" install "$WORK"/dist/shrink-*.whl
cd "$WORK"
SHRINK_CACHE="$WORK/cache" "$WORK/venv/bin/python" - <<'PY'
import warnings
warnings.filterwarnings("error", message="shrink: .* unavailable")  # a build that fell back to PyTorch fails here
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import shrink
from shrink.quant.kernels import native
from shrink.runtime.llama import extension

assert "site-packages" in shrink.__file__, shrink.__file__
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))  # the last layer stays full precision
x = torch.randn(3, 64)
q = shrink.quantize(net, "int4-g32", progress=False)
assert native.available(), "the kernel did not build from the installed files"
ref = torch.nn.functional.linear(x, q[0].weight, q[0].bias)  # the dequantized weight in float
err = ((q[0](x) - ref).norm() / ref.norm()).item()
assert err < 0.05, err
cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
model = shrink.quantize(LlamaForCausalLM(cfg).eval(), "int8", progress=False)
assert extension() is not None, "the runtime did not build from the installed files"
prompt = torch.tensor([[1, 5, 9, 3]])
out = model.generate(prompt, max_new_tokens=4, do_sample=False)
assert out.shape == (1, 8), out.shape
print(f"wheel check: kernel call (relative error {err:.1e}) and decoding from {shrink.__file__}: ok")
PY
