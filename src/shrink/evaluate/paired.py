"""Compare an original and a compressed model on the user's own task, example by example.

Both models see exactly the same inputs. For every example: both outputs and scores, whether it
flipped (right to wrong, wrong to right), and how far the compressed model's distribution moved
(KL divergence and top-1 agreement of next-token distributions for language models, of the label
distribution for classifiers; embedding cosine for encoders). Then: the score change with a paired
bootstrap interval, McNemar's exact test on the flips, the same per slice (the example's tags, and
difficulty slices from the original model's confidence and from input length), and a verdict.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.errors import ShrinkError
from ..core.model_outputs import kl_divergence
from .adapters import Adapter, Outcome, adapter_for
from .scorers import load_scorer
from .stored import StoredOutcomes, run_original, same_inputs
from .stats import divergence_summary, mcnemar_exact, paired_bootstrap
from .tasks import Task, load_task
from .verdict import CANNOT_TELL, PAST, Verdict, decide, too_small

MIN_SLICE = 5  # slices with fewer examples are reported but cannot fail the verdict
SIGNIFICANCE = 0.05


@dataclass
class ExampleResult:
    """One example, both models."""

    id: str
    tags: list[str]
    input: str
    target: str
    original_output: str = ""
    compressed_output: str = ""
    original_score: float = float("nan")
    compressed_score: float = float("nan")
    flip: str | None = None  # "right→wrong", "wrong→right" or None
    confidence: float = float("nan")  # the original model's, higher = easier
    length: int = 0
    kl_mean: float | None = None
    top1_agreement: float | None = None
    embedding_cosine: float | None = None
    original_seconds: float = 0.0
    compressed_seconds: float = 0.0
    slices: list[str] = field(default_factory=list)
    error: str | None = None
    kind: str = ""


@dataclass
class SliceResult:
    """Scores of both models on a group of examples, in points (0-100) or perplexity."""

    name: str
    n: int
    original: float
    compressed: float
    change: float  # compressed - original, in points (perplexity tasks: percent of perplexity, sign = better)
    ci_low: float
    ci_high: float
    right_to_wrong: int
    wrong_to_right: int
    p_value: float | None
    past: bool = False


@dataclass
class Comparison:
    """The whole comparison; `to_dict()` is what results.json holds."""

    task: dict
    original: dict
    compressed: dict
    tolerance: float
    relative: bool
    overall: SliceResult
    slices: list[SliceResult]
    examples: list[ExampleResult]
    divergence: dict
    within: bool  # status == WITHIN TOLERANCE
    verdict: str  # the one line that says it (`verdict.decide`)
    errors: int = 0
    status: str = ""  # WITHIN TOLERANCE, PAST THE SWEET SPOT or CANNOT TELL
    needed: int | None = None  # CANNOT TELL: about how many examples would tell

    def to_dict(self) -> dict:
        return finite(asdict(self))

    def allowed_drop(self) -> float:
        """The loss of overall score allowed, in points (the tolerance, or its share of the original's score)."""
        return allowed_drop(self.tolerance, self.relative, self.overall.original)

    @property
    def flips(self) -> list[ExampleResult]:
        return [e for e in self.examples if e.flip]


def allowed_drop(tolerance: float, relative: bool, original_score: float) -> float:
    """The loss of score allowed, in points: `tolerance` itself, or that percentage of the original's score."""
    return tolerance / 100 * abs(original_score) if relative else tolerance


def finite(obj):
    """NaN and infinity as None, so results.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers as held in memory (tied tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel()) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# float64 bytes of positions per block: under 2 MiB a block's rows come from memory the allocator reuses,
# where a whole sequence's (or blocks of 2 MiB and more, mapped afresh in huge pages) are new each time
KL_BLOCK_BYTES = 3 << 19


def _kl(p: Outcome, q: Outcome) -> tuple[np.ndarray, np.ndarray]:
    """Per position of the measured sequence: KL(original || compressed) and whether their top-1 tokens agree."""
    n, width = p.logprobs.shape
    rows = max(1, KL_BLOCK_BYTES // (8 * width))
    kl, same = np.empty(n), np.empty(n, dtype=bool)
    for s in range(0, n, rows):
        # renormalised in float64: for close models the terms cancel below float32's resolution (KL read as 0)
        lp, lq = (t[s:s + rows].double().log_softmax(-1) for t in (p.logprobs, q.logprobs))
        kl[s:s + rows] = kl_divergence(lp, lq).clamp(min=0).numpy()
        same[s:s + rows] = (lp.argmax(-1) == lq.argmax(-1)).numpy()
    return kl, same


def _rank_slices(values: list[float], names: tuple[str, ...]) -> list[str | None]:
    """Split examples into len(names) equal groups by value (lowest first), ties broken by order."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out: list[str | None] = [None] * len(values)
    for r, i in enumerate(order):
        out[i] = names[min(len(names) - 1, r * len(names) // max(1, len(values)))]
    return out


def _slice(name: str, rows: list[ExampleResult], perplexity: bool) -> SliceResult:
    a = [r.original_score for r in rows]
    b = [r.compressed_score for r in rows]
    diff, lo, hi = paired_bootstrap(a, b)
    if perplexity:  # scores are mean log-likelihoods; report perplexity and its percent change
        orig, comp = math.exp(-np.mean(a)), math.exp(-np.mean(b))
        pct = [100 * (math.exp(x) - 1) for x in (diff, lo, hi)]  # ll up = perplexity down = better
        change, ci_low, ci_high = pct
        rw = wr = 0
        p = None
    else:
        orig, comp = 100 * float(np.mean(a)), 100 * float(np.mean(b))
        change, ci_low, ci_high = 100 * diff, 100 * lo, 100 * hi
        rw = sum(r.flip == "right→wrong" for r in rows)
        wr = sum(r.flip == "wrong→right" for r in rows)
        p = mcnemar_exact(rw, wr)
    return SliceResult(name, len(rows), orig, comp, change, ci_low, ci_high, rw, wr, p)


def _slice_past(slices: list[SliceResult], allowed, perplexity: bool) -> str | None:
    """Why a slice is past the sweet spot (the worst of those of at least MIN_SLICE examples that lost more
    than `allowed(slice)` and significantly so; each such slice is marked past), or None."""
    unit = "%" if perplexity else " points"

    def significant(s):
        return (s.p_value is not None and s.p_value < SIGNIFICANCE) or (s.p_value is None and s.ci_high < 0)

    failing = [s for s in slices if s.n >= MIN_SLICE and -s.change > allowed(s) and significant(s)]
    for s in failing:
        s.past = True
    if not failing:
        return None
    worst = min(failing, key=lambda s: s.change)
    p = f"p = {worst.p_value:.3g}" if worst.p_value is not None else f"CI {worst.ci_low:+.1f}…{worst.ci_high:+.1f}"
    lost = f"{-worst.change:.1f}{unit}" if not perplexity else f"{worst.change:+.1f}% perplexity"
    why = ""
    easy = [s for s in slices if s.name in ("confidence:high", "tag:easy", "length:short") and -s.change <= allowed(s)]
    if easy and worst.name in ("confidence:low", "tag:hard", "length:long", "tag:edge"):
        why = ": the model still aces simple inputs and fails hard ones"
    return f"the {worst.name} slice lost {lost} ({p}){why}"


def _outcomes(ad: Adapter, examples: list, task: Task, score_fn, ids: list | None) -> list[tuple]:
    """(Outcome or the exception it raised, seconds) per example, from one batch through `ad`; when the
    batch fails, its examples run one at a time, so one failing example does not lose the others. The
    seconds are the batch's time shared out evenly."""
    if not examples:
        return []
    t0 = time.perf_counter()
    try:
        outs = ad.run_batch(examples, task, ids=ids, scorer=score_fn)
    except Exception as e:
        if len(examples) == 1:
            return [(e, 0.0)]
        return [one for k, ex in enumerate(examples)
                for one in _outcomes(ad, [ex], task, score_fn, [ids[k]] if ids else None)]
    each = (time.perf_counter() - t0) / len(examples)
    return [(o, each) for o in outs]


def _batches(task: Task, batch_size: int) -> list[list[int]]:
    """Example indices in batches of `batch_size` of one kind each, by input length (so a batch pads little)."""
    def length(i):
        x = task.examples[i].input
        return len(x) if isinstance(x, str) else int(x.numel())

    out = []
    for kind in task.kinds():
        order = sorted((i for i, ex in enumerate(task.examples) if ex.kind == kind), key=length)
        out += [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    return out


def estimate_seconds(adapter: Adapter, task: Task, batch_size: int = 16) -> float:
    """About how many seconds `adapter`'s model takes to run the whole task in batches of `batch_size`: one
    batch of each kind of example is run (its outcomes are not kept) and its time scaled to that kind's
    count. A batch that fails counts as taking no time (the comparison will report its examples)."""
    total = 0.0
    for kind in task.kinds():
        idx = [i for i, ex in enumerate(task.examples) if ex.kind == kind]
        probe = [task.examples[i] for i in idx[len(idx) // 2:len(idx) // 2 + batch_size]]  # typical lengths
        t0 = time.perf_counter()
        try:
            adapter.run_batch(probe, task)
        except Exception:  # noqa: BLE001 - an estimate; compare reports the failure itself
            continue
        total += (time.perf_counter() - t0) * len(idx) / len(probe)
    return total


def _example_row(ex, original: tuple, compressed: tuple | None, perplexity: bool):
    """One example's comparison from both models' outcomes: (ExampleResult, per-position KL or None,
    per-position top-1 match or None). An exception from either model is recorded in the result."""
    d = ex.data
    target = (" | ".join(map(str, d["target"])) if "target" in d else d["choices"][d["answer"]] if "choices" in d
              else str(d.get("label", "")))
    text = ex.input if isinstance(ex.input, str) else f"tensor {tuple(ex.input.shape)}"
    r = ExampleResult(ex.id, list(ex.tags), text, target, kind=ex.kind)
    r.length = len(ex.input.split()) if isinstance(ex.input, str) else int(ex.input.numel())
    (po, original_seconds), (qo, compressed_seconds) = original, compressed or (None, 0.0)
    failed = po if isinstance(po, Exception) else qo if isinstance(qo, Exception) else None
    if failed is not None:
        r.error = f"{type(failed).__name__}: {failed}"
        return r, None, None
    r.original_seconds, r.compressed_seconds = original_seconds, compressed_seconds
    r.original_output, r.compressed_output = po.output, qo.output
    r.original_score, r.compressed_score = po.score, qo.score
    r.confidence = po.confidence
    if not perplexity:
        was, now = po.score >= 0.5, qo.score >= 0.5
        r.flip = "right→wrong" if was and not now else "wrong→right" if now and not was else None
    kl = same = None
    if po.logprobs is not None and qo.logprobs is not None:
        kl, same = _kl(po, qo)
        r.kl_mean, r.top1_agreement = float(kl.mean()), float(same.mean())
    if po.embedding is not None:
        r.embedding_cosine = float(po.embedding @ qo.embedding)
    return r, kl, same


def check_options(task: Task, tolerance: float, scorer: str | None) -> None:
    """Refuse, before any model runs, a tolerance that is not a finite number of 0 or more, and a scorer
    for a task whose kind is scored without one (its file would be run for nothing)."""
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ShrinkError(f"tolerance must be a number of points (or percent) of 0 or more, got {tolerance!r}")
    if scorer and "generation" not in task.kinds():
        raise ShrinkError(f"--scorer scores generated outputs; {task.source or task.name} is a {task.kind} task, "
                          "scored without one (leave out --scorer)")


def check_batch_size(batch_size) -> None:
    """ShrinkError unless `batch_size` is an integer of 1 or more."""
    if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise ShrinkError(f"batch_size must be an integer of 1 or more, got {batch_size!r}")


def task_too_small(task: Task, tolerance: float, relative: bool) -> str | None:
    """Why `task` is too small for any verdict at this tolerance (before any model runs), or None. Perplexity
    tasks, whose scores are not right or wrong, are never too small by this measure; a relative tolerance
    is taken at its most lenient (an original scoring 100)."""
    if task.kind == "perplexity":
        return None
    return too_small(len(task.examples), tolerance, tolerance_text(tolerance, relative, False, tolerance))


def compare_models(original, compressed, task: Task | str | None = None, *, tokenizer=None, compressed_tokenizer=None,
            tolerance: float = 1.0, relative: bool = False, scorer: str | None = None,
            chat_template: bool | None = None, max_new_tokens: int = 32, names: tuple[str, str] = ("original", "compressed"),
            progress: bool | None = None, cache: dict | None = None, batch_size: int = 16,
            warn_small: bool = True) -> Comparison:
    """Run both models on every example of `task` and compare them.

    original, compressed: modules (Hugging Face or plain PyTorch) or adapters. tokenizer: for both
    models unless compressed_tokenizer is given. task: a Task, a path (.jsonl, .npz, .safetensors) or
    None for the built-in default task. tolerance: allowed score loss, in points (default 1.0,
    absolute; relative=True makes it a percentage of the original's score; perplexity tasks always
    measure percent of perplexity). scorer: 'module:function' to score generation outputs instead of
    the task's match rule. chat_template: None uses the tokenizer's when it has one. max_new_tokens:
    greedy generation length when an example gives none (default 32). An example counts as right
    when its score is at least 0.5 (flips are counted on that); scores themselves are averaged.
    cache: a dict that keeps the original model's outcomes by example id, so that comparing many
    compressed models with one original (a search) runs the original once; pass the same dict each
    time, with the same task, tokenizer and options (default None: no cache).
    batch_size: examples run together, sorted by length (default 16; language models generate and score
    a batch at once, padded, with the same outcomes as one at a time up to float rounding). Each
    example's time is its batch's shared out, and in a batch the compressed model's answer is drafted by
    the original's where it runs in shrink's runtime (fewer steps: not its latency); batch_size=1
    measures the latency of one example alone.
    warn_small: warn, before any model runs, when the task has too few examples for any verdict at this
    tolerance (default True; a search says it once for all its comparisons).
    """
    task = load_task(task)
    check_options(task, tolerance, scorer)
    small = task_too_small(task, tolerance, relative) if warn_small else None
    if small:
        warnings.warn(small, stacklevel=2)
    check_batch_size(batch_size)
    score_fn = load_scorer(scorer) if scorer else None  # runs the scorer module's code: only when it is used
    a, b = _adapters(original, compressed, tokenizer, compressed_tokenizer, chat_template, max_new_tokens, names, task)
    perplexity = task.kind == "perplexity"
    setup = _prepare(a, b)
    rows, kls, agree, cosines = _run_examples(a, b, task, score_fn, perplexity, cache, progress, batch_size)
    ok = [r for r in rows if r.error is None]
    if not ok:
        raise ShrinkError(f"every example failed; the first: example {rows[0].id!r}: {rows[0].error}")
    slices = _slices(ok, task.kind != "tensor", perplexity)
    overall = _slice("overall", ok, perplexity)
    relative = relative and not perplexity  # perplexity changes are percentages already
    verdict = _judge(overall, slices, ok, tolerance, relative, perplexity)
    return Comparison(
        task={"name": task.name, "kind": task.kind, "source": task.source, "examples": len(task.examples),
              "batch_size": batch_size},
        original={**_model_info(a, [r.original_seconds for r in ok], names[0]), "setup_seconds": setup[0]},
        compressed={**_model_info(b, [r.compressed_seconds for r in ok], names[1]), "setup_seconds": setup[1]},
        tolerance=tolerance, relative=relative, overall=overall, slices=slices, examples=rows,
        divergence=_divergence(kls, agree, cosines), within=verdict.within, verdict=verdict.line,
        errors=len(rows) - len(ok), status=verdict.status, needed=verdict.needed,
    )


def store_original(original, task: Task | str | None, folder, key: str, *, tokenizer=None, scorer: str | None = None,
                   chat_template: bool | None = None, max_new_tokens: int = 32, batch_size: int = 16,
                   progress: bool | None = None) -> StoredOutcomes:
    """Run `original` alone over `task`, in the batches `compare_models` runs it in, and keep its outcomes in
    `folder` under `key` (what they depend on: the caller's digest of the model, task and options), so that
    `compare_models(stored.adapter(), compressed, task, cache=stored, ...)` compares without the original
    in memory, with the same results. Options as `compare_models` takes them (scorer, chat_template,
    max_new_tokens, batch_size must be those of that call)."""
    task = load_task(task)
    check_batch_size(batch_size)
    score_fn = load_scorer(scorer) if scorer else None
    a = adapter_for(original, tokenizer, chat_template, max_new_tokens)
    a.check_task(task)
    if hasattr(a, "prepare"):
        a.prepare()
    return run_original(a, task, folder, key, _batches(task, batch_size),
                        lambda ad, examples: _outcomes(ad, examples, task, score_fn, None),
                        _model_info(a, [], "")["bytes"], progress)


def _prepare(a: Adapter, b: Adapter) -> tuple[float, float]:
    """Each model's one-time setup (compiling shrink's runtime, once per machine), done before any example is
    timed and said apart when it took a while: (seconds for the original, for the compressed)."""
    out = []
    for ad in (a, b):
        t0 = time.perf_counter()
        if hasattr(ad, "prepare"):
            ad.prepare()
        out.append(round(time.perf_counter() - t0, 3))
    if max(out) >= 1.0:
        print(f"note: setting up the models took {out[0]:.1f} s and {out[1]:.1f} s (shrink's runtime compiled once "
              "per machine); not counted in their timings", file=sys.stderr)
    return out[0], out[1]


def _adapters(original, compressed, tokenizer, compressed_tokenizer, chat_template, max_new_tokens, names, task):
    """Both models as adapters, refused unless they are of one kind, see the same inputs, and run the task."""
    a = adapter_for(original, tokenizer, chat_template, max_new_tokens)
    b = adapter_for(compressed, compressed_tokenizer or tokenizer, chat_template, max_new_tokens)
    if a.kind != b.kind:
        raise ShrinkError(f"the models are of different kinds: {names[0]} is a {a.kind} model, {names[1]} a {b.kind} model")
    sa, sb = a.signature(), b.signature()
    if not same_inputs(a, b):
        what = "label sets" if sa and sa[0] == "labels" and sa[1] != sb[1] else "tokenizers"
        raise ShrinkError(f"the two models have different {what}; they must see exactly the same inputs")
    for ad in (a, b):
        ad.check_task(task)
    return a, b


def _run_examples(a: Adapter, b: Adapter, task: Task, score_fn, perplexity: bool, cache, progress, batch_size: int):
    """Every example through both models, in batches of similar length (both models get the same
    batches; the compressed one sees the original's tokens): the rows in the task's order, and per
    example the KL divergences, top-1 agreement and embedding cosines where the kind of model has them.
    `cache` holds the original's outcomes by example id: used when present, filled when not."""
    results = [None] * len(task.examples)
    bar = tqdm(total=len(task.examples), desc="compare", unit="example",
               disable=None if progress is None else not progress)
    for idx in _batches(task, batch_size):
        batch = [task.examples[i] for i in idx]
        todo = [ex for ex in batch if cache is None or ex.id not in cache]
        original = dict(zip([ex.id for ex in todo], _outcomes(a, todo, task, score_fn, None)))
        for ex in batch:
            if ex.id in original and cache is not None and not isinstance(original[ex.id][0], Exception):
                cache[ex.id] = original[ex.id]
            original.setdefault(ex.id, cache[ex.id] if cache is not None and ex.id in cache else None)
        ready = [ex for ex in batch if not isinstance(original[ex.id][0], Exception)]
        compressed = dict(zip([ex.id for ex in ready],
                              _outcomes(b, ready, task, score_fn, [original[ex.id][0].ids for ex in ready])))
        for i, ex in zip(idx, batch):
            results[i] = _example_row(ex, original[ex.id], compressed.get(ex.id), perplexity)
        bar.update(len(batch))
    bar.close()
    rows = [r for r, _, _ in results]
    kls = [kl for _, kl, _ in results if kl is not None]
    agree = [same for _, kl, same in results if kl is not None]
    cosines = [r.embedding_cosine for r in rows if r.embedding_cosine is not None]
    return rows, kls, agree, cosines


def _slices(ok: list[ExampleResult], by_length: bool, perplexity: bool) -> list[SliceResult]:
    """Kinds (in a mixed task), tags, then thirds by the original's confidence, then (text tasks) halves by
    input length; each row's slice names are set on it. Confidence is ranked within each kind (a margin
    between choices and a log-probability of a target are not on one scale)."""
    kinds = list(dict.fromkeys(r.kind for r in ok))
    thirds = ("confidence:low", "confidence:mid", "confidence:high")
    for kind in kinds:
        rows = [r for r in ok if r.kind == kind]
        for r, c in zip(rows, _rank_slices([r.confidence for r in rows], thirds)):
            r.slices = ([f"kind:{kind}"] if len(kinds) > 1 else []) + [f"tag:{t}" for t in r.tags] + [c]
    if by_length:
        for r, s in zip(ok, _rank_slices([r.length for r in ok], ("length:short", "length:long"))):
            r.slices.append(s)
    present = {s for r in ok for s in r.slices}
    fixed = ("confidence:low", "confidence:mid", "confidence:high", "length:short", "length:long")
    names_in_order = ([f"kind:{k}" for k in kinds] if len(kinds) > 1 else []) + \
        [f"tag:{t}" for t in dict.fromkeys(t for r in ok for t in r.tags)] + [n for n in fixed if n in present]
    return [_slice(n, [r for r in ok if n in r.slices], perplexity) for n in names_in_order]


def tolerance_text(tolerance: float, relative: bool, perplexity: bool, allowed_points: float | None = None) -> str:
    """How a tolerance reads in a verdict: "1 point, absolute", "5% of the original score, relative = 2.10
    points overall", "2% of perplexity"."""
    if perplexity:
        return f"{tolerance:g}% of perplexity"
    if relative:
        return f"{tolerance:g}% of the original score, relative = {allowed_points:.2f} points overall"
    return f"{tolerance:g} point{'' if tolerance == 1 else 's'}, absolute"


def _judge(overall: SliceResult, slices: list[SliceResult], ok: list[ExampleResult], tolerance: float,
           relative: bool, perplexity: bool) -> Verdict:
    """The verdict under the tolerance (the rule of `verdict.decide`); a result holding NaN is never within it:
    non-finite scores are past the sweet spot, non-finite outputs behind finite scores (KL divergence,
    embedding cosines) cannot tell."""
    def allowed(s: SliceResult) -> float:
        return allowed_drop(tolerance, relative, s.original)

    tol_text = tolerance_text(tolerance, relative, perplexity, allowed(overall))
    nan = [r.id for r in ok if not (math.isfinite(r.original_score) and math.isfinite(r.compressed_score))]
    if nan:
        shown = ", ".join(map(repr, nan[:5])) + (" ..." if len(nan) > 5 else "")
        return Verdict(PAST, f"{PAST} ({tol_text}): the scores hold NaN or infinity (examples {shown}); a model "
                             "produced non-finite outputs")
    verdict = decide(overall.change, overall.ci_low, overall.ci_high, allowed(overall), overall.n, tol_text,
                     "%" if perplexity else " points", _slice_past(slices, allowed, perplexity))
    bad = [r.id for r in ok if any(v is not None and not math.isfinite(v) for v in (r.kl_mean, r.embedding_cosine))]
    if bad and verdict.status != PAST:
        shown = ", ".join(map(repr, bad[:5])) + (" ..." if len(bad) > 5 else "")
        return Verdict(CANNOT_TELL, f"{CANNOT_TELL} ({tol_text}): a model produced NaN or infinite outputs (examples "
                                    f"{shown}: their KL divergence or cosine is not finite), so the scores cannot be "
                                    "trusted whatever they are; check the model for overflow or damaged weights")
    return verdict


def _divergence(kls, agree, cosines) -> dict:
    """KL divergence of next-token (or label) distributions, top-1 agreement, embedding cosines."""
    divergence = {}
    if kls:
        divergence["kl"] = divergence_summary(np.concatenate(kls))
        divergence["top1_agreement"] = float(np.concatenate(agree).mean())
    if cosines:
        divergence["embedding_cosine"] = {"mean": float(np.mean(cosines)), "min": float(np.min(cosines))}
    return divergence


def _model_info(ad: Adapter, secs: list[float], name: str) -> dict:
    m = getattr(ad, "model", None)
    size = ad.size_bytes() if hasattr(ad, "size_bytes") else model_bytes(m) if isinstance(m, torch.nn.Module) else None
    return {"name": name, "kind": ad.kind, "bytes": size, "seconds_per_example": float(np.median(secs)) if secs else None}
