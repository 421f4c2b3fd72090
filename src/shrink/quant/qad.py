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
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.atomic import atomic_dir
from ..core.errors import ShrinkError
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

    def to_dict(self) -> dict:
        return asdict(self)


def teacher_targets(model: torch.nn.Module, windows: list[torch.Tensor], top_k: int = DEFAULT_TOP_K) -> list:
    """The model's top-k next-token log-probabilities and their token ids for each window, as (values [T, k],
    ids [T, k]): the teacher's outputs, taken before the model is quantized (it is quantized in place)."""
    out = []
    with torch.no_grad():
        for w in windows:
            logp = F.log_softmax(model(w.reshape(1, -1)).logits[0, :-1].float(), -1)
            values, ids = logp.topk(min(top_k, logp.shape[-1]), -1)
            out.append((values, ids))
    return out


def _kl(model: torch.nn.Module, window: torch.Tensor, target) -> torch.Tensor:
    """Mean KL(teacher || student) per position over the teacher's top k tokens (both renormalised there)."""
    values, ids = target
    student = F.log_softmax(model(window.reshape(1, -1)).logits[0, :-1].float(), -1).gather(-1, ids)
    teacher = values.log_softmax(-1)
    return (teacher.exp() * (teacher - student.log_softmax(-1))).sum(-1).mean()


def distill_quantized(model: torch.nn.Module, windows: list[torch.Tensor], targets: list, *, steps: int = 0,
                      seconds: float | None = None, lr: float = 1e-3, norm_lr: float = 1e-4,
                      progress: bool | None = None, say=print, checkpoint: str | Path | None = None,
                      resume: bool = False, every: float = CHECKPOINT_EVERY, codes_lr: float = 0.0) -> QADResult:
    """Train `model`'s quantized layers' scales and its norms' weights (codes fixed) so its next-token
    distributions on `windows` approach `targets` (`teacher_targets` of the original on the same windows).

    The last eighth of the windows (at least one) is held out: its KL is measured before and after, and the
    change is kept only if it went down. steps: Adam steps, one window each, cycling (0: as many as `seconds`
    allows); seconds: a time budget (None: `steps` alone); lr, norm_lr: learning rates of the scales' and the
    norms' relative changes (defaults 1e-3, 1e-4); codes_lr: above 0, the codes train too, by a
    straight-through estimator (tune._Tunable), at this rate in code steps (default 0: fixed). checkpoint: a folder the training state is written to
    every `every` seconds (default 60) and on an interruption (default None: none); resume: continue from it
    (the budget counts the steps and seconds already spent). ShrinkError before any training for fewer than
    two windows, no budget, a budget of seconds below one step's estimated time, or a checkpoint to resume
    that is missing, damaged or made for another model, data or settings.
    """
    if not all(isinstance(w, torch.Tensor) and not w.is_floating_point() for w in windows):
        raise ShrinkError("quantization-aware distillation takes token windows of a causal language model")
    if len(windows) < 2 or len(windows) != len(targets):
        raise ShrinkError(f"quantization-aware distillation needs at least 2 windows of data (one to train on, one "
                          f"held out), got {len(windows)}: give more text, or shorter windows")
    if not steps and not seconds:
        raise ShrinkError("quantization-aware distillation needs a budget: steps or seconds")
    held = max(1, len(windows) // 8)
    train, test = list(zip(windows, targets))[:-held], list(zip(windows, targets))[-held:]
    trainable = Trainable(model, codes=codes_lr > 0)
    if not trainable.quant:
        raise ShrinkError("quantization-aware distillation trains quantized layers' scales: the model has none")

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

    with trainable, torch.enable_grad():
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
                     int(targets[0][1].shape[-1]), resumed)


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
