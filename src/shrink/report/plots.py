"""Plots for reports, drawn with matplotlib as inline SVG (the HTML report stays one self-contained file)."""

from __future__ import annotations

import io
import re

import numpy as np

ORIGINAL, COMPRESSED, BAD, GOOD = "#4c72b0", "#dd8452", "#c44e52", "#55a868"


def _svg(fig) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text as text, not paths: smaller and searchable
        fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: it is embedded in HTML


def _figure(width: float, height: float):
    """(figure, axes) of a figure on its own, outside pyplot: nothing global to close, no GUI backend."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def slice_scores(names: list[str], original: list[float], compressed: list[float], unit: str,
                 labels: tuple[str, str] = ("original", "compressed")) -> str:
    """Grouped horizontal bars: each slice's score for both models."""
    fig, ax = _figure(7, 0.45 * len(names) + 1.2)
    y = np.arange(len(names))
    ax.barh(y - 0.2, original, 0.4, label=labels[0], color=ORIGINAL)
    ax.barh(y + 0.2, compressed, 0.4, label=labels[1], color=COMPRESSED)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Score per slice")
    return _svg(fig)


def divergence_histogram(values: list[float], label: str) -> str:
    """Histogram of per-example divergences on a log axis; examples with none at all are counted in the title."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    pos = v[v > 1e-12]
    fig, ax = _figure(7, 2.8)
    if pos.size:
        lo, hi = np.log10(pos.min()) - 0.1, np.log10(pos.max()) + 0.1
        ax.hist(pos, bins=np.logspace(lo, max(hi, lo + 0.5), 30), color=COMPRESSED)
        ax.set_xscale("log")
        ax.axvline(float(np.median(v)), color="k", ls="--", lw=1, label=f"median {np.median(v):.3g}")
        ax.legend(fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel("examples")
    zero = v.size - pos.size
    ax.set_title("Divergence of the compressed model, per example" + (f" ({zero} of {v.size} with none)" if zero else ""))
    return _svg(fig)


def flips(names: list[str], right_to_wrong: list[int], wrong_to_right: list[int]) -> str:
    """Per slice: examples that went right to wrong (left, red) and wrong to right (right, green)."""
    fig, ax = _figure(7, 0.4 * len(names) + 1.2)
    y = np.arange(len(names))
    ax.barh(y, [-x for x in right_to_wrong], color=BAD, label="right → wrong")
    ax.barh(y, wrong_to_right, color=GOOD, label="wrong → right")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    m = max([1, *right_to_wrong, *wrong_to_right])
    ax.set_xlim(-m - 0.5, m + 0.5)
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda t, _: str(abs(int(t)))))
    ax.set_xlabel("examples that flipped")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Flips per slice")
    return _svg(fig)


def strip_ids(svg: str, prefix: str) -> str:
    """Make matplotlib's element ids unique per plot, so several SVGs can share one page."""
    return re.sub(r'(id="|url\(#|href="#)', lambda m: m.group(1) + prefix, svg)


def frontier(costs: list[float], changes: list[float], names: list[str], ok: list[bool], front: list[bool],
             cost_label: str, allowed: float | None, log_x: bool = False, unit: str = "points",
             intervals: list[tuple[float, float]] | None = None, original: tuple[float, str] | None = None) -> str:
    """Quality change against a cost, one point per candidate (green: qualifies, red: does not) with its 95%
    interval as a bar, the Pareto frontier joined by a line, the tolerance as a dashed line, and the
    original (cost, name) as a blue diamond at zero change. Labels are placed apart so they stay readable."""
    fig, ax = _figure(7.5, 4.2)
    c = np.asarray(costs, dtype=np.float64)
    q = np.asarray(changes, dtype=np.float64)
    colors = [GOOD if k else BAD for k in ok]
    if intervals:
        lo = np.asarray([a for a, _ in intervals], dtype=np.float64)
        hi = np.asarray([b for _, b in intervals], dtype=np.float64)
        ax.errorbar(c, q, yerr=[np.clip(q - lo, 0, None), np.clip(hi - q, 0, None)], fmt="none", ecolor="#777",
                    elinewidth=1, capsize=3, zorder=2)
    ax.scatter(c, q, c=colors, s=40, zorder=3, edgecolors="k", linewidths=0.5)
    idx = sorted((i for i in range(len(c)) if front[i]), key=lambda i: c[i])
    if idx:
        ax.plot(c[idx], q[idx], color=ORIGINAL, lw=1.2, zorder=2, label="Pareto frontier")
    points = [(float(c[i]), float(q[i]), n) for i, n in enumerate(names)]
    if original is not None:
        ax.scatter([original[0]], [0.0], marker="D", s=60, color=ORIGINAL, edgecolors="k", linewidths=0.5, zorder=4,
                   label="original")
        points.append((float(original[0]), 0.0, original[1]))
    # labels stacked upward where points crowd together, so none is written over another
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    span = (max(p[0] for p in points) - min(p[0] for p in points)) or 1.0
    placed: list[tuple[float, int]] = []
    for i in order:
        x, y, name = points[i]
        near = sum(1 for px, _ in placed if abs(px - x) < 0.08 * span)
        placed.append((x, i))
        ax.annotate(name, (x, y), xytext=(6, 6 + 11 * near), textcoords="offset points", fontsize=8,
                    arrowprops={"arrowstyle": "-", "color": "#999", "lw": 0.5} if near else None)
    if allowed is not None:
        ax.axhline(-allowed, color="k", ls="--", lw=0.8, label=f"tolerance (−{allowed:g} {unit})")
    ax.axhline(0, color="#999", lw=0.6)
    if log_x:
        ax.set_xscale("log")
    ax.margins(x=0.15, y=0.2)
    ax.set_xlabel(cost_label)
    ax.set_ylabel(f"quality change ({unit})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"Quality against {cost_label.split(' (')[0]} (bars: 95% intervals)")
    return _svg(fig)
