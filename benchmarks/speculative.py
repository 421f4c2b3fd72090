"""Speculative decoding on SmolLM2-135M-Instruct in shrink's runtime: the target (int4-g32, output layer int8)
alone and with a distilled draft of at most a third of its parameters (int4-g32 too), greedy, interleaved.

The draft: the teacher's blocks that change their input most (block importance on the training text,
`--student layers=N:importance`), distilled from the full-precision model for `--minutes` on the target's
greedy answers (64 tokens), in its chat template, to questions made from BBC News headlines and openings (articles 20
onwards of each category; the draft imitates what the target says, as DistillSpec trains drafts). Evaluated
on the built-in task's 40 prompts (through the chat template), which it never saw. Per prompt, both ways
in turn, `--rounds` times: the tokens must be identical (checked); reported are the acceptance rate,
tokens per target pass, and tokens per second (medians over rounds of the whole prompt set).

    .venv/bin/python benchmarks/speculative.py [--minutes 20] [--draft-layers 4] [--questions 400] [--new-tokens 48] [--rounds 3]
        [--draft DIR] [--save-draft DIR] [--llama-cpp BIN_DIR] [--out benchmarks/results/speculative.json]

--draft takes a draft saved by an earlier run (--save-draft) instead of distilling one. --llama-cpp names a
folder holding llama.cpp's llama-speculative and llama-bench: the same pair exported to GGUF (Q4_0, output
layer Q8_0) is decoded there too, side by side.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import bbc_texts, machine  # noqa: E402

import shrink  # noqa: E402
from shrink.core.atomic import write_json  # noqa: E402
from shrink.distillation import (  # noqa: E402
    DistillConfig,
    block_importance,
    most_important,
    pack_text,
    parameter_count,
    student_from_teacher,
    teacher_topk,
    train_student,
)
from shrink.io import read_model  # noqa: E402
from shrink.runtime import decoder_for, last_speculation  # noqa: E402
from shrink.runtime import generate as runtime_generate  # noqa: E402

CATEGORIES = ("business", "entertainment", "politics", "sport", "tech")
FORMAT = {"*": "int4-g32", "lm_head": "int8"}


def chat(tok, question: str, answer: str | None = None):
    turns = [{"role": "user", "content": question}] + ([{"role": "assistant", "content": answer}] if answer else [])
    if answer is not None:
        return tok.apply_chat_template(turns, tokenize=False)
    ids = tok.apply_chat_template(turns, add_generation_prompt=True, return_tensors="pt")
    return ids["input_ids"] if not torch.is_tensor(ids) else ids


def training_questions(n: int) -> list[str]:
    """Questions from BBC articles 20 onwards: about a headline, or to summarise an opening paragraph."""
    out = []
    for c in CATEGORIES:
        for text in bbc_texts(c, 20, 20 + n // len(CATEGORIES)):
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            if len(lines) < 2:
                continue
            out.append(f"What do you know about this: {lines[0]}?" if len(out) % 2 else
                       f"Summarise in one sentence: {lines[1][:400]}")
    return out


def answers(model, tok, questions: list[str], n_new: int, batch: int = 16) -> list[str]:
    """The model's greedy answers (shrink's runtime, batches of left-padded prompts)."""
    out = []
    for i in range(0, len(questions), batch):
        prompts = [chat(tok, q)[0] for q in questions[i:i + batch]]
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):], mask[r, width - len(p):] = p, 1
        gen = runtime_generate(model, ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                               pad_token_id=tok.pad_token_id or 0)
        out += [tok.decode(g[width:], skip_special_tokens=True) for g in gen]
    return out


def distill_draft(teacher, target, tok, layers: int, minutes: float, n_questions: int, console) -> tuple:
    questions = training_questions(n_questions)
    t = time.perf_counter()
    said = answers(target, tok, questions, 64)  # what the draft will be asked to guess: the target's words
    console.print(f"{len(questions)} training answers by the target in {time.perf_counter() - t:.0f} s")
    data = pack_text([chat(tok, q, a) for q, a in zip(questions, said)], tok, 256, eval_fraction=0.05,
                     source="SmolLM2's answers to questions from BBC News")
    importance = block_importance(teacher, data.train_x)
    keep = most_important(importance, layers)
    student, idx = student_from_teacher(teacher, keep)
    t = time.perf_counter()
    cache = teacher_topk(teacher, data, k=32)  # the teacher once: the draft sees the data several times over
    console.print(f"the teacher's top 32 logits on {len(data):,} sequences in {time.perf_counter() - t:.0f} s")

    def cfg(steps, budget=None):
        return DistillConfig(steps=steps, time_budget=budget, batch_size=8, lr=5e-4, alpha=0.9, temperature=1.0,
                             eval_every=max(1, steps // 4), checkpoint_every=10 ** 9, eval_batches=2, warmup=0.03)

    def probe(n):
        t = time.perf_counter()
        train_student(teacher, copy.deepcopy(student), data, cfg(n), progress=False, teacher_cache=cache)
        return time.perf_counter() - t

    per_step = (probe(4) - probe(1)) / 3  # (start-up and evaluation cancel out)
    steps = max(10, int(minutes * 60 / per_step))
    console.print(f"draft: teacher blocks {idx}, {parameter_count(student):,} parameters; {steps} steps planned "
                  f"({per_step:.2f} s/step) on {len(data):,} sequences of 256 tokens")
    with tempfile.TemporaryDirectory() as d:
        res = train_student(teacher, student, data, cfg(steps, minutes * 60), out=d, progress=True, teacher_cache=cache)
    return student, {"teacher_blocks": idx, "steps": res.steps, "train_seconds": res.seconds,
                     "training_sequences": len(data), "importance": importance}


def run_pair(target, draft, prompts, n_new: int, rounds: int):
    """Interleaved per prompt: alone, then with the draft; seconds per round of each way, tokens, statistics."""
    decoder_for(target), decoder_for(draft)  # built (and the kernels tiled) before anything is timed
    times = {"alone": [], "drafted": []}
    stats = {"proposed": 0, "accepted": 0, "passes": 0, "tokens": 0}
    mismatched = []
    for r in range(rounds):
        spent = {"alone": 0.0, "drafted": 0.0}
        for i, ids in enumerate(prompts):
            t = time.perf_counter()
            a = runtime_generate(target, ids, max_new_tokens=n_new, do_sample=False)
            spent["alone"] += time.perf_counter() - t
            t = time.perf_counter()
            b = runtime_generate(target, ids, max_new_tokens=n_new, do_sample=False, assistant_model=draft)
            spent["drafted"] += time.perf_counter() - t
            s = last_speculation(target)
            if r == 0:
                stats["proposed"] += s.proposed
                stats["accepted"] += s.accepted
                stats["passes"] += s.target_passes
                stats["tokens"] += s.new_tokens
                if not torch.equal(a, b):
                    mismatched.append(i)
        for k in times:
            times[k].append(spent[k])
    return times, stats, mismatched


def llama_cpp_pair(bin_dir: Path, teacher, target, draft, tok, questions, n_new: int, console) -> dict | None:
    """llama-speculative on the same pair exported to GGUF (greedy, --draft-max 16 --draft-min 1, 2 threads), and
    llama-bench's decoding speed of the target alone (tg n_new, its defaults otherwise)."""
    spec, bench = bin_dir / "llama-speculative", bin_dir / "llama-bench"
    if not spec.exists() or not bench.exists():
        console.print(f"llama.cpp: no llama-speculative or llama-bench in {bin_dir}: skipped")
        return None
    with tempfile.TemporaryDirectory() as d:
        tg, dg = Path(d) / "target.gguf", Path(d) / "draft.gguf"
        from shrink.io.export import source_gguf_of

        src = source_gguf_of(teacher)  # the tokenizer and metadata of the GGUF file SmolLM2 came from
        shrink.export_gguf(target, tg, source_gguf=src)
        shrink.export_gguf(draft, dg, source_gguf=src)
        alone = subprocess.run([str(bench), "-m", str(tg), "-p", "0", "-n", str(n_new), "-t", "2", "-o", "json"],
                               capture_output=True, text=True, check=True)
        alone_tps = json.loads(alone.stdout)[0]["avg_ts"]
        accepted = drafted = 0
        speeds = []
        for q in questions:
            prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
            r = subprocess.run([str(spec), "-m", str(tg), "-md", str(dg), "-p", prompt, "-n", str(n_new), "-t", "2",
                                "--temp", "0", "--draft-max", "16", "--draft-min", "1", "-c", "1024"],
                               capture_output=True, text=True)
            text = r.stdout + r.stderr
            m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s", text)
            a = re.search(r"n_drafted\s*=\s*(\d+).*?n_accept\s*=\s*(\d+)", text, re.S)
            if m:
                speeds.append(float(m.group(3)))
            if a:
                drafted += int(a.group(1))
                accepted += int(a.group(2))
        return {"alone_tokens_per_s": alone_tps, "drafted_tokens_per_s": statistics.median(speeds) if speeds else None,
                "acceptance": accepted / drafted if drafted else None, "prompts": len(speeds)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="distillation budget of the draft (default 20)")
    ap.add_argument("--draft-layers", type=int, default=4, help="teacher blocks the draft keeps (default 4: 31%% of "
                                                                 "the parameters, the tied table being 28.3M of them)")
    ap.add_argument("--questions", type=int, default=400, help="training questions the teacher answers (default 400)")
    ap.add_argument("--new-tokens", type=int, default=48, help="greedy new tokens per prompt (default 48)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the prompts (default 3)")
    ap.add_argument("--draft", default=None, metavar="DIR", help="a draft saved by --save-draft (no distillation)")
    ap.add_argument("--save-draft", default=None, metavar="DIR", help="save the distilled draft (full precision) here")
    ap.add_argument("--llama-cpp", default=None, metavar="BIN_DIR", help="llama.cpp's tools, for the same pair there")
    ap.add_argument("--out", default="benchmarks/results/speculative.json")
    args = ap.parse_args(argv)
    console = Console(width=120)
    torch.manual_seed(0)

    loaded = read_model("default")
    teacher, tok = loaded.model, loaded.tokenizer
    record = {}
    target = shrink.quantize(copy.deepcopy(teacher), FORMAT, keep_output=False, progress=False)
    if args.draft:
        draft = shrink.load(args.draft)
        record["draft_from"] = args.draft
    else:
        draft, record = distill_draft(teacher, target, tok, args.draft_layers, args.minutes, args.questions, console)
        if args.save_draft:
            shrink.save(draft, args.save_draft, tokenizer=tok)
    share = parameter_count(draft) / parameter_count(teacher)
    draft_q = shrink.quantize(copy.deepcopy(draft), FORMAT, keep_output=False, progress=False)
    rows = [json.loads(line) for line in (files("shrink") / "data" / "default_task.jsonl").read_text().splitlines()]
    prompts = [chat(tok, r["input"]) for r in rows]
    times, stats, mismatched = run_pair(target, draft_q, prompts, args.new_tokens, args.rounds)
    alone, drafted = statistics.median(times["alone"]), statistics.median(times["drafted"])
    tokens = stats["tokens"]
    result = {
        "machine": machine(), "prompts": len(prompts), "new_tokens": args.new_tokens, "rounds": args.rounds,
        "format": FORMAT, "draft": {**record, "parameters": parameter_count(draft), "share_of_target": share,
                                    "minutes": args.minutes if not args.draft else None},
        "identical": not mismatched, "mismatched_prompts": mismatched,
        "acceptance": stats["accepted"] / max(stats["proposed"], 1), "tokens_per_target_pass": tokens / stats["passes"],
        "tokens_per_s": {"alone": tokens / alone, "drafted": tokens / drafted}, "speedup": alone / drafted,
        "seconds_per_round": times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    write_json(Path(args.out), result)  # (shrink's figures kept whatever llama.cpp does)
    console.print(f"shrink: {tokens / alone:.1f} tokens/s alone, {tokens / drafted:.1f} with the draft "
                  f"({alone / drafted:.2f}x), acceptance {result['acceptance']:.0%}, identical: {not mismatched}")
    if args.llama_cpp:
        result["llama_cpp"] = llama_cpp_pair(Path(args.llama_cpp), teacher, target, draft_q, tok, [r["input"] for r in rows],
                                             args.new_tokens, console)
    t = Table(title=f"SmolLM2 {FORMAT['*']} (head int8), greedy, {len(prompts)} prompts x {args.new_tokens} new tokens, "
                    f"draft of {share:.0%} of the parameters")
    for c in ("decoding", "tokens/s", "speedup", "acceptance", "tokens a target pass", "identical"):
        t.add_column(c)
    t.add_row("target alone (shrink)", f"{tokens / alone:.1f}", "1.00x", "", "1.00", "")
    t.add_row("target + draft (shrink)", f"{tokens / drafted:.1f}", f"{alone / drafted:.2f}x",
              f"{result['acceptance']:.0%}", f"{result['tokens_per_target_pass']:.2f}",
              "yes" if not mismatched else f"NO: prompts {mismatched}")
    lc = result.get("llama_cpp")
    if lc:
        t.add_row("target alone (llama.cpp)", f"{lc['alone_tokens_per_s']:.1f}", "1.00x", "", "", "")
        if lc["drafted_tokens_per_s"]:
            t.add_row("target + draft (llama-speculative)", f"{lc['drafted_tokens_per_s']:.1f}",
                      f"{lc['drafted_tokens_per_s'] / lc['alone_tokens_per_s']:.2f}x",
                      f"{lc['acceptance']:.0%}" if lc["acceptance"] is not None else "", "", "")
    console.print(t)
    write_json(Path(args.out), result)
    console.print(f"written {args.out}")
    if mismatched:
        raise SystemExit(f"speculative decoding changed the output of prompts {mismatched}")


if __name__ == "__main__":
    main()
