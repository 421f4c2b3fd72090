"""The distillation loop: AdamW with warmup and cosine decay, gradient accumulation, periodic evaluation,
the best checkpoint kept, atomic checkpoints that resume exactly, and DistributedDataParallel under torchrun.

Where training is, is (step, epoch, offset): the data order of each epoch is a permutation drawn from the
seed and the epoch number, and each optimizer step takes the next `batch_size x world_size x grad_accum`
examples of it (rank r takes its contiguous share), so a resumed run, or the same global batch split over
more processes, sees exactly the same examples in the same steps.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_model as load_weights
from safetensors.torch import save_model
from tqdm.auto import tqdm

from ..core import processes
from ..core.atomic import atomic_dir, restore, write_json
from ..core.errors import ShrinkError
from ..core.model_outputs import kl_divergence, main_output, mean_pool
from .data import PADDED_KINDS, DistillData, split_padded
from .layerfit import layer_fit_loss, spans
from .losses import DIVERGENCES, distillation_loss, embedding_loss, hidden_state_loss


def _opt(default, help_text: str):
    """A config field with its help text (read by the command line, which shows both)."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class DistillConfig:
    """Options of a distillation run. Each field's default and help text are also `shrink distill`'s
    option of that name (the command line is generated from these fields)."""

    temperature: float = _opt(2.0, "Softening of both distributions (2 for language models, as DistilBERT used).")
    alpha: float = _opt(0.5, "Weight of the soft-target loss; 1 - alpha goes to hard labels.")
    divergence: str = _opt("forward", "Soft-target divergence: forward KL(teacher || student), reverse KL(student || "
                                      "teacher) (mode-seeking, as MiniLLM), or jsd (the generalized Jensen-Shannon "
                                      "divergence, beta 0.5, as GKD).")
    hidden_weight: float = _opt(0.0, "Weight of matching each student layer's hidden state to the teacher layer it "
                                     "came from (Hugging Face models of the same width).")
    hidden_loss: str = _opt("mse", "Loss of hidden-state matching: mse or cosine.")
    layer_fit_steps: int = _opt(0, "First steps (of --steps) fit each student layer alone to the span of teacher "
                                   "layers it stands for, on the teacher's hidden states; repairs a student built "
                                   "from the teacher before end-to-end distillation (0: off).")
    layer_fit_lr: float | None = _opt(None, "Peak learning rate of layer fitting, which has its own warmup and cosine "
                                            "decay (default: --lr).")
    steps: int = _opt(1000, "Optimizer steps (the learning-rate schedule spans them).")
    time_budget: float | None = _opt(None, "Stop after this many seconds (a checkpoint is written).")
    batch_size: int = _opt(8, "Examples per process per micro-step.")
    grad_accum: int = _opt(1, "Micro-steps per optimizer step.")
    lr: float = _opt(5e-4, "Peak learning rate of AdamW (warmup, then cosine).")
    weight_decay: float = _opt(0.01, "AdamW's weight decay.")
    warmup: float = _opt(0.05, "Fraction of the steps with a linearly rising learning rate.")
    max_grad_norm: float = _opt(1.0, "Gradients are clipped to this norm.")
    eval_every: int = _opt(100, "Evaluate on the held-out split every this many steps.")
    checkpoint_every: int = _opt(100, "Write a checkpoint every this many steps.")
    eval_batches: int | None = _opt(None, "Cap on evaluation batches (default: the whole held-out split).")
    seed: int = _opt(0, "Seed of the data order and of the student's new weights.")


@dataclass
class DistillResult:
    """What a run did: steps, evaluation history, best step, where things were written."""

    steps: int
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    seconds: float = 0.0
    out: str | None = None
    resumed_from: int | None = None


_world = processes.world


init_distributed = processes.join  # the names distillation's callers know
finish_distributed = processes.leave


def _average_gradients(model: nn.Module, world: int) -> None:
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def _schedule(cfg: DistillConfig):
    """Learning-rate factor per step: linear warmup, then cosine decay to zero. Layer fitting, when on,
    is a stage of its own with its own warmup and decay (at layer_fit_lr), followed by the main stage's."""
    fit = cfg.layer_fit_steps
    ratio = (cfg.layer_fit_lr or cfg.lr) / cfg.lr

    def stage(step, n):
        warm = max(1, int(cfg.warmup * n))
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, n - warm))))

    def f(step):
        return ratio * stage(step, fit) if step < fit else stage(step - fit, cfg.steps - fit)
    return f


class _Position:
    """Epoch and offset in the epoch's permutation; next global batch of `size` examples."""

    def __init__(self, n: int, seed: int, epoch: int = 0, offset: int = 0):
        self.n, self.seed, self.epoch, self.offset = n, seed, epoch, offset
        self._perm = None

    def perm(self):
        if self._perm is None or self._perm[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            self._perm = (self.epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def take(self, size: int) -> torch.Tensor:
        if size > self.n:
            raise ShrinkError(f"a global batch of {size} examples is larger than the training split ({self.n})")
        if self.offset + size > self.n:  # drop the incomplete last batch of the epoch
            self.epoch, self.offset = self.epoch + 1, 0
        idx = self.perm()[self.offset:self.offset + size]
        self.offset += size
        return idx


def _batch(data: DistillData, idx: torch.Tensor, train: bool = True):
    x = (data.train_x if train else data.eval_x)[idx]
    if data.kind == "text":
        return x, x[:, 1:]  # labels: next tokens (logits of the last position are dropped)
    if data.kind == "sentences":
        return x, None
    return x, (data.train_y if train else data.eval_y)[idx]


def _forward(model, x, kind: str, hidden: bool):
    """(outputs, hidden states or None): next-token logits (text), class logits (labelled, tensor), or
    mean-pooled embeddings over the text's tokens (sentences)."""
    if kind == "text":
        out = model(x, use_cache=False, output_hidden_states=hidden)
        return out.logits[:, :-1], (out.hidden_states if hidden else None)
    if kind in PADDED_KINDS:
        ids, mask = split_padded(x)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
        states = out.hidden_states if hidden else None
        if kind == "labelled":
            return out.logits, states
        return mean_pool(out.last_hidden_state, mask), states
    out = model(x)
    return main_output(out), None


def _token_mask(x, kind: str):
    """Which positions of hidden states are real tokens (None: all of them)."""
    return split_padded(x)[1].bool() if kind in PADDED_KINDS else None


def _selection(metrics: dict) -> float:
    """What the best checkpoint minimises: held-out cross-entropy, or for encoders the embedding distance."""
    return metrics["ce"] if "ce" in metrics else metrics["embedding_distance"]


@torch.no_grad()
def evaluate(student: nn.Module, teacher: nn.Module | None, data: DistillData, cfg: DistillConfig) -> dict:
    """Held-out metrics: the student's cross-entropy (and perplexity for LMs), KL(teacher || student) at
    T=1 and top-1 agreement with the teacher, and accuracies for classifiers; teacher and student on the
    same examples."""
    student.eval()
    n = len(data.eval_x)
    bs = cfg.batch_size
    if data.kind == "sentences":
        return _evaluate_embeddings(student, teacher, data, cfg)
    tot = {"ce": 0.0, "kl": 0.0, "agree": 0.0, "acc": 0.0, "teacher_acc": 0.0, "teacher_ce": 0.0, "count": 0}
    batches = range(0, n, bs)
    if cfg.eval_batches is not None:
        batches = list(batches)[:cfg.eval_batches]
    for i in batches:
        idx = torch.arange(i, min(n, i + bs))
        x, y = _batch(data, idx, train=False)
        s, _ = _forward(student, x, data.kind, False)
        s = s.float()
        count = y.numel()
        tot["ce"] += F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1), reduction="sum").item()
        pred = s.argmax(-1)
        tot["acc"] += (pred == y).sum().item()
        if teacher is not None:
            t, _ = _forward(teacher, x, data.kind, False)
            t = t.float()
            lp, lq = F.log_softmax(t, -1), F.log_softmax(s, -1)
            tot["kl"] += kl_divergence(lp, lq).sum().item()
            tot["agree"] += (t.argmax(-1) == pred).sum().item()
            tot["teacher_acc"] += (t.argmax(-1) == y).sum().item()
            tot["teacher_ce"] += F.cross_entropy(t.reshape(-1, t.shape[-1]), y.reshape(-1), reduction="sum").item()
        tot["count"] += count
    c = max(1, tot["count"])
    out = {"ce": tot["ce"] / c, "accuracy": tot["acc"] / c}
    if teacher is not None:
        out.update(kl=tot["kl"] / c, top1_agreement=tot["agree"] / c, teacher_accuracy=tot["teacher_acc"] / c,
                   teacher_ce=tot["teacher_ce"] / c)
    if data.kind == "text":
        out["perplexity"] = math.exp(min(out["ce"], 50))
        if teacher is not None:
            out["teacher_perplexity"] = math.exp(min(out["teacher_ce"], 50))
    student.train()
    return out


def _evaluate_embeddings(student, teacher, data: DistillData, cfg: DistillConfig) -> dict:
    """Held-out cosine similarity of the student's embeddings to the teacher's (mean and worst text)."""
    if teacher is None:
        raise ShrinkError("an encoder is distilled by matching the teacher's embeddings: it needs a teacher")
    sims = []
    batches = list(range(0, len(data.eval_x), cfg.batch_size))[:cfg.eval_batches]
    for i in batches:
        x = data.eval_x[i:i + cfg.batch_size]
        s, _ = _forward(student, x, data.kind, False)
        t, _ = _forward(teacher, x, data.kind, False)
        sims.append(F.cosine_similarity(s.float(), t.float(), dim=-1))
    sim = torch.cat(sims)
    student.train()
    return {"cosine": sim.mean().item(), "worst_cosine": sim.min().item(), "embedding_distance": 1 - sim.mean().item()}


def _save_checkpoint(folder: Path, student, opt, sched, step, pos, best, history, cfg, data):
    state = {"step": step, "epoch": pos.epoch, "offset": pos.offset, "rng": torch.get_rng_state(),
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "best": json.dumps(best),
             "history": json.dumps(history), "config": json.dumps(asdict(cfg)), "data": data.fingerprint,
             "world": _world()[1]}
    with atomic_dir(folder) as tmp:
        save_model(student, str(tmp / "student.safetensors"))  # tied weights stored once
        torch.save(state, tmp / "state.pt")


def _load_state_dict(model: nn.Module, path: Path):
    try:
        load_weights(model, str(path), strict=True)
    except Exception as e:
        raise ShrinkError(f"{path}: does not match the student ({type(e).__name__}: {str(e)[:300]})") from None


def _restore(out: Path | None, student, opt, sched, cfg: DistillConfig, data: DistillData):
    """Load out/checkpoint into student, optimizer, schedule and random state, after checking it was made
    with the same data and options; returns (step, position, history, best)."""
    if out is not None:
        restore(out / "checkpoint")  # killed while replacing it: the previous one is put back
    if out is None or not (out / "checkpoint" / "state.pt").is_file():
        raise ShrinkError(f"{out}: nothing to resume (no checkpoint/state.pt)")
    state = _read_state(out / "checkpoint" / "state.pt")
    if state["data"] != data.fingerprint:
        raise ShrinkError(f"{out}: the checkpoint was trained on other data (fingerprint {state['data']}, "
                          f"now {data.fingerprint})")
    saved_cfg = json.loads(state["config"])
    changed = {k for k, v in asdict(cfg).items() if k != "time_budget" and saved_cfg.get(k) != v}
    if changed:
        raise ShrinkError(f"{out}: resuming with different options {sorted(changed)} than the checkpoint")
    where = out / "checkpoint" / "state.pt"
    history, best = json.loads(state["history"]), json.loads(state["best"])
    if state["step"] > cfg.steps or state["offset"] > len(data):
        raise ShrinkError(f"{where}: step {state['step']} (offset {state['offset']}) is past this run's {cfg.steps} "
                          f"steps ({len(data)} sequences); the checkpoint is damaged or not this run's")
    def evaluation(m) -> bool:  # as evaluate() records it: its step, and the loss the best is chosen by
        loss = m.get("ce", m.get("embedding_distance")) if isinstance(m, dict) else None
        return isinstance(m.get("step") if isinstance(m, dict) else None, int) and isinstance(loss, (int, float))

    if (best is not None and not evaluation(best)) or not all(evaluation(h) for h in history):
        raise ShrinkError(f"{where}: field 'best' or 'history' does not hold evaluations (each with its step and "
                          "held-out loss); the checkpoint is damaged")
    _load_state_dict(student, out / "checkpoint" / "student.safetensors")
    for part, restore_it in (("optimizer", lambda: opt.load_state_dict(state["optimizer"])),
                             ("scheduler", lambda: sched.load_state_dict(state["scheduler"])),
                             ("rng", lambda: torch.set_rng_state(state["rng"]))):
        try:
            restore_it()
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise ShrinkError(f"{where}: field {part!r} cannot be restored ({type(e).__name__}: {str(e)[:120]}); "
                              "the checkpoint is damaged") from None
    pos = _Position(len(data), cfg.seed, state["epoch"], state["offset"])
    return state["step"], pos, history, best


def train_student(teacher: nn.Module | None, student: nn.Module, data: DistillData, cfg: DistillConfig | None = None, *,
            out: str | os.PathLike | None = None, resume: bool = False, layer_map: dict[int, int] | None = None,
            progress: bool | None = None, on_eval=None,
            teacher_cache: tuple[torch.Tensor, torch.Tensor] | None = None, augment=None) -> DistillResult:
    """Train `student` to imitate `teacher` on `data`, in place; returns the run's history.

    teacher: None trains the student on hard labels alone (the baseline distillation is measured against).
    out: folder for checkpoint/ (latest, written atomically every cfg.checkpoint_every steps), best/ (the
    student at its best held-out cross-entropy) and results.json. resume: continue from out/checkpoint.
    layer_map: student layer -> teacher layer for hidden-state matching (hidden_states indices, 0 = embeddings).
    on_eval: called as on_eval(step, metrics) after each evaluation (for example a task comparison).
    teacher_cache: (values, indices) of the teacher's top-k logits for every training example, from
    `teacher_topk`; the teacher then runs only for evaluation.
    augment: a function applied to each training batch of inputs (for example random shifts of images),
    drawing from torch's random generator, whose state checkpoints keep; not with a cached teacher.
    Under torchrun, call init_distributed() first: each rank trains on its share of every global batch.
    """
    cfg = cfg or DistillConfig()
    _check_config(cfg)
    rank, world = _world()
    torch.manual_seed(cfg.seed)
    fit_spans = _check_request(teacher, data, cfg, layer_map, teacher_cache, augment)
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    _check_shapes(teacher, student, data)
    if cfg.batch_size * world > len(data):
        raise ShrinkError(f"{data.source}: {len(data)} training examples are fewer than one global batch "
                          f"({cfg.batch_size} x {world} processes)")
    student.train()
    model = nn.parallel.DistributedDataParallel(student) if world > 1 else student
    loss_of = _Losses(teacher, student, model, cfg, data.kind, layer_map, fit_spans, teacher_cache)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    pos = _Position(len(data), cfg.seed)
    step, history, best = 0, [], None
    out = Path(out) if out is not None else None
    resumed = None
    if resume:
        step, pos, history, best = _restore(out, student, opt, sched, cfg, data)
        resumed = step

    global_batch = cfg.batch_size * world
    units = data.units_per_example() * global_batch * cfg.grad_accum
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc="distill", unit="step",
               disable=(rank != 0) or (None if progress is None else not progress))
    stop = False
    while step < cfg.steps and not stop:
        # one optimizer step: grad_accum micro-steps, each rank on its share of the global batch
        opt.zero_grad(set_to_none=True)
        parts_sum: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            idx = pos.take(global_batch)[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
            x, y = _batch(data, idx)
            if augment is not None:
                x = augment(x)
            fitting = step < cfg.layer_fit_steps  # the layers run outside DistributedDataParallel then
            sync = micro == cfg.grad_accum - 1 or world == 1
            with model.no_sync() if (world > 1 and not sync and not fitting) else contextlib.nullcontext():
                loss, parts = loss_of(step, x, y, idx)
                (loss / cfg.grad_accum).backward()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / cfg.grad_accum
            last_loss = loss.item()
        if world > 1 and step < cfg.layer_fit_steps:
            _average_gradients(student, world)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        step += 1

        elapsed = time.perf_counter() - t0
        rate = (step - (resumed or 0)) * units / max(elapsed, 1e-9)
        bar.set_postfix(loss=f"{last_loss:.4f}", **{f"{data.unit()}/s": f"{rate:,.0f}"})
        bar.update(1)
        out_of_time = cfg.time_budget is not None and elapsed >= cfg.time_budget
        if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
            metrics = {"step": step, "loss": last_loss, **parts_sum, "lr": sched.get_last_lr()[0],
                       "seconds": round(elapsed, 2), **evaluate(student, teacher, data, cfg)}
            history.append(metrics)
            if on_eval is not None:
                on_eval(step, metrics)
            if best is None or _selection(metrics) < _selection(best):
                best = metrics
                if out is not None and rank == 0:
                    with atomic_dir(out / "best") as tmp:
                        save_model(student, str(tmp / "student.safetensors"))
        if out is not None and rank == 0 and (step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time):
            _save_checkpoint(out / "checkpoint", student, opt, sched, step, pos, best, history, cfg, data)
        stop = _all_stop(out_of_time, world)
    bar.close()
    result = DistillResult(step, history, best, time.perf_counter() - t0, str(out) if out else None, resumed)
    if out is not None and rank == 0:
        write_json(out / "results.json", {"steps": step, "resumed_from": resumed, "seconds": result.seconds,
                                          "config": asdict(cfg), "data": {"source": data.source,
                                                                          "fingerprint": data.fingerprint,
                                                                          "train": len(data), "eval": len(data.eval_x)},
                                          "best": best, "history": history, "world_size": world})
    return result


def _check_request(teacher, data: DistillData, cfg: DistillConfig, layer_map, teacher_cache, augment):
    """Refuse combinations that cannot train; returns the teacher spans of layer fitting (None: off)."""
    use_hidden = cfg.hidden_weight > 0
    if use_hidden and (data.kind == "tensor" or not layer_map):
        raise ShrinkError("hidden-state matching needs Hugging Face models and a layer map (student layer -> teacher layer)")
    if teacher_cache is not None and augment is not None:
        raise ShrinkError("a cached teacher saw the inputs unchanged; it cannot be used with augmentation")
    if teacher_cache is not None and use_hidden:
        raise ShrinkError("hidden-state matching runs the teacher every step; it cannot use a cached teacher")
    fit_spans = None
    if cfg.layer_fit_steps:
        if teacher is None or data.kind != "text" or not layer_map:
            raise ShrinkError("layer fitting needs a teacher, Hugging Face models and a layer map (student layer -> "
                              "teacher layer); build the student from the teacher")
        if teacher_cache is not None:
            raise ShrinkError("layer fitting runs the teacher every step; it cannot use a cached teacher")
        fit_spans = spans(layer_map)
    if teacher is None and cfg.alpha > 0:
        raise ShrinkError("alpha > 0 needs a teacher (alpha=0 trains on hard labels alone)")
    if data.kind == "sentences" and (teacher is None or teacher_cache is not None):
        raise ShrinkError("an encoder is distilled by matching the teacher's embeddings at every step: it needs "
                          "a teacher, and cannot use a cache of top-k logits")
    return fit_spans


class _Losses:
    """The loss of one micro-step and its parts: layer fitting in its first steps, then soft targets (from
    the teacher, or its cached top-k) mixed with hard labels, or for encoders the embedding loss; plus
    hidden-state matching when weighted."""

    def __init__(self, teacher, student, model, cfg: DistillConfig, kind: str, layer_map, fit_spans, teacher_cache):
        self.teacher, self.student, self.model, self.cfg, self.kind = teacher, student, model, cfg, kind
        self.layer_map, self.fit_spans, self.teacher_cache = layer_map, fit_spans, teacher_cache
        self.use_hidden = cfg.hidden_weight > 0

    def __call__(self, step: int, x, y, idx) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        if step < cfg.layer_fit_steps:
            loss = layer_fit_loss(self.teacher, self.student, x, self.fit_spans)
            return loss, {"layer_fit": loss.item()}
        s_logits, s_hidden = _forward(self.model, x, self.kind, self.use_hidden)
        t_logits = t_hidden = topk = None
        if self.teacher_cache is not None:
            topk = (self.teacher_cache[0][idx].float(), self.teacher_cache[1][idx].long())
        elif self.teacher is not None and (cfg.alpha > 0 or self.kind == "sentences"):
            with torch.no_grad():
                t_logits, t_hidden = _forward(self.teacher, x, self.kind, self.use_hidden)
        if self.kind == "sentences":
            loss = embedding_loss(s_logits, t_logits)
            parts = {"embedding": loss.item()}
        else:
            loss, parts = distillation_loss(s_logits, t_logits, y, temperature=cfg.temperature, alpha=cfg.alpha,
                                            teacher_topk=topk, kind=cfg.divergence)
        if self.use_hidden:
            mask = _token_mask(x, self.kind)
            h = sum(hidden_state_loss(s_hidden[si], t_hidden[ti], cfg.hidden_loss, mask)
                    for si, ti in self.layer_map.items()) / len(self.layer_map)
            loss = loss + cfg.hidden_weight * h
            parts["hidden"] = h.item()
        return loss, parts


def _all_stop(out_of_time: bool, world: int) -> bool:
    """Whether to stop: when any rank ran out of time, all ranks stop together."""
    if world > 1:
        flag = torch.tensor([1.0 if out_of_time else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
    return out_of_time


STATE_KEYS = ("step", "epoch", "offset", "rng", "optimizer", "scheduler", "best", "history", "config", "data")


def _read_state(path: Path) -> dict:
    try:
        state = torch.load(path, weights_only=True)  # never unpickles arbitrary objects
    except Exception as e:
        raise ShrinkError(f"{path}: not a readable shrink checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ShrinkError(f"{path}: not a shrink distillation checkpoint (missing {missing})")
    kinds = {"step": int, "epoch": int, "offset": int, "rng": torch.Tensor, "optimizer": dict, "scheduler": dict,
             "best": str, "history": str, "config": str, "data": str}
    for k, kind in kinds.items():
        v = state[k]
        if not isinstance(v, kind) or isinstance(v, bool) or (kind is int and v < 0):
            raise ShrinkError(f"{path}: field {k!r} must be {'a non-negative integer' if kind is int else kind.__name__}, "
                              f"got {type(v).__name__}")
    for k, kind, want in (("best", (dict, type(None)), "an object or null"), ("history", list, "a list"),
                          ("config", dict, "an object")):
        try:
            value = json.loads(state[k])
        except (ValueError, RecursionError, TypeError) as e:
            raise ShrinkError(f"{path}: field {k!r} is not valid JSON ({str(e)[:80]})") from None
        if not isinstance(value, kind):
            raise ShrinkError(f"{path}: field {k!r} holds {type(value).__name__}, expected {want}")
    return state


MAX_SEED = 2 ** 32 - 1  # the data order's generator takes seed * 100003 + epoch, which must fit in 64 bits


def _check_config(cfg: DistillConfig) -> None:
    problems = []
    if not (math.isfinite(cfg.temperature) and cfg.temperature > 0):
        problems.append(f"temperature must be > 0 (got {cfg.temperature})")
    if not 0 <= cfg.alpha <= 1:  # also refuses NaN
        problems.append(f"alpha must be between 0 and 1 (got {cfg.alpha})")
    if cfg.divergence not in DIVERGENCES:
        problems.append(f"divergence must be one of {', '.join(DIVERGENCES)} (got {cfg.divergence!r})")
    if not (math.isfinite(cfg.hidden_weight) and cfg.hidden_weight >= 0):
        problems.append(f"hidden_weight must be 0 or more (got {cfg.hidden_weight})")
    if not 0 <= cfg.layer_fit_steps <= cfg.steps:
        problems.append(f"layer_fit_steps must be between 0 and steps ({cfg.steps}), got {cfg.layer_fit_steps}")
    for name in ("steps", "batch_size", "grad_accum", "eval_every", "checkpoint_every"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be at least 1 (got {getattr(cfg, name)})")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0) or (
            cfg.layer_fit_lr is not None and not (math.isfinite(cfg.layer_fit_lr) and cfg.layer_fit_lr > 0)):
        problems.append(f"lr and layer_fit_lr must be > 0 (got {cfg.lr}, {cfg.layer_fit_lr})")
    if cfg.hidden_loss not in ("mse", "cosine"):
        problems.append(f"hidden_loss must be 'mse' or 'cosine' (got {cfg.hidden_loss!r})")
    if not (isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool) and 0 <= cfg.seed <= MAX_SEED):
        problems.append(f"seed must be an integer from 0 to {MAX_SEED} (got {cfg.seed!r})")
    if problems:
        raise ShrinkError("distillation options: " + "; ".join(problems))


@torch.no_grad()
def _check_shapes(teacher: nn.Module | None, student: nn.Module, data: DistillData) -> None:
    """Before training: the student must run on the data and predict over the same classes (vocabulary) as
    the teacher, or, without one, over at least the labels the data has; checked on one example."""
    x = data.train_x[:1]
    was = student.training
    student.eval()
    try:
        t = _forward(teacher, x, data.kind, False)[0] if teacher is not None else None
    except Exception as e:
        raise ShrinkError(f"cannot run the teacher on {data.source} ({type(e).__name__}: {str(e)[:200]})") from None
    try:
        s, _ = _forward(student, x, data.kind, False)
    except Exception as e:
        raise ShrinkError(f"the student does not fit the data {data.source}: its first example, of shape "
                          f"{tuple(x.shape[1:])}, fails in the student ({type(e).__name__}: {str(e)[:200]})") from None
    finally:
        student.train(was)
    what = {"text": "vocabulary", "sentences": "embedding width"}.get(data.kind, "classes")
    if t is not None and t.shape != s.shape:
        raise ShrinkError(f"the student's outputs {tuple(s.shape)} do not match the teacher's {tuple(t.shape)} "
                          f"(different {what}: {s.shape[-1]} vs {t.shape[-1]})")
    if data.kind == "sentences":
        return
    labels = data.train_y if data.kind != "text" else data.train_x
    top = int(labels.max()) if labels.numel() else -1
    if s.shape[-1] <= top:
        raise ShrinkError(f"the student predicts {s.shape[-1]} {what}, but {data.source} has label or token {top}")
