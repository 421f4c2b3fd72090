"""Statistics of a paired comparison: bootstrap confidence interval of the score difference, McNemar's
exact test on flips, and summaries of divergence."""

from __future__ import annotations

import math

import numpy as np


def paired_bootstrap(a, b, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a with a percentile bootstrap confidence interval over examples (resampled in pairs).

    Returns (difference, low, high). Defaults: 2000 resamples, 95 %, fixed seed (reproducible reports).
    """
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(lo), float(hi)


def mcnemar_exact(right_to_wrong: int, wrong_to_right: int) -> float:
    """Two-sided p-value of McNemar's exact test: under no change, each flip goes either way with
    probability 1/2, so the smaller count follows Binomial(flips, 1/2). 1.0 when nothing flipped."""
    n = right_to_wrong + wrong_to_right
    if n == 0:
        return 1.0
    k = min(right_to_wrong, wrong_to_right)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def divergence_summary(values) -> dict:
    """Mean, median and 99th percentile of per-position divergences (empty: NaNs)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan"), "positions": 0}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "p99": float(np.quantile(v, 0.99)),
            "positions": int(v.size)}
