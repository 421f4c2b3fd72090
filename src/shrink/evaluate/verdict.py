"""The one rule that says whether a compressed model is within tolerance, and the words that say it.

`compare` and `search` both judge by `decide`, so the same outcomes give the same verdict, phrased the
same way, wherever it is printed:

- PAST THE SWEET SPOT: the whole 95% interval of the change lies past the tolerance (even its best end
  loses more), or a slice of at least MIN_SLICE examples lost more than its tolerance and significantly
  so, or a score is not finite;
- WITHIN TOLERANCE: the interval's worst end is within the tolerance, and no slice is past;
- CANNOT TELL: the interval straddles the tolerance: the task is too small to decide, and the verdict
  says about how many examples would (the interval narrows as one over the square root of their number).

`examples_needed` says up front whether a task is large enough for any verdict at a tolerance: with the
paired bootstrap, one changed answer alone puts the interval's lower end at -3/n of the score (the
flipped example drawn three times or more in 2.5% of resamples), so a task of n examples cannot call a
model with a single flip within a tolerance of less than 300/n points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WITHIN, PAST, CANNOT_TELL = "WITHIN TOLERANCE", "PAST THE SWEET SPOT", "CANNOT TELL"
STATUSES = (WITHIN, PAST, CANNOT_TELL)
ONE_FLIP_REACH = 3.0  # one changed answer in n puts the bootstrap interval's lower end at -ONE_FLIP_REACH / n


@dataclass(frozen=True)
class Verdict:
    """A comparison judged: `status` (one of STATUSES), the one line that says it, and for CANNOT TELL
    about how many examples would decide it (None when no number would: the change sits at the tolerance)."""

    status: str
    line: str
    needed: int | None = None

    @property
    def within(self) -> bool:
        return self.status == WITHIN


def status_of(line: str | None) -> str | None:
    """The status a verdict line starts with (None for anything else)."""
    return next((s for s in STATUSES if (line or "").startswith(s)), None)


def examples_needed(allowed_points: float) -> float:
    """The fewest examples for which one changed answer leaves the interval within `allowed_points`
    (points of a score out of 100); infinity for a tolerance of 0."""
    return math.ceil(100 * ONE_FLIP_REACH / allowed_points) if allowed_points > 0 else math.inf


def too_small(n: int, allowed_points: float, tol_text: str) -> str | None:
    """Why a task of `n` examples cannot tell a change of `allowed_points`, or None when it can."""
    need = examples_needed(allowed_points)
    if n >= need:
        return None
    more = f"at least {need:,} examples are needed" if math.isfinite(need) else "no number of examples is enough"
    return (f"a task of {n:,} examples is too small to judge a tolerance of {tol_text}: one changed answer alone puts "
            f"the 95% interval's lower end at -{100 * ONE_FLIP_REACH / n:.1f} points, so any model that changes an "
            f"answer will be CANNOT TELL; {more} (or a tolerance of at least {100 * ONE_FLIP_REACH / n:.1f} points)")


def decide(change: float, ci_low: float, ci_high: float, allowed: float, n: int, tol_text: str, unit: str = " points",
           slice_past: str | None = None) -> Verdict:
    """The verdict on a change (compressed - original, in `unit`; higher is better) with its 95% interval,
    under a loss of `allowed` in the same unit, on `n` examples. `slice_past`: why a slice is past the sweet
    spot (as `evaluate.compare` words it), or None."""
    span = f"overall {change:+.1f}{unit} (95% CI {ci_low:+.1f}…{ci_high:+.1f}) on {n:,} examples"
    head = f"({tol_text}): {span}"
    if not all(math.isfinite(x) for x in (change, ci_low, ci_high)):
        return Verdict(PAST, f"{PAST} ({tol_text}): the scores hold NaN or infinity; a model produced non-finite "
                             "outputs")
    if -ci_high > allowed:
        return Verdict(PAST, f"{PAST} {head}; even the interval's best end loses more than the tolerance")
    if slice_past:
        return Verdict(PAST, f"{PAST} {head}, but {slice_past}")
    if -ci_low <= allowed:
        return Verdict(WITHIN, f"{WITHIN} {head}; the interval's worst end is within the tolerance and no slice "
                               "lost significantly more")
    margin, half = abs(change + allowed), (ci_high - ci_low) / 2
    needed = math.ceil(n * (half / margin) ** 2) if margin > 1e-9 else None
    more = (f"about {needed:,} examples would tell" if needed is not None else
            "no number of examples would tell while the change sits at the tolerance itself")
    return Verdict(CANNOT_TELL, f"{CANNOT_TELL} {head}; the interval reaches past the tolerance but not wholly, so "
                                f"neither within nor past is sure: {more}", needed)
