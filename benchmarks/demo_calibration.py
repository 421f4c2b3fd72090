"""Which calibrated int4 the demo can afford: methods and calibration sizes at int4-g32 on the built-in task.

For each variant: SmolLM2-135M-Instruct quantized to int4-g32 (round-to-nearest, or a calibrated method on
N windows of L tokens of the demo's calibration text, which the task does not hold), the time to build it,
and its comparison with the original on the built-in task's 400 examples (change, 95% interval, verdict at
the demo's tolerance of 3 points, KL). The original's outcomes are computed once and shared. Build times
are wall times on this machine (read them as ratios); quality figures are deterministic.

    .venv/bin/python benchmarks/demo_calibration.py [--variants rtn,awq+gptq:8x256,gptq:8x256,...]
        [--out benchmarks/results/demo_calibration.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import CpuLoad, machine  # noqa: E402

import shrink  # noqa: E402
from shrink.evaluate import load_task  # noqa: E402
from shrink.evaluate.builtin_task import calibration_text  # noqa: E402

VARIANTS = "rtn,awq+gptq:8x256,gptq:8x256,awq:8x256,awq+gptq:16x512,gptq:16x512"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=VARIANTS, help=f"comma-separated METHOD[:NxL] (default {VARIANTS})")
    ap.add_argument("--max-drop", type=float, default=3.0, help="tolerance in points (default 3, the demo's)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo_calibration.json")
    args = ap.parse_args()
    console = Console(width=120)
    task = load_task(None)
    loaded = shrink.io.read_model("default")
    calibration = Path(tempfile.mkdtemp()) / "calibration.txt"  # the demo's text, as the demo writes it
    calibration.write_text(calibration_text())
    cache, rows = {}, []
    load = CpuLoad().start()
    for v in args.variants.split(","):
        method, _, size = v.partition(":")
        n, seq = (int(x) for x in size.split("x")) if size else (0, 0)
        model = copy.deepcopy(loaded.model)
        t0 = time.perf_counter()
        kw = dict(calibration=calibration, tokenizer=loaded.tokenizer, n_samples=n, seq_len=seq) if method != "rtn" else {}
        shrink.quantize(model, "int4-g32", method=method, progress=False, **kw)
        build = time.perf_counter() - t0
        c = shrink.compare(loaded.model, model, task, tokenizer=loaded.tokenizer, progress=False, cache=cache,
                           max_drop=args.max_drop)
        rows.append({"variant": v, "build_s": round(build, 1), "change": c.overall.change, "ci_low": c.overall.ci_low,
                     "ci_high": c.overall.ci_high, "status": c.status, "verdict": c.verdict,
                     "kl_mean": c.divergence["kl"]["mean"], "right_to_wrong": c.overall.right_to_wrong,
                     "wrong_to_right": c.overall.wrong_to_right})
        console.print(f"{v}: built in {build:.0f} s, {c.overall.change:+.1f} points, {c.status}")
    other = load.stop()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = Table(title=f"int4-g32 on the built-in task (400 examples), tolerance {args.max_drop:g} points "
                    f"({other:.0%} CPU load from others; peak memory {peak_mb:,.0f} MB)")
    for col in ("variant", "build s", "change", "95% CI", "verdict", "KL mean", "broke / fixed"):
        t.add_column(col, no_wrap=True)
    for r in rows:
        t.add_row(r["variant"], f"{r['build_s']:.0f}", f"{r['change']:+.1f}", f"{r['ci_low']:+.1f}…{r['ci_high']:+.1f}",
                  r["status"], f"{r['kl_mean']:.3f}", f"{r['right_to_wrong']} / {r['wrong_to_right']}")
    console.print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "cpu_load_others": other, "peak_rss_mb": round(peak_mb),
                                    "rows": rows}, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
