"""Decoding and prefill speed of SmolLM2-135M-Instruct: shrink's runtime, transformers, and llama.cpp on the
same formats, side by side in one run.

Variants (like with like: the tied embedding/output layer at 8 bits wherever the body is quantized, as
llama.cpp's Q4_0 files keep it):
  fp32                      shrink fp32                          vs llama.cpp F32
  int8                      int8 everywhere (lm_head included)   vs Q8_0
  int4-g32 + lm_head int8   int4-g32, embedding/head int8        vs Q4_0 with Q8_0 embedding
Each is exported with `shrink.export_gguf` (exact block copies), so llama.cpp runs the very same codes.

Measured per round, all variants in turn (rounds interleave; medians reported):
  - decode: 64 greedy tokens after the chat-templated prompt of the built-in task's first question, through
    `model.generate` (shrink's runtime) and through transformers' own generate; tokens per second of the
    64 steps after the prompt (the prompt's own time subtracted);
  - prefill: one prompt of 512 tokens, through the runtime and through transformers' forward;
  - llama.cpp: `llama-bench -p 512 -n 64 -r 1` with as many threads as torch uses (its tg64 decodes from
    an empty context). Needs a llama-bench binary: --llama-bench PATH, $LLAMA_BENCH, or one found in
    ~/.cache/shrink/llama.cpp-*/bin (`scripts/setup.sh --llama-bench` builds it there) or on PATH; without one, llama.cpp's columns are left out and it says so.
Ratios shrink/llama.cpp are of figures measured in the same round.

    .venv/bin/python benchmarks/decode_speed.py [--rounds 3] [--out benchmarks/results/decode_speed.json]
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import CpuLoad, machine, median_spread  # noqa: E402

import shrink  # noqa: E402
from shrink.core.atomic import write_json  # noqa: E402
from shrink.evaluate.adapters import CausalLMAdapter  # noqa: E402
from shrink.evaluate.tasks import load_task  # noqa: E402
from shrink.io import LoadedModel, read_model  # noqa: E402
from shrink.runtime import decoder_for  # noqa: E402

NEW_TOKENS, PROMPT_TOKENS = 64, 512
VARIANTS = {  # name -> (format or None, llama.cpp's name of the same format, float type of the export)
    "fp32": (None, "F32", "f32"),
    "int8": ({"lm_head": "int8", "*": "int8"}, "Q8_0", "f16"),
    "int4-g32 + lm_head int8": ({"lm_head": "int8", "*": "int4-g32"}, "Q4_0 (embedding Q8_0)", "f16"),
}


def find_llama_bench(given: str | None) -> str | None:
    """A llama-bench binary: the one given, $LLAMA_BENCH, a cached build's, or one on PATH."""
    for cand in (given, os.environ.get("LLAMA_BENCH"), *sorted(glob.glob(os.path.expanduser("~/.cache/shrink/llama.cpp-*/bin/llama-bench"))),
                 shutil.which("llama-bench")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def llama_bench(binary: str, gguf: Path, threads: int) -> tuple[float, float]:
    """(decode tokens/s, prefill tokens/s) of one llama-bench repetition."""
    out = subprocess.run([binary, "-m", str(gguf), "-p", str(PROMPT_TOKENS), "-n", str(NEW_TOKENS), "-t", str(threads),
                          "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    speed = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in rows}
    return speed["tg"], speed["pp"]


def timers(model, prompt: torch.Tensor, long: torch.Tensor):
    """Callables returning tokens per second: runtime decode and prefill, transformers' decode and prefill."""
    one = dict(do_sample=False, pad_token_id=2)

    def decode(generate):
        def run():
            t = time.perf_counter()
            generate(prompt[None], max_new_tokens=1, **one)
            first = time.perf_counter() - t
            t = time.perf_counter()
            out = generate(prompt[None], max_new_tokens=NEW_TOKENS + 1, min_new_tokens=NEW_TOKENS + 1, **one)
            assert out.shape[1] == len(prompt) + NEW_TOKENS + 1
            return NEW_TOKENS / (time.perf_counter() - t - first)
        return run

    def prefill_runtime():
        t = time.perf_counter()
        model.generate(long[None], max_new_tokens=1, **one)
        return PROMPT_TOKENS / (time.perf_counter() - t)

    def prefill_transformers():
        t = time.perf_counter()
        with torch.no_grad():
            model(long[None], use_cache=False)
        return PROMPT_TOKENS / (time.perf_counter() - t)

    hf = type(model).generate.__get__(model)
    return {"shrink_decode": decode(model.generate), "shrink_prefill": prefill_runtime,
            "transformers_decode": decode(hf), "transformers_prefill": prefill_transformers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    ap.add_argument("--llama-bench", default=None, help="path of llama.cpp's llama-bench (default: found, see above)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_speed.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    console = Console()
    bench = find_llama_bench(args.llama_bench)
    if bench is None:
        console.print("no llama-bench found (--llama-bench, $LLAMA_BENCH): llama.cpp's columns are left out")
    threads = torch.get_num_threads()
    base = read_model("default")
    tok = base.tokenizer
    prompt = CausalLMAdapter(base.model, tok).prompt_ids(load_task(None).examples[0].input)
    long = torch.randint(100, 40000, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0))
    tmp = Path(tempfile.mkdtemp(prefix="decode_speed."))
    models, fns, ggufs = {}, {}, {}
    for name in args.variants.split(","):
        fmt, _, float_type = VARIANTS[name]
        model = copy.deepcopy(base.model)
        if fmt is not None:
            shrink.quantize(model, fmt, keep_output=False, progress=False)
        else:
            shrink.runtime.install(model)
        if decoder_for(model) is None:
            sys.exit(f"decode_speed.py: shrink's runtime cannot run the {name} model here")
        models[name], fns[name] = model, timers(model, prompt, long)
        if bench:
            ggufs[name] = tmp / f"{name.split()[0]}.gguf"
            shrink.export_gguf(LoadedModel(model, tok, base.source), ggufs[name], float_type=float_type)
    keys = ("shrink_decode", "transformers_decode", "llama_decode", "shrink_prefill", "transformers_prefill", "llama_prefill")
    samples = {n: {k: [] for k in keys} for n in models}
    ratios = {n: {"decode": [], "prefill": []} for n in models}
    load = CpuLoad().start()
    for r in range(args.rounds + 1):  # round 0 warms up
        for name in models:
            got = {k: fn() for k, fn in fns[name].items()}
            if bench:
                got["llama_decode"], got["llama_prefill"] = llama_bench(bench, ggufs[name], threads)
            if r:
                for k, v in got.items():
                    samples[name][k].append(v)
                if bench:
                    for what in ("decode", "prefill"):
                        ratios[name][what].append(got[f"shrink_{what}"] / got[f"llama_{what}"])
        console.print(f"timing round {r} of {args.rounds} done" if r else "warm-up round done")
    other = load.stop()
    table = Table(title=f"SmolLM2-135M-Instruct, tokens per second, {threads} threads ({args.rounds} interleaved "
                        f"rounds, {100 * other:.0f}% CPU load from other processes); ratio: shrink / llama.cpp, per round")
    for col in ("variant", "llama.cpp format", "decode shrink", "decode transformers", "decode llama.cpp",
                "decode ratio", "prefill shrink", "prefill transformers", "prefill llama.cpp", "prefill ratio"):
        table.add_column(col, justify="left" if col in ("variant", "llama.cpp format") else "right")
    num = lambda v, p=0: "-" if v is None else f"{v:,.{p}f}"  # noqa: E731
    rows = {}
    for name in models:
        med = {k: median_spread(v)[0] if v else None for k, v in samples[name].items()}
        ratio = {k: median_spread(v)[0] if v else None for k, v in ratios[name].items()}
        rows[name] = {"format": str(VARIANTS[name][0]), "llama_cpp_format": VARIANTS[name][1],
                      **{f"{k}_tokens_per_s": v for k, v in med.items()},
                      **{f"{k}_spread": median_spread(v)[1] for k, v in samples[name].items() if v},
                      "decode_ratio_shrink_over_llama_cpp": ratio["decode"],
                      "prefill_ratio_shrink_over_llama_cpp": ratio["prefill"]}
        table.add_row(name, VARIANTS[name][1], *(num(med[k]) for k in keys[:3]), num(ratio["decode"], 2),
                      *(num(med[k]) for k in keys[3:]), num(ratio["prefill"], 2))
    Console(width=200).print(table)
    write_json(args.out, {"machine": machine(), "rounds": args.rounds, "other_cpu_load": other, "threads": threads,
                          "llama_bench": bench, "prompt_tokens_decode": len(prompt), "new_tokens": NEW_TOKENS,
                          "prefill_tokens": PROMPT_TOKENS, "variants": rows})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
