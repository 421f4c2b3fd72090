"""The report of one comparison: `report.md`, a self-contained `report.html` with plots, and
`results.json`, all written atomically into one folder."""

from __future__ import annotations

import html
from pathlib import Path

from ..core.atomic import write_json, write_text
from ..evaluate.paired import Comparison
from . import plots
from .webpage import html_table, page


def _fmt(x, digits=1, sign=False):
    if x is None or x != x:
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _p(p):
    return "–" if p is None else f"{p:.3g}"


def _mb(n):
    return "–" if n is None else f"{n / 1e6:,.1f} MB"


def _unit(c: Comparison) -> str:
    return "perplexity" if c.task["kind"] == "perplexity" else "points"


def slice_rows(c: Comparison) -> list[list[str]]:
    """Rows of the slice table: name, n, both scores, change, CI, flips both ways, p, past."""
    change = "%" if c.task["kind"] == "perplexity" else ""
    rows = []
    for s in [c.overall, *c.slices]:
        rows.append([s.name, str(s.n), _fmt(s.original, 2 if change else 1), _fmt(s.compressed, 2 if change else 1),
                     _fmt(s.change, 1, True) + change, f"{_fmt(s.ci_low, 1, True)} … {_fmt(s.ci_high, 1, True)}",
                     str(s.right_to_wrong), str(s.wrong_to_right), _p(s.p_value), "PAST" if s.past else ""])
    return rows


SLICE_HEAD = ["slice", "n", "original", "compressed", "change", "95% CI", "right→wrong", "wrong→right", "McNemar p", ""]
FLIP_HEAD = ["id", "flip", "tags", "input", "target", "original output", "compressed output"]


def model_rows(c: Comparison) -> list[list[str]]:
    rows = []
    for m in (c.original, c.compressed):
        secs = m.get("seconds_per_example")
        rows.append([m["name"], m["kind"], _mb(m.get("bytes")), "–" if secs is None else f"{secs * 1000:,.0f} ms"])
    o, q = c.original, c.compressed
    if o.get("bytes") and q.get("bytes") and o.get("seconds_per_example") and q.get("seconds_per_example"):
        batched = c.task.get("batch_size", 1) > 1  # shares of batch times, not latencies
        rows.append(["ratio", "", f"{o['bytes'] / q['bytes']:.2f}x smaller",
                     f"{o['seconds_per_example'] / q['seconds_per_example']:.2f}x faster"
                     + (" (in batches; --batch-size 1 for latency)" if batched else "")])
    return rows


def divergence_lines(c: Comparison) -> list[str]:
    d, out = c.divergence, []
    if "kl" in d:
        k = d["kl"]
        out.append(f"KL divergence (original ‖ compressed) over {k['positions']:,} positions: mean {k['mean']:.4f}, "
                   f"median {k['median']:.4f}, 99th percentile {k['p99']:.4f}")
        out.append(f"Top-1 agreement: {100 * d['top1_agreement']:.1f}% of positions")
    if "embedding_cosine" in d:
        e = d["embedding_cosine"]
        out.append(f"Embedding cosine between the models: mean {e['mean']:.4f}, lowest {e['min']:.4f}")
    return out


def _tolerance_line(c: Comparison) -> str:
    kind = "relative (percent of the original score)" if c.relative else "absolute (points)"
    if c.task["kind"] == "perplexity":
        kind = "relative (percent of perplexity)"
    return f"Tolerance: {c.tolerance:g}, {kind}."


def to_markdown(c: Comparison) -> str:
    """The report as Markdown (tables; plots are in the HTML report)."""
    def table(head, rows):
        esc = [[str(x).replace("|", "\\|").replace("\n", " ") for x in r] for r in rows]
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in esc])

    t = c.task
    parts = [f"# {c.compressed['name']} vs {c.original['name']} on task {t['name']}", "", f"**{c.verdict}**", "",
             f"Task: {t['kind']}, {t['examples']} examples ({t['source'] or 'built in'}); errors: {c.errors}. "
             + _tolerance_line(c), "", "## Models", "",
             table(["model", "kind", "size", "time per example"], model_rows(c)), "",
             f"## Scores ({_unit(c)})", "", table(SLICE_HEAD, slice_rows(c)), ""]
    lines = divergence_lines(c)
    if lines:
        parts += ["## Divergence", ""] + [f"- {x}" for x in lines] + [""]
    parts += ["## Flipped examples", ""]
    flips = c.flips
    parts += [table(FLIP_HEAD, [[e.id, e.flip, ", ".join(e.tags), e.input, e.target, e.original_output,
                                 e.compressed_output] for e in flips]) if flips else "None.", ""]
    errors = [e for e in c.examples if e.error]
    if errors:
        parts += ["## Examples that failed", "", table(["id", "error"], [[e.id, e.error] for e in errors]), ""]
    return "\n".join(parts)


def to_html(c: Comparison) -> str:
    """The report as one self-contained HTML page: verdict, tables, inline SVG plots, flipped examples."""
    t = c.task
    all_slices = [c.overall, *c.slices]
    names = [s.name for s in all_slices]
    perplexity = t["kind"] == "perplexity"
    svgs = [plots.strip_ids(plots.slice_scores(names, [s.original for s in all_slices], [s.compressed for s in all_slices],
                                               "perplexity" if perplexity else "score (points)",
                                               (c.original["name"], c.compressed["name"])), "p1")]
    kl = [e.kl_mean for e in c.examples if e.kl_mean is not None]
    cos = [1 - e.embedding_cosine for e in c.examples if e.embedding_cosine is not None]
    if kl:
        svgs.append(plots.strip_ids(plots.divergence_histogram(kl, "mean KL divergence per example (nats)"), "p2"))
    elif cos:
        svgs.append(plots.strip_ids(plots.divergence_histogram(cos, "1 − embedding cosine per example"), "p2"))
    if not perplexity:
        svgs.append(plots.strip_ids(plots.flips(names, [s.right_to_wrong for s in all_slices],
                                                [s.wrong_to_right for s in all_slices]), "p3"))
    flips = c.flips
    errors = [e for e in c.examples if e.error]
    title = f"{c.compressed['name']} vs {c.original['name']} on {t['name']}"
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="verdict {"ok" if c.within else "past"}">{html.escape(c.verdict)}</p>',
        f'<p class="muted">Task: {html.escape(t["kind"])}, {t["examples"]} examples '
        f'({html.escape(t["source"] or "built in")}); errors: {c.errors}. {html.escape(_tolerance_line(c))}</p>',
        "<h2>Models</h2>", html_table(["model", "kind", "size", "time per example (median)"], model_rows(c), cls=""),
        f"<h2>Scores ({_unit(c)})</h2>",
        html_table(SLICE_HEAD, slice_rows(c), numeric=range(1, 9), bad=lambda i, r: r[-1] == "PAST"),
    ]
    lines = divergence_lines(c)
    if lines:
        body += ["<h2>Divergence</h2>", "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>"]
    body += ['<h2>Plots</h2><div class="plots">' + "".join(svgs) + "</div>"]
    body += [f"<h2>Flipped examples ({len(flips)})</h2>",
             html_table(FLIP_HEAD, [[e.id, e.flip, ", ".join(e.tags), e.input, e.target, e.original_output,
                                      e.compressed_output] for e in flips], bad=lambda i, r: r[1] == "right→wrong")
             if flips else "<p>None.</p>"]
    if errors:
        body += [f"<h2>Examples that failed ({len(errors)})</h2>", html_table(["id", "error"], [[e.id, e.error] for e in errors])]
    body += ['<h2>All examples</h2><details><summary>show</summary>',
             html_table(["id", "tags", "slices", "original", "compressed", "KL mean", "original output", "compressed output"],
                         [[e.id, ", ".join(e.tags), ", ".join(e.slices), _fmt(e.original_score, 3), _fmt(e.compressed_score, 3),
                           _fmt(e.kl_mean, 4), e.original_output, e.compressed_output] for e in c.examples],
                         numeric=(3, 4, 5)), "</details>"]
    return page(title, body)


def write_comparison_report(c: Comparison, out: str | Path) -> dict[str, Path]:
    """Write report.md, report.html and results.json into folder `out` (created); returns their paths."""
    out = Path(out)
    paths = {"markdown": out / "report.md", "html": out / "report.html", "json": out / "results.json"}
    write_json(paths["json"], c.to_dict())
    write_text(paths["markdown"], to_markdown(c))
    write_text(paths["html"], to_html(c))
    return paths
