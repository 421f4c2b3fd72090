"""Greedy decoding of SmolLM2-135M-Instruct in shrink's own runtime: transformers' generate as it is, with a
static KV cache, and with that cache and the forward compiled by torch.compile (the kernels stay in the
graph as torch.ops.shrink.*). Interleaved in one process, reported as tokens per second and as a ratio
to the eager dynamic-cache run; also how many of the greedy tokens each variant shares with it (float
rounding differs between attention paths, so long greedy runs can part).

    .venv/bin/python benchmarks/decode_compile.py [--formats int8,int4-g32] [--out benchmarks/results/decode_compile.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import CpuLoad, machine, median_spread  # noqa: E402

import shrink  # noqa: E402
from shrink.core.atomic import write_json  # noqa: E402
from shrink.io import read_model  # noqa: E402

PROMPT = "Write a short paragraph about why the sea is salty."
NEW_TOKENS = 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="int8,int4-g32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/decode_compile.json")
    args = ap.parse_args()
    console = Console()
    loaded = read_model("default")
    tok = loaded.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    rows = []
    for fmt in args.formats.split(","):
        model = copy.deepcopy(loaded.model)
        spec = {"lm_head": "int8", "*": fmt}  # the head at 8 bits, as llama.cpp's Q4_0 file keeps it
        shrink.quantize(model, spec, keep_output=False, progress=False)
        model.eval()
        compiled = copy.deepcopy(model)
        t0 = time.perf_counter()
        compiled.forward = torch.compile(compiled.forward, dynamic=False)

        def gen(m, **kw):
            with torch.no_grad():
                return m.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, **kw)

        gen(compiled, cache_implementation="static")
        compile_s = time.perf_counter() - t0
        variants = {"eager": lambda: gen(model), "eager static cache": lambda: gen(model, cache_implementation="static"),
                    "compiled static cache": lambda: gen(compiled, cache_implementation="static")}
        outs = {k: f() for k, f in variants.items()}  # warm-up, and the tokens each gives
        times = {k: [] for k in variants}
        load = CpuLoad().start()
        for _ in range(args.rounds):
            for k, f in variants.items():
                t = time.perf_counter()
                f()
                times[k].append(NEW_TOKENS / (time.perf_counter() - t))
        cpu_other = load.stop()
        base = median_spread(times["eager"])[0]
        for k in variants:
            med, spread = median_spread(times[k])
            same = outs[k][0, ids.shape[1]:] == outs["eager"][0, ids.shape[1]:]
            shared = int(same.cumprod(0).sum())
            rows.append({"format": fmt, "variant": k, "tokens_per_s": med, "spread": spread, "vs_eager": med / base,
                         "tokens_shared_with_eager": shared, "compile_seconds": compile_s if "compiled" in k else None,
                         "cpu_load_other": cpu_other})
    t = Table(title=f"SmolLM2-135M greedy decoding, {NEW_TOKENS} tokens (head int8)")
    for col in ("format", "variant", "tok/s", "x eager", "tokens = eager", "compile s"):
        t.add_column(col, justify="left" if col in ("format", "variant") else "right")
    for r in rows:
        t.add_row(r["format"], r["variant"], f"{r['tokens_per_s']:.1f}", f"{r['vs_eager']:.2f}",
                  f"{r['tokens_shared_with_eager']}/{NEW_TOKENS}",
                  f"{r['compile_seconds']:.0f}" if r["compile_seconds"] else "")
    console.print(t)
    write_json(Path(args.out), {"machine": machine(), "new_tokens": NEW_TOKENS, "rows": rows})


if __name__ == "__main__":
    main()
