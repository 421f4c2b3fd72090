"""Calibrated quantization: GPTQ, activation-aware scaling, and mixed precision, block by block.

Each block of the model (a decoder layer) is quantized in turn on the calibration inputs it receives
from the already quantized blocks before it, so errors are corrected where they arise and memory holds
one block's activations at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.model_outputs import kl_divergence, main_output
from . import awq
from ..core.errors import ShrinkError
from .distributed import my_share, world
from .experts import expert_layers
from .gptq import gptq_quantize
from ..core.architecture import find_stacks
from .layerwise import blockwise, call_model, capture_inputs, collect_stats, first_output, run_block
from .linear import QuantLinear
from .mixed import DEFAULT_LADDER
from .recipe import GPTQ, Recipe, parse_method
from .replace import round_to_nearest, set_submodule
from .rtn import quantize_weight
from .spec import QuantSpec, parse_format
from .tune import tune_block

AWQ_ROWS = 512  # input rows kept per layer for the scale and clipping searches (spread over the data)
CLIP_ROWS = 256


@dataclass
class CalibrationReport:
    """What calibrated quantization did, per layer: method details, dampening, chosen scales."""

    method: str
    layers: dict[str, dict] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)

    def warnings(self) -> list[str]:
        out = [f"{n}: Hessian singular, dampening raised to {d['damp']:g}" for n, d in self.layers.items()
               if d.get("damp_retries")]
        out += [f"{n}: {d['note']}" for n, d in self.layers.items() if str(d.get("note", "")).startswith("no calibration")]
        return out + [f"{n}: {d['awq_fold']}" for n, d in self.layers.items()
                      if str(d.get("awq_fold", "")).startswith("not applied")]


def _linear_names(block: nn.Module, prefix: str, assignment: dict[str, QuantSpec | None]) -> list[str]:
    """Relative names of the block's Linear layers that are to be quantized to an integer format."""
    out = []
    for name, m in block.named_modules():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(m, nn.Linear) and assignment.get(full) is not None and not assignment[full].cast:
            out.append(name)
    return out


def _output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's main output on one calibration sample (logits, or an encoder's hidden states), float32."""
    return main_output(call_model(model, x)).float()


def _divergence(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Mean KL(ref || out) over positions for logits; mean squared error relative to ref otherwise."""
    if ref.dim() == 3:  # [batch, positions, vocabulary]: next-token distributions
        lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(out, -1)
        return float(kl_divergence(lp, lq).mean())
    return float(((out - ref) ** 2).mean() / (ref ** 2).mean().clamp(min=1e-12))


def measure_sensitivity(model: nn.Module, samples, assignment, ladder=DEFAULT_LADDER, progress=None,
                        probe_samples: int = 1, probe_tokens: int = 256, around=None):
    """Per-layer sensitivity to each format of `ladder`: the divergence of the model's output from its
    full-precision output (KL of next-token distributions for language models) when that layer alone
    is rounded to the format, on the first `probe_tokens` tokens of the first `probe_samples` calibration
    samples. The widest format of the ladder counts as lossless for this purpose.

    A model with one stack of blocks is walked block by block: the full-precision hidden states reach each
    block once, each layer-and-format trial starts from them at its own block and runs through the blocks
    after it only (the same arithmetic as running the whole model with that layer rounded, minus the blocks
    before it, which compute exactly what they did). So memory holds one block at a time plus every
    trial's hidden states, and the blocks may be on disk: around (`layerwise.BlockHooks`) gives each its
    weights and takes them back (default None: in memory). Other models run the whole model per trial.
    Returns (errors {layer: {format: divergence}}, sizes {layer: (rows, inputs)})."""
    specs = [parse_format(f) for f in ladder]
    probe = [x if x.is_floating_point() else x[..., :probe_tokens] for x in samples[:probe_samples]]
    names = [n for n, s in assignment.items() if s is not None and not s.cast]
    stacks = find_stacks(model)
    prefix = stacks[0][0] + "." if len(stacks) == 1 else None
    if prefix is None or any(not n.startswith(prefix) for n in names) or any(x.is_floating_point() for x in probe):
        if around is not None:
            raise ShrinkError("the sensitivity pass walks blocks from disk only for the layers of one stack of blocks")
        return _sensitivity_whole_model(model, probe, names, specs, progress)
    return _sensitivity_by_block(model, stacks[0], probe, names, specs, progress, around)


def _trial_weights(original: torch.Tensor, lin: nn.Module, spec, widest: bool):
    """A layer's `original` weight rounded to `spec` and back (in its own dtype), or a divergence that needs
    no run: inf where the format's group does not divide the inputs, 0 for the ladder's widest format."""
    rows = original.reshape(original.shape[0], -1) if isinstance(lin, nn.Conv2d) else original
    if rows.shape[1] % spec.group_for(rows.shape[1]):
        return float("inf")
    if widest:
        return 0.0
    return awq.fake_quant(rows.float(), spec).reshape(original.shape).to(original.dtype)


def _each_trial(lin: nn.Module, specs, fixed: dict):
    """Give `lin` each format's rounding of its weight in turn, yielding the format's name; a format that needs
    no run has its divergence put in `fixed` instead. The weight is put back after (each trial is a new
    tensor: the original stays as it is)."""
    original = lin.weight.data
    try:
        for i, spec in enumerate(specs):
            trial = _trial_weights(original, lin, spec, i == len(specs) - 1)
            if isinstance(trial, float):
                fixed[spec.name] = trial
                continue
            lin.weight.data = trial
            yield spec.name
    finally:
        lin.weight.data = original


def _size(lin: nn.Module) -> tuple[int, int]:
    w = lin.weight
    return (int(w.shape[0]), int(w.numel() // w.shape[0]))


def _sensitivity_whole_model(model, probe, names, specs, progress):
    errors: dict[str, dict[str, float]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    with torch.no_grad():
        refs = [_output(model, x) for x in probe]
        for full in tqdm(names, desc="sensitivity", unit="layer", disable=None if progress is None else not progress):
            lin = model.get_submodule(full)
            sizes[full] = _size(lin)
            errors[full] = {}
            for fmt in _each_trial(lin, specs, errors[full]):
                errors[full][fmt] = sum(_divergence(r, _output(model, x)) for r, x in zip(refs, probe)) / len(probe)
    return errors, sizes


class _Given(nn.Module):
    """Stands for the embedding (zeros of its output's shape) or for the stack's one block (the hidden states
    it is given), so that a forward of the model runs only what comes after the blocks."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool = False):
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


def _after_blocks(model: nn.Module, prefix: str, hidden: torch.Tensor, x: torch.Tensor, as_tuple: bool) -> torch.Tensor:
    """The model's output for `x` when its last block gives `hidden`: the stack replaced by one stand-in block
    returning it and the embedding by zeros (whatever the model does before its blocks, and its weights,
    may be gone), so only the final norm and the output layer run."""
    stack = model.get_submodule(prefix)
    table = model.get_input_embeddings()
    table_name = next(n for n, m in model.named_modules() if m is table)
    set_submodule(model, prefix, nn.ModuleList([_Given(hidden, as_tuple)]))
    set_submodule(model, table_name, _Given(torch.zeros_like(hidden)))
    try:
        return _output(model, x)
    finally:
        set_submodule(model, prefix, stack)
        set_submodule(model, table_name, table)


def outputs_by_block(model: nn.Module, samples: list[torch.Tensor], keep=lambda out: out, *, around=None,
                     progress: bool | None = None, desc: str = "forward") -> list:
    """`keep` of the model's main output (float32, as `_output` gives it) on each sample, computed a block at a
    time: every sample's hidden states through one block before the next (one stack of blocks), then the
    final norm and output layer per sample; around (`layerwise.BlockHooks`) gives each block its weights and
    takes them back, so the blocks may be on disk (default None: in memory). keep: what is kept of each
    output (default all of it; a window's logits are vocabulary x tokens floats)."""
    (prefix, blocks), = find_stacks(model)
    as_tuple = []
    seen = blocks[0].register_forward_hook(lambda _m, _a, out: as_tuple.append(isinstance(out, (tuple, list))))
    with torch.no_grad():
        inputs = capture_inputs(model, blocks[0], samples)
        try:
            for i, block in enumerate(tqdm(blocks, desc=desc, unit="block",
                                           disable=None if progress is None else not progress)):
                if around is not None:
                    around.enter(f"{prefix}.{i}", block)
                inputs = run_block(block, inputs)
                if around is not None:
                    around.leave(f"{prefix}.{i}", block)
        finally:
            seen.remove()
        return [keep(_after_blocks(model, prefix, a[0] if a else k["hidden_states"], x, as_tuple[0]))
                for (a, k), x in zip(inputs, samples)]


def _sensitivity_by_block(model, stack, probe, names, specs, progress, around):
    prefix, blocks = stack
    errors: dict[str, dict[str, float]] = {n: {} for n in names}
    sizes: dict[str, tuple[int, int]] = {}
    trials: dict[tuple[str, str], list] = {}  # (layer, format) -> each probe's inputs to the next block
    as_tuple = []  # whether a block returns a tuple (the stand-in for the last one must, too)
    seen = blocks[0].register_forward_hook(lambda _m, _a, out: as_tuple.append(isinstance(out, (tuple, list))))
    bar = tqdm(total=len(blocks), desc="sensitivity", unit="block", disable=None if progress is None else not progress)
    with torch.no_grad():
        ref = capture_inputs(model, blocks[0], probe)
        try:
            for i, block in enumerate(blocks):
                name = f"{prefix}.{i}"
                if around is not None:
                    around.enter(name, block)
                for key, inputs in trials.items():  # the trials begun in earlier blocks, one block on
                    trials[key] = run_block(block, inputs)
                for full in [n for n in names if n.startswith(name + ".")]:
                    lin = model.get_submodule(full)
                    sizes[full] = _size(lin)
                    for fmt in _each_trial(lin, specs, errors[full]):
                        trials[(full, fmt)] = run_block(block, ref)
                ref = run_block(block, ref)
                if around is not None:
                    around.leave(name, block)
                bar.update()
        finally:
            seen.remove()
            bar.close()
        hidden = lambda inputs: [a[0] if a else k["hidden_states"] for a, k in inputs]  # noqa: E731
        refs = [_after_blocks(model, prefix, h, x, as_tuple[0]) for h, x in zip(hidden(ref), probe)]
        for (full, fmt), inputs in tqdm(list(trials.items()), desc="sensitivity outputs", unit="trial",
                                        disable=None if progress is None else not progress):
            outs = [_after_blocks(model, prefix, h, x, as_tuple[0]) for h, x in zip(hidden(inputs), probe)]
            errors[full][fmt] = sum(_divergence(r, o) for r, o in zip(refs, outs)) / len(probe)
            del trials[(full, fmt)]
    return errors, sizes


def quantize_calibrated(model: nn.Module, assignment: dict[str, QuantSpec | None], samples, method: str | Recipe,
                        backend: str | None = None, damp: float = 0.01, act_order: bool = True,
                        true_sequential: bool = False, tune_steps: int = 0, refit: bool = True,
                        progress: bool | None = None, around=None) -> CalibrationReport:
    """Quantize `model` in place by `method` on `samples`: a Recipe (whose GPTQ and tuning options then
    replace the keyword ones below), or a method string as `recipe.parse_method` reads it.

    true_sequential: GPTQ takes each layer's Hessian from inputs that already pass through the
    quantized layers before it in the block (default False: all Hessians come from the block's
    full-precision run; on SmolLM2 int4-g64 the sequential variant measured no better and took
    1.8x as long).
    refit: after GPTQ, re-solve each layer's group scales for the chosen codes (gptq.refit_scales;
    default True: it never raises a layer's output error and costs little).
    tune_steps: then tune each block's scales and norm weights against its full-precision output
    (tune.tune_block) on at most this many calibration inputs (default 0: off).
    around: `layerwise.BlockHooks` for blocks held on disk (default None: the model is in memory); the
    layers outside the blocks are then the caller's to quantize."""
    if not isinstance(method, Recipe):
        method = parse_method(method, damp=damp, act_order=act_order, tune_steps=tune_steps)
        if method.gptq is not None:
            method = Recipe(method.awq, GPTQ(damp, act_order, true_sequential, refit), method.tune)
    recipe = method
    report = CalibrationReport(method=recipe.method)
    if world()[1] > 1:
        if recipe.tune is not None:
            raise ShrinkError("block tuning runs in one process: leave out --tune-steps under torchrun, or run "
                              "without torchrun")
        samples = my_share(samples)  # this process's windows; the statistics are combined across processes

    with torch.no_grad():
        blockwise(model, samples, _BlockPass(recipe, assignment, backend, report), progress=progress, desc=recipe.name,
                  around=around)
    if around is not None:
        return report
    # Linear layers outside the repeated blocks (rare in decoders) get round-to-nearest.
    leftovers = {n: s for n, s in assignment.items()
                 if s is not None and isinstance(model.get_submodule(n), (nn.Linear, nn.Embedding, nn.Conv2d))}
    for n, spec in leftovers.items():
        lin = model.get_submodule(n)
        set_submodule(model, n, round_to_nearest(lin, spec, n, backend))
        report.layers.setdefault(n, {})["note"] = (
            "an embedding: round to nearest (its inputs are one-hot: nothing to calibrate)"
            if isinstance(lin, nn.Embedding) else
            "a convolution: round to nearest (calibrated methods handle Linear layers so far)"
            if isinstance(lin, nn.Conv2d) else "outside the repeated blocks: round to nearest")
    return report


class _BlockPass:
    """The recipe applied to one block at a time (called by `layerwise.blockwise` with each block and the
    inputs the quantized blocks before it produce): AWQ's scales folded into what feeds them (each fold
    checked) and its clipping, then GPTQ stage by stage or round-to-nearest, casts, then tuning."""

    def __init__(self, recipe: Recipe, assignment: dict[str, QuantSpec | None], backend, report: CalibrationReport):
        self.recipe, self.assignment, self.backend, self.report = recipe, assignment, backend, report

    def __call__(self, prefix: str, block: nn.Module, inputs) -> None:
        names = _linear_names(block, prefix, self.assignment)
        if not names:
            return
        self.prefix, self.block, self.inputs = prefix, block, inputs
        self.full = {n: self._full(n) for n in names}
        self.mods = dict(block.named_modules())
        tune_inputs, targets = self._tuning_targets()
        stats = collect_stats(block, inputs, names, keep_rows=AWQ_ROWS if self.recipe.awq else 0)
        experts = expert_layers(block)
        for n in names:
            if n in experts:  # what each expert was calibrated on, recorded
                self._note(self.full[n], tokens=stats[n].tokens if n in stats else 0)
        for n in [n for n in names if n not in stats]:  # an expert no calibration token was routed to
            self._replace(n, quantize_weight(self.mods[n].weight, self._spec(n), self.full[n]))
            self._note(self.full[n], note="no calibration token reached it (an expert nothing was routed to): round "
                                          "to nearest; all_experts=True (--all-experts) gives every expert statistics")
        names = [n for n in names if n in stats]
        clips = {}
        if self.recipe.awq is not None:
            self._awq_scales(stats)
            if self.recipe.gptq is None:
                clips = self._awq_clips(names, stats)
        if self.recipe.gptq is None:
            for n in names:
                self._replace(n, quantize_weight(self.mods[n].weight, self._spec(n), self.full[n], clip=clips.get(n, 1.0)))
        else:
            self._gptq(names, stats)
        self._casts()
        if self.recipe.tune is not None:
            res = tune_block(block, tune_inputs, targets, steps=self.recipe.tune.steps)
            self._note(prefix or "<model>", tune_error_before=res.before, tune_error_after=res.after)

    def _full(self, n: str) -> str:
        return f"{self.prefix}.{n}" if self.prefix else n

    def _spec(self, n: str) -> QuantSpec:
        return self.assignment[self.full[n]]

    def _note(self, full_name: str, **fields) -> None:
        self.report.layers.setdefault(full_name, {}).update(fields)

    def _tuning_targets(self):
        """Tuning sees at most its steps' worth of inputs, spread over the data (targets and error checks
        for more would cost more forward passes than the tuning itself), and the block's outputs on them."""
        steps = self.recipe.tune.steps if self.recipe.tune else 0
        inputs = self.inputs
        spread = torch.linspace(0, len(inputs) - 1, min(len(inputs), steps)).round().long().tolist()
        tune_inputs = [inputs[i] for i in spread]
        return tune_inputs, [first_output(self.block(*a, **k)) for a, k in tune_inputs]

    def _awq_scales(self, stats) -> None:
        """Per group of layers sharing an input, search the scales and fold them into what feeds them;
        a fold that moves the block's output is undone and said. The statistics follow the scaling."""
        check_inputs = self.inputs[:2]
        reference = [first_output(self.block(*a, **k)) for a, k in check_inputs]  # before any fold
        for prev, group in awq.scale_groups(self.block, self.inputs[0]):
            group = [n for n in group if n in stats]
            specs = {self._spec(n) for n in group}
            if not group or len(specs) != 1:
                continue  # layers sharing an input but given different formats: leave unscaled
            spec = specs.pop()
            x = torch.cat(stats[group[0]].sample).float()
            s, alpha, ratio = awq.search_scale([self.mods[n].weight for n in group], x, stats[group[0]].abs_mean, spec)
            moved, form = awq.checked_fold(self.block, self.mods[prev], [self.mods[n] for n in group], s,
                                           check_inputs, reference)
            where = self._full(prev)
            if form == "none":
                for n in group:
                    self._note(self.full[n], awq_fold=(
                        f"not applied: folding the scales into {where} moved the block's output by {moved:.1e} "
                        f"(relative; more than {awq.FOLD_TOLERANCE:g}), so that fold is not exact here"))
                continue
            how = " as x * (1 + w)" if form == "1+w" else ""
            for n in group:
                self._note(self.full[n], awq_fold=f"into {where}{how}, checked (output moved {moved:.1e})")
            inv = (1.0 / s).double()
            for st in {id(stats[n]): stats[n] for n in group}.values():  # shared by the group
                st.hessian = st.hessian * inv.unsqueeze(0) * inv.unsqueeze(1)
                st.sample = [t / s for t in st.sample]
            for n in group:
                self._note(self.full[n], awq_alpha=alpha, awq_error_ratio=round(ratio, 4))

    def _awq_clips(self, names, stats) -> dict:
        """AWQ without GPTQ: each layer's clipping ratios per group, searched on its (scaled) inputs."""
        clips = {}
        for n in names:
            x = torch.cat(stats[n].sample)[:CLIP_ROWS].float()
            clips[n] = awq.search_clip(self.mods[n].weight, x, self._spec(n))
            self._note(self.full[n], clip_mean=round(float(clips[n].mean()), 4))
        return clips

    def _gptq(self, names, stats) -> None:
        """GPTQ stage by stage: the layers fed the same input (q, k, v) together. With true_sequential,
        the layers after a stage get their Hessians again from the block with that stage quantized."""
        g = self.recipe.gptq
        remaining = [n for n in stats if n in names]  # in the order the block runs them
        while remaining:
            stage = [n for n in remaining if n in stats and stats[n] is stats[remaining[0]]]
            for n in stage:
                res = gptq_quantize(self.mods[n].weight, stats[n].hessian, self._spec(n), damp=g.damp,
                                    act_order=g.act_order, refit=g.refit, name=self.full[n])
                self._replace(n, res.weight)
                self._note(self.full[n], damp=res.damp, damp_retries=res.retries)
                if res.refit_ratio is not None:
                    self._note(self.full[n], refit_error_ratio=round(res.refit_ratio, 4))
            remaining = [n for n in remaining if n not in stage]
            for n in stage:  # its Hessian is done with (a 14336-input layer's is 1.6 GB)
                stats.pop(n, None)
            if remaining and g.true_sequential:
                stats = collect_stats(self.block, self.inputs, remaining, first_stage_only=True)
                remaining = [n for n in stats if n in remaining] + [n for n in remaining if n not in stats]

    def _casts(self) -> None:
        """Cast formats (bf16/fp16) in this block need no calibration."""
        for name, m in list(self.block.named_modules()):
            f = self._full(name)
            if isinstance(m, nn.Linear) and self.assignment.get(f) is not None and self.assignment[f].cast:
                set_submodule(self.block, name, round_to_nearest(m, self.assignment[f], f))

    def _replace(self, n: str, q) -> None:
        lin, spec = self.mods[n], self._spec(n)
        new = QuantLinear.from_quantized(q, lin.in_features, lin.out_features, spec, lin.bias, self.backend)
        set_submodule(self.block, n, new)
        self.report.formats[self.full[n]] = spec.name
