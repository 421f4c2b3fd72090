"""Reports a person can look at: Markdown, self-contained HTML with plots, and results.json."""

from .comparison import to_html, to_markdown, write_comparison_report

__all__ = ["to_html", "to_markdown", "write_comparison_report"]
