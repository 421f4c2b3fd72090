"""Which candidates are worth having (the Pareto frontier) and which one to recommend.

Works on the result records of a search (dicts, as in results.jsonl): each has the candidate, its
quality (score, change and interval), size on disk, memory and latency, and whether it meets each
constraint. Ranking is a total order, so the recommendation over a growing set of results is always
either the previous one or the newest: the search can save the best as it goes.
"""

from __future__ import annotations

from .constraints import Constraints, human_bytes


def pareto(results: list[dict], cost: str) -> list[dict]:
    """The finished results not dominated in (lower `cost`, higher quality change): for each, no other
    result is at most as costly and at least as good, and strictly better in one. Sorted by cost. (The
    change, not the score, so that perplexity tasks, where a lower score is better, read the same.)"""
    pts = [r for r in results if r.get("status") == "done" and r.get(cost) is not None]
    front = []
    for r in pts:
        dominated = any(o is not r and o[cost] <= r[cost] and o["change"] >= r["change"]
                        and (o[cost] < r[cost] or o["change"] > r["change"]) for o in pts)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (r[cost], -r["change"]))


def judge(r: dict, c: Constraints, allowed: float) -> dict:
    """Add to a measured result whether it meets each constraint and, when not, by how much.

    quality_ok: the comparison found no slice past the sweet spot, and the loss at the far end of the
    95% interval is within `allowed` points. miss: constraint -> amount ("quality": points beyond the
    tolerance; "size"/"latency": fraction over the limit)."""
    miss = {}
    worst_loss = -min(r["change"], r["ci_low"])
    if not r["within"] or worst_loss > allowed:
        miss["quality"] = max(0.0, worst_loss - allowed) + (0.0 if r["within"] else 0.001)
    if c.max_size is not None and r["size_bytes"] > c.max_size:
        miss["size"] = r["size_bytes"] / c.max_size - 1
    lat = r.get(f"latency_{c.latency_per}")
    if c.max_latency is not None and lat is not None and lat > c.max_latency:
        miss["latency"] = lat / c.max_latency - 1
    r["allowed"] = allowed  # kept, so a resumed search judges again with the same tolerance
    r["quality_ok"] = "quality" not in miss
    r["miss"] = miss
    r["qualifies"] = not miss
    return r


def rank_key(r: dict, objective: str = "size", per: str = "example"):
    """Smaller is better: qualifying first, by the objective (size, or latency per example or token) then
    quality; then those that keep quality but miss size or latency, by how far; then the rest, by how
    much quality they miss."""
    cost = r["size_bytes"] if objective == "size" else (r.get(f"latency_{per}") or r.get("latency_example") or 0.0)
    if r["qualifies"]:
        return (0, cost, -r["change"], r["candidate"]["name"])
    if r["quality_ok"]:
        return (1, max(r["miss"].values()), cost, r["candidate"]["name"])
    return (2, r["miss"]["quality"], cost, r["candidate"]["name"])


def recommend(results: list[dict], objective: str = "size", per: str = "example") -> dict | None:
    """The best finished result by `rank_key` (None when nothing finished)."""
    done = [r for r in results if r.get("status") == "done"]
    return min(done, key=lambda r: rank_key(r, objective, per)) if done else None


def explain(best: dict | None, c: Constraints, original: dict) -> str:
    """The recommendation as one line a person can act on, never empty."""
    if best is None:
        return "NOTHING MEASURED: no candidate finished (raise --time or --max-trials)"
    name = best["candidate"]["name"]
    ratio = original["size_bytes"] / max(1, best["size_bytes"])
    speed = ""
    if best.get("latency_example") and original.get("latency_example"):
        speed = f", {original['latency_example'] / best['latency_example']:.2f}x the original's speed per example"
    quality = f"{best['change']:+.1f} points (95% CI {best['ci_low']:+.1f}…{best['ci_high']:+.1f})"
    facts = f"{human_bytes(best['size_bytes'])} ({ratio:.2f}x smaller){speed}; quality {quality}"
    if best["qualifies"]:
        return f"RECOMMENDED: {name}: {facts}. Meets: {c.describe()}."
    misses = []
    m = best["miss"]
    if "quality" in m:
        misses.append(f"quality by {m['quality']:.1f} points at the far end of its interval"
                      if m["quality"] >= 0.01 else "quality: a slice is past the sweet spot")
    if "size" in m:
        misses.append(f"size by {100 * m['size']:.0f}% ({human_bytes(best['size_bytes'])} > {human_bytes(c.max_size)})")
    if "latency" in m:
        lat = best[f"latency_{c.latency_per}"]
        misses.append(f"latency by {100 * m['latency']:.0f}% ({lat * 1e3:.1f} ms > {c.max_latency * 1e3:.1f} ms "
                      f"per {c.latency_per})")
    return f"NOTHING MEETS {c.describe()}; closest is {name}: {facts}; it misses {', '.join(misses)}."
