"""The report of a search: the recommendation, the size–quality and latency–quality frontiers, every
candidate in one table, and the examples that broke first as compression increased. `report.md`, a
self-contained `report.html` and `results.json`, written atomically into the search's folder.

It reads the search's result through its attributes and `to_dict()`, so reporting does not depend on
the search package (the search depends on reporting).
"""

from __future__ import annotations

import html
from pathlib import Path

from ..core.atomic import write_json, write_text
from ..evaluate.verdict import status_of
from . import plots
from .webpage import html_table, page

TABLE_HEAD = ["candidate", "size MB", "x smaller", "memory MB", "ms/example", "ms/token", "score", "change",
              "95% CI", "verdict", "slices past", "meets", "build s"]
MEETS = TABLE_HEAD.index("meets")


def _f(x, digits=1, scale=1.0, sign=False):
    if x is None:
        return "–"
    return f"{x * scale:+.{digits}f}" if sign else f"{x * scale:,.{digits}f}"


def candidate_rows(result) -> list[list[str]]:
    """One row per finished candidate, smallest first."""
    rows = []
    orig = result.original.size_bytes
    done = sorted((r for r in result.results if r.done), key=lambda r: r.size_bytes)
    for r in done:
        meets = "yes" if r.qualifies else "no: " + ", ".join(r.miss)
        rows.append([r.name, _f(r.size_bytes, 1, 1e-6), f"{orig / r.size_bytes:.2f}",
                     _f(r.memory_bytes, 1, 1e-6), _f(r.latency_example, 0, 1e3), _f(r.latency_token, 1, 1e3),
                     _f(r.score), _f(r.change, sign=True), f"{r.ci_low:+.1f}…{r.ci_high:+.1f}",
                     status_of(r.verdict) or "–", ", ".join(r.slices_past) or "–", meets, _f(r.build_seconds, 0)])
    for r in result.results:
        if not r.done:
            rows.append([r.name] + ["–"] * 10 + ["error: " + r.error[:120], "–"])
    return rows


def latency_note(result) -> str:
    """How the latency columns were measured (the same way for the original and every candidate)."""
    batch = getattr(result, "batch_size", 16)  # as the search compared (Constraints.times_examples_alone decides)
    per_example = ("each example run alone (its latency)" if batch == 1 else
                   f"each example's share of its batch's time (batches of {batch} examples; the original's and each "
                   "candidate's on the same batches, the candidate's answers drafted by the original's)")
    return (f"ms/example: {per_example}. ms/token: greedy decoding of 32 tokens after a 16-token prompt, batch 1, "
            "best of 2, after the runtime was compiled and warm; the same measurement for every row.")


def original_row(result) -> list[str]:
    o = result.original
    return [f"{o.name} (original)", _f(o.size_bytes, 1, 1e-6), "1.00", _f(o.memory_bytes, 1, 1e-6),
            _f(o.latency_example, 0, 1e3), _f(o.latency_token, 1, 1e3), _f(o.score), "", "", "", "", "", ""]


def broken_examples(result, name: str) -> list[dict]:
    """The examples candidate `name` broke, as kept by the search: id, input, target (the expected answer),
    original (its answer) and compressed (the candidate's)."""
    r = next((r for r in result.results if r.name == name), None)
    return list(r.broke_examples) if r is not None else []


def broke_first(result, inputs: dict[str, str], limit: int = 20) -> list[list[str]]:
    """Examples that went right to wrong, those that broke in the widest (largest) candidate first:
    id, input, expected answer, the original's answer, the answer of the widest candidate it broke in, that
    candidate, its size, and in how many of the candidates it broke."""
    done = sorted((r for r in result.results if r.done), key=lambda r: -r.size_bytes)
    first: dict = {}
    count: dict[str, int] = {}
    for r in done:
        for i in r.broke:
            first.setdefault(i, r)
            count[i] = count.get(i, 0) + 1
    order = sorted(first, key=lambda i: (-first[i].size_bytes, -count[i]))
    rows = []
    for i in order[:limit]:
        kept = next((e for e in first[i].broke_examples if e.get("id") == i), {})
        rows.append([i, inputs.get(i, ""), kept.get("target", "–"), kept.get("original", "–"),
                     kept.get("compressed", "–"), first[i].name, _f(first[i].size_bytes, 1, 1e-6),
                     f"{count[i]} of {len(done)}"])
    return rows


BROKE_HEAD = ["id", "input", "expected", "original's answer", "compressed answer", "first broke in", "at MB",
              "broke in"]


def _front_svg(result, cost: str, label: str, allowed: float | None, unit: str, prefix: str) -> str | None:
    done = [r for r in result.results if r.done and r.cost(cost) is not None]
    if not done:
        return None
    names = {r.name for r in result.frontier(cost)}
    scale = 1e-6 if cost == "size_bytes" else 1e3
    o = result.original
    base = o.size_bytes if cost == "size_bytes" else getattr(o, cost, None)
    svg = plots.frontier([r.cost(cost) * scale for r in done], [r.change for r in done],
                         [r.name for r in done], [r.qualifies for r in done],
                         [r.name in names for r in done], label, allowed, unit=unit,
                         intervals=[(r.ci_low, r.ci_high) for r in done],
                         original=None if base is None else (base * scale, f"{o.name} (original)"))
    return plots.strip_ids(svg, prefix)


def _allowed(result) -> float | None:
    """The tolerance in the task's unit, as the search judged it (None before any candidate finished)."""
    return next((r.judgement.allowed for r in result.results if r.done and r.judgement), None)


def _header(result) -> str:
    t = result.task
    return (f"Task {t.name} ({t.kind}, {t.examples} examples, {t.source or 'built in'}); "
            f"{len([r for r in result.results if r.done])} candidates measured, "
            f"{len(result.skipped)} skipped, {len(result.untried)} left for lack of budget; measuring took "
            f"{sum(r.seconds or 0 for r in result.results) / 60:.1f} min (this run {result.seconds / 60:.1f} min)."
            + (" Each candidate was exported to GGUF and judged in llama.cpp (sizes are the GGUF files; the "
               "recommended one is best.gguf)." if getattr(result, "runtime", "shrink") == "llama.cpp" else ""))


def to_markdown(result, inputs: dict[str, str]) -> str:
    """The search report as Markdown (tables; the plots are in the HTML report)."""
    def table(head, rows):
        esc = [[str(x).replace("|", "\\|").replace("\n", " ") for x in r] for r in rows]
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in esc])

    parts = [f"# Search: {result.original.name}", "", f"**{result.line}**", "", _header(result), "",
             "## Candidates", "", table(TABLE_HEAD, [original_row(result)] + candidate_rows(result)), "",
             latency_note(result), "",
             "Frontier (size): " + ", ".join(r.name for r in result.frontier("size_bytes")), "",
             "Frontier (latency): " + ", ".join(r.name for r in result.frontier("latency_example")), ""]
    if result.skipped:
        parts += ["## Skipped", ""] + [f"- {s.candidate}: {s.reason}" for s in result.skipped] + [""]
    if result.untried:
        parts += ["## Not tried (budget spent)", "", ", ".join(result.untried), ""]
    rows = broke_first(result, inputs)
    parts += ["## Examples that broke first as compression increased", "",
              table(BROKE_HEAD, rows) if rows else "None broke.", ""]
    return "\n".join(parts)


def to_html(result, inputs: dict[str, str]) -> str:
    """The search report as one self-contained HTML page with inline SVG plots."""
    allowed = _allowed(result)
    unit = "% perplexity" if result.task.kind == "perplexity" else "points"
    svgs = [s for s in (_front_svg(result, "size_bytes", "size on disk (MB)", allowed, unit, "f1"),
                        _front_svg(result, "latency_example", "latency (ms per example)", allowed, unit, "f2")) if s]
    ok = result.recommendation is not None and result.recommendation.qualifies
    title = f"Search: {result.original.name}"
    body = [f"<h1>{html.escape(title)}</h1>",
            f'<p class="verdict {"ok" if ok else "past"}">{html.escape(result.line)}</p>',
            f'<p class="muted">{html.escape(_header(result))}</p>',
            '<h2>Frontiers</h2><div class="plots">' + "".join(svgs) + "</div>",
            "<h2>Candidates</h2>",
            html_table(TABLE_HEAD, [original_row(result)] + candidate_rows(result), numeric=range(1, 9),
                        bad=lambda i, r: r[MEETS].startswith(("no", "error"))),
            f'<p class="muted">{html.escape(latency_note(result))}</p>']
    if result.skipped:
        body += ["<h2>Skipped</h2><ul>" + "".join(f"<li>{html.escape(s.candidate)}: {html.escape(s.reason)}</li>"
                                                 for s in result.skipped) + "</ul>"]
    if result.untried:
        body += [f"<h2>Not tried (budget spent)</h2><p>{html.escape(', '.join(result.untried))}</p>"]
    rows = broke_first(result, inputs)
    body += ["<h2>Examples that broke first as compression increased</h2>",
             html_table(BROKE_HEAD, rows) if rows else "<p>None broke.</p>"]
    return page(title, body)


def write_search_report(result, task, out: str | Path) -> dict[str, Path]:
    """Write report.md, report.html and results.json into the search's folder; returns their paths."""
    out = Path(out)
    inputs = {ex.id: ex.input if isinstance(ex.input, str) else f"tensor {tuple(ex.input.shape)}" for ex in task.examples}
    paths = {"markdown": out / "report.md", "html": out / "report.html", "json": out / "results.json"}
    write_json(paths["json"], result.to_dict())
    write_text(paths["markdown"], to_markdown(result, inputs))
    write_text(paths["html"], to_html(result, inputs))
    return paths
