"""Quantize a Hugging Face folder larger than memory: block by block from its safetensors shards.

The model is built as a skeleton on the meta device (no memory). The tensors outside the decoder blocks
that the first block's inputs need (the input embedding, in its stored dtype) are read once; then each
block's tensors are read from the shards when it is its turn, the block is quantized (round to nearest, or
calibrated on the inputs the quantized blocks before it give, exactly as in memory), its outputs are computed
for the next block, its packed tensors are written out and its memory is let go. Round to nearest keeps the
weights it rounds as stored (bf16) and makes each float32 in one reused workspace as it is computed with or
rounded; calibrated methods hold the block in float32. The tensors outside the blocks go to the output as
stored (bf16 stays bf16). So the peak is about one block, plus the embedding, the calibration activations and
one output shard, never the whole model.

The forward check follows one sample input through both the original and the quantized blocks, and
compares the last block's outputs (the output layer is not run, so as not to hold it in float32).

With quantization-aware distillation (a QAD step in the recipe), the original's outputs on the QAD text are
computed first, a block at a time from the shards (`teacher_streamed`); the quantized model is written to
a temporary folder beside the output, read back (packed, it is a fraction of the original), trained (a
block at a time where whole it would not fit: quant/qad.py) and written to the output.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from ..core.architecture import find_stacks
from ..core.errors import ShrinkError
from ..core.memory import MemoryEstimate, check_fits_memory, release_freed_memory, resident_memory
from ..io.hfnames import CheckpointNames, checkpoint_names
from ..io.manifest import FORMAT_VERSION
from ..io.models import tokenizer_or_none
from ..io.safety import build_empty, read_config, skeleton_bytes
from ..io.saved import finish_folder, layer_state, manifest_for, planned_layout, writing_folder
from ..io.shards import DTYPES, SHARD_BYTES, Checkpoint, placeholder, release
from ..quant.apply import fuse_back, output_layer_name, plan_job, validate_weights
from ..quant.experts import LinearExperts, all_tokens, fused_experts, unfuse_experts
from ..quant.check import ForwardCheck, refuse_non_finite_tensor, relative_error, sample_input
from ..quant.layerwise import capture_inputs, first_output, float32_weights, run_block
from ..quant.mixed import DEFAULT_LADDER, MixedPrecision, allocate
from ..quant.spec import parse_format
from ..quant.record import update_record
from ..quant.replace import find_submodule, round_to_nearest, set_submodule


@dataclass
class Streamed:
    """What a streamed quantization leaves: the model's skeleton (its quantized layers in place, described by
    `shrink.info`, their tensors let go), its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: object
    source: dict
    estimate: MemoryEstimate | None = None


def _skeleton(folder: Path):
    """The causal LM `folder/config.json` describes, its parameters on the meta device."""
    import transformers

    config = read_config(folder)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs and isinstance(archs[0], str) else None
    if not (isinstance(cls, type) and archs[0].endswith("ForCausalLM")):
        return None, f"{folder / 'config.json'} names {archs or 'no architecture'}, not a causal LM transformers builds"
    # the skeleton is built a tensor at a time (each made, then put on the meta device) and keeps its
    # buffers: what the config implies of those must fit (a million layers, an absurd vocabulary)
    check_fits_memory(skeleton_bytes(cls, config, folder / "config.json"), f"{folder / 'config.json'}: the model it "
                      "describes", " (its largest tensor and its buffers, which a streamed job holds at once)")
    model = build_empty(cls, config, folder / "config.json")
    return model.eval(), None


def _checkpoint(folder: Path, model: nn.Module) -> Checkpoint:
    """The folder's weights, known by the names the model's modules give them (transformers' renamings)."""
    checkpoint = Checkpoint(folder)
    checkpoint.mapped = True  # each tensor read once and let go: mapped, not copied (a tenth of the time)
    names = checkpoint_names(model.config.model_type)
    if names.renamings:
        checkpoint.rename(names.loaded)
    return checkpoint


def why_not_streamed(folder, spec=None, *, target_bits: float | None = None, keep_output: bool = True,
                     job=None, model=None, checkpoint=None, names: bool = True) -> str | None:
    """Why `folder` cannot be quantized block by block from disk (None when it can): it must be a Hugging
    Face causal LM with safetensors weights named as the model names its tensors, one stack of decoder
    blocks, and the job (`spec` with `target_bits` and `keep_output`, as `shrink.quantize` takes them; or
    a planned `job`) must quantize only the blocks' layers and the output layer (quantized embeddings need
    the whole model in memory so far), and mixed precision (`target_bits`) choose formats for the blocks'
    layers only."""
    folder = Path(folder)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        return f"{folder} is not a Hugging Face folder"
    if not any(folder.glob("*.safetensors")):
        return f"{folder} holds no safetensors weights"
    if model is None:
        model, why = _skeleton(folder)
        if why:
            return why
    stacks = find_stacks(model)
    if len(stacks) != 1:
        return f"{type(model).__name__} has {len(stacks)} stacks of blocks (one decoder stack streams)"
    try:
        checkpoint = checkpoint or _checkpoint(folder, model)
    except ShrinkError as e:
        return str(e)
    if job is None and spec is not None:
        with warnings.catch_warnings():  # said again when the job runs
            warnings.simplefilter("ignore")
            job = plan_job(model, spec, keep_output=keep_output, target_bits=target_bits,
                           calibration=[] if target_bits is not None or isinstance(spec, MixedPrecision) else None)
    known = _tensor_names(model, checkpoint_names(model.config.model_type).leaves) if names else set(checkpoint.tensors)
    unknown = [k for k in checkpoint.tensors if k not in known]
    if unknown:
        return (f"the weights name tensors {type(model).__name__} does not have as such ({unknown[0]!r}"
                f"{f' and {len(unknown) - 1} more' if len(unknown) > 1 else ''}; transformers renames them on loading)")
    if job is not None and job.recipe.rotate is not None:
        return ("a rotation folds into the embedding, every block and the output layer at once: it needs the "
                "whole model in memory")
    if job is not None:
        prefix = stacks[0][0] + "."
        head = output_layer_name(model)
        outside = [n for n, s in job.assignment.items() if s is not None and not n.startswith(prefix) and n != head]
        if outside:
            return f"layer {outside[0]!r} outside the decoder blocks is to be quantized"
        if job.target_bits is not None and job.assignment.get(head) is not None:
            return (f"mixed precision would choose a format for the output layer {head!r} too (its sensitivity pass "
                    "streams the blocks' layers): keep the output layer, or load the model whole")
    return None


def _refuse_incomplete(folder: Path, model: nn.Module, checkpoint: Checkpoint) -> None:
    """Before any work: every tensor the model needs must be in the weights with its shape (a tied output
    layer's is its table's; a mixture's experts may be stored one tensor per expert), as the whole-model
    load refuses it."""
    leaves = checkpoint_names(model.config.model_type).leaves
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        tied.add(f"{head}.weight")
    experts = {path for path, _ in fused_experts(model)}
    missing, wrong = [], []
    for name, t in model.state_dict(keep_vars=True).items():
        stored = checkpoint.tensors.get(name)
        if stored is None:
            path = name.rpartition(".")[0]
            per_expert = path in experts and len(leaves) == 2 and f"{path}.0.{leaves['down'][0]}" in checkpoint.tensors
            if name not in tied and not per_expert:
                missing.append(name)
        elif stored.shape != tuple(t.shape):
            wrong.append(name)
    if missing or wrong:
        def show(keys):
            return ", ".join(keys[:4]) + (f" ... ({len(keys)} in all)" if len(keys) > 4 else "")
        parts = ([f"missing {show(missing)}"] if missing else []) + ([f"of the wrong shape {show(wrong)}"] if wrong else [])
        raise ShrinkError(f"{folder}: the weights do not match config.json ({'; '.join(parts)})")


def _tensor_names(model: nn.Module, leaves: dict) -> set[str]:
    """The names a checkpoint of `model` may use: its own, and one tensor per expert and projection for its
    fused experts (how Mixtral's and Qwen-MoE's checkpoints store them, e.g. `experts.3.w1.weight`)."""
    names = set(model.state_dict(keep_vars=True))
    if len(leaves) == 2:
        for path, m in fused_experts(model):
            for e in range(m.gate_up_proj.shape[0]):
                names.update(f"{path}.{e}.{leaf}" for leaf in (*leaves["gate_up"], *leaves["down"]))
    return names


def quantize_streamed(folder, out: Path | None, spec="int4-g64", *, method="rtn", calibration=None,
                      n_samples: int = 128, seq_len: int = 512, damp: float = 0.01, act_order: bool = True,
                      tune_steps: int = 0, keep_output: bool = True, backend: str | None = None,
                      progress: bool | None = None, force: bool = False, results=None,
                      shard_bytes: int = SHARD_BYTES, say=print, all_experts: bool = False, qad_data=None,
                      qad_checkpoint: Path | None = None, qad_resume: bool = False) -> Streamed:
    """Quantize the Hugging Face causal LM in `folder` block by block from its safetensors weights, and write
    it to `out` (a shrink folder, sharded past `shard_bytes`, default 2 GB; None: nothing is written).

    spec, method, calibration, n_samples, seq_len, damp, act_order, tune_steps, keep_output, backend,
    progress, all_experts: as `shrink.quantize` takes them (defaults int4-g64, rtn, no data, 128 x 512, 0.01,
    on, 0, True, auto, auto, False). force: replace a folder shrink wrote at `out` (default False). results: a function of the
    quantized skeleton and the MemoryEstimate returning the dict written as results.json (default none). say: where the memory
    estimate line goes (default print); the estimate is in `Streamed.estimate` too. qad_data,
    qad_checkpoint, qad_resume: a QAD step's text (default: the calibration text), its checkpoint folder and
    whether to resume from it, as `shrink.quantize` takes them; QAD needs `out`. ShrinkError when the
    folder cannot be streamed (`why_not_streamed` says why), naming the file and tensor on bad input.
    """
    folder = Path(folder)
    model, why = _skeleton(folder)
    if why:
        raise ShrinkError(f"cannot stream {folder}: {why}")
    checkpoint = _checkpoint(folder, model)
    why = why_not_streamed(folder, model=model, checkpoint=checkpoint)  # the names as the checkpoint has them
    if why:
        raise ShrinkError(f"cannot stream {folder}: {why}")
    _refuse_incomplete(folder, model, checkpoint)
    fused = unfuse_experts(model)  # a mixture's experts one Linear layer each, read from the fused tensors
    job = plan_job(model, spec, method=method, calibration=calibration, n_samples=n_samples, seq_len=seq_len,
                   damp=damp, act_order=act_order, tune_steps=tune_steps, keep_output=keep_output)
    fuse_back(model, fused, job.assignment)
    why = why_not_streamed(folder, job=job, model=model, checkpoint=checkpoint, names=False)
    if why:
        raise ShrinkError(f"cannot stream {folder}: {why}")
    tokenizer = tokenizer_or_none(folder)
    source = {"kind": "huggingface", "path": str(folder), "streamed": True}
    (prefix, blocks), = find_stacks(model)
    head = output_layer_name(model)
    data = qad = None
    from ..quant.calibration import prepare

    if job.needs_data:
        data = prepare(calibration, tokenizer=tokenizer, model=model, n_samples=n_samples, seq_len=seq_len)
    if job.recipe.qad is not None:  # its data checked before any work
        from ..quant.qad import check_resumable, check_windows

        if out is None:
            raise ShrinkError("quantization-aware distillation of a model quantized block by block trains the "
                              "folder it writes: give an output folder")
        if qad_data is None and calibration is None:
            raise ShrinkError("QAD needs data: pass qad_data= (or calibration=) text or token windows")
        qad = prepare(qad_data if qad_data is not None else calibration, tokenizer=tokenizer, model=model,
                      n_samples=n_samples, seq_len=seq_len)
        check_windows(qad.samples)
        check_resumable(qad_checkpoint, qad_resume)
    windows = (data.samples if data is not None else []) + (qad.samples if qad is not None else [])
    tokens = max(sum(int(w.numel()) for w in part.samples) if part is not None else 0 for part in (data, qad))
    estimate = estimate_memory(model, checkpoint, job, prefix, tokens,
                               max((int(w.shape[-1]) for w in windows), default=0), head)
    estimate.refuse_unless_fits("--samples and --seq-len lower the calibration's share" if windows else "")
    say(estimate.line())
    if qad is not None:
        import tempfile

        from ..core.outdir import claim
        from ..core.ownership import is_own_folder, remove_own

        with claim(Path(out), "quantize", owned=is_own_folder, force=force):  # (refused now, not after the work)
            targets = teacher_streamed(folder, qad.samples, job.recipe.qad.top_k, progress=progress)
            staging = Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.quantized-", dir=Path(out).parent))
            try:
                streamed = quantize_streamed(folder, staging / "model", spec, method=replace(job.recipe, qad=None),
                                             calibration=calibration, n_samples=n_samples, seq_len=seq_len, damp=damp,
                                             act_order=act_order, tune_steps=tune_steps, keep_output=keep_output,
                                             backend=backend, progress=progress, shard_bytes=shard_bytes,
                                             say=lambda _line: None, all_experts=all_experts)
                return _distill_written(staging / "model", out, qad, targets, job, streamed, estimate,
                                        results=results, force=force, shard_bytes=shard_bytes, progress=progress,
                                        say=say, checkpoint=qad_checkpoint, resume=qad_resume)
            finally:
                if (staging / "model").exists():
                    remove_own(staging / "model")
                staging.rmdir()
    mixed = None
    if job.target_bits is not None:  # a first walk over the blocks measures each layer's sensitivity
        ladder = tuple(job.ladder or DEFAULT_LADDER)
        errors, sizes = _sensitivity(checkpoint, model, prefix, head, job, data.samples, ladder, progress)
        chosen = allocate(errors, sizes, job.target_bits, ladder)
        job.assignment.update({n: parse_format(f) for n, f in chosen.items()})
        mixed = {"target_bits": job.target_bits, "ladder": list(ladder)}
    layout = planned_layout(model, job.assignment)
    names = checkpoint_names(model.config.model_type)
    walk = _Walk(checkpoint, model, prefix, head, job.assignment, layout, names, rounding=not job.needs_data)
    with (writing_folder(out, {"format_version": FORMAT_VERSION, "layout": layout}, force=force,
                         shard_bytes=shard_bytes, names=names) if out is not None else _nowhere()) as (tmp, writer):
        walk.writer = writer
        walk.load_rest()
        inputs, described = sample_input(model)
        walk.check = capture_inputs(model, blocks[0], [inputs["input_ids"]])
        walk.original = walk.check
        record = None
        if job.needs_data:
            from ..quant.calibrated import quantize_calibrated

            all_tokens(model, all_experts)
            report = quantize_calibrated(model, job.assignment, data.samples, job.recipe, backend=backend,
                                         progress=progress, around=walk)
            all_tokens(model, False)
            record = {**job.calibration_record(data.record), **(mixed or {}), "layers": report.layers,
                      "warnings": report.warnings()}
        else:
            from ..quant.layerwise import blockwise

            blockwise(model, [], _RoundBlock(job.assignment, backend, walk.workspace), progress=progress,
                      desc="quantize", around=walk)
        walk.finish_rest()
        err = relative_error(first_output(walk.original[0][0]), first_output(walk.check[0][0]))
        if not math.isfinite(err):
            raise ShrinkError(f"the quantized blocks' output on {described} is not finite; nothing was written")
        check = ForwardCheck(err, f"{described}, the last block's output (streamed: the output layer is not run)")
        formats = {n: (s.name if s else None) for n, s in job.assignment.items()}
        update_record(model, method=job.method, formats=formats, calibration=record, check=check,
                      fallbacks=job.fallbacks, source=source)
        if writer is not None:
            manifest = manifest_for(model, source)
            if manifest["layout"] != layout:
                raise ShrinkError(f"internal: the streamed weights were written in layout {layout!r}, but the model "
                                  f"describes {manifest['layout']!r}; nothing was written")
            finish_folder(model, tmp, writer, manifest, tokenizer=tokenizer,
                          results=results(model, estimate) if results is not None else None)
    return Streamed(model, tokenizer, source, estimate)


def _distill_written(written: Path, out: Path, qad, targets, job, streamed: Streamed, estimate, *, results,
                     force: bool, shard_bytes: int, progress, say, checkpoint, resume) -> Streamed:
    """QAD of the quantized model in `written` (read back whole: packed, it is a fraction of the original)
    against the original's `targets` on `qad`'s windows, a block at a time (whole when the codes train too),
    then the model written to `out`, its record saying what QAD did."""
    from ..io import read_model, save
    from ..quant.qad import distill_quantized, qad_record
    from ..quant.record import record_of

    loaded = read_model(written)
    model = loaded.model
    q = job.recipe.qad
    # a block at a time, as the rest of a streamed job (whole, the float32 levels alone are twice the bf16 model)
    result = distill_quantized(model, qad.samples, targets, steps=q.steps, seconds=q.seconds, lr=q.lr,
                               progress=progress, say=say, checkpoint=checkpoint, resume=resume, codes_lr=q.codes_lr,
                               blockwise=not q.codes_lr)
    record = record_of(model).calibration or job.calibration_record(qad.record)
    record["qad"] = qad_record(result, qad.record, q)
    update_record(model, calibration=record)
    source = streamed.source
    save(model, out, tokenizer=loaded.tokenizer, source=source, force=force, shard_bytes=shard_bytes,
         results=results(model, estimate) if results is not None else None)
    return Streamed(model, loaded.tokenizer, source, estimate)


def teacher_streamed(folder, windows: list[torch.Tensor], top_k: int = 64, progress: bool | None = None) -> list:
    """`quant.qad.teacher_targets` of the Hugging Face causal LM in `folder` on token `windows` (the top-k
    next-token log-probabilities and ids, default k 64), its blocks read from the safetensors weights one at
    a time in float32, all windows through each, then the final norm and the output layer per window: the
    original's outputs for a model that does not fit in memory."""
    from ..quant.calibrated import outputs_by_block
    from ..quant.qad import top_tokens

    folder = Path(folder)
    model, why = _skeleton(folder)
    if why:
        raise ShrinkError(f"cannot stream {folder}: {why}")
    checkpoint = _checkpoint(folder, model)
    _refuse_incomplete(folder, model, checkpoint)
    unfuse_experts(model)
    (prefix, _), = find_stacks(model)
    head = output_layer_name(model)
    walk = _Walk(checkpoint, model, prefix, head, {}, "", checkpoint_names(model.config.model_type))
    walk.load_rest()
    set_submodule(model, head, walk.head_linear())
    try:
        return outputs_by_block(model, [w.reshape(1, -1) for w in windows], lambda out: top_tokens(out[0], top_k),
                                around=_Reading(walk), progress=progress, desc="teacher")
    finally:
        release(model)
        release_freed_memory()


SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"), ("query", "key", "value"))


def estimate_memory(model: nn.Module, checkpoint: Checkpoint, job, prefix: str, tokens: int = 0,
                    length: int = 0, head: str | None = None) -> MemoryEstimate:
    """The streamed job's peak memory from the skeleton's shapes, the checkpoint's dtypes and the calibration
    (`tokens` in all, in windows of at most `length`; none for round to nearest), by phase: capturing the first block's
    inputs (the embedding as stored, the activations), one block (read as stored, held in float32, its
    inputs and outputs, one sample's forward, and for calibrated methods the Hessians and GPTQ's or AWQ's
    working copies of the largest layer), and writing the tensors outside the blocks one at a time."""
    config = model.config
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(config, "head_dim", None) or (hidden // heads if heads else 0))
    blocks = model.get_submodule(prefix)
    length = max(length, 16)  # (the forward check's sample: 16 tokens)
    acts = tokens * hidden * 4
    kwargs = tokens * head_dim * 4 * 2  # each window's rotary cos and sin
    table = model.get_input_embeddings()
    table_keys = [f"{n}.{k}" for n, m in model.named_modules() if m is table for k in m._parameters]
    outside = [k for k in checkpoint.tensors if not k.startswith(prefix + ".")]
    rest_f32 = sum(4 * math.prod(checkpoint.tensors[k].shape) for k in outside
                   if k not in table_keys and not (head and k.startswith(head + ".")))  # the output layer waits
    phases = {"capturing the first block's inputs": {
        "embedding as stored": checkpoint.nbytes([k for k in table_keys if k in checkpoint.tensors]),
        "other tensors outside the blocks": rest_f32, "activations": acts + kwargs}}
    worst: dict[str, int] = {}
    rounded = rounded_weights(model, prefix, job.assignment)
    for i, block in enumerate(blocks):
        keys = [k for k in checkpoint.tensors if k.startswith(f"{prefix}.{i}.")]
        params = sum(p.numel() for p in block.parameters())
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        largest = max(linears.values(), key=lambda m: m.in_features * m.out_features, default=None)
        inter = max((m.out_features for m in linears.values()), default=hidden)
        if job.needs_data:  # the block as stored: this one's bytes while they are made float32, then the next one's
            parts = {"block as stored": checkpoint.nbytes(keys), "block in float32": 4 * params}
        else:  # rounded weights held as stored, made float32 one at a time; the next block read ahead
            kept = {k: v for k, v in rounded.items() if k.startswith(f"{prefix}.{i}.")}
            parts = {"block as stored": checkpoint.nbytes(keys), "next block read ahead": checkpoint.nbytes(keys),
                     "the rest of the block in float32": 4 * (params - sum(kept.values())),
                     "float32 workspace": 4 * max(kept.values(), default=0)}
        parts |= {"activations in and out": 2 * acts + kwargs + length * hidden * 4 * 2,
                  "one sample through the block": heads * length * length * 4 + 3 * length * inter * 4}
        if largest is not None:  # its codes (a byte each) and their packed form, rounded in float32 memory
            parts["rounding a layer"] = 3 * largest.in_features * largest.out_features // 2
        if job.needs_data and largest is not None:
            # the Hessians (float64) of the block's layers, one per distinct input, all gathered first and
            # each let go once its layers are quantized; GPTQ on a layer of k inputs adds its dampened copy,
            # the factorisation's workspace and the factor (about 1.75 k x k in float64) and its weights
            hessians, seen = [], set()
            for n, m in linears.items():
                leaf = n.rpartition(".")[2]
                shared = next((g for g in SHARED_INPUTS if leaf in g), None)
                key = (n.rpartition(".")[0], shared) if shared else n
                if key not in seen and job.assignment.get(f"{prefix}.{i}.{n}") is not None:
                    seen.add(key)
                    hessians.append((8 * m.in_features ** 2, m))
            parts["input statistics (Hessians)"] = sum(b for b, _ in hessians)
            if job.recipe.gptq is not None:
                left, most = sum(b for b, _ in hessians), 0
                for b, m in hessians:
                    most = max(most, left - sum(b for b, _ in hessians) + int(1.75 * b) + 12 * m.out_features * m.in_features)
                    left -= b
                parts["GPTQ on one layer"] = most
            if job.recipe.awq is not None:
                k, o = largest.in_features, largest.out_features
                parts["AWQ's searches"] = 4 * 4 * o * k + 512 * k * 4 * 2
            if job.recipe.tune is not None:
                parts["tuning"] = 3 * 4 * params + job.recipe.tune.steps * length * hidden * 4
        if sum(parts.values()) > sum(worst.values()):
            worst = parts
    phases["quantizing a block"] = worst
    if job.target_bits is not None and head is not None:
        # every layer-and-format trial's hidden states (the probe: at most 256 tokens of the first window)
        probe = min(256, length)
        trials = sum(1 for n, s in job.assignment.items() if s is not None and n.startswith(prefix + ".")) \
            * (len(job.ladder or DEFAULT_LADDER) - 1)
        out = model.get_submodule(head)
        phases["measuring sensitivity"] = {
            "block in float32": max(4 * sum(p.numel() for p in b.parameters()) for b in blocks),
            "output layer in float32": 4 * out.in_features * out.out_features,
            "trials' hidden states": trials * probe * hidden * 4,
            "one trial's output": 4 * probe * out.out_features * 4}
    biggest = max((checkpoint.nbytes([k]) for k in outside), default=0)
    phases["writing the tensors outside the blocks"] = {"largest tensor as stored": biggest}
    return MemoryEstimate("streamed quantization", resident_memory(), phases)


class _nowhere:
    """writing_folder's stand-in when nothing is to be written."""

    def __enter__(self):
        return None, None

    def __exit__(self, *exc):
        return False


def _sensitivity(checkpoint: Checkpoint, model: nn.Module, prefix: str, head: str, job, samples, ladder, progress):
    """Mixed precision's sensitivity pass (calibrated.measure_sensitivity) over the blocks read from disk one
    at a time in float32, then the final norm and the output layer (float32) for every trial's output."""
    from ..quant.calibrated import measure_sensitivity

    walk = _Walk(checkpoint, model, prefix, head, job.assignment, "", checkpoint_names(model.config.model_type))
    walk.load_rest()
    skeleton_head = model.get_submodule(head)
    set_submodule(model, head, walk.head_linear())  # for the trials' outputs, then the skeleton's again
    try:
        return measure_sensitivity(model, samples, job.assignment, ladder, progress=progress, around=_Reading(walk))
    finally:
        set_submodule(model, head, skeleton_head)
        release_freed_memory()


class _Reading:
    """Around each block of the sensitivity pass: its tensors read (float32) before, let go after."""

    def __init__(self, walk: "_Walk"):
        self.walk = walk

    def enter(self, name: str, block: nn.Module) -> None:
        self.walk.fill_block(name, block)

    def leave(self, name: str, block: nn.Module) -> None:
        release(block)
        release_freed_memory()


def rounded_weights(model: nn.Module, prefix: str, assignment) -> dict[str, int]:
    """{weight name: values} of the Linear layers in the blocks under `prefix` that `assignment` rounds to an
    integer format (what a streamed round to nearest keeps as stored and makes float32 one at a time)."""
    return {f"{n}.weight": m.in_features * m.out_features for n, m in model.named_modules()
            if n.startswith(prefix + ".") and isinstance(m, nn.Linear) and assignment.get(n) is not None
            and not assignment[n].cast}


class _RoundBlock:
    """Round to nearest for one block's layers (blockwise's visit when there is no calibration)."""

    def __init__(self, assignment, backend, workspace: torch.Tensor | None = None):
        self.assignment, self.backend, self.workspace = assignment, backend, workspace

    def __call__(self, name, block, inputs) -> None:
        for rel, m in list(block.named_modules()):
            spec = self.assignment.get(f"{name}.{rel}")
            if spec is not None:  # each weight made float32 and rounded in the one workspace
                set_submodule(block, rel, round_to_nearest(m, spec, f"{name}.{rel}", self.backend, self.workspace))


class _Walk:
    """Around each block (layerwise.BlockHooks): its tensors read and checked before it is visited, the sample
    input run through the original block; after it: the sample through the quantized block, its tensors
    written and let go. rounding (round to nearest): the weights of the Linear layers to be rounded are held as
    stored and made float32 one at a time in `workspace` (the forward through the original block, the
    rounding); otherwise the block is held in float32."""

    def __init__(self, checkpoint: Checkpoint, model: nn.Module, prefix: str, head: str | None, assignment, layout: str,
                 names: CheckpointNames, rounding: bool = False):
        self.checkpoint, self.model, self.prefix, self.head = checkpoint, model, prefix + ".", head
        self.names = names  # its per-expert tensor names read experts stored one by one, and write them so
        self.assignment, self.layout, self.writer = assignment, layout, None
        self.check = self.original = None
        # an output layer tied to the embedding shares its tensor: the checkpoint holds it under the table's name
        self.head_key = None
        if head is not None:
            key = f"{head}.weight"
            table = model.get_input_embeddings()
            tied = [f"{n}.weight" for n, m in model.named_modules() if m is table] \
                if getattr(model.config, "tie_word_embeddings", False) else []
            self.head_key = key if key in checkpoint.tensors else next(iter(tied), None)
        self.hook = None
        self.stored = rounded_weights(model, prefix, assignment) if rounding else {}
        self.workspace = torch.empty(max(self.stored.values()), dtype=torch.float32) if self.stored else None

    def _outside(self, name: str) -> bool:
        return not name.startswith(self.prefix) and (self.head is None or not name.startswith(self.head + "."))

    def load_rest(self) -> None:
        """The tensors outside the blocks and the output layer, for the first block's inputs: the input
        embedding as stored (its rows are made float32 as they are looked up: a float32 copy of a large
        vocabulary's table would double it), the rest (norms, small) in float32."""
        table = self.model.get_input_embeddings()
        table_names = {f"{n}.{k}" for n, m in self.model.named_modules() if m is table for k in m._parameters}
        read = self.checkpoint.fill(self.model, float_dtype=torch.float32,
                                    only=lambda n: self._outside(n) and n not in table_names)
        read += self.checkpoint.fill(self.model, only=lambda n: n in table_names)
        state = self.model.state_dict()
        for name in read:  # (the output layer's are checked as they are written)
            refuse_non_finite_tensor(name, state[name])
        self.hook = table.register_forward_hook(lambda _m, _a, out: out.float() if out.is_floating_point() else out)

    def head_linear(self) -> nn.Linear:
        """A new Linear holding the output layer in float32 (its own tensors, or the embedding table's when
        tied): the skeleton's output layer, and a tie it has, stay as they are."""
        if self.head_key is None:
            raise ShrinkError(f"{self.checkpoint.where}: no tensor holds the output layer {self.head!r}'s weight")
        old = self.model.get_submodule(self.head)
        lin = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        self.checkpoint.fill(lin, self.head + ".", torch.float32, only=lambda n: not n.endswith(".weight"))
        lin.weight = nn.Parameter(self.checkpoint.tensor(self.head_key).float(), requires_grad=False)
        return lin

    def enter(self, name: str, block: nn.Module) -> None:
        self.fill_block(name, block)
        with float32_weights(block, self.workspace) if self.workspace is not None else nullcontext():
            self.original = run_block(block, self.original)  # (each layer's weight is checked as it is quantized)

    def fill_block(self, name: str, block: nn.Module) -> None:
        """The block's tensors from the checkpoint (the embedding let go once the first block's inputs are
        captured), and the next block's read ahead."""
        if self.hook is not None:  # the first block's inputs are captured: the embedding is not needed again
            self.hook.remove()
            self.hook = None
            release(self.model.get_input_embeddings())
            release_freed_memory()
        experts = [n for n, m in block.named_modules() if isinstance(m, LinearExperts)]
        inside = tuple(f"{name}.{n}." for n in experts)
        stored = self.stored
        self.checkpoint.fill(block, name + ".", float_dtype=torch.float32,
                             only=lambda n: not n.startswith(inside) and n not in stored)
        self.checkpoint.fill(block, name + ".", only=lambda n: not n.startswith(inside) and n in stored)
        for rel in experts:
            self._fill_experts(block.get_submodule(rel), f"{name}.{rel}")
        # the next block's tensors read while this one is worked on (its bytes as stored are what reading this
        # one held a moment ago: the peak is the same)
        after = f"{self.prefix}{int(name[len(self.prefix):]) + 1}."
        self.checkpoint.read_ahead(k for k in self.checkpoint.tensors if k.startswith(after))

    def _fill_experts(self, m: LinearExperts, path: str) -> None:
        """Each expert's Linear layers from the checkpoint: slices of the fused 3-D tensors, or the expert's
        own tensors (gate and up stacked as the fused layout stacks them)."""
        fused = [f"{path}.gate_up_proj", f"{path}.down_proj"]
        if all(k in self.checkpoint.tensors for k in fused):
            tensors = self.checkpoint.read(fused)
            per_expert = [[t[e] for e in range(m.num_experts)] for t in tensors.values()]
        elif self.names.per_expert:
            (gate, up), (down,) = self.names.leaves["gate_up"], self.names.leaves["down"]
            keys = [f"{path}.{e}.{leaf}" for e in range(m.num_experts) for leaf in (gate, up, down)]
            missing = [k for k in keys if k not in self.checkpoint.tensors]
            if missing:
                raise ShrinkError(f"{self.checkpoint.where}: the model needs tensor {missing[0]!r}, which the weights "
                                  "do not hold")
            t = self.checkpoint.read(keys)
            per_expert = [[torch.cat([t[f"{path}.{e}.{gate}"], t[f"{path}.{e}.{up}"]]) for e in range(m.num_experts)],
                          [t[f"{path}.{e}.{down}"] for e in range(m.num_experts)]]
        else:
            raise ShrinkError(f"{self.checkpoint.where}: no tensors for the experts of {path!r} (neither "
                              f"{fused[0]!r} nor one per expert)")
        for weights, layers in zip(per_expert, (m.gate_up, m.down)):
            for e, (w, lin) in enumerate(zip(weights, layers)):
                if tuple(w.shape) != (lin.out_features, lin.in_features):
                    raise ShrinkError(f"{self.checkpoint.where}: expert {e} of {path!r} has weights of shape "
                                      f"{tuple(w.shape)}, the model's config gives {(lin.out_features, lin.in_features)}")
                stored = f"{path}.{'gate_up' if layers is m.gate_up else 'down'}.{e}.weight" in self.stored
                lin.weight = nn.Parameter(w if stored else w.float(), requires_grad=False)

    def leave(self, name: str, block: nn.Module) -> None:
        # written before the check's forward: a layer the native kernel has not run yet is still in the
        # row layout the files hold (running it would tile it, and writing untile it again)
        state = {k: self._as_stored(k, t) for k, t in
                 layer_state(block, self.layout, prefix=name + ".", names=self.names).items()}
        for key, t in state.items():
            refuse_non_finite_tensor(key, t)
        if self.writer is not None:
            self.writer.add(state)
        self.check = run_block(block, self.check)
        release(block)
        for key, t in state.items():  # the skeleton describes what was written: placeholders of its dtypes
            owner, _, leaf = key[len(name) + 1:].rpartition(".")
            mod = find_submodule(block, owner)  # (an expert's stored tensors are no module's)
            if mod is not None and leaf in mod._parameters and mod._parameters[leaf].dtype != t.dtype:
                placeholder(mod, leaf, t.shape, t.dtype)
        del state
        release_freed_memory()

    def _as_stored(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """A tensor the block kept as it was (a norm, a kept layer's weight) back in its stored dtype, as the
        rest of the model is written, where that holds its values exactly (a norm AWQ folded its scales into
        stays float32); anything else as it is."""
        stored = self.checkpoint.tensors.get(key)
        dtype = DTYPES.get(stored.dtype) if stored is not None else None
        if dtype is None or not dtype.is_floating_point or not t.is_floating_point() or t.dtype == dtype:
            return t
        back = t.detach().to(dtype)
        return back if torch.equal(back.to(t.dtype), t) else t

    def finish_rest(self) -> None:
        """The tensors outside the blocks to the output, a tensor at a time as stored; the output layer
        quantized when the job says so."""
        spec = self.assignment.get(self.head) if self.head else None
        if spec is not None:
            lin = self.head_linear()
            validate_weights(nn.ModuleDict({"head": lin}), {"head": spec})
            new = round_to_nearest(lin, spec, self.head)
            set_submodule(self.model, self.head, new)
            if self.writer is not None:
                self.writer.add(layer_state(new, self.layout, prefix=self.head + ".", names=self.names))
            release(new)
        for name, stored in self.checkpoint.tensors.items():
            if name.startswith(self.prefix) or (spec is not None and name.startswith(self.head + ".")):
                continue
            if self.writer is not None:
                t = self.checkpoint.tensor(name)
                refuse_non_finite_tensor(name, t)
                self.writer.add({name: t})
                del t  # before the next is read: two large tables (embedding, output layer) never held at once
            # the skeleton describes what was written: a placeholder of the stored dtype
            owner, _, leaf = name.rpartition(".")
            placeholder(self.model.get_submodule(owner), leaf, stored.shape, DTYPES.get(stored.dtype, torch.float32))
        if spec is None and self.head_key is not None and self.head_key != f"{self.head}.weight":
            self.model.get_submodule(self.head).weight = self.model.get_input_embeddings().weight  # tied, as stored
        release_freed_memory()

