"""shrink's K-quant formats against ggml's own K-quant quantizers, layer by layer, on heavy-tailed synthetic layers.

A layer's quality is its output error relative to its output, tr(E H E^T) / tr(W H W^T), with H = X^T X over
inputs X whose channels have Student-t values of very different scales (the outlier channels real models have)
and weights W Student-t as well. ggml's side: `ggml_quantize_chunk` from llama.cpp's libggml-base (the code
llama-quantize runs), without and with the importance matrix llama-imatrix would give (the inputs' mean squares).
shrink's side: round to nearest and GPTQ (with its refit) on the same grid; `shrink export --gguf` copies those
codes into the same GGUF types. Deterministic (seeded); one process, no timings.

    .venv/bin/python benchmarks/kquant_grid.py [--lib ~/.cache/llama.cpp-0.3.36/lib/libggml-base.so]
        [--out benchmarks/results/kquant_grid.json]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from shrink.core.atomic import write_json  # noqa: E402
from shrink.quant.format import dequantize  # noqa: E402
from shrink.quant.gptq import gptq_quantize  # noqa: E402
from shrink.quant.rtn import quantize_weight  # noqa: E402
from shrink.quant.spec import KQUANTS, parse_format  # noqa: E402

LIB = Path.home() / ".cache" / "llama.cpp-0.3.36" / "lib" / "libggml-base.so"
SHAPES = ((256, 1536), (512, 2048))  # (outputs, inputs) of the layers measured


def ggml(path: Path):
    """libggml-base with ggml_quantize_chunk typed."""
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def ggml_round(lib, w: np.ndarray, qtype, importance: np.ndarray | None) -> np.ndarray:
    """w quantized by ggml into `qtype` and dequantized back (gguf-py reads the blocks)."""
    rows, n = w.shape
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.empty((rows, n // block * size), dtype=np.uint8)
    lib.ggml_quantize_init(int(qtype))
    imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    lib.ggml_quantize_chunk(int(qtype), np.ascontiguousarray(w).ctypes.data, out.ctypes.data, 0, rows, n,
                            None if imp is None else imp.ctypes.data)
    return gguf.quants.dequantize(out, qtype).reshape(rows, n)


def layer(rows: int, inputs: int, seed: int):
    """Weights, input Hessian and llama-imatrix's importance (mean square input) of one synthetic layer."""
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(torch.tensor(4.0))
    torch.manual_seed(seed)
    x = t.sample((4096, inputs)) * (torch.rand(inputs, generator=g) ** 3 * 4 + 0.05)
    w = torch.distributions.StudentT(torch.tensor(5.0)).sample((rows, inputs)) * 0.05
    return w, 2 * x.T @ x / x.shape[0], (x ** 2).mean(0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", default=str(LIB), help=f"llama.cpp's libggml-base.so (default {LIB})")
    ap.add_argument("--out", default="benchmarks/results/kquant_grid.json")
    args = ap.parse_args(argv)
    if not Path(args.lib).exists():
        raise SystemExit(f"{args.lib} not found: ../shared/tools/build-llama-cpp.sh builds llama.cpp's libraries")
    lib = ggml(Path(args.lib))
    rows = {}
    for fmt, kq in KQUANTS.items():
        spec, qtype = parse_format(fmt), gguf.GGMLQuantizationType[kq.gguf]
        errs = {"ggml": [], "ggml + imatrix": [], "shrink rtn": [], "shrink gptq": []}
        for seed, (n, k) in enumerate(SHAPES):
            w, h, imp = layer(n, k, seed)
            total = float(((w @ h) * w).sum())

            def rel(wq):
                e = wq - w
                return float(((e @ h) * e).sum()) / total

            def back(q):
                return dequantize(q.codes, q.scales, q.zeros, q.zero_const, superscales=q.superscales)

            errs["ggml"].append(rel(torch.from_numpy(ggml_round(lib, w.numpy(), qtype, None))))
            errs["ggml + imatrix"].append(rel(torch.from_numpy(ggml_round(lib, w.numpy(), qtype, np.tile(imp.numpy(), 1)))))
            errs["shrink rtn"].append(rel(back(quantize_weight(w, spec))))
            errs["shrink gptq"].append(rel(back(gptq_quantize(w, h, spec, refit=True).weight)))
        rows[fmt] = {"gguf": kq.gguf, "bits_per_weight": spec.bits_per_weight(4096),
                     **{k: float(np.mean(v)) for k, v in errs.items()}}
    write_json(args.out, {"machine": machine(), "layers": [list(s) for s in SHAPES], "rows": rows})
    t = Table(title="relative output error of one layer, mean over 2 synthetic heavy-tailed layers (lower is better)")
    for c in ("format", "GGUF type", "bits/w", "ggml", "ggml + imatrix", "shrink rtn", "shrink gptq", "gptq / ggml+imatrix"):
        t.add_column(c, justify="left" if c in ("format", "GGUF type") else "right")
    for fmt, r in rows.items():
        t.add_row(fmt, r["gguf"], f"{r['bits_per_weight']:.4g}", f"{r['ggml']:.5f}", f"{r['ggml + imatrix']:.5f}",
                  f"{r['shrink rtn']:.5f}", f"{r['shrink gptq']:.5f}", f"{r['shrink gptq'] / r['ggml + imatrix']:.2f}x")
    Console(width=140).print(t)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
