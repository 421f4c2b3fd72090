"""The search loop: measure candidates one by one against the user's constraints, stream the results,
resume where a previous run stopped, keep the best model so far, and write the report.

The folder of a search:
    search.json     what is searched (model, task, constraints, candidates): a resume must match it
    results.jsonl   one line per finished candidate, appended and flushed as each finishes
    students/       distilled students (each resumable from its own checkpoints)
    best/           the recommended model so far, loadable with shrink.load
    best.gguf       with runtime "llama.cpp": the recommended model as the GGUF file llama.cpp was measured on
    original-outcomes/   one model at a time: the original's outcomes on the task, reused on resume
    report.html, report.md, results.json   written at the end
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn
from rich.console import Console

from ...core.atomic import swap_in, write_json, write_text
from ...core.errors import ShrinkError
from ...core.outdir import claim
from ...core.ownership import remove_own
from ...distillation.cache import model_fingerprint
from ...evaluate import compare_models
from ...evaluate.adapters import adapter_for
from ...evaluate.paired import allowed_drop, estimate_seconds, finite, task_too_small
from ...evaluate.tasks import Task, load_task
from ...io import read_model, resolve
from ...io.manifest import read_json
from ..compare import ORIGINAL_OUTCOMES
from ..distill import distill
from .candidates import Candidate, build, order, quantization_candidates, skip_reason, student_candidates
from .constraints import Constraints, human_bytes
from .frontier import explain, judge, pareto, recommend
from .measure import disk_bytes, memory_bytes, seconds_per_token, weights_bytes
from .records import CandidateResult, Original, Skipped, TaskSummary

RESULTS, CONFIG = "results.jsonl", "search.json"
BROKE_KEPT = 20  # examples a candidate broke kept with both answers, for the report
EVAL_BATCH = 16  # examples a comparison runs together (1 when latency per example is constrained)
# what a search writes in its folder (outdir.claim refuses a folder holding anything else)
OUT_NAMES = (CONFIG, RESULTS, "students", "best", "best.gguf", "report.html", "report.md", "results.json", ".candidate",
             ".candidate.gguf", ".original", ORIGINAL_OUTCOMES)


@dataclass
class SearchResult:
    """What a search found: the original's measurements, every finished candidate, those skipped or left
    for lack of budget, the recommendation and its line. `to_dict()` is results.json."""

    original: Original
    results: list[CandidateResult]
    skipped: list[Skipped] = field(default_factory=list)
    untried: list[str] = field(default_factory=list)
    recommendation: CandidateResult | None = None
    line: str = ""
    constraints: dict = field(default_factory=dict)  # Constraints.to_dict(), as search.json stores it
    task: TaskSummary | None = None
    out: str | None = None
    seconds: float = 0.0
    runtime: str = "shrink"  # what judged the candidates: shrink's model, or its GGUF export in llama.cpp
    batch_size: int = EVAL_BATCH  # examples each comparison ran together (1: each example alone, its latency)

    def frontier(self, cost: str = "size_bytes") -> list[CandidateResult]:
        """Pareto frontier of quality against `cost` ("size_bytes", "latency_example", "latency_token")."""
        return pareto(self.results, cost)

    def to_dict(self) -> dict:
        return finite({"recommendation": self.recommendation.to_json() if self.recommendation else None,
                       "line": self.line, "constraints": self.constraints,
                       "task": self.task.to_json() if self.task else {}, "original": self.original.to_json(),
                       "results": [r.to_json() for r in self.results], "skipped": [s.to_json() for s in self.skipped],
                       "untried": self.untried, "runtime": self.runtime, "batch_size": self.batch_size,
                       "frontier_size": [r.name for r in self.frontier("size_bytes")],
                       "frontier_latency": [r.name for r in self.frontier("latency_example")],
                       "seconds": self.seconds})


def task_fingerprint(task: Task) -> str:
    """A hash of the task's examples (ids, inputs, targets), so a resume can tell it is the same task."""
    h = hashlib.sha256(task.kind.encode())
    for ex in task.examples:
        h.update(ex.id.encode())
        h.update(ex.input.encode() if isinstance(ex.input, str) else ex.input.numpy().tobytes())
        h.update(json.dumps(ex.data, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _number(v, low: float = -math.inf) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= low


def _check_record(d: dict, where: str, con: Constraints | None) -> dict:
    """A done record of results.jsonl checked field by field before it is believed, and its `within`
    recomputed from its numbers (the rule of `evaluate.verdict.decide`), never taken as stored: ShrinkError
    naming the line and the field for anything of the wrong type, out of range or inconsistent."""
    def bad(field, why):
        raise ShrinkError(f"{where}: {field!r} {why}; the results file is damaged or was edited (remove the line "
                          "to measure that candidate again)")

    for f in ("score", "original_score", "change", "ci_low", "ci_high"):
        if d.get(f) is not None and not _number(d[f]):
            bad(f, f"must be a finite number or null, got {d[f]!r}")
    for f in ("size_bytes", "memory_bytes"):
        if not (_number(d.get(f), 0) and float(d[f]).is_integer()):
            bad(f, f"must be a whole number of bytes, got {d.get(f)!r}")
    for f in ("latency_example", "latency_token", "kl_mean", "build_seconds", "seconds", "original_latency_example"):
        if d.get(f) is not None and not _number(d[f], 0):
            bad(f, f"must be a number of 0 or more, or null, got {d[f]!r}")
    if not (isinstance(d.get("errors", 0), int) and not isinstance(d.get("errors", 0), bool) and d.get("errors", 0) >= 0):
        bad("errors", f"must be a count, got {d.get('errors')!r}")
    if not isinstance(d.get("within"), bool):
        bad("within", f"must be true or false, got {d.get('within')!r}")
    for f in ("slices_past", "broke", "fixed"):
        if not (isinstance(d.get(f, []), list) and all(isinstance(x, str) for x in d.get(f, []))):
            bad(f, "must be a list of names")
    if not (isinstance(d.get("slices", {}), dict) and all(_number(v) for v in d.get("slices", {}).values())):
        bad("slices", "must map slice names to finite numbers")
    if not isinstance(d.get("miss", {}), dict):
        bad("miss", "must be an object")
    allowed = d.get("allowed")
    if not _number(allowed, 0):
        bad("allowed", f"must be a number of 0 or more, got {allowed!r}")
    nums = [d.get(f) for f in ("change", "ci_low", "ci_high")]
    if all(v is not None for v in nums) and not d["ci_low"] - 1e-6 <= d["change"] <= d["ci_high"] + 1e-6:
        bad("change", f"{d['change']} lies outside its own interval {d['ci_low']}…{d['ci_high']}")
    if con is not None:
        orig = d.get("original_score")
        fits = [con.max_drop] + ([allowed_drop(con.max_drop, True, orig)] if con.relative and orig is not None else [])
        if not any(abs(allowed - f) <= 1e-9 * max(1.0, abs(f)) for f in fits):
            bad("allowed", f"is {allowed}, but the search's tolerance gives {fits[-1]:g}")
    # the stored verdict may only be lowered by the numbers (a false one also covers non-finite outputs)
    within = all(v is not None for v in nums) and -d["ci_low"] <= allowed + 1e-9 and not d.get("slices_past")
    if d["within"] and not within:
        bad("within", "is true, but its numbers are not within the tolerance")
    return d


def _read_results(path: Path, con: Constraints | None = None) -> list[CandidateResult]:
    """Finished candidates from results.jsonl, each checked (`_check_record`); a last line cut short by a
    crash is dropped."""
    if not path.is_file():
        return []
    out, seen = [], set()
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            if i == len(lines) - 1:
                break  # the write that was interrupted; that candidate is measured again
            raise ShrinkError(f"{path}:{i + 1}: not a JSON line; the results file is damaged") from None
        cand = record.get("candidate") if isinstance(record, dict) else None
        if not isinstance(cand, dict) or not isinstance(cand.get("name"), str) or record.get("status") not in (
                "done", "error") or (record["status"] == "done" and not isinstance(record.get("allowed"), (int, float))):
            raise ShrinkError(f"{path}:{i + 1}: not a search result (a candidate, its status and measurements); "
                              "the results file is damaged")
        if cand["name"] in seen:  # written twice by runs before results were locked: the first one counts
            print(f"note: {path}:{i + 1}: {cand['name']} measured twice; keeping the first", file=sys.stderr)
            continue
        seen.add(cand["name"])
        if record["status"] == "done":
            record = _check_record(record, f"{path}:{i + 1}", con)
        try:
            out.append(CandidateResult.from_json(record))
        except (TypeError, ValueError) as e:
            raise ShrinkError(f"{path}:{i + 1}: not a search result ({e}); the results file is damaged") from None
    return out


def _append(path: Path, record: CandidateResult) -> None:
    """One line per candidate, flushed to disk before the next candidate starts."""
    with open(path, "a") as f:
        f.write(json.dumps(finite(record.to_json())) + "\n")
        f.flush()
        os.fsync(f.fileno())


def min_possible_bytes(model: nn.Module) -> int:
    """A lower bound on any quantized copy's weights: the Linear layers at 2.5 bits per weight, everything
    else (embeddings, norms, the output layer) as it is."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return int(memory_bytes(model) - 4 * linear + linear * 2.5 / 8)


@dataclass
class _BuildOptions:
    """How candidates are built: calibration data and windows, students' training data and time."""

    calibration: object = None
    n_samples: int = 32
    seq_len: int = 512
    distill_data: object = None
    distill_seconds: float = 600.0
    distill_options: dict = field(default_factory=dict)


def search(model, task=None, constraints: Constraints | None = None, *, out: str | os.PathLike,
           candidates: list[Candidate] | None = None, calibration=None, methods=("awq+gptq",),
           n_samples: int = 32, seq_len: int = 512, distill_data=None, students=("every-other",),
           distill_seconds: float = 600.0, distill_options: dict | None = None, tokenizer=None,
           resume: bool = False, force: bool = False, max_new_tokens: int = 32, progress: bool | None = None,
           console: Console | None = None, runtime: str = "shrink", keep_order: bool = False,
           one_at_a_time: bool | None = None, **constraint_options) -> SearchResult:
    """Search compressed versions of `model` for the best one under `constraints`, measured on `task`.

    model: a module, a LoadedModel, or a name/path for `shrink.io.read_model` ("default", .gguf, folders).
    task: a .jsonl/.npz/.safetensors path, a Task, or None for the built-in default task.
    out: the search's folder (see the module docstring); resume=True continues a search there.
    constraints: tolerance, size, latency, objective and budget (default: 1 point absolute, no limits);
    or give them as keywords as people write them (max_drop=2, max_size="60MB", max_latency="20ms/token",
    objective="latency", time="1h", max_trials=10; see `Constraints.of`).
    candidates: the candidates to try (default: the rtn ladder; with `calibration`, `methods` at 4/3/2 bits
    and mixed precision at 6, 4.5 and 3.5 bits per weight; with runtime "llama.cpp", GGUF types instead: Q8_0,
    Q6_K, the Q5_K_M/Q4_K_M/Q3_K_M/Q2_K mixes, IQ4_NL and Q4_0; with `distill_data`, each of `students`
    trained for `distill_seconds` (default 600) and then quantized). They are tried cheap and likely-good
    first, and a direction is abandoned at its first failure. n_samples, seq_len: calibration windows
    (default 32 of 512 tokens; fewer than quantize's 128, as a search calibrates many candidates).
    distill_options: more DistillConfig fields for the students (for example steps, lr, batch_size).
    out must be new or empty, or a search folder shrink wrote: resume=True continues it, force=True
    (default False) starts it again (its files are removed; nothing else may be in it).
    runtime: what each candidate is judged on: "shrink" (default: shrink's own model) or "llama.cpp"
    (each candidate exported to GGUF with exact block copies and run by llama.cpp; its size is the GGUF
    file's, its latency llama.cpp's; candidates no GGUF type holds exactly are recorded as errors; the
    recommended file is out/best.gguf). Needs llama-cpp-python.
    keep_order: measure `candidates` in the order given (default False: cheap and likely-good first).
    one_at_a_time: for a Hugging Face folder given by its path, hold one model at a time: the original runs
    over the task once, its outcomes kept in out/original-outcomes (reused on resume), and is let go; each
    candidate is quantized block by block from the folder's weights into out/.candidate and loaded from there
    (default None: when the original and a copy to quantize would not fit in memory together). Students
    (distillation) and runtime "llama.cpp" need the original in memory and are refused so. The original's
    size is then its weights as stored in the folder.
    A task too small to tell a change of max_drop is said so (a warning) before anything runs, and a `time`
    that cannot hold one candidate (the original's run over the task and the candidate's, estimated from one
    batch of each kind of example) is refused.
    Returns a SearchResult; the report is written to out/report.html, report.md and results.json.
    """
    from ...core.peers import llama_cpp_missing
    from ...evaluate.llamacpp import RUNTIMES

    if runtime not in RUNTIMES:
        raise ShrinkError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if runtime == "llama.cpp" and llama_cpp_missing():
        raise ShrinkError(llama_cpp_missing())
    if constraint_options and constraints is not None:
        raise ShrinkError("give constraints either as a Constraints or as keywords, not both")
    with claim(out, "search", OUT_NAMES, force=force, resume=resume, keep=(ORIGINAL_OUTCOMES,)):
        con = constraints or Constraints.of(**constraint_options)
        console = console or Console(quiet=progress is False)
        out = Path(out)
        source = _streamed_source(model, one_at_a_time, runtime, distill_data, candidates, console)
        original, tok, name = resolve(model, tokenizer)
        name = name or type(original).__name__
        original.eval()
        task = load_task(task)
        adapter = adapter_for(original, tok, None, max_new_tokens)
        adapter.check_task(task)  # a task this model cannot run: say so now
        small = task_too_small(task, con.max_drop, con.relative)
        if small:
            warnings.warn(small, stacklevel=2)
        if con.latency_per == "token" and con.max_latency is not None and tok is None:
            raise ShrinkError("--max-latency per token needs a language model; give a time per example (like 50ms)")
        options = _BuildOptions(calibration, n_samples, seq_len, distill_data, distill_seconds, dict(distill_options or {}))
        candidates = _candidates(candidates, options, methods, students, keep_order, runtime)
        _check_size_is_reachable(original, con, candidates)
        if source is None:
            _compile_ahead(original)  # no budget of the user's is spent compiling
        t_start = time.perf_counter()
        if con.time is not None:
            _check_time_is_enough(con, estimate_seconds(adapter, task, _eval_batch(con)), len(task.examples), runtime)

        identity = {"model": name, "model_fingerprint": model_fingerprint(original), "task": task.name,
                    "task_source": task.source, "task_fingerprint": task_fingerprint(task)}
        results = _resumed(out, identity, con, runtime, console) if resume else []
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG, {**identity, "constraints": con.to_dict(), "candidates": [c.to_dict() for c in candidates],
                                  "calibration": str(calibration) if calibration is not None else None,
                                  "n_samples": n_samples, "seq_len": seq_len,
                                  "distill_data": str(distill_data) if distill_data else None, "runtime": runtime})
        (out / RESULTS).touch()

        alone = None
        if source is not None:  # the original's outcomes kept on disk, the original let go
            import gc

            from ...core.memory import release_freed_memory

            alone = _outcomes_alone(original, tok, name, source, task, tokenizer, out, con, max_new_tokens, progress)
            original = adapter = alone[1].adapter()
            gc.collect()
            release_freed_memory()
        run = _Run(original, tok, name, task, con, out, options, runtime, max_new_tokens, progress, console,
                   source=source, alone=alone)
        skipped, untried = [], []
        for c in candidates:
            if c.name in {r.name for r in results}:
                continue
            if not run.budget_left(len(results), time.perf_counter() - t_start):
                untried.append(c.name)
                continue
            why = skip_reason(c, results, con.objective)
            if why:
                skipped.append(Skipped(c.name, why))
                console.print(f"[dim]skip {c.name}: {why}[/dim]")
                continue
            console.print(f"[bold]{c.name}[/bold] ({len(results) + 1} of at most {len(candidates)})")
            results.append(run.measure(c, results))

        best = recommend(results, con.objective, con.latency_per)
        run.original_from(results)
        result = SearchResult(run.original_info, results, skipped, untried, best,
                              explain(best, con, run.original_info), con.to_dict(),
                              TaskSummary(task.name, task.kind, task.source, len(task.examples)), str(out),
                              time.perf_counter() - t_start, runtime, run.batch_size)
        if best is not None and _best_name(out) != best.name:  # the constraints changed on resume
            run.rebuild_best(best)
        from ...report.search import write_search_report

        write_search_report(result, task, out)
        return result


def _eval_batch(con: Constraints) -> int:
    """Examples a comparison runs together: one when a latency per example is asked for, else EVAL_BATCH."""
    return 1 if con.times_examples_alone else EVAL_BATCH


def _compile_ahead(model: nn.Module) -> None:
    """Build (or load from the cache) the compiled kernel and, for a model that decodes in shrink's runtime,
    the runtime, so that the search's clock does not count their first-use compilation."""
    from ...quant.kernels import native

    from ...runtime.llama import extension, unsupported

    native.load()
    if unsupported(model, compiled=False) is None:
        extension()


def _check_time_is_enough(con: Constraints, seconds: float, examples: int, runtime: str) -> None:
    """Refuse a --time that cannot hold one candidate: the original's run over the task (once) and the
    candidate's own, each about `seconds` (measured on one batch of each kind of example)."""
    need = 2 * seconds
    if con.time < need:
        where = "" if runtime == "shrink" else " (measured in shrink's runtime; llama.cpp's may differ)"
        raise ShrinkError(f"--time {con.time:.3g}s cannot hold one candidate: running the task's {examples:,} examples "
                          f"takes about {seconds:.3g}s per model here{where}, once for the original and again for each "
                          f"candidate, before the candidate is built; give at least --time {max(1, math.ceil(need * 1.5))}s")


def _candidates(candidates, options: _BuildOptions, methods, students, keep_order: bool = False,
                runtime: str = "shrink") -> list[Candidate]:
    """The candidates to try, in order (defaults from what data was given and the runtime judging them: GGUF
    types for llama.cpp), checked against that data."""
    if candidates is None:
        candidates = quantization_candidates(calibration=options.calibration is not None, methods=methods,
                                             llama_cpp=runtime == "llama.cpp")
        if options.distill_data is not None:
            candidates += student_candidates(students)
    candidates = list(candidates) if keep_order else order(candidates)
    if len({c.name for c in candidates}) != len(candidates):
        raise ShrinkError("candidate names must be unique")
    if any(c.needs_calibration for c in candidates) and options.calibration is None:
        raise ShrinkError("calibrated candidates (gptq, awq, mixed precision) need --calibration FILE")
    if any(c.student for c in candidates) and options.distill_data is None:
        raise ShrinkError("student candidates need training data (--distill FILE)")
    return candidates


def _check_size_is_reachable(original: nn.Module, con: Constraints, candidates: list[Candidate]) -> None:
    floor = min_possible_bytes(original)
    if con.max_size is not None and con.max_size < floor and not any(c.student for c in candidates):
        raise ShrinkError(f"nothing can meet --max-size {human_bytes(con.max_size)} by quantization: even at 2 bits "
                          f"this model's weights take at least {human_bytes(floor)} (embeddings and the output layer "
                          "stay in full precision); allow distillation (--distill DATA) or raise --max-size")


def _resumed(out: Path, identity: dict, con: Constraints, runtime: str, console) -> list[CandidateResult]:
    """The results of the search in `out`, after checking it is this search, judged again under `con`."""
    if not (out / CONFIG).is_file():
        raise ShrinkError(f"{out}: nothing to resume (no {CONFIG})")
    saved = read_json(out / CONFIG, "search file")
    if not isinstance(saved, dict):
        raise ShrinkError(f"{out / CONFIG}: expected a JSON object; the search file is damaged")
    differs = [what for key, what in (("model_fingerprint", "model (its weights differ)"),
                                      ("task_fingerprint", "task (its examples differ)")) if saved.get(key) != identity[key]]
    if differs:
        raise ShrinkError(f"{out}: that search was of another {' and another '.join(differs)}; "
                          "start a new search in another folder")
    if saved.get("runtime", "shrink") != runtime:
        raise ShrinkError(f"{out}: that search judged candidates in {saved.get('runtime', 'shrink')}; resume it "
                          f"with --runtime {saved.get('runtime', 'shrink')}, or start a new search in another folder")
    was = saved.get("constraints", {})
    if not isinstance(was, dict):
        raise ShrinkError(f"{out / CONFIG}: 'constraints' must be an object, got {type(was).__name__}; the search "
                          "file is damaged")
    if (was.get("max_drop"), was.get("relative")) != (con.max_drop, con.relative):
        raise ShrinkError(f"{out}: that search compared with a tolerance of {was.get('max_drop')} "
                          f"({'relative' if was.get('relative') else 'absolute'}); resume it with the same "
                          "--max-drop/--relative, or start a new search in another folder")
    # judged again: size, latency and objective may have changed since
    results = [judge(r, con, r.judgement.allowed) if r.done else r for r in _read_results(out / RESULTS, con)]
    write_text(out / RESULTS, "".join(json.dumps(r.to_json()) + "\n" for r in results))  # drop a line cut short
    console.print(f"resuming: {len(results)} candidate(s) already measured in {out / RESULTS}")
    return results


def _streamed_source(model, one_at_a_time: bool | None, runtime: str, distill_data, candidates, console) -> Path | None:
    """The Hugging Face folder the candidates are to be quantized from block by block, one model at a time,
    or None (the original held in memory): `one_at_a_time` True asks for it (refused, saying why, where it
    cannot be), None chooses it when the original and a copy of it would not fit in memory together."""
    from ...core.memory import available_memory
    from ...io.models import loaded_size, model_path
    from ..streamed import why_not_streamed

    if one_at_a_time is False or not isinstance(model, (str, os.PathLike)):
        if one_at_a_time:
            raise ShrinkError("one model at a time needs the original given by the path of its Hugging Face folder")
        return None
    path = model_path(model)
    if one_at_a_time is None:
        need, avail = 2 * loaded_size(path), available_memory()
        if not (avail is not None and need > 0.8 * avail and why_not_streamed(path) is None):
            return None
        console.print(f"note: the original and a copy of it to quantize need about {need / 1e9:.1f} GB, more than the "
                      f"{avail / 1e9:.1f} GB available allows: one model at a time (candidates quantized block by block "
                      f"from {path}; the original's outcomes kept in the search folder)")
    why = why_not_streamed(path) or (
        "runtime llama.cpp exports each candidate beside the original in memory" if runtime != "shrink" else None) or (
        "students are distilled from the original in memory" if distill_data is not None
        or any(c.student for c in candidates or []) else None)
    if why:
        raise ShrinkError(f"one model at a time: {why}")
    return path


def _outcomes_alone(original, tok, name, source: Path, task, tokenizer, out: Path, con, max_new_tokens, progress):
    """(the original's record, its StoredOutcomes in out/original-outcomes): its size as stored, memory and
    speed measured, its outcomes on the task computed (or found there from an earlier run of this search
    with the same original files, task and options), for the caller to let it go."""
    from ...evaluate import StoredOutcomes, store_original
    from ...io.shards import Checkpoint
    from ..compare import outcomes_key

    run = {"max_new_tokens": max_new_tokens, "batch_size": _eval_batch(con)}
    key = outcomes_key(source, task, tokenizer, run)
    stored = StoredOutcomes.open(out / ORIGINAL_OUTCOMES, key)
    if stored is None:
        stored = store_original(original, task, out / ORIGINAL_OUTCOMES, key, tokenizer=tok, progress=progress, **run)
    size = sum(f.stat().st_size for f in Checkpoint(source).files)
    return Original(name, size, memory_bytes(original), seconds_per_token(original, tok)), stored


class _Run:
    """One search's measuring: the original (measured once; its outcomes on the task cached for every
    comparison), the students trained so far, and how long candidates take. source: the Hugging Face
    folder candidates are quantized from block by block (one model at a time; `alone` is then the
    original's record and stored outcomes, and `original` their stand-in)."""

    def __init__(self, original, tok, name, task, con, out, options, runtime, max_new_tokens, progress, console,
                 source: Path | None = None, alone=None):
        self.original, self.tok, self.name, self.task, self.con, self.out = original, tok, name, task, con, out
        self.options, self.runtime, self.max_new_tokens = options, runtime, max_new_tokens
        self.progress, self.console, self.source = progress, console, source
        self.cache = alone[1] if alone else {}
        self.batch_size = _eval_batch(con)
        self.trained: dict[str, nn.Module] = {}
        self.durations: list[float] = []
        if alone:
            self.original_info = alone[0]
            return
        remove_own(out / ".original")
        orig_size = disk_bytes(original, out / ".original", tok)
        remove_own(out / ".original")
        self.original_info = Original(name, orig_size, memory_bytes(original), seconds_per_token(original, tok))

    def budget_left(self, measured: int, spent: float) -> bool:
        """Whether another candidate fits in --max-trials and in --time (at the typical candidate's time)."""
        typical = sum(self.durations) / len(self.durations) if self.durations else 0.0
        return not ((self.con.max_trials is not None and measured >= self.con.max_trials)
                    or (self.con.time is not None and spent + typical > self.con.time))

    def measure(self, c: Candidate, results: list[CandidateResult]) -> CandidateResult:
        """Build `c`, compare it with the original on the task, judge it, append it to results.jsonl and,
        when it is the best so far, make it out/best. A candidate that cannot be built is an error record."""
        t0 = time.perf_counter()
        try:
            model = self.build(c)
        except _NotStreamed as e:
            return self._failed(c, str(e), "not built")
        except ShrinkError:
            raise
        except Exception as e:  # one candidate that cannot be built must not end the search
            return self._failed(c, f"{type(e).__name__}: {e}", "failed")
        build_s = time.perf_counter() - t0
        original_before = self._original_seconds()
        target, shipped = model, None
        if self.runtime == "llama.cpp":
            try:
                target, shipped = _in_llama_cpp(model, self.original, self.tok, self.out / ".candidate.gguf",
                                                self.max_new_tokens)
            except ShrinkError as e:
                return self._failed(c, f"not run in llama.cpp: {e}", "")
        try:
            comp = compare_models(self.original, target, self.task, tokenizer=self.tok, tolerance=self.con.max_drop,
                                  relative=self.con.relative, max_new_tokens=self.max_new_tokens,
                                  names=(self.name, c.name), progress=self.progress, cache=self.cache,
                                  batch_size=self.batch_size, warn_small=False)
            latency_token = seconds_per_token(model, self.tok) if shipped is None else _llama_cpp_per_token(target)
        finally:
            if shipped is not None:
                target.runtime.close()
        if self.original_info.latency_example is None:
            self.original_info.latency_example = comp.original["seconds_per_example"]
            self.original_info.score = comp.overall.original
        staging = self.out / ".candidate"
        if self.source is not None:  # built there, block by block
            size = weights_bytes(staging)
        else:
            remove_own(staging)
            size = disk_bytes(model, staging, self.tok) if shipped is None else _also_saved(model, staging, self.tok, shipped)
        record = judge(_measured(c, comp, size, memory_bytes(model), latency_token, build_s,
                                 time.perf_counter() - t0), self.con, comp.allowed_drop())  # compared with max_drop
        _append(self.out / RESULTS, record)
        # less the original's once-only run
        self.durations.append(record.seconds - (self._original_seconds() - original_before))
        if recommend(results + [record], self.con.objective, self.con.latency_per) is record:
            write_json(staging / "candidate.json", record.to_json())
            swap_in(staging, self.out / "best")  # seals it first: a model folder and its record, shrink's
            if shipped is not None:
                os.replace(shipped, self.out / "best.gguf")
        remove_own(staging)
        if shipped is not None:
            shipped.unlink(missing_ok=True)
        mark = "[green]qualifies[/green]" if record.qualifies else f"[red]misses {', '.join(record.miss)}[/red]"
        self.console.print(f"  {record.change:+.1f} points (CI {record.ci_low:+.1f}…{record.ci_high:+.1f}), "
                           f"{human_bytes(record.size_bytes)}, {record.latency_example * 1e3:,.0f} ms/example: {mark}")
        return record

    def build(self, c: Candidate) -> nn.Module:
        """The candidate's model, training its student first when it has one not trained yet; one model at a
        time: quantized block by block from the source folder into out/.candidate and loaded from there."""
        r = self.options
        if self.source is not None:
            return self._streamed(c)
        if c.student and c.student not in self.trained:
            self.trained[c.student] = _train_student(c.student, self.original, self.tok, r.distill_data, self.out,
                                                     r.distill_seconds, r.distill_options, self.progress)
        return build(c, self.original, students=self.trained, calibration=r.calibration, tokenizer=self.tok,
                     n_samples=r.n_samples, seq_len=r.seq_len, progress=self.progress)

    def original_from(self, results: list[CandidateResult]) -> None:
        """On a resume that measured nothing new, the original's latency and score from the stored results."""
        done = [r for r in results if r.done]
        if self.original_info.latency_example is None and done:
            self.original_info.latency_example = done[0].original_latency_example
            self.original_info.score = done[0].original_score

    def _streamed(self, c: Candidate) -> nn.Module:
        from ...io import load
        from ...quant.mixed import MixedPrecision
        from ...quant.recipe import parse_method
        from ..streamed import quantize_streamed

        if c.method is None or c.student:
            raise _NotStreamed(f"candidate {c.name} is not a quantization of the original")
        r, staging = self.options, self.out / ".candidate"
        remove_own(staging)
        spec = MixedPrecision(c.target_bits) if c.target_bits is not None else c.format
        try:
            quantize_streamed(self.source, staging, spec, method=parse_method(c.method),
                              calibration=r.calibration if c.needs_calibration else None, n_samples=r.n_samples,
                              seq_len=r.seq_len, progress=self.progress, say=lambda line: self.console.print(f"  {line}"))
        except ShrinkError as e:
            if str(e).startswith("cannot stream"):
                raise _NotStreamed(str(e)) from None
            raise
        return load(staging)

    def rebuild_best(self, best: CandidateResult) -> None:
        """best/ went missing (removed by hand, or the best was found before a crash in promoting it): build it again."""
        model = self.build(best.candidate)
        staging = self.out / ".candidate"
        if self.source is None:
            remove_own(staging)
            disk_bytes(model, staging, self.tok)
        write_json(staging / "candidate.json", best.to_json())
        swap_in(staging, self.out / "best")
        if self.runtime == "llama.cpp":
            from ...io import LoadedModel
            from ...io.export import export_gguf, source_gguf_of

            export_gguf(LoadedModel(model, self.tok, {}), self.out / "best.gguf",
                        source_gguf=source_gguf_of(self.original), force=True)

    def _original_seconds(self) -> float:
        # (one model at a time: the original ran before any candidate, and its stored outcomes are on disk)
        return 0.0 if self.source is not None else sum(v[1] for v in self.cache.values())

    def _failed(self, c: Candidate, error: str, verb: str) -> CandidateResult:
        record = CandidateResult.failed(c, error)
        self.console.print(f"[red]{c.name}{' ' + verb if verb else ''}[/red]: {error}")
        _append(self.out / RESULTS, record)
        return record


class _NotStreamed(Exception):
    """A candidate that cannot be quantized block by block from the source folder (recorded as failed)."""


def _measured(c: Candidate, comp, size: int, memory: int, latency_token, build_s: float, seconds: float):
    """A candidate's record from its comparison with the original (not judged yet)."""
    return CandidateResult(
        c, "done", score=comp.overall.compressed, original_score=comp.overall.original, change=comp.overall.change,
        ci_low=comp.overall.ci_low, ci_high=comp.overall.ci_high, within=comp.within, verdict=comp.verdict,
        slices_past=[s.name for s in comp.slices if s.past], slices={s.name: round(s.change, 3) for s in comp.slices},
        size_bytes=size, memory_bytes=memory, latency_example=comp.compressed["seconds_per_example"],
        latency_token=latency_token, broke=[e.id for e in comp.examples if e.flip == "right→wrong"],
        broke_examples=[{"id": e.id, "input": e.input, "target": e.target, "original": e.original_output,
                         "compressed": e.compressed_output} for e in comp.examples if e.flip == "right→wrong"][:BROKE_KEPT],
        fixed=[e.id for e in comp.examples if e.flip == "wrong→right"],
        kl_mean=(comp.divergence.get("kl") or {}).get("mean"), errors=comp.errors, build_seconds=round(build_s, 2),
        seconds=round(seconds, 2), original_latency_example=comp.original["seconds_per_example"])


def _in_llama_cpp(model: nn.Module, original: nn.Module, tok, path: Path, max_new_tokens: int):
    """(adapter, file): `model` exported to the GGUF file `path` (exact block copies; tokenizer from the
    original's source GGUF when it has one) and run by llama.cpp."""
    from ...evaluate.llamacpp import LlamaCppAdapter
    from ...io import LoadedModel
    from ...io.export import export_gguf, source_gguf_of

    export_gguf(LoadedModel(model, tok, {}), path, source_gguf=source_gguf_of(original), force=True)
    return LlamaCppAdapter(path, tok, None, max_new_tokens), path


def _llama_cpp_per_token(adapter, new_tokens: int = 32) -> float:
    """llama.cpp's greedy decoding speed, seconds per token after a one-token prompt (best of two)."""
    return min(adapter.runtime.bench(prompt=1, decode=new_tokens)["decode_s"] for _ in range(2)) / new_tokens


def _also_saved(model: nn.Module, folder: Path, tok, shipped: Path) -> int:
    """Save the candidate as shrink does (for best/) and return the size of what ships: the GGUF file."""
    disk_bytes(model, folder, tok)
    return shipped.stat().st_size


def _best_name(out: Path) -> str | None:
    try:
        return json.loads((out / "best" / "candidate.json").read_text())["candidate"]["name"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def _train_student(spec: str, teacher: nn.Module, tok, data, out: Path, seconds: float, options: dict, progress):
    """Distill (or, when a previous run finished it, load) the student `spec` under out/students/."""
    folder = out / "students" / spec.replace("/", "_").replace(":", "_")
    if (folder / "results.json").is_file() and (folder / "model").is_dir():  # trained by an earlier run
        return read_model(folder / "model").model.eval()
    opts = {"steps": 2000, "time_budget": seconds, "eval_every": 200, "checkpoint_every": 50, **options}
    resume = (folder / "checkpoint" / "state.pt").is_file()
    # inside the search's own folder: what a killed run left there before its first checkpoint is started again
    student, _ = distill(teacher, spec, data, out=folder, tokenizer=tok, resume=resume, force=not resume,
                         progress=progress, **opts)
    return student.eval()


__all__ = ["SearchResult", "min_possible_bytes", "search", "task_fingerprint"]
