"""The report of one comparison: `report.md`, a self-contained `report.html` with plots, and
`results.json`, all written atomically into one folder."""

from __future__ import annotations

import html
from pathlib import Path

from ..atomic import write_json, write_text
from ..evaluate.compare import Comparison
from . import plots

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
.verdict{padding:.8em 1em;border-radius:6px;font-weight:600;font-size:1.05em}
.ok{background:#e8f5e9;border:1px solid #55a868} .past{background:#fdecea;border:1px solid #c44e52}
table{border-collapse:collapse;margin:.6em 0;font-size:13px} th,td{border:1px solid #ddd;padding:4px 8px;vertical-align:top}
th{background:#f4f4f4;cursor:pointer;user-select:none} td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.bad td{background:#fff4f4} .muted{color:#777} pre{white-space:pre-wrap;margin:0;font:12px/1.35 ui-monospace,monospace}
.plots svg{max-width:100%;height:auto;display:block;margin:1em 0}
"""

# Click a header to sort that table by the column (numbers numerically).
_JS = """
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var asc = th.dataset.asc !== "1"; th.dataset.asc = asc ? "1" : "0";
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v || a.cells[col].textContent, y = b.cells[col].dataset.v || b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


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
        rows.append(["ratio", "", f"{o['bytes'] / q['bytes']:.2f}x smaller",
                     f"{o['seconds_per_example'] / q['seconds_per_example']:.2f}x faster"])
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


def _html_table(head, rows, cls="sortable", numeric=(), bad=None):
    h = "".join(f"<th>{html.escape(x)}</th>" for x in head)
    body = []
    for i, r in enumerate(rows):
        cells = "".join(f'<td class="n">{html.escape(str(x))}</td>' if j in numeric else
                        f"<td><pre>{html.escape(str(x))}</pre></td>" if len(str(x)) > 60 else f"<td>{html.escape(str(x))}</td>"
                        for j, x in enumerate(r))
        body.append(f'<tr{" class=bad" if bad and bad(i, r) else ""}>{cells}</tr>')
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{"".join(body)}</tbody></table>'


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
        "<h2>Models</h2>", _html_table(["model", "kind", "size", "time per example (median)"], model_rows(c), cls=""),
        f"<h2>Scores ({_unit(c)})</h2>",
        _html_table(SLICE_HEAD, slice_rows(c), numeric=range(1, 9), bad=lambda i, r: r[-1] == "PAST"),
    ]
    lines = divergence_lines(c)
    if lines:
        body += ["<h2>Divergence</h2>", "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>"]
    body += ['<h2>Plots</h2><div class="plots">' + "".join(svgs) + "</div>"]
    body += [f"<h2>Flipped examples ({len(flips)})</h2>",
             _html_table(FLIP_HEAD, [[e.id, e.flip, ", ".join(e.tags), e.input, e.target, e.original_output,
                                      e.compressed_output] for e in flips], bad=lambda i, r: r[1] == "right→wrong")
             if flips else "<p>None.</p>"]
    if errors:
        body += [f"<h2>Examples that failed ({len(errors)})</h2>", _html_table(["id", "error"], [[e.id, e.error] for e in errors])]
    body += ['<h2>All examples</h2><details><summary>show</summary>',
             _html_table(["id", "tags", "slices", "original", "compressed", "KL mean", "original output", "compressed output"],
                         [[e.id, ", ".join(e.tags), ", ".join(e.slices), _fmt(e.original_score, 3), _fmt(e.compressed_score, 3),
                           _fmt(e.kl_mean, 4), e.original_output, e.compressed_output] for e in c.examples],
                         numeric=(3, 4, 5)), "</details>"]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>{''.join(body)}<script>{_JS}</script></body></html>")


def write_comparison_report(c: Comparison, out: str | Path) -> dict[str, Path]:
    """Write report.md, report.html and results.json into folder `out` (created); returns their paths."""
    out = Path(out)
    paths = {"markdown": out / "report.md", "html": out / "report.html", "json": out / "results.json"}
    write_json(paths["json"], c.to_dict())
    write_text(paths["markdown"], to_markdown(c))
    write_text(paths["html"], to_html(c))
    return paths
