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

from ..outputs import kl_divergence, main_output
from . import awq
from .gptq import gptq_quantize
from .layerwise import blockwise, call_model, collect_stats, first_output
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
                        probe_samples: int = 1, probe_tokens: int = 256):
    """Per-layer sensitivity to each format of `ladder`: the divergence of the model's output from its
    full-precision output (KL of next-token distributions for language models) when that layer alone
    is rounded to the format, on the first `probe_tokens` tokens of the first `probe_samples` calibration
    samples. The widest format of the ladder counts as lossless for this purpose."""
    errors: dict[str, dict[str, float]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    specs = [parse_format(f) for f in ladder]
    probe = [x if x.is_floating_point() else x[..., :probe_tokens] for x in samples[:probe_samples]]
    names = [n for n, s in assignment.items() if s is not None and not s.cast]
    with torch.no_grad():
        refs = [_output(model, x) for x in probe]
        for full in tqdm(names, desc="sensitivity", unit="layer", disable=None if progress is None else not progress):
            lin = model.get_submodule(full)
            original = lin.weight.data.clone()
            rows = original.reshape(original.shape[0], -1) if isinstance(lin, nn.Conv2d) else original
            sizes[full] = tuple(rows.shape)
            errors[full] = {}
            for i, spec in enumerate(specs):
                if rows.shape[1] % spec.group_for(rows.shape[1]):
                    errors[full][spec.name] = float("inf")
                    continue
                if i == len(specs) - 1:
                    errors[full][spec.name] = 0.0
                    continue
                lin.weight.data.copy_(awq.fake_quant(rows, spec).reshape(original.shape))
                errors[full][spec.name] = sum(_divergence(r, _output(model, x)) for r, x in zip(refs, probe)) / len(probe)
            lin.weight.data.copy_(original)
    return errors, sizes


def quantize_calibrated(model: nn.Module, assignment: dict[str, QuantSpec | None], samples, method: str | Recipe,
                        backend: str | None = None, damp: float = 0.01, act_order: bool = True,
                        true_sequential: bool = False, tune_steps: int = 0, refit: bool = True,
                        progress: bool | None = None) -> CalibrationReport:
    """Quantize `model` in place by `method` on `samples`: a Recipe (whose GPTQ and tuning options then
    replace the keyword ones below), or a method string as `recipe.parse_method` reads it.

    true_sequential: GPTQ takes each layer's Hessian from inputs that already pass through the
    quantized layers before it in the block (default False: all Hessians come from the block's
    full-precision run; on SmolLM2 int4-g64 the sequential variant measured no better and took
    1.8x as long).
    refit: after GPTQ, re-solve each layer's group scales for the chosen codes (gptq.refit_scales;
    default True: it never raises a layer's output error and costs little).
    tune_steps: then tune each block's scales and norm weights against its full-precision output
    (tune.tune_block) on at most this many calibration inputs (default 0: off)."""
    if not isinstance(method, Recipe):
        method = parse_method(method, damp=damp, act_order=act_order, tune_steps=tune_steps)
        if method.gptq is not None:
            method = Recipe(method.awq, GPTQ(damp, act_order, true_sequential, refit), method.tune)
    recipe = method
    report = CalibrationReport(method=recipe.method)
    use_awq, use_gptq = recipe.awq is not None, recipe.gptq is not None
    if use_gptq:
        damp, act_order = recipe.gptq.damp, recipe.gptq.act_order
        true_sequential, refit = recipe.gptq.true_sequential, recipe.gptq.refit
    tune_steps = recipe.tune.steps if recipe.tune else 0

    def visit(prefix, block, inputs):
        names = _linear_names(block, prefix, assignment)
        if not names:
            return
        full = {n: (f"{prefix}.{n}" if prefix else n) for n in names}
        mods = dict(block.named_modules())
        # Tuning sees at most tune_steps inputs, spread over the data: targets and error checks for
        # more would cost more forward passes than the tuning itself.
        spread = torch.linspace(0, len(inputs) - 1, min(len(inputs), tune_steps)).round().long().tolist()
        tune_inputs = [inputs[i] for i in spread]
        targets = [first_output(block(*a, **k)) for a, k in tune_inputs]
        stats = collect_stats(block, inputs, names, keep_rows=AWQ_ROWS if use_awq else 0)
        clips = {}
        if use_awq:
            check_inputs = inputs[:2]
            reference = [first_output(block(*a, **k)) for a, k in check_inputs]  # before any fold
            for prev, group in awq.scale_groups(block, inputs[0]):
                group = [n for n in group if n in stats]
                specs = {assignment[full[n]] for n in group}
                if not group or len(specs) != 1:
                    continue  # layers sharing an input but given different formats: leave unscaled
                spec = specs.pop()
                x = torch.cat(stats[group[0]].sample).float()
                s, alpha, ratio = awq.search_scale([mods[n].weight for n in group], x, stats[group[0]].abs_mean, spec)
                moved, form = awq.checked_fold(block, mods[prev], [mods[n] for n in group], s, check_inputs,
                                               reference)
                where = f"{prefix}.{prev}" if prefix else prev
                if form == "none":
                    for n in group:
                        report.layers.setdefault(full[n], {})["awq_fold"] = (
                            f"not applied: folding the scales into {where} moved the block's output by {moved:.1e} "
                            f"(relative; more than {awq.FOLD_TOLERANCE:g}), so that fold is not exact here")
                    continue
                how = " as x * (1 + w)" if form == "1+w" else ""
                for n in group:
                    report.layers.setdefault(full[n], {})["awq_fold"] = (
                        f"into {where}{how}, checked (output moved {moved:.1e})")
                inv = (1.0 / s).double()
                for st in {id(stats[n]): stats[n] for n in group}.values():  # shared by the group
                    st.hessian = st.hessian * inv.unsqueeze(0) * inv.unsqueeze(1)
                    st.sample = [t / s for t in st.sample]
                for n in group:
                    report.layers.setdefault(full[n], {})["awq_alpha"] = alpha
                    report.layers[full[n]]["awq_error_ratio"] = round(ratio, 4)
            if not use_gptq:
                for n in names:
                    x = torch.cat(stats[n].sample)[:CLIP_ROWS].float()
                    clips[n] = awq.search_clip(mods[n].weight, x, assignment[full[n]])
                    report.layers.setdefault(full[n], {})["clip_mean"] = round(float(clips[n].mean()), 4)

        def replace(n, q):
            lin, spec = mods[n], assignment[full[n]]
            new = QuantLinear.from_quantized(q, lin.in_features, lin.out_features, spec, lin.bias, backend)
            set_submodule(block, n, new)
            report.formats[full[n]] = spec.name

        if not use_gptq:
            for n in names:
                replace(n, quantize_weight(mods[n].weight, assignment[full[n]], full[n], clip=clips.get(n, 1.0)))
        remaining = [n for n in stats if n in names]  # in the order the block runs them
        while use_gptq and remaining:
            # One stage: the layers fed the same input (q, k, v). With true_sequential, the layers after
            # it get their Hessians again from the block with this stage already quantized.
            stage = [n for n in remaining if n in stats and stats[n] is stats[remaining[0]]]
            for n in stage:
                res = gptq_quantize(mods[n].weight, stats[n].hessian, assignment[full[n]], damp=damp,
                                    act_order=act_order, refit=refit, name=full[n])
                replace(n, res.weight)
                report.layers.setdefault(full[n], {}).update(damp=res.damp, damp_retries=res.retries)
                if res.refit_ratio is not None:
                    report.layers[full[n]]["refit_error_ratio"] = round(res.refit_ratio, 4)
            remaining = [n for n in remaining if n not in stage]
            if remaining and true_sequential:
                stats = collect_stats(block, inputs, remaining, first_stage_only=True)
                remaining = [n for n in stats if n in remaining] + [n for n in remaining if n not in stats]
        # cast formats (bf16/fp16) in this block need no calibration
        for name, m in list(block.named_modules()):
            f = f"{prefix}.{name}" if prefix else name
            if isinstance(m, nn.Linear) and assignment.get(f) is not None and assignment[f].cast:
                set_submodule(block, name, round_to_nearest(m, assignment[f], f))
        if tune_steps:
            res = tune_block(block, tune_inputs, targets, steps=tune_steps)
            report.layers.setdefault(prefix or "<model>", {}).update(
                tune_error_before=res.before, tune_error_after=res.after)

    with torch.no_grad():
        blockwise(model, samples, visit, progress=progress, desc=method)
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
