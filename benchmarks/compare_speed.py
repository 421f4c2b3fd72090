"""Time of `shrink compare default <int8 folder>` on the built-in task, whole command, side by side in one run.

Variants, in turn each round (medians reported):
  runtime        shrink's runtime generates and scores (log-probabilities from the decoding pass, targets and
                 the original's answers as continuations of each prompt's cache), batches of 16;
  transformers   SHRINK_RUNTIME=0: transformers generates and scores, in the same batches of 16;
  one at a time  SHRINK_RUNTIME=0 --batch-size 1 (only with --one-at-a-time: it takes about a minute a round);
  before REV     the same command run by shrink's code at git revision REV (only with --before REV, for
                 example f938411, the code before batched evaluation), from a worktree of this repository
                 on PYTHONPATH, its kernels compiled by a warm-up run first.
The int8 folder is made first with `shrink quantize -f int8`. Each variant's score change and KL are kept, so
a reader sees whether the faster path measures the same thing (float rounding moves a few greedy answers of
an int8 model; see the README).

    .venv/bin/python benchmarks/compare_speed.py [--rounds 3] [--runtime-only] [--one-at-a-time] [--before REV]
        [--out benchmarks/results/compare_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import CpuLoad, machine  # noqa: E402

SHRINK = str(Path(sys.executable).with_name("shrink"))


def run(folder: Path, out: Path, env: dict, extra: list[str]) -> tuple[float, dict]:
    """Seconds of one whole `shrink compare` command and what its results.json says."""
    t = time.perf_counter()
    subprocess.run([SHRINK, "compare", "default", str(folder), "--out", str(out), "--force", *extra],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - t
    r = json.loads((out / "results.json").read_text())
    return seconds, {"change": r["overall"]["change"], "kl_mean": r["divergence"]["kl"]["mean"],
                     "top1_agreement": r["divergence"]["top1_agreement"], "verdict": r["verdict"],
                     "examples": r["task"]["examples"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--one-at-a-time", action="store_true", help="also time transformers with --batch-size 1")
    ap.add_argument("--runtime-only", action="store_true", help="time shrink's runtime alone (no transformers variant)")
    ap.add_argument("--before", metavar="REV", help="also time the code at this git revision (a worktree)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compare_speed.json")
    args = ap.parse_args()
    console = Console(width=120)
    base = dict(os.environ)
    variants = {"runtime": (base, [])}
    if not args.runtime_only:
        variants["transformers"] = ({**base, "SHRINK_RUNTIME": "0"}, [])
    if args.one_at_a_time:
        variants["one at a time"] = ({**base, "SHRINK_RUNTIME": "0"}, ["--batch-size", "1"])
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:
            tree = Path(tmp) / "before"
            subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), args.before], check=True,
                           stdout=subprocess.DEVNULL)
            # its own package first on the path: this checkout's shrink is installed editable in the venv
            variants[f"before {args.before}"] = ({**base, "PYTHONPATH": str(tree / "src")}, [])
        try:
            _measure(args, console, variants, Path(tmp))
        finally:
            if args.before:
                subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], check=False)


def _measure(args, console, variants: dict, tmp: Path) -> None:
    """Make the int8 folder, warm every variant up, time them in interleaved rounds, print and save the table."""
    folder = tmp / "int8"
    subprocess.run([SHRINK, "quantize", "-f", "int8", "--out", str(folder)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for name, (env, _) in variants.items():  # kernels compiled, files in the page cache
        if name == "runtime" or name.startswith("before"):
            run(folder, tmp / "warm", env, [])
    seconds = {k: [] for k in variants}
    measured = {}
    load = CpuLoad().start()
    for r in range(args.rounds):
        for name, (env, extra) in variants.items():
            s, m = run(folder, tmp / f"cmp-{r}-{name.replace(' ', '-')}", env, extra)
            seconds[name].append(s)
            measured[name] = m
            console.print(f"round {r + 1}: {name}: {s:.1f} s")
    other = load.stop()
    import resource

    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest command's, in MB
    med = {k: statistics.median(v) for k, v in seconds.items()}
    t = Table(title=f"shrink compare default <int8 folder>, whole command ({other:.0%} CPU load from others)")
    for col in ("variant", "seconds (median)", "vs runtime", "change (points)", "KL mean", "top-1 agreement"):
        t.add_column(col, no_wrap=True)
    for k in variants:
        m = measured[k]
        t.add_row(k, f"{med[k]:.1f}", f"{med[k] / med['runtime']:.2f}x", f"{m['change']:+.1f}",
                  f"{m['kl_mean']:.4f}", f"{m['top1_agreement']:.1%}")
    console.print(t)
    console.print(f"peak resident memory of one command: {peak_mb:,.0f} MB; examples: {measured['runtime']['examples']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "cpu_load_others": other, "rounds": args.rounds,
                                    "seconds": seconds, "median": med, "measured": measured,
                                    "peak_rss_mb": round(peak_mb)}, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
