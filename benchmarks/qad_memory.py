"""Memory and time of quantization-aware distillation trained whole against a block at a time, on SmolLM2-135M-Instruct.

Each mode runs in a fresh process: the built-in model is loaded, the teacher's top-64 outputs taken on
--windows windows of --seq-len tokens of BBC business articles, the model rounded to int4-g64, and then
--steps QAD steps run with `blockwise` False (the whole graph at once: every quantized weight held as
float32 levels, every block's activations kept for the backward pass) or True (levels unpacked from the
codes in each forward, each block run again in the backward pass). Measured: the peak resident memory
(VmHWM, reset just before QAD starts) above what the process held then, seconds per step, the held-out KL
after (the same in both modes: the same arithmetic), and `qad_memory`'s estimate of the step.

    .venv/bin/python benchmarks/qad_memory.py [--steps 6] [--windows 8] [--seq-len 512] [--out benchmarks/results/qad_memory.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(blockwise: bool, steps: int, windows: int, seq_len: int) -> dict:
    """One mode's measurement, in this process."""
    import tempfile
    import time

    import torch

    import shrink
    from common import bbc_texts
    from shrink.io import read_model
    from shrink.quant.calibration import prepare
    from shrink.quant.qad import distill_quantized, qad_memory, teacher_targets

    torch.manual_seed(0)
    loaded = read_model("default")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "text.txt"
        text.write_text("\n\n".join(bbc_texts("business", 200, 60)))
        data = prepare(text, tokenizer=loaded.tokenizer, model=loaded.model, n_samples=windows, seq_len=seq_len)
    targets = teacher_targets(loaded.model, data.samples)
    shrink.quantize(loaded.model, "int4-g64", progress=False)
    estimate = qad_memory(loaded.model, seq_len, blockwise=blockwise)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to VmRSS: the peak from here on
    before = _status("VmRSS")
    t0 = time.perf_counter()
    r = distill_quantized(loaded.model, data.samples, targets, steps=steps, progress=False, say=lambda s: None,
                          blockwise=blockwise)
    seconds = time.perf_counter() - t0
    return {"peak_above_start_bytes": _status("VmHWM") - before, "held_before_bytes": before,
            "estimate_bytes": estimate.total - estimate.baseline, "seconds": seconds,
            "seconds_per_step": r.seconds / max(r.steps, 1), "kl_before": r.kl_before, "kl_after": r.kl_after,
            "steps": r.steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="QAD steps per mode (default 6)")
    ap.add_argument("--windows", type=int, default=8, help="windows of text, an eighth held out (default 8)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--out", default="benchmarks/results/qad_memory.json")
    ap.add_argument("--child", choices=["whole", "blockwise"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "blockwise", args.steps, args.windows, args.seq_len)))
        return
    rows = {}
    for mode in ("whole", "blockwise"):  # each in a fresh process: peaks do not mix
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--windows",
                              str(args.windows), "--seq-len", str(args.seq_len)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    table = Table(title=f"QAD on SmolLM2-135M int4-g64, windows of {args.seq_len} tokens, {args.steps} steps")
    for col in ("mode", "peak above start (MB)", "estimate (MB)", "s/step", "held-out KL before -> after"):
        table.add_column(col)
    for mode, r in rows.items():
        table.add_row(mode, f"{r['peak_above_start_bytes'] / 1e6:.0f}", f"{r['estimate_bytes'] / 1e6:.0f}",
                      f"{r['seconds_per_step']:.2f}", f"{r['kl_before']:.4f} -> {r['kl_after']:.4f}")
    Console().print(table)
    result = {"machine": machine(), "model": "SmolLM2-135M-Instruct (built-in)", "format": "int4-g64",
              "steps": args.steps, "windows": args.windows, "seq_len": args.seq_len, "rows": rows,
              "peak_ratio_blockwise_to_whole": rows["blockwise"]["peak_above_start_bytes"]
              / rows["whole"]["peak_above_start_bytes"],
              "time_ratio_blockwise_to_whole": rows["blockwise"]["seconds_per_step"] / rows["whole"]["seconds_per_step"]}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
