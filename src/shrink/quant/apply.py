"""`quantize(model, spec)`: swap a model's weight layers for quantized ones, in place.

The layers are `nn.Linear`, transformers' `Conv1D` and `nn.Conv2d`, and embeddings on request. A spec is
one format string for every such layer, or a mapping from module-name globs to format strings (first
matching glob wins; `None` keeps the layer in full precision; unmatched layers stay in full precision).
The output layer (`lm_head`, or the last Linear of a plain model) is kept in full precision unless
`keep_output=False` or the mapping names it exactly; so are a mixture of experts' routing gates unless a
glob other than `*` names them. A mixture's fused 3-D expert weights become one Linear layer per expert
(quant/experts.py), each quantized like any Linear layer. An embedding is quantized only when a glob other
than `*` names it; a tied output layer then shares its codes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
import math
import warnings
from collections.abc import Mapping

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.errors import ShrinkError
from ..core.finite import all_finite
from .check import ForwardCheck, relative_error, sample_input
from .check import run as run_forward
from .embedding import QuantEmbedding
from .experts import all_tokens, routers, unfuse_experts
from .format import check_weight
from .kmix import is_mix, kquant_mix
from .linear import CastLinear, QuantLinear
from .mixed import DEFAULT_LADDER, MixedPrecision, allocate
from .recipe import GPTQ, MAX_TUNE_STEPS, Recipe, parse_method
from .record import record_of, update_record
from .replace import round_to_nearest, set_submodule
from .spec import KQUANTS, SUPERBLOCK, QuantSpec, parse_format
from .summary import fused_expert_tensors

Spec = str | QuantSpec | Mapping[str, "str | QuantSpec | None"] | MixedPrecision


def output_layer_name(model: nn.Module) -> str | None:
    """Name of the model's output layer: the HF output embeddings, else its last `nn.Linear`."""
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            out = get()
        except (AttributeError, NotImplementedError):
            out = None
        if isinstance(out, nn.Linear):
            for name, module in model.named_modules():
                if module is out:
                    return name
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return last


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2's projections): a Linear with its weight stored transposed, [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def linear_layers(model: nn.Module) -> list[str]:
    """Names of the weight layers shrink quantizes by default: `nn.Linear`, transformers' `Conv1D` and
    `nn.Conv2d` (its kernel flattened, one row per output channel)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) or is_conv1d(m)]


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The layer's weight as [rows, inputs], the shape its format groups: a Linear's as it is, a Conv1D's
    transposed, a Conv2d's kernel flattened per output channel, an Embedding's table."""
    if isinstance(module, nn.Conv2d):
        return module.weight.reshape(module.out_channels, -1)
    return as_linear(module).weight


def as_linear(module: nn.Module) -> nn.Linear:
    """`module` as an `nn.Linear` computing the same function (a Conv1D's weight transposed; a Linear as is)."""
    if isinstance(module, nn.Linear) or not is_conv1d(module):
        return module
    nx, nf = module.weight.shape
    linear = nn.Linear(nx, nf, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    return linear


def plan(model: nn.Module, spec: Spec, keep_output: bool = True) -> dict[str, QuantSpec | None]:
    """The format each weight layer of `model` will get (None: kept in full precision): every `nn.Linear`,
    `Conv1D` and `nn.Conv2d`, and the embeddings a glob other than `*` names."""
    if isinstance(spec, Mapping):
        rules = [(pattern, parse_format(fmt) if fmt is not None else None) for pattern, fmt in spec.items()]
        explicit = set(spec)
    else:
        rules = [("*", parse_format(spec))]
        explicit = set()
    out_name = output_layer_name(model) if keep_output else None
    gates = set(routers(model))  # kept like the output layer unless a glob other than "*" names them
    names = linear_layers(model)
    embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    for pattern, _ in rules:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names + embeddings) and pattern != "*":
            example = f" (they are named like {names[len(names) // 2]!r})" if names else ""
            raise ShrinkError(f"layer pattern {pattern!r} matches no Linear or Embedding layer of the model{example}")
    result: dict[str, QuantSpec | None] = {}
    for name in names:
        chosen = None
        for pattern, fmt in rules:
            if fnmatch.fnmatchcase(name, pattern):
                chosen = fmt
                break
        if name == out_name and name not in explicit:
            chosen = None
        if name in gates and not any(p != "*" and fnmatch.fnmatchcase(name, p) for p, _ in rules):
            chosen = None
        result[name] = chosen
    for name in embeddings:  # only on request: a pattern other than "*" names them
        chosen = next((fmt for pattern, fmt in rules if pattern != "*" and fnmatch.fnmatchcase(name, pattern)), None)
        if chosen is not None and chosen.cast:
            raise ShrinkError(f"embedding {name!r}: embeddings take integer formats (int8, int4-g32, ...), not {chosen.name}")
        if chosen is not None:
            result[name] = chosen
    return result


@dataclass
class QuantizeJob:
    """What `quantize` will do, settled from the model's structure alone (shapes, names) before any weight
    is read or changed: the recipe, each layer's format (None: kept), the layers given another format
    than asked and why, and whether calibration data is needed."""

    recipe: Recipe
    assignment: dict[str, QuantSpec | None]
    fallbacks: dict[str, str]
    spec: object  # the spec as resolved (a mixed-precision budget's base mapping, or the format asked)
    target_bits: float | None
    ladder: tuple[str, ...] | None
    needs_data: bool

    @property
    def method(self) -> str:
        return self.recipe.method

    def calibration_record(self, data_record: dict) -> dict:
        """shrink.json's `calibration` for this job on data described by `data_record`."""
        g = self.recipe.gptq
        record = {"data": data_record, "method": self.method, "damp": g.damp if g else GPTQ.damp,
                  "act_order": g.act_order if g else GPTQ.act_order}
        if g is not None and g.true_sequential:  # non-default GPTQ options, when given
            record["true_sequential"] = True
        if g is not None and not g.refit:
            record["refit"] = False
        if self.recipe.tune:
            record["tune_steps"] = self.recipe.tune.steps
        return record


def plan_job(model: nn.Module, spec: Spec = "int8", *, method: str | Recipe | list = "rtn", calibration=None,
             n_samples: int = 128, seq_len: int = 512, target_bits: float | None = None,
             ladder: tuple[str, ...] | None = None, damp: float = GPTQ.damp, act_order: bool = GPTQ.act_order,
             tune_steps: int = 0, keep_output: bool = True) -> QuantizeJob:
    """The QuantizeJob `quantize` would run on `model` with these arguments (as `quantize` documents them),
    every option checked; the model may be a skeleton on the meta device (nothing of its weights is read)."""
    if isinstance(spec, MixedPrecision):
        if target_bits is not None or ladder is not None:
            raise ShrinkError("give the bit budget once: MixedPrecision(...) as the spec, or target_bits=, not both")
        spec, target_bits, ladder = spec.base if spec.base is not None else "int8", spec.target_bits, spec.ladder
    elif target_bits is not None and not isinstance(spec, Mapping) and spec != "int8":
        warnings.warn(f"target_bits={target_bits} chooses a format per layer, so the format {spec!r} is ignored; "
                      f"pass MixedPrecision({target_bits}) as the spec instead", stacklevel=3)
    recipe = parse_method(method, damp=damp, act_order=act_order, tune_steps=tune_steps)
    method, tune_steps = recipe.method, recipe.tune.steps if recipe.tune else 0
    if recipe.gptq is not None:
        damp, act_order = recipe.gptq.damp, recipe.gptq.act_order
    done = [n for n, m in model.named_modules() if isinstance(m, (QuantLinear, CastLinear))]
    if done:
        fmt = model.get_submodule(done[0]).spec.name
        raise ShrinkError(f"the model is quantized already ({len(done)} layers, {done[0]!r} in {fmt}); quantizing "
                         "it again would round rounded weights: start from the full-precision model")
    _check_options(n_samples, seq_len, target_bits, damp)
    needs_data = method != "rtn" or target_bits is not None
    if calibration is None and needs_data:
        what = f"method {method!r}" if method != "rtn" else "target_bits"
        raise ShrinkError(f"{what} needs calibration data: pass calibration=<text file, .jsonl file or tensors>")
    if not (isinstance(tune_steps, int) and not isinstance(tune_steps, bool) and 0 <= tune_steps <= MAX_TUNE_STEPS):
        raise ShrinkError(f"tune_steps={tune_steps!r}: must be an integer from 0 to {MAX_TUNE_STEPS:,} (32 is a good value)")
    if tune_steps and not needs_data:
        raise ShrinkError(f"tune_steps={tune_steps}: tuning needs a calibrated method (gptq, awq, awq+gptq) "
                         "or target_bits, and a number of steps >= 0")
    if calibration is not None and not needs_data and recipe.qad is None:
        raise ShrinkError("method 'rtn' uses no calibration data; leave calibration=None or choose method='gptq' or 'awq'")
    if target_bits is not None:
        spec = {"*": (ladder or DEFAULT_LADDER)[0]} if not isinstance(spec, Mapping) else spec
    mix = is_mix(spec)
    if mix:  # llama.cpp's K-quant mix, layer by layer (its fallbacks below, as for a pattern)
        spec = kquant_mix(model, spec, output_layer_name(model), linear_layers(model))
    assignment = plan(model, spec, keep_output=keep_output)
    _refuse_nothing_to_do(model, assignment)
    _say_experts_kept(model)
    exact = {k for k in spec if not any(c in k for c in "*?[")} if isinstance(spec, Mapping) and not mix else set()
    fell_back = _fall_back(model, assignment, exact, quiet=target_bits is not None)
    # with target_bits the plan's format is a stand-in: the allocation chooses from the ladder, fitting each layer
    fallbacks = {} if target_bits is not None else fell_back
    return QuantizeJob(recipe, assignment, fallbacks, spec, target_bits, ladder, needs_data)


def quantize(model: nn.Module, spec: Spec = "int8", *, method: str | Recipe | list = "rtn", calibration=None, tokenizer=None,
             n_samples: int = 128, seq_len: int = 512, target_bits: float | None = None,
             ladder: tuple[str, ...] | None = None, damp: float = GPTQ.damp, act_order: bool = GPTQ.act_order,
             tune_steps: int = 0, keep_output: bool = True, backend: str | None = None, progress: bool | None = None,
             all_experts: bool = False, qad_data=None, qad_checkpoint=None, qad_resume: bool = False) -> nn.Module:
    """Quantize `model`'s Linear layers in place and return it.

    spec: a format string (default "int8"), a mapping of module-name globs to formats or None, or
        `MixedPrecision(target_bits, ladder)` (a format per layer to a bit budget; as target_bits below).
    method: "rtn" (round to nearest, default, no data needed), "gptq", "awq" (activation-aware scaling
        and clipping), or "awq+gptq" (scaling, then GPTQ), each calibrated one optionally "+tune[N]"
        (block tuning, as tune_steps), each optionally after "rotate+" ("rotate" alone: with rtn): the
        residual stream and attention values rotated by Hadamard matrices folded into the weights first
        (Llama-shaped decoders, float32; an output layer tied to its table is untied, said in the record),
        or after "rotate-online+": the same, and each down projection's input rotated as the model runs
        (only shrink runs the result: it exports to no other format);
        or the method objects in the order they run (`[Rotate(), AWQ(), GPTQ(damp=0.05), Tune(32)]`, from
        `shrink.quant`), or a `Recipe` of them. All but rtn need `calibration`.
    calibration: a .txt or .jsonl path (needs `tokenizer`), or an iterable of tensors (token ids or
        model inputs); text is cut into `n_samples` (default 128) windows of `seq_len` (default 512) tokens.
    target_bits: (or MixedPrecision as the spec) instead of one format, choose one per layer from
        `ladder` (default int2-g32, int3-g32, int4-g64, int4-g32, int8) so the average bits per weight
        of the quantized layers meets this budget, keeping the layers whose rounding moves the model's
        output most wider; needs `calibration`.
    damp, act_order: GPTQ's Hessian dampening (fraction of its mean diagonal, default 0.01) and
        activation order (default on: columns with the largest inputs first, groups kept static so the
        stored layout and the kernels are unchanged; measured on SmolLM2 it lowers KL by about 30%).
    tune_steps: after a calibrated method, tune each block's fp16 group scales and normalisation
        weights (codes fixed) by this many Adam steps against the full-precision block's output on the
        calibration inputs (default 0: off; 32 takes SmolLM2 int4-g64 awq+gptq perplexity from 25.2 to
        24.8, fp32 23.1, for about as long again as GPTQ).
    keep_output: keep the output layer in full precision (default True).
    backend: kernel backend for the new layers ("auto", "native", "torch"; default $SHRINK_BACKEND or auto).
    progress: show a progress bar (default: when writing to a terminal).
    all_experts: a mixture of experts' calibration sends every token through every expert for statistics
        only (default False: each expert sees the tokens routed to it; one that sees none is rounded to
        nearest, and said so). The tokens each expert saw are in the record.
    qad_data: the text (or token windows, as calibration) a `QAD(...)` step in `method` trains on: the
        quantized model's scales and norms trained end to end against the original's outputs (default None:
        the calibration data). Its before/after held-out KL is in the record (`calibration["qad"]`).
    qad_checkpoint, qad_resume: a folder QAD writes its training state to every minute and when interrupted
        (default None), and whether to continue from it (default False; the steps before QAD run again, and
        must give the same quantized model: checked).
    What was done is recorded on the model (`shrink.info(model)`: the chosen formats, name -> format or
    None; for calibrated methods the calibration record). One sample input (random token ids, pixels, or
    a batch for the first layer) runs through the model before and after: the record's `check` holds the
    relative output error (or why the check was skipped); ShrinkError (a ValueError) when the quantized
    model no longer runs, and when the plan quantizes no layer at all.
    """
    if qad_data is None and calibration is None and parse_method(method).qad is not None:
        raise ShrinkError("QAD needs data: pass qad_data= (or calibration=) text or token windows")
    if qad_resume and (qad_checkpoint is None or parse_method(method).qad is None):
        raise ShrinkError("qad_resume continues a QAD step from qad_checkpoint: give both, and QAD in the method")
    if qad_resume:
        from .qad import check_resumable

        check_resumable(qad_checkpoint, qad_resume)  # before the work that comes first
    fused = unfuse_experts(model)  # one Linear per expert; put back below when none of them is quantized
    try:
        job = plan_job(model, spec, method=method, calibration=calibration, n_samples=n_samples, seq_len=seq_len,
                       target_bits=target_bits, ladder=ladder, damp=damp, act_order=act_order, tune_steps=tune_steps,
                       keep_output=keep_output)
        fuse_back(model, fused, job.assignment)
    except BaseException:
        fuse_back(model, fused, {})
        raise
    assignment, method, needs_data = job.assignment, job.method, job.needs_data
    target_bits, ladder, spec, recipe = job.target_bits, job.ladder, job.spec, job.recipe
    validate_weights(model, assignment)
    undo = _Undo(model)  # any failure from here on puts the model back as it was
    try:
        for name, fmt in assignment.items():  # GPT-2's Conv1D layers to be quantized become the Linear they are
            if fmt is not None and is_conv1d(model.get_submodule(name)):
                set_submodule(model, name, as_linear(model.get_submodule(name)))
        inputs, described = sample_input(model)
        before, skipped = None, None
        if inputs is None:
            skipped = described
        else:
            try:
                before = run_forward(model, inputs)
            except Exception as e:  # our guess at an input did not fit this model: say so, do not fail
                skipped = f"the original model does not run on {described} ({type(e).__name__}: {str(e)[:160]})"
        rotation = None
        if recipe.rotate is not None:  # before anything reads the weights: every method works on the rotated model
            from .rotate import rotate_model

            rotation = rotate_model(model, recipe.rotate.seed)
            if recipe.rotate.online:  # (after the fold: the down projections' weights are the rotated ones)
                from .online import down_projections, rotate_inputs

                rotation["online"] = rotate_inputs(model, down_projections(model), recipe.rotate.seed + 2)
        qad = None
        if recipe.qad is not None:  # the teacher's outputs, while the model is still the original
            from .calibration import prepare
            from .qad import teacher_targets

            qad = prepare(qad_data if qad_data is not None else calibration, tokenizer=tokenizer, model=model,
                          n_samples=n_samples, seq_len=seq_len)
            qad_targets = teacher_targets(model, qad.samples, recipe.qad.top_k)
        record = {}
        if needs_data:
            from .calibrated import measure_sensitivity, quantize_calibrated
            from .calibration import prepare

            data = prepare(calibration, tokenizer=tokenizer, model=model, n_samples=n_samples, seq_len=seq_len)
            record = job.calibration_record(data.record)
            if target_bits is not None:
                lad = tuple(ladder or DEFAULT_LADDER)
                errors, sizes = measure_sensitivity(model, data.samples, assignment, lad, progress=progress)
                chosen = allocate(errors, sizes, target_bits, lad)
                assignment.update({n: parse_format(f) for n, f in chosen.items()})
                validate_weights(model, assignment)
                record["target_bits"] = target_bits
                record["ladder"] = list(lad)
            all_tokens(model, all_experts)
            try:
                report = quantize_calibrated(model, assignment, data.samples, recipe, backend=backend, progress=progress)
            finally:
                all_tokens(model, False)
            record["layers"] = report.layers
            record["warnings"] = report.warnings()
        else:
            todo = [(n, s) for n, s in assignment.items() if s is not None]
            modules = dict(model.named_modules())
            for name, fmt in tqdm(todo, desc="quantize", unit="layer", disable=None if progress is None else not progress):
                set_submodule(model, name, round_to_nearest(modules[name], fmt, name, backend))
        _tie_quantized_embedding(model, assignment, spec, backend)
        if qad is not None:
            from .qad import distill_quantized, qad_record

            q = recipe.qad
            result = distill_quantized(model, qad.samples, qad_targets, steps=q.steps, seconds=q.seconds, lr=q.lr,
                                       progress=progress, checkpoint=qad_checkpoint, resume=qad_resume,
                                       codes_lr=q.codes_lr)
            record = record or job.calibration_record(qad.record)  # (round to nearest: the data is QAD's)
            record["qad"] = qad_record(result, qad.record, q)
        previous = record_of(model).formats
        update_record(model, method=method,
                      formats={**previous, **{n: (s.name if s else previous.get(n)) for n, s in assignment.items()}},
                      calibration=record or None, check=_check_forward(model, inputs, described, before, skipped),
                      fallbacks=job.fallbacks, rotation=rotation)
    except BaseException:
        undo.restore()
        fuse_back(model, fused, {})
        raise
    return model


def fuse_back(model: nn.Module, fused: dict, assignment: dict) -> None:
    """Put back the fused expert modules none of whose per-expert layers `assignment` quantizes (all of
    them for an empty assignment): a model keeps its own layout where nothing in it changes."""
    for name, original in fused.items():
        if not any(s is not None for n, s in assignment.items() if n.startswith(name + ".")):
            set_submodule(model, name, original)
            for n in [n for n in assignment if n.startswith(name + ".")]:
                del assignment[n]


def _say_experts_kept(model: nn.Module) -> None:
    """A mixture of experts whose expert weights are fused 3-D tensors keeps them in full precision, and
    they are most of its weights: said in a warning, never left for the size table alone to show."""
    fused = fused_expert_tensors(model)
    if not fused:
        return
    total = sum(p.numel() for p in model.parameters())
    share = sum(n for _, n in fused) / max(total, 1)
    warnings.warn(f"{len(fused)} fused expert tensor{'s' * (len(fused) != 1)} ({fused[0][0]}{' and others' * (len(fused) > 1)}"
                  f": {share:.0%} of the model's weights) kept in full precision: shrink quantizes Linear, Conv1D, "
                  "Conv2d and Embedding layers, not experts fused into 3-D tensors yet", stacklevel=4)


def _fall_back(model: nn.Module, assignment: dict, exact: set[str], quiet: bool = False) -> dict[str, str]:
    """Layers a glob gave a grouped format whose group does not divide their inputs (ResNet's 147-input stem)
    get the same format with one scale per output channel instead, and layers a glob gave a K-quant format whose
    super-blocks of 256 do not divide their inputs get the format llama.cpp gives them (q4k: int5-g32, which is
    Q5_0); said in a warning and returned as {layer: why} for the record. A layer named exactly keeps its
    format (and validate_weights refuses it), and so does every layer when none would keep the format asked
    (the format does not fit this model at all)."""
    misfits = {}  # name -> its number of inputs
    grouped = 0
    for name, fmt in assignment.items():
        if fmt is None or fmt.cast or fmt.group_size is None or name in exact:
            continue
        grouped += 1
        k = weight_2d(model.get_submodule(name)).shape[1]
        if k % (SUPERBLOCK if fmt.kquant else fmt.group_size):
            misfits[name] = k
    if not misfits or len(misfits) == grouped:
        return {}
    out = {}
    for name, k in misfits.items():
        fmt = assignment[name]
        if fmt.kquant:
            assignment[name] = new = parse_format(KQUANTS[fmt.kquant].fallback)
            out[name] = (f"asked {fmt.name}: its super-blocks of {SUPERBLOCK} do not divide the layer's {k} inputs, "
                         f"so it is {new.name}, as llama.cpp does")
            continue
        assignment[name] = new = dataclasses.replace(fmt, group_size=None)
        out[name] = (f"asked {fmt.name}: its groups of {fmt.group_size} do not divide the layer's {k} inputs, "
                     f"so it is {new.name} (one scale per output channel)")
    if not quiet:
        for kquant in (False, True):
            names = [n for n in out if (assignment[n].group_size is not None) == kquant]
            if not names:
                continue
            shown = ", ".join(f"{n} ({misfits[n]} inputs)" for n in names[:4])
            more = f" and {len(names) - 4} more" if len(names) > 4 else ""
            what = (f"given {', '.join(sorted({assignment[n].name for n in names}))} (as llama.cpp gives them), not "
                    f"the K-quant asked" if kquant else "kept per channel, not in groups")
            why = "super-blocks of 256" if kquant else "the group"
            warnings.warn(f"{len(names)} layer{'s' * (len(names) != 1)} {what}: {shown}{more}; their input sizes are "
                          f"not a multiple of {why} (shrink.json's 'fallbacks' lists them)", stacklevel=5)
    return out


class _Undo:
    """What `quantize` needs to put a model back as it was after a failure: every module's children and
    every parameter's and buffer's tensor, by reference (no copy: the methods replace tensors rather than
    change them in place), and the config fields it sets."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.children = [(m, dict(m._modules)) for m in model.modules()]
        self.tensors = [(m, dict(m._parameters), {n: (p.data if p is not None else None)
                                                  for n, p in m._parameters.items()}, dict(m._buffers))
                        for m in model.modules()]
        self.hooks = [(m, dict(m._forward_pre_hooks)) for m in model.modules()]  # (an online rotation's)
        config = getattr(model, "config", None)
        self.tie = getattr(config, "tie_word_embeddings", None) if config is not None else None

    def restore(self) -> None:
        for m, children in self.children:
            m._modules.clear()
            m._modules.update(children)
        for m, params, data, buffers in self.tensors:
            m._parameters.clear()
            m._parameters.update(params)
            for n, p in params.items():
                if p is not None:
                    p.data = data[n]
            m._buffers.clear()
            m._buffers.update(buffers)
        for m, hooks in self.hooks:
            m._forward_pre_hooks.clear()
            m._forward_pre_hooks.update(hooks)
        if self.tie is not None:
            self.model.config.tie_word_embeddings = self.tie


def _tie_quantized_embedding(model: nn.Module, assignment: dict, spec, backend: str | None) -> None:
    """A quantized input embedding whose output layer was tied to it: the output layer becomes a QuantLinear
    over the embedding's own buffers (quantized once, kept tied) unless the mapping names the output layer
    with another format or None (then it is untied and keeps that). transformers must not tie them again
    either way (tie_word_embeddings false)."""
    config = getattr(model, "config", None)
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if config is None or not callable(get_in) or not callable(get_out):
        return
    try:
        table = get_in()
    except (NotImplementedError, AttributeError):  # vision models (ResNet) have no input embeddings
        return
    if not isinstance(table, QuantEmbedding) or not getattr(config, "tie_word_embeddings", False):
        return
    config.tie_word_embeddings = False
    head = get_out()
    name = next((n for n, m in model.named_modules() if m is head), None)
    explicit = isinstance(spec, Mapping) and name in spec
    if name is not None and (assignment.get(name) == table.spec or (not explicit and assignment.get(name) is None)):
        tied = table.tied_output(head.bias, backend)
        set_submodule(model, name, tied)
        assignment[name] = table.spec


def _check_forward(model: nn.Module, inputs, described: str, before, skipped: str | None) -> ForwardCheck:
    """The quantized model's output on the sample input against the original's; ValueError when it no
    longer runs or its output is not finite."""
    if before is None:
        return ForwardCheck(None, described, skipped=skipped)
    try:
        after = run_forward(model, inputs)
    except Exception as e:
        raise ShrinkError(f"the quantized model's forward pass fails on {described} ({type(e).__name__}: "
                         f"{str(e)[:200]}); the model was put back as it was") from None
    err = relative_error(before, after)
    if not math.isfinite(err):
        from .check import refuse_non_finite

        refuse_non_finite(model)  # names the tensor when the weights themselves hold NaN
        raise ShrinkError(f"the quantized model's output on {described} is not finite or changed shape; the model "
                         "was put back as it was")
    return ForwardCheck(err, described)


def _refuse_nothing_to_do(model: nn.Module, assignment: dict) -> None:
    """ValueError saying what the model holds when the plan quantizes no layer at all."""
    if any(s is not None for s in assignment.values()):
        return
    kinds: dict[str, int] = {}
    for m in model.modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) and not is_conv1d(m) and any(True for _ in m.parameters(recurse=False)):
            kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
    others = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
    others = f"; its other layers ({others}) are not quantized by shrink" if others else ""
    if assignment:
        raise ShrinkError(f"nothing to quantize: the model's {len(assignment)} Linear layer(s) are all kept in full "
                         f"precision (the output layer is kept unless keep_output=False){others}")
    raise ShrinkError(f"nothing to quantize: the model has no Linear or Conv2d layers{others}")


def _check_options(n_samples: int, seq_len: int, target_bits: float | None, damp: float) -> None:
    """Calibration options in range (NaN and infinity refused), with the range in the message."""
    import math

    def real(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not (isinstance(n_samples, int) and not isinstance(n_samples, bool) and n_samples >= 1):
        raise ShrinkError(f"n_samples (calibration windows) must be an integer of 1 or more, got {n_samples!r}")
    if not (isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len >= 2):
        raise ShrinkError(f"seq_len (tokens per calibration window) must be an integer of 2 or more, got {seq_len!r}")
    if target_bits is not None and not (real(target_bits) and 2.5 <= target_bits <= 16):
        raise ShrinkError(f"target_bits must be a number from 2.5 to 16 bits per weight, got {target_bits!r}")
    if not (real(damp) and 0 < damp <= 1):
        raise ShrinkError(f"damp (GPTQ's dampening, a fraction of the Hessian's mean diagonal) must be more than 0 "
                         f"and at most 1, got {damp!r}")


def validate_weights(model: nn.Module, assignment: dict[str, QuantSpec | None]) -> None:
    """Check every layer against its format before changing anything, so an error leaves the model whole."""
    for name, fmt in assignment.items():
        if fmt is None:
            continue
        w = weight_2d(model.get_submodule(name))
        if fmt.cast and isinstance(model.get_submodule(name), nn.Conv2d):
            raise ShrinkError(f"layer {name!r}: convolutions take integer formats (int8, int4-g32, ...), not {fmt.name}")
        if fmt.cast:
            if not all_finite(w):
                raise ShrinkError(f"layer {name!r}: weight has NaN or infinite values")
        else:
            check_weight(w, fmt, name)
