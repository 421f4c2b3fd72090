"""The pieces both HTML reports share: the style sheet, the script that sorts a table by a clicked
column, a table of escaped cells, and the self-contained page around them."""

from __future__ import annotations

import html

CSS = """
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
JS = """
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


def html_table(head, rows, cls="sortable", numeric=(), bad=None) -> str:
    """An HTML table of escaped cells: columns in `numeric` right-aligned, long cells preformatted, rows
    for which bad(i, row) is true marked."""
    h = "".join(f"<th>{html.escape(x)}</th>" for x in head)
    body = []
    for i, r in enumerate(rows):
        cells = "".join(f'<td class="n">{html.escape(str(x))}</td>' if j in numeric else
                        f"<td><pre>{html.escape(str(x))}</pre></td>" if len(str(x)) > 60 else f"<td>{html.escape(str(x))}</td>"
                        for j, x in enumerate(r))
        body.append(f'<tr{" class=bad" if bad and bad(i, r) else ""}>{cells}</tr>')
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def page(title: str, body: list[str]) -> str:
    """A whole HTML document: the title, the style sheet, the body's parts and the sorting script."""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}<script>{JS}</script></body></html>")
