"""Quantization-aware distillation: the quantized model trained end to end to match the original's outputs.

Block tuning (tune.py) matches each block's output to the full-precision block's; here the whole quantized
model is the student and the original the teacher, the loss the KL divergence of the student's next-token
distribution from the teacher's (over the teacher's top k tokens, renormalised, as distillation caches
them), on the user's text. What trains is what block tuning trains: every quantized layer's fp16 group scales
(relative changes) and the norms' weights; the integer codes stay (or, asked, train too through a
straight-through estimator, each still one of its format's codes), so the packed format and the kernels are
unchanged (EfficientQAT's end-to-end step, on a budget of steps or seconds). Some windows are held out: their
KL before and after is measured, and the result is kept only if it went down. With a checkpoint folder, the
trained changes and the optimizer's state are written there every minute and when interrupted; a resumed
run continues from them exactly (the same steps, the same scales), once it has checked the checkpoint was
made for the same quantized model, data and settings.

Memory: trained as a whole, the graph of one window holds every layer's weights in float32 (and the codes
as float levels). When that does not fit (or asked, `blockwise=True`), training goes a block at a time:
each layer's levels are unpacked from its codes while it computes, and each decoder block keeps only its
input in the forward pass and runs again in the backward (activation checkpointing), so the peak is the
packed model, one block in float32 and the blocks' inputs. The steps compute the same numbers either way.
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute
from tqdm.auto import tqdm

from ..core.architecture import find_stacks
from ..core.atomic import atomic_dir
from ..core.errors import ShrinkError
from ..core.memory import MemoryEstimate, release_freed_memory, resident_memory
from .linear import QuantLinear
from .tune import Trainable

DEFAULT_TOP_K = 64
CHECKPOINT_EVERY = 60.0  # seconds of training between checkpoints
STATE = "state.pt"


@dataclass
class QADResult:
    """What quantization-aware distillation did: steps taken in `seconds`, the mean KL on the held-out windows
    before and after (per token, nats, over the teacher's top k), and whether the trained scales were kept."""

    steps: int
    seconds: float
    kl_before: float
    kl_after: float
    kept: bool
    train_windows: int
    held_out_windows: int
    top_k: int
    resumed_from: int | None = None
    blockwise: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def teacher_targets(model: torch.nn.Module, windows: list[torch.Tensor], top_k: int = DEFAULT_TOP_K) -> list:
    """The model's top-k next-token log-probabilities and their token ids for each window, as (values [T, k],
    ids [T, k]): the teacher's outputs, taken before the model is quantized (it is quantized in place)."""
    with torch.no_grad():
        return [top_tokens(model(w.reshape(1, -1), use_cache=False).logits[0], top_k) for w in windows]


def check_windows(windows: list) -> None:
    """ShrinkError unless `windows` are token windows, at least 2 (one to train on, one held out)."""
    if not all(isinstance(w, torch.Tensor) and not w.is_floating_point() for w in windows):
        raise ShrinkError("quantization-aware distillation takes token windows of a causal language model")
    if len(windows) < 2:
        raise ShrinkError(f"quantization-aware distillation needs at least 2 windows of data (one to train on, one "
                          f"held out), got {len(windows)}: give more text, or shorter windows")


def check_resumable(checkpoint, resume: bool) -> None:
    """With `resume`, ShrinkError unless `checkpoint` holds a training state (checked before the work that
    comes before QAD)."""
    if resume and (checkpoint is None or not (Path(checkpoint) / STATE).is_file()):
        raise ShrinkError(f"{checkpoint}: nothing to resume (no {STATE}); run without --resume to start afresh")


def qad_record(result: QADResult, data: dict, qad) -> dict:
    """What shrink.json's calibration["qad"] says of a QAD step: its result, its data and its settings."""
    return {**result.to_dict(), "data": data, "lr": qad.lr, "budget_steps": qad.steps,
            "budget_seconds": qad.seconds, "codes_lr": qad.codes_lr}


def top_tokens(logits: torch.Tensor, top_k: int = DEFAULT_TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """A window's targets from its logits [T, vocab]: the top-k log-probabilities of each position but the
    last (which predicts past the window) and their token ids."""
    logp = F.log_softmax(logits[:-1].float(), -1)
    return logp.topk(min(top_k, logp.shape[-1]), -1)


def _kl(model: torch.nn.Module, window: torch.Tensor, target) -> torch.Tensor:
    """Mean KL(teacher || student) per position over the teacher's top k tokens (both renormalised there)."""
    values, ids = target
    logits = model(window.reshape(1, -1), use_cache=False).logits[0, :-1]
    student = F.log_softmax(logits.float(), -1).gather(-1, ids)
    teacher = values.log_softmax(-1)
    return (teacher.exp() * (teacher - student.log_softmax(-1))).sum(-1).mean()


def distill_quantized(model: torch.nn.Module, windows: list[torch.Tensor], targets: list, *, steps: int = 0,
                      seconds: float | None = None, lr: float = 1e-3, norm_lr: float = 1e-4,
                      progress: bool | None = None, say=print, checkpoint: str | Path | None = None,
                      resume: bool = False, every: float = CHECKPOINT_EVERY, codes_lr: float = 0.0,
                      blockwise: bool | None = None) -> QADResult:
    """Train `model`'s quantized layers' scales and its norms' weights (codes fixed) so its next-token
    distributions on `windows` approach `targets` (`teacher_targets` of the original on the same windows).

    The last eighth of the windows (at least one) is held out: its KL is measured before and after, and the
    change is kept only if it went down. steps: Adam steps, one window each, cycling (0: as many as `seconds`
    allows); seconds: a time budget (None: `steps` alone); lr, norm_lr: learning rates of the scales' and the
    norms' relative changes (defaults 1e-3, 1e-4); codes_lr: above 0, the codes train too, by a
    straight-through estimator (tune._Tunable), at this rate in code steps (default 0: fixed). checkpoint: a folder the training state is written to
    every `every` seconds (default 60) and on an interruption (default None: none); resume: continue from it
    (the budget counts the steps and seconds already spent). blockwise: train a block at a time (True), the
    whole graph at once (False), or the latter when `qad_memory` says it fits and the former otherwise
    (default None; said when chosen); the codes cannot train a block at a time. ShrinkError before any
    training for fewer than two windows, no budget, a budget of seconds below one step's estimated time, a
    step that does not fit in the memory available either way, or a checkpoint to resume that is missing,
    damaged or made for another model, data or settings.
    """
    check_windows(windows)
    if len(windows) != len(targets):
        raise ShrinkError(f"quantization-aware distillation: {len(windows)} windows but {len(targets)} targets")
    if not steps and not seconds:
        raise ShrinkError("quantization-aware distillation needs a budget: steps or seconds")
    held = max(1, len(windows) // 8)
    train, test = list(zip(windows, targets))[:-held], list(zip(windows, targets))[-held:]
    if not _trained(model):
        raise ShrinkError("quantization-aware distillation trains quantized layers' scales: the model has none")
    blockwise = _choose(model, max(int(w.numel()) for w in windows), codes_lr > 0, blockwise, say)
    trainable = Trainable(model, codes=codes_lr > 0, lazy=blockwise)

    def held_out() -> float:
        with torch.no_grad():
            return sum(float(_kl(model, w, t)) for w, t in test) / len(test)

    folder = Path(checkpoint) if checkpoint is not None else None
    if resume and folder is None:
        raise ShrinkError("resuming quantization-aware distillation needs its checkpoint folder")
    fingerprint = _fingerprint(trainable, windows, targets, lr, norm_lr, codes_lr) if folder is not None else None
    opt = torch.optim.Adam(trainable.params(lr, norm_lr, codes_lr))
    params = [p for group in opt.param_groups for p in group["params"]]
    done, spent_before, resumed = 0, 0.0, None
    if resume:
        done, spent_before, before = _load(folder, fingerprint, params, opt)
        resumed = done
        say(f"quantization-aware distillation resumed from {folder} at step {done} ({spent_before:.0f} s spent)")
    t0 = time.perf_counter()
    if not resume:
        before = held_out()
    per_window = (time.perf_counter() - t0) / len(test)
    if seconds is not None and not resume and seconds < 3 * per_window:  # a step: forward and backward, ~3 forwards
        raise ShrinkError(f"a time budget of {seconds:g} s is below one training step here (about {3 * per_window:.1f} s "
                          "for a window): give more time, or shorter windows")
    total = steps or None
    start = time.perf_counter() - spent_before
    saved_at = time.perf_counter()
    bar = tqdm(total=total, initial=done, desc="qad", unit="step", disable=None if progress is None else not progress)

    def save() -> None:
        _save(folder, params, opt, done, time.perf_counter() - start, before, fingerprint)

    with _recomputed(model, blockwise), trainable, torch.enable_grad():  # (the blocks found before the swap)
        try:
            while (not steps or done < steps) and (seconds is None or time.perf_counter() - start < seconds):
                window, target = train[done % len(train)]
                trainable.weights()
                loss = _kl(model, window, target)
                if not torch.isfinite(loss):
                    raise ShrinkError(f"quantization-aware distillation: the loss is {float(loss.detach())} at step {done}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
                release_freed_memory()  # (else the allocator's heap grows step by step: freed, not returned)
                bar.update()
                bar.set_postfix(kl=f"{float(loss.detach()):.4f}")
                if folder is not None and time.perf_counter() - saved_at >= every:
                    save()
                    saved_at = time.perf_counter()
        except KeyboardInterrupt:
            if folder is not None and done > (resumed or 0):
                save()
                say(f"quantization-aware distillation interrupted at step {done}: its state is in {folder}; "
                    "run again with --resume to continue")
            raise
    bar.close()
    spent = time.perf_counter() - start
    saved = trainable.keep()
    after = held_out()
    kept = after < before
    if not kept:
        trainable.undo(saved)
        say(f"quantization-aware distillation did not lower the held-out KL ({before:.4f} -> {after:.4f}): "
            "the scales are kept as they were")
    else:
        say(f"quantization-aware distillation: held-out KL {before:.4f} -> {after:.4f} in {done} steps ({spent:.0f} s)")
    return QADResult(done, spent, before, after if kept else before, kept, len(train), len(test),
                     int(targets[0][1].shape[-1]), resumed, blockwise)


@contextmanager
def _recomputed(model: torch.nn.Module, on: bool):
    """While in it, with `on`: each block of the model's stacks keeps only its inputs for the backward pass
    and runs again there (activation checkpointing; the random state is restored for the rerun)."""
    blocks = _blocks(model) if on else []
    for b in blocks:
        def forward(*args, _run=b.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _run(*args, **kwargs)
            return recompute(_run, *args, use_reentrant=False, **kwargs)
        b.forward = forward  # an instance attribute over the class's method, removed after
    try:
        yield
    finally:
        for b in blocks:
            del b.forward


def _trained(model: torch.nn.Module) -> list[QuantLinear]:
    """The quantized layers whose scales QAD trains (as tune.Trainable picks them: not a tied output layer)."""
    return [m for m in model.modules() if isinstance(m, QuantLinear) and not m.__dict__.get("shares_buffers")]


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of the model's stacks, their layers quantized or not."""
    return [b for _, stack in find_stacks(model, layers=(torch.nn.Linear, QuantLinear)) for b in stack]


def qad_memory(model: torch.nn.Module, length: int, *, blockwise: bool, codes: bool = False) -> MemoryEstimate:
    """The peak memory one QAD step adds to what the process holds, from the model's shapes: the trained
    parameters with their gradients and Adam's moments; whole (blockwise False), every quantized weight as
    float32 levels (and trained codes' gradients and moments) and the graph of a window of `length` tokens
    through every block; a block at a time, each block's input and one block's float32 weights and graph;
    and the logits of the window either way."""
    config = getattr(model, "config", None)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    quant = _trained(model)
    trained = sum(int(m.scales.numel() if m.superscales is None else m.superscales.numel()) for m in quant)
    stacks = _blocks(model)

    def graph(block) -> int:  # a block's saved activations for one window (a rough upper bound, float32)
        linears = [m for m in block.modules() if isinstance(m, (torch.nn.Linear, QuantLinear))]
        widths = sum(m.out_features for m in linears) + sum(m.in_features for m in linears)
        return 4 * length * (widths + 4 * hidden) + 4 * 3 * heads * length * length

    def weights(mods) -> int:
        return sum(m.in_features * m.out_features for m in mods)

    parts = {"trained parameters, gradients and Adam's moments": 4 * 4 * trained,
             "logits, log-probabilities and their gradients": 6 * 4 * length * vocab}  # (measured: 6 copies)
    if blockwise:
        largest = max(stacks, key=lambda b: weights(m for m in b.modules() if isinstance(m, QuantLinear)),
                      default=None)
        parts["each block's input"] = 4 * length * hidden * len(stacks)
        if largest is not None:
            n = weights(m for m in largest.modules() if isinstance(m, QuantLinear))
            parts["one block in float32, its graph"] = 3 * 4 * n + graph(largest)
    else:
        n = weights(quant)
        parts["the quantized weights as float32 levels"] = 4 * n * (4 if codes else 1)
        parts["every block's graph, its weights in float32"] = 4 * n + sum(graph(b) for b in stacks)
    how = "a block at a time" if blockwise else "whole"
    return MemoryEstimate(f"quantization-aware distillation ({how})", resident_memory(), {"a training step": parts})


def _choose(model: torch.nn.Module, length: int, codes: bool, blockwise: bool | None, say) -> bool:
    """Whether to train a block at a time: as asked, else whole when that fits. ShrinkError when the step
    does not fit either way (or a block at a time with the codes trained)."""
    if blockwise and not _blocks(model):
        raise ShrinkError(f"{type(model).__name__} has no stack of blocks: quantization-aware distillation cannot "
                          "train it a block at a time")
    if blockwise and codes:
        raise ShrinkError("quantization-aware distillation of the codes holds them as float levels: it cannot train "
                          "a block at a time (leave out --qad-codes-lr)")
    if blockwise is None:
        whole = qad_memory(model, length, blockwise=False, codes=codes)
        try:
            whole.refuse_unless_fits()
            say(whole.line())
            return False
        except ShrinkError:
            if codes or not _blocks(model):
                raise ShrinkError(f"{whole.what}: estimated peak memory {whole.total / 1e9:.1f} GB, more than "
                                  "available" + ("; without --qad-codes-lr it trains a block at a time in less" if codes else "")) from None
        blockwise = True
        say(f"quantization-aware distillation trains a block at a time: whole, it would need about "
            f"{whole.total / 1e9:.1f} GB")
    estimate = qad_memory(model, length, blockwise=blockwise, codes=codes)
    estimate.refuse_unless_fits("shorter windows (--seq-len) lower it" if blockwise else "")
    say(estimate.line())
    return bool(blockwise)


def _fingerprint(trainable: Trainable, windows: list, targets: list, lr: float, norm_lr: float,
                 codes_lr: float = 0.0) -> str:
    """What a checkpoint must have been made from: what trains, as it was before training (the codes and
    scales of the layers `trainable` trains, the weights of its norms), the windows, the teacher's targets
    and the learning rates."""
    h = hashlib.sha256(f"{lr!r} {norm_lr!r} {codes_lr!r}".encode())
    tensors = [t for name, q in trainable.quant.items()
               for t in (name.encode(), q.qweight, q.scales, *([] if q.superscales is None else [q.superscales]))]
    tensors += trainable.norm0
    tensors += [t for w, (values, ids) in zip(windows, targets) for t in (w, values, ids)]
    for t in tensors:
        h.update(t if isinstance(t, bytes) else t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _save(folder: Path, params: list, opt, step: int, seconds: float, kl_before: float, fingerprint: str) -> None:
    """The training state, written whole or not at all (a folder swapped in)."""
    state = {"fingerprint": fingerprint, "step": step, "seconds": float(seconds), "kl_before": float(kl_before),
             "params": [p.detach().clone() for p in params], "optimizer": opt.state_dict()}
    with atomic_dir(folder) as tmp:
        torch.save(state, tmp / STATE)


def _load(folder: Path, fingerprint: str, params: list, opt) -> tuple[int, float, float]:
    """Restore a checkpoint's trained changes and optimizer state into `params` and `opt`; (step, seconds
    spent, held-out KL before training). ShrinkError naming the folder for anything that does not fit."""
    path = folder / STATE
    if not path.is_file():
        raise ShrinkError(f"{folder}: nothing to resume (no {STATE}); run without --resume to start afresh")
    try:
        state = torch.load(path, weights_only=True)  # tensors and plain values only: nothing is unpickled
    except Exception as e:  # noqa: BLE001 - any damage: one line naming the file
        raise ShrinkError(f"{path}: not a readable QAD checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    kinds = {"fingerprint": str, "step": int, "seconds": float, "kl_before": float, "params": list, "optimizer": dict}
    for key, kind in kinds.items():
        if not isinstance(state, dict) or not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise ShrinkError(f"{path}: field {key!r} missing or not {kind.__name__}; not a QAD checkpoint")
    if state["fingerprint"] != fingerprint:
        raise ShrinkError(f"{folder}: the checkpoint was made for another quantized model, data or learning rate "
                          "(the codes and scales before training, the windows or the teacher's outputs differ); "
                          "run without --resume to start afresh")
    saved = state["params"]
    if len(saved) != len(params) or any(not isinstance(a, torch.Tensor) or a.shape != b.shape
                                        for a, b in zip(saved, params)):
        raise ShrinkError(f"{path}: its trained changes do not fit the model's quantized layers and norms")
    with torch.no_grad():
        for p, v in zip(params, saved):
            p.copy_(v)
    try:
        opt.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise ShrinkError(f"{path}: its optimizer state does not fit ({str(e)[:200]})") from None
    return state["step"], state["seconds"], state["kl_before"]


def parse_seconds(text: str) -> float:
    """A duration: seconds ("90", "90s"), minutes ("20m") or hours ("1.5h"); ValueError naming it."""
    units = {"s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    scale = units.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 1)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (e.g. 90s, 20m, 1.5h)") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{text!r}: a duration must be positive")
    return value
