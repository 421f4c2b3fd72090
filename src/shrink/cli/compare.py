"""`shrink compare`: the compressed model against the original on a task, example by example."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from ..core.errors import ShrinkError
from ..evaluate.paired import compare_models
from .common import FORCE, Number, console, default_of, main


@main.command("compare")
@click.argument("original")
@click.argument("compressed")
@click.option("--task", "-t", default=None, metavar="FILE",
              help="Task file: .jsonl (generation, multiple choice, classification or perplexity examples), or "
                   ".npz/.safetensors tensors (x, y) for plain classifiers. Default: the built-in task of short "
                   "questions with exact answers, written for the default model.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write report.md, report.html (with plots) and results.json to this folder.")
@click.option("--max-drop", "--tolerance", "tolerance", default=1.0, show_default=True, type=Number(0, 100),
              help="Allowed loss of score, in points (0-100 scale) unless --relative (as shrink search's --max-drop; "
                   "--tolerance is its older name).")
@click.option("--relative", is_flag=True, help="--max-drop is a percentage of the original's score instead of points.")
@click.option("--scorer", default=None, metavar="MODULE:FUNCTION",
              help="Score generated outputs with this Python function f(output, example) -> float in [0, 1] or "
                   "bool; MODULE is importable from the current folder, or a path to a .py file. This RUNS that "
                   "file's code (only for generation tasks, the ones that use a scorer): pass only your own.")
@click.option("--max-new-tokens", default=32, show_default=True, type=Number(1, 1 << 20, integer=True),
              help="Greedy generation length for examples that give none.")
@click.option("--chat-template/--no-chat-template", default=None,
              help="Wrap prompts in the tokenizer's chat template. Default: when the tokenizer has one.")
@click.option("--batch-size", default=default_of(compare_models, "batch_size"), show_default=True,
              type=Number(1, 1 << 16, integer=True),
              help="Examples run together, sorted by length (the same outcomes as one at a time, up to float "
                   "rounding); time per example is its batch's shared out; 1 measures one example alone.")
@click.option("--strict", is_flag=True, help="Exit with code 3 unless the verdict is WITHIN TOLERANCE (past the sweet spot, or cannot tell).")
@click.option("--runtime", type=click.Choice(["shrink", "llama.cpp"]), default="shrink", show_default=True,
              help="What runs COMPRESSED: shrink's own model, or llama.cpp running a .gguf file (needs "
                   "llama-cpp-python: bash scripts/setup.sh --llama-cpp), so the verdict is on what llama.cpp computes.")
@click.option("--one-at-a-time", "one_at_a_time", flag_value=True, default=None,
              help="Run the original alone first, keep its outcomes in OUT/original-outcomes (reused by a later "
                   "--force run with the same original, task and options) and let it go before loading the "
                   "compressed model. Default: when the two would not fit in memory together.")
@FORCE


def compare_command(original, compressed, task, out, tolerance, relative, scorer, max_new_tokens, chat_template, batch_size,
            strict, runtime, one_at_a_time, force):
    """Compare COMPRESSED against ORIGINAL on a task, example by example.

    Each model may be "default", a .gguf file, a Hugging Face folder or a folder saved by shrink; with
    --runtime llama.cpp, COMPRESSED is a .gguf file that llama.cpp runs.
    Prints the verdict (within tolerance, or past the sweet spot and why), scores per slice
    (tags, difficulty from the original's confidence, input length) with bootstrap intervals and
    McNemar's test on flips, and for language models the KL divergence of next-token distributions.
    Models too large to hold together are run one at a time (--one-at-a-time): the original first, its
    outcomes kept in OUT/original-outcomes (a later --force run into OUT with the same original, task and
    options reuses them).
    """
    from contextlib import nullcontext

    from ..core.outdir import claim
    from ..entrypoints.compare import ORIGINAL_OUTCOMES, OUT_NAMES, compare
    from ..evaluate import load_task
    from ..evaluate.paired import check_options

    tk = load_task(task)  # fail on a bad task or options before loading models
    check_options(tk, tolerance, scorer)
    if runtime == "llama.cpp":
        from ..core.peers import llama_cpp_missing

        if llama_cpp_missing():
            raise ShrinkError(llama_cpp_missing())
    with claim(out, "compare", OUT_NAMES, force=force, keep=(ORIGINAL_OUTCOMES,)) if out is not None else nullcontext():
        # by name: models too large to hold together are run one at a time
        result = compare(original, compressed, tk, out=out, one_at_a_time=one_at_a_time, tolerance=tolerance, relative=relative, scorer=scorer,
                             max_new_tokens=max_new_tokens, chat_template=chat_template, runtime=runtime, batch_size=batch_size,
                             names=(Path(original).name, Path(compressed).name), force=force)
    _print_comparison(result)
    if out is not None:
        console.print(f"report: {out / 'report.html'} (and report.md, results.json)")
    if strict and not result.within:
        sys.exit(3)


def _print_comparison(c) -> None:
    from ..report.comparison import SLICE_HEAD, divergence_lines, model_rows, slice_rows

    console.print(f"[bold {'green' if c.within else 'red'}]{c.verdict}[/]")
    from rich import box

    t = Table(title=f"{c.task['name']}: {c.task['kind']}, {c.task['examples']} examples"
                    + (f", {c.errors} failed" if c.errors else ""), box=box.SIMPLE_HEAD)
    # numbers never wrap; past slices are shown in red (the report names them), so the table fits 80 columns
    for i, col in enumerate(("slice", "n", "orig", "comp", "change", "95% CI", "R→W", "W→R", "p")):
        t.add_column(col, justify="left" if i == 0 else "right", no_wrap=i > 0, overflow="fold" if i == 0 else "ellipsis")
    ci, past = SLICE_HEAD.index("95% CI"), len(SLICE_HEAD) - 1  # the last column says PAST
    for r in slice_rows(c):
        r[ci] = r[ci].replace(" … ", "…")
        t.add_row(*r[:past], style="bold red" if r[past] == "PAST" else None)
    console.print(t)
    m = Table()
    for col in ("model", "kind", "size", "time per example"):
        m.add_column(col)
    for r in model_rows(c):
        m.add_row(*r)
    console.print(m)
    for line in divergence_lines(c):
        console.print(line)
