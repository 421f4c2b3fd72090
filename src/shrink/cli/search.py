"""`shrink search` and `shrink demo`: the sweet spot of a model under the user's constraints, and the tour on the
built-in model and task."""

from __future__ import annotations

import hashlib
from pathlib import Path

import click
from rich.table import Table

from ..core.errors import ShrinkError
from ..entrypoints.search import search
from ..entrypoints.search.constraints import Constraints
from .common import FORCE, Number, calibration_windows, config_option, console, main


def _search_options(f):
    """Options shared by `search` and `demo`: the constraints and the budget."""
    opts = [
        config_option(Constraints, "max_drop", type=Number(0, 100)),
        config_option(Constraints, "relative", is_flag=True),
        click.option("--max-size", default=None, metavar="SIZE",
                     help="Largest size on disk of the weights, like 60MB, 60 MB, 1.5GiB or 6e7 (bytes)."),
        click.option("--max-latency", default=None, metavar="TIME",
                     help="Slowest time on this machine: per example (50ms, 2s) or per generated token (20ms/token)."),
        config_option(Constraints, "objective", type=click.Choice(["size", "latency"])),
        click.option("--time", "time_budget", default=None, metavar="TIME",
                     help="Stop starting candidates when this is spent, or when the next would overrun it (10m, 1.5h)."),
        config_option(Constraints, "max_trials", type=Number(1, 1 << 20, integer=True)),
        click.option("--max-new-tokens", default=32, show_default=True, type=Number(1, 1 << 20, integer=True),
                     help="Greedy generation length for examples that give none."),
        click.option("--resume", is_flag=True, help="Continue the search in OUT, without measuring finished candidates again."),
        click.option("--force", is_flag=True, help="Start the search in OUT again, removing shrink's earlier search there "
                                                     "(never a folder holding anything else)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@main.command("search")
@click.argument("model", default="default")
@click.option("--task", "-t", default=None, metavar="FILE",
              help="Task file (as for shrink compare). Default: the built-in task for the default model.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for results.jsonl (streamed), best/ (the recommended model), report.html, report.md, results.json.")
@_search_options
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Text for calibrated candidates (GPTQ and activation-aware at 4, 3 and 2 bits, mixed precision at "
                   "6, 4.5 and 3.5 bits per weight). Without it only round-to-nearest is tried.")
@click.option("--methods", default="awq+gptq", show_default=True,
              help="Comma-separated calibrated methods to try: gptq, awq, awq+gptq, and gptq+tune or awq+gptq+tune "
                   "(then 32 steps of block tuning; better quality, about twice the time).")
@calibration_windows(search, "Calibration windows per calibrated candidate.")
@click.option("--distill", "distill_data", default=None, metavar="FILE",
              help="Also try distilled students trained on this data (as shrink distill --data), and them quantized.")
@click.option("--students", default="every-other", show_default=True,
              help="Comma-separated student specs for --distill (every-other, layers=N, mlp:..., cnn:...).")
@click.option("--distill-time", default="10m", show_default=True, metavar="TIME", help="Training budget per student.")
@click.option("--runtime", type=click.Choice(["shrink", "llama.cpp"]), default="shrink", show_default=True,
              help="Judge each candidate in shrink's own runtime, or exported to GGUF and run by llama.cpp (its size "
                   "the file's, its latency llama.cpp's; the recommendation is written to OUT/best.gguf too; the "
                   "candidates are then GGUF types: Q8_0, Q6_K, the Q5_K_M/Q4_K_M/Q3_K_M/Q2_K mixes, IQ4_NL, Q4_0). "
                   "llama.cpp needs llama-cpp-python: bash scripts/setup.sh --llama-cpp.")
@click.option("--one-at-a-time/--together", "one_at_a_time", default=None,
              help="For a Hugging Face folder: hold one model at a time (the original runs over the task once, its "
                   "outcomes kept in OUT/original-outcomes; each candidate is quantized block by block from the "
                   "folder). Default: when the original and a copy of it would not fit in memory together.")


def search_command(model, task, out, max_drop, relative, max_size, max_latency, objective, time_budget, max_trials,
           max_new_tokens, resume, force, calibration, methods, samples, seq_len, distill_data, students, distill_time,
           runtime, one_at_a_time):
    """Find the smallest (or fastest) compressed MODEL that stays within tolerance on your task.

    Tries round-to-nearest from 8 bits down, then (with --calibration) calibrated methods and mixed
    precision, then (with --distill) distilled students and those quantized; cheap, likely-good
    candidates first, and a direction is abandoned at its first failure. Each candidate is compared with
    the original example by example (slices, intervals), and its size on disk, memory and latency on this
    machine are measured. Results stream to OUT/results.jsonl; --resume continues an interrupted search.
    Prints the frontier and the recommendation, saves the recommended model to OUT/best/ and the report
    to OUT/report.html.
    """
    from ..entrypoints.search import parse_duration
    from ..entrypoints.search.candidates import METHODS_CALIBRATED

    con = Constraints.of(max_drop=max_drop, relative=relative, max_size=max_size, max_latency=max_latency,
                         objective=objective, time=time_budget, max_trials=max_trials)
    meths = tuple(m.strip() for m in methods.split(",") if m.strip())
    bad = [m for m in meths if m not in METHODS_CALIBRATED]
    if bad:
        raise ShrinkError(f"--methods {methods!r}: unknown {', '.join(bad)}; choose from {', '.join(METHODS_CALIBRATED)}")
    if calibration is not None and not calibration.is_file():
        raise ShrinkError(f"{calibration}: calibration file not found")
    distill_seconds = parse_duration(distill_time, "--distill-time")
    with _claim_search(out, resume, force):
        if one_at_a_time is not False and Path(model).is_dir():
            loaded = model  # a folder: search decides whether to hold one model at a time, and loads it
        else:
            with console.status("loading model"):
                from ..io import read_model

                loaded = read_model(model)
        result = search(loaded, task, out=out, constraints=con, calibration=calibration, methods=meths,
                            n_samples=samples, seq_len=seq_len, distill_data=distill_data,
                            students=tuple(s.strip() for s in students.split(",") if s.strip()),
                            distill_seconds=distill_seconds, resume=resume, force=force,
                            max_new_tokens=max_new_tokens, console=console, runtime=runtime,
                            one_at_a_time=one_at_a_time)
    _print_search(result)


def _claim_search(out: Path, resume: bool, force: bool):
    """The search folder, held from before the model loads (so a bad --out costs nothing)."""
    from ..core.outdir import claim
    from ..entrypoints.search.run import ORIGINAL_OUTCOMES, OUT_NAMES

    return claim(out, "search", OUT_NAMES, force=force, resume=resume, keep=(ORIGINAL_OUTCOMES,))


DEMO_CANDIDATES = (("rtn", "int8"), ("rtn", "int4-g32"), ("awq+gptq", "int4-g32"), ("awq+gptq", "int4-g64"),
                   ("awq+gptq", "int3-g32"))
DEMO_WINDOWS = (8, 256)  # calibration windows of tokens: enough for awq+gptq at 4 bits, and quick


@main.command("demo")
@click.option("--out", "-o", default="runs/demo", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--time", "time_budget", default="4m", show_default=True, metavar="TIME",
              help="Search budget, after loading and compiling: no candidate is started that would overrun it.")
@click.option("--max-drop", default=3.0, show_default=True, type=Number(0, 100),
              help="Points of the built-in task the compressed model may lose, at the worst end of its 95% interval.")
@click.option("--examples", type=Number(1, 1 << 30, integer=True), default=None,
              help="Use only the first N examples of the task (a quick run; too few cannot tell, and the demo says so).")
@click.option("--max-trials", type=Number(1, 1 << 20, integer=True), default=None,
              help="Measure at most this many candidates.")
@click.option("--calibrated/--no-calibrated", default=True, show_default=True,
              help="Also try awq+gptq at int4-g32, int4-g64 and int3-g32, calibrated on 8 windows of 256 tokens of "
                   "BBC News business articles that the built-in task does not hold.")
@click.option("--resume", is_flag=True, help="Continue the demo's search in OUT.")
@FORCE


def demo_command(out, time_budget, max_drop, examples, max_trials, calibrated, resume, force):
    """The tour: search the built-in default model (SmolLM2-135M-Instruct) on the built-in task (400
    examples: questions with exact answers, multiple choice, next words of news text) for the smallest
    quantization within --max-drop points: int8 and int4 by round-to-nearest, then awq+gptq at 4 and 3 bits,
    bounded by --time; print the frontier and the recommendation with its evidence, and write the report."""
    from ..entrypoints.search import Candidate
    from ..evaluate import load_task

    task = load_task(None)
    if examples is not None:
        task.examples = task.examples[:examples]
    con = Constraints.of(max_drop=max_drop, time=time_budget, max_trials=max_trials)
    with _claim_search(out, resume, force):
        with console.status("loading the default model"):
            from ..io import read_model

            loaded = read_model("default")
        cands = [Candidate(f"{m}:{f}", m, f) for m, f in DEMO_CANDIDATES if calibrated or m == "rtn"]
        calibration = _demo_calibration() if calibrated else None
        result = search(loaded, task, out=out, constraints=con, candidates=cands, calibration=calibration,
                            n_samples=DEMO_WINDOWS[0], seq_len=DEMO_WINDOWS[1], resume=resume, force=force,
                            max_new_tokens=16, console=console, keep_order=True)
    _print_search(result)
    _print_broken(result)


def _demo_calibration() -> Path:
    """The built-in task's calibration text (BBC News business articles it does not hold) as a file in
    shrink's cache."""
    from ..core.atomic import write_text
    from ..core.paths import cache_dir
    from ..evaluate.builtin_task import calibration_text

    text = calibration_text()
    path = cache_dir() / "demo" / f"calibration-{hashlib.sha256(text.encode()).hexdigest()[:12]}.txt"
    if not path.is_file():
        write_text(path, text)
    return path


def _print_broken(result, shown: int = 2) -> None:
    """Why the recommendation is what it is: for each measured candidate smaller than it that did not meet
    the quality bar, its verdict and the first examples it broke (input, expected, both answers)."""
    best = result.recommendation
    if best is None:
        return
    smaller = sorted((r for r in result.results if r.done and not r.quality_ok and r.size_bytes < best.size_bytes),
                     key=lambda r: -r.size_bytes)
    for r in smaller:
        console.print(f"[bold]{r.name}[/bold] not recommended: {r.verdict}", highlight=False)
        for e in r.broke_examples[:shown]:
            console.print(f"  broke [dim]{e['id']}[/dim] {_short(e['input'])!r}: expected {_short(e['target'])!r}; "
                          f"original {_short(e['original'])!r}, {r.name} {_short(e['compressed'])!r}", highlight=False)
        if r.broke_examples:
            console.print(f"  ({len(r.broke)} broke, {len(r.fixed)} fixed; all in the report)", highlight=False)


def _short(text: str, width: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_search(result) -> None:
    from rich import box

    from ..report.search import TABLE_HEAD, candidate_rows, original_row

    score = result.original.score
    t = Table(title=f"{result.original.name} on {result.task.name} ({result.task.examples} examples"
                    + (f", original score {score:.1f})" if score is not None else ")"), box=box.SIMPLE_HEAD)
    front = {r.name for r in result.frontier("size_bytes")}
    # 80 columns: the full table (x smaller, memory, ms/token, slices) is in the report
    for i, col in enumerate(("candidate", "MB", "ms/ex", "change", "95% CI", "misses")):
        t.add_column(col, justify="left" if i in (0, 5) else "right", no_wrap=i < 5, overflow="fold")
    orig = original_row(result)
    orig[0] = "original"
    for row in [orig] + candidate_rows(result):
        r = dict(zip(TABLE_HEAD, row))  # by column name: a new report column shifts nothing here
        name = r["candidate"] + (" *" if r["candidate"] in front else "")
        misses = "" if r["meets"] in ("yes", "") else r["meets"].replace("no: ", "")
        t.add_row(name, r["size MB"], r["ms/example"], r["change"], r["95% CI"].replace("…", ".."), misses,
                  style="green" if r["meets"] == "yes" else None)
    console.print(t)
    console.print("* on the size-quality frontier")
    ok = result.recommendation is not None and result.recommendation.qualifies
    console.print(f"[bold {'green' if ok else 'red'}]{result.line}[/]")
    if result.recommendation is not None:
        console.print(f"model: {Path(result.out) / 'best'} (load it with shrink.load)")
        if (Path(result.out) / "best.gguf").is_file():
            console.print(f"llama.cpp file it was judged on: {Path(result.out) / 'best.gguf'}")
    console.print(f"report: open {Path(result.out) / 'report.html'} (and report.md, results.json)")
