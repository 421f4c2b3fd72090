"""Which candidates are worth having (the Pareto frontier) and which one to recommend.

Works on the result records of a search (`CandidateResult`): each has the candidate, its quality
(score, change and interval), size on disk, memory and latency, and, once judged, whether it meets each
constraint. Ranking is a total order, so the recommendation over a growing set of results is always
either the previous one or the newest: the search can save the best as it goes.
"""

from __future__ import annotations

from ...evaluate.verdict import status_of
from .constraints import Constraints, human_bytes
from .records import CandidateResult, Judgement


def pareto(results: list[CandidateResult], cost: str) -> list[CandidateResult]:
    """The finished results not dominated in (lower `cost`, higher quality change): for each, no other
    result is at most as costly and at least as good, and strictly better in one. Sorted by cost. (The
    change, not the score, so that perplexity tasks, where a lower score is better, read the same.)"""
    pts = [r for r in results if r.done and r.cost(cost) is not None]
    front = []
    for r in pts:
        dominated = any(o is not r and o.cost(cost) <= r.cost(cost) and o.change >= r.change
                        and (o.cost(cost) < r.cost(cost) or o.change > r.change) for o in pts)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (r.cost(cost), -r.change))


def judge(r: CandidateResult, c: Constraints, allowed: float) -> CandidateResult:
    """`r` with its judgement: whether it meets each constraint and, when not, by how much.

    Quality is met when the comparison's verdict is WITHIN TOLERANCE: the loss at the interval's worst end
    is within `allowed` points and no slice is past the sweet spot (the rule of `evaluate.verdict.decide`,
    applied again here so a resumed search judges alike). See `Judgement` for what a miss holds."""
    miss = {}
    worst_loss = -min(r.change, r.ci_low)
    if not r.within or worst_loss > allowed:
        miss["quality"] = max(0.0, worst_loss - allowed) + (0.0 if r.within else 0.001)
    if c.max_size is not None and r.size_bytes > c.max_size:
        miss["size"] = r.size_bytes / c.max_size - 1
    lat = r.cost(f"latency_{c.latency_per}")
    if c.max_latency is not None and lat is not None and lat > c.max_latency:
        miss["latency"] = lat / c.max_latency - 1
    return r.judged(Judgement(allowed, miss))


def rank_key(r: CandidateResult, objective: str = "size", per: str = "example"):
    """Smaller is better: qualifying first, by the objective (size, or latency per example or token) then
    quality; then those that keep quality but miss size or latency, by how far; then the rest, by how
    much quality they miss."""
    cost = r.size_bytes if objective == "size" else (r.cost(f"latency_{per}") or r.latency_example or 0.0)
    if r.qualifies:
        return (0, cost, -r.change, r.name)
    if r.quality_ok:
        return (1, max(r.miss.values()), cost, r.name)
    return (2, r.miss["quality"], cost, r.name)


def recommend(results: list[CandidateResult], objective: str = "size", per: str = "example") -> CandidateResult | None:
    """The best finished result by `rank_key` (None when nothing finished)."""
    done = [r for r in results if r.done]
    return min(done, key=lambda r: rank_key(r, objective, per)) if done else None


def explain(best: CandidateResult | None, c: Constraints, original) -> str:
    """The recommendation as one line a person can act on, never empty (`original`: the search's Original)."""
    if best is None:
        return "NOTHING MEASURED: no candidate finished (raise --time or --max-trials)"
    ratio = original.size_bytes / max(1, best.size_bytes)
    speed = ""
    if best.latency_example and original.latency_example:
        speed = f", {original.latency_example / best.latency_example:.2f}x the original's speed per example" + (
            "" if c.times_examples_alone else " (from batch times, not latencies)")
    facts = f"{human_bytes(best.size_bytes)} ({ratio:.2f}x smaller){speed}"
    # the comparison's verdict, word for word; records from before verdicts were lines say the numbers instead
    verdict = best.verdict if status_of(best.verdict) else \
        f"Quality {best.change:+.1f} points (95% CI {best.ci_low:+.1f}…{best.ci_high:+.1f})."
    if best.qualifies:
        return f"RECOMMENDED: {best.name}: {facts}. Meets: {c.describe()}. {verdict}"
    misses = []
    m = best.miss
    if "quality" in m:
        misses.append(f"quality: {verdict}")
    if "size" in m:
        misses.append(f"size by {100 * m['size']:.0f}% ({human_bytes(best.size_bytes)} > {human_bytes(c.max_size)})")
    if "latency" in m:
        lat = best.cost(f"latency_{c.latency_per}")
        misses.append(f"latency by {100 * m['latency']:.0f}% ({lat * 1e3:.1f} ms > {c.max_latency * 1e3:.1f} ms "
                      f"per {c.latency_per})")
    line = f"NOTHING MEETS {c.describe()}; closest is {best.name}: {facts}; it misses {', '.join(misses)}."
    return line if "quality" in m else f"{line} {verdict}"
