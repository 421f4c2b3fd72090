"""Quantize a Hugging Face folder larger than memory: block by block from its safetensors shards.

The model is built as a skeleton on the meta device (no memory). The tensors outside the decoder blocks
that the first block's inputs need (the input embedding, in its stored dtype) are read once; then each
block's tensors are read from the shards in float32 when it is its turn, the block is quantized (round to
nearest, or calibrated on the inputs the quantized blocks before it give, exactly as in memory), its
outputs are computed for the next block, its packed tensors are written out and its memory is let go. The
tensors outside the blocks go to the output as stored (bf16 stays bf16). So the peak is about one block in
float32, plus the embedding, the calibration activations and one output shard, never the whole model.

The forward check follows one sample input through both the original and the quantized blocks, and
compares the last block's outputs (the output layer is not run, so as not to hold it in float32).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..core.architecture import find_stacks
from ..core.errors import ShrinkError
from ..core.memory import release_freed_memory
from ..io.manifest import FORMAT_VERSION
from ..io.models import tokenizer_or_none
from ..io.safety import refuse_custom_code
from ..io.saved import finish_folder, layer_state, manifest_for, writing_folder
from ..io.shards import DTYPES, SHARD_BYTES, Checkpoint, release
from ..quant.apply import output_layer_name, plan_job, validate_weights
from ..quant.linear import CastLinear, QuantLinear
from ..quant.check import ForwardCheck, refuse_non_finite, relative_error, sample_input
from ..quant.layerwise import capture_inputs, first_output, run_block
from ..quant.mixed import MixedPrecision
from ..quant.record import update_record
from ..quant.replace import round_to_nearest, set_submodule


@dataclass
class Streamed:
    """What a streamed quantization leaves: the model's skeleton (its quantized layers in place, described by
    `shrink.info`, their tensors let go), its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: object
    source: dict
    notes: list[str] = field(default_factory=list)


def _skeleton(folder: Path):
    """The causal LM `folder/config.json` describes, its parameters on the meta device."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    refuse_custom_code(folder)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:
        raise ShrinkError(f"{folder / 'config.json'}: cannot read Hugging Face config ({type(e).__name__}: {e})") from None
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs and isinstance(archs[0], str) else None
    if not (isinstance(cls, type) and archs[0].endswith("ForCausalLM")):
        return None, f"{folder / 'config.json'} names {archs or 'no architecture'}, not a causal LM transformers builds"
    with init_empty_weights(include_buffers=False):
        model = cls(config)
    return model.eval(), None


def why_not_streamed(folder, spec=None, *, target_bits: float | None = None, keep_output: bool = True,
                     job=None, model=None, checkpoint=None) -> str | None:
    """Why `folder` cannot be quantized block by block from disk (None when it can): it must be a Hugging
    Face causal LM with safetensors weights named as the model names its tensors, one stack of decoder
    blocks, and the job (`spec` with `target_bits` and `keep_output`, as `shrink.quantize` takes them; or
    a planned `job`) must quantize only the blocks' layers and the output layer (mixed precision's
    sensitivity pass and quantized embeddings need the whole model in memory so far)."""
    folder = Path(folder)
    if target_bits is not None or isinstance(spec, MixedPrecision):
        return "mixed precision (--target-bits) measures every layer on the whole model"
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
        checkpoint = checkpoint or Checkpoint(folder)
    except ShrinkError as e:
        return str(e)
    if job is None and spec is not None:
        with warnings.catch_warnings():  # said again when the job runs
            warnings.simplefilter("ignore")
            job = plan_job(model, spec, keep_output=keep_output)
    names = _tensor_names(model)
    unknown = [k for k in checkpoint.tensors if k not in names]
    if unknown:
        return (f"the weights name tensors {type(model).__name__} does not have as such ({unknown[0]!r}"
                f"{f' and {len(unknown) - 1} more' if len(unknown) > 1 else ''}; transformers renames them on loading)")
    if job is not None:
        if job.target_bits is not None:
            return "mixed precision (--target-bits) measures every layer on the whole model"
        prefix = stacks[0][0] + "."
        head = output_layer_name(model)
        outside = [n for n, s in job.assignment.items() if s is not None and not n.startswith(prefix) and n != head]
        if outside:
            return f"layer {outside[0]!r} outside the decoder blocks is to be quantized"
    return None


def _tensor_names(model: nn.Module) -> set[str]:
    return set(model.state_dict(keep_vars=True))


def quantize_streamed(folder, out: Path | None, spec="int4-g64", *, method="rtn", calibration=None,
                      n_samples: int = 128, seq_len: int = 512, damp: float = 0.01, act_order: bool = True,
                      tune_steps: int = 0, keep_output: bool = True, backend: str | None = None,
                      progress: bool | None = None, force: bool = False, results=None,
                      shard_bytes: int = SHARD_BYTES) -> Streamed:
    """Quantize the Hugging Face causal LM in `folder` block by block from its safetensors weights, and write
    it to `out` (a shrink folder, sharded past `shard_bytes`, default 2 GB; None: nothing is written).

    spec, method, calibration, n_samples, seq_len, damp, act_order, tune_steps, keep_output, backend,
    progress: as `shrink.quantize` takes them (defaults int4-g64, rtn, no data, 128 x 512, 0.01, on, 0,
    True). force: replace a folder shrink wrote at `out` (default False). results: a function of the
    quantized skeleton returning the dict written as results.json (default none). ShrinkError when the
    folder cannot be streamed (`why_not_streamed` says why), naming the file and tensor on bad input.
    """
    folder = Path(folder)
    model, why = _skeleton(folder)
    if why:
        raise ShrinkError(f"cannot stream {folder}: {why}")
    checkpoint = Checkpoint(folder)
    job = plan_job(model, spec, method=method, calibration=calibration, n_samples=n_samples, seq_len=seq_len,
                   damp=damp, act_order=act_order, tune_steps=tune_steps, keep_output=keep_output)
    why = why_not_streamed(folder, job=job, model=model, checkpoint=checkpoint)
    if why:
        raise ShrinkError(f"cannot stream {folder}: {why}")
    tokenizer = tokenizer_or_none(folder)
    source = {"kind": "huggingface", "path": str(folder), "streamed": True}
    (prefix, blocks), = find_stacks(model)
    head = output_layer_name(model)
    data = None
    if job.needs_data:
        from ..quant.calibration import prepare

        data = prepare(calibration, tokenizer=tokenizer, model=model, n_samples=n_samples, seq_len=seq_len)
    layout = "pack-quantized" if all(s is None or s.cast or s.symmetric for s in job.assignment.values()) else "shrink"
    walk = _Walk(checkpoint, model, prefix, head, job.assignment, layout)
    with (writing_folder(out, {"format_version": FORMAT_VERSION, "layout": layout}, force=force,
                         shard_bytes=shard_bytes) if out is not None else _nowhere()) as (tmp, writer):
        walk.writer = writer
        walk.load_rest()
        inputs, described = sample_input(model)
        walk.check = capture_inputs(model, blocks[0], [inputs["input_ids"]])
        walk.original = walk.check
        record = None
        if job.needs_data:
            from ..quant.calibrated import quantize_calibrated

            report = quantize_calibrated(model, job.assignment, data.samples, job.recipe, backend=backend,
                                         progress=progress, around=walk)
            record = {**job.calibration_record(data.record), "layers": report.layers, "warnings": report.warnings()}
        else:
            from ..quant.layerwise import blockwise

            blockwise(model, [], _RoundBlock(job.assignment, backend), progress=progress, desc="quantize", around=walk)
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
                          results=results(model) if results is not None else None)
    return Streamed(model, tokenizer, source)


class _nowhere:
    """writing_folder's stand-in when nothing is to be written."""

    def __enter__(self):
        return None, None

    def __exit__(self, *exc):
        return False


class _RoundBlock:
    """Round to nearest for one block's layers (blockwise's visit when there is no calibration)."""

    def __init__(self, assignment, backend):
        self.assignment, self.backend = assignment, backend

    def __call__(self, name, block, inputs) -> None:
        for rel, m in list(block.named_modules()):
            spec = self.assignment.get(f"{name}.{rel}")
            if spec is not None:
                set_submodule(block, rel, round_to_nearest(m, spec, f"{name}.{rel}", self.backend))


class _Walk:
    """Around each block (layerwise.BlockHooks): its tensors read in float32 and checked before it is
    visited, the sample input run through the original block; after it: the sample through the quantized
    block, its tensors written and let go."""

    def __init__(self, checkpoint: Checkpoint, model: nn.Module, prefix: str, head: str | None, assignment, layout: str):
        self.checkpoint, self.model, self.prefix, self.head = checkpoint, model, prefix + ".", head
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

    def _outside(self, name: str) -> bool:
        return not name.startswith(self.prefix) and (self.head is None or not name.startswith(self.head + "."))

    def load_rest(self) -> None:
        """The tensors outside the blocks and the output layer, for the first block's inputs: the input
        embedding as stored (its rows are made float32 as they are looked up: a float32 copy of a large
        vocabulary's table would double it), the rest (norms, small) in float32."""
        table = self.model.get_input_embeddings()
        table_names = {f"{n}.{k}" for n, m in self.model.named_modules() if m is table for k in m._parameters}
        self.checkpoint.fill(self.model, float_dtype=torch.float32,
                             only=lambda n: self._outside(n) and n not in table_names)
        self.checkpoint.fill(self.model, only=lambda n: n in table_names)
        self.hook = table.register_forward_hook(lambda _m, _a, out: out.float() if out.is_floating_point() else out)

    def enter(self, name: str, block: nn.Module) -> None:
        if self.hook is not None:  # the first block's inputs are captured: the embedding is not needed again
            self.hook.remove()
            self.hook = None
            release(self.model.get_input_embeddings())
            release_freed_memory()
        self.checkpoint.fill(block, name + ".", float_dtype=torch.float32)
        validate_weights(self.model, {n: s for n, s in self.assignment.items() if n.startswith(name + ".")})
        self.original = run_block(block, self.original)

    def leave(self, name: str, block: nn.Module) -> None:
        self.check = run_block(block, self.check)
        refuse_non_finite(block)
        self._as_stored(block, name + ".")
        if self.writer is not None:
            self.writer.add(layer_state(block, self.layout, prefix=name + "."))
        release(block)
        release_freed_memory()

    def _as_stored(self, block: nn.Module, prefix: str) -> None:
        """The block's tensors kept as they were (norms, a kept layer's weights) back in their stored dtype,
        as the rest of the model is written, where that holds their values exactly (a norm AWQ folded its
        scales into stays float32); a quantized layer's own tensors are as its format wants them."""
        for mod_name, mod in block.named_modules():
            if isinstance(mod, (QuantLinear, CastLinear)):
                continue
            for leaf, t in mod._parameters.items():
                stored = self.checkpoint.tensors.get(f"{prefix}{mod_name}{'.' if mod_name else ''}{leaf}")
                dtype = DTYPES.get(stored.dtype) if stored is not None else None
                if t is not None and t.is_floating_point() and dtype is not None and dtype.is_floating_point:
                    back = t.detach().to(dtype)
                    if torch.equal(back.to(t.dtype), t):
                        mod._parameters[leaf] = nn.Parameter(back, requires_grad=False)

    def finish_rest(self) -> None:
        """The tensors outside the blocks to the output, a tensor at a time as stored; the output layer
        quantized when the job says so."""
        spec = self.assignment.get(self.head) if self.head else None
        if spec is not None:
            if self.head_key is None:
                raise ShrinkError(f"{self.checkpoint.where}: no tensor holds the output layer {self.head!r}'s weight")
            old = self.model.get_submodule(self.head)
            lin = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
            self.checkpoint.fill(lin, self.head + ".", torch.float32, only=lambda n: not n.endswith(".weight"))
            lin.weight = nn.Parameter(self.checkpoint.tensor(self.head_key).float(), requires_grad=False)
            validate_weights(nn.ModuleDict({"head": lin}), {"head": spec})
            new = round_to_nearest(lin, spec, self.head)
            set_submodule(self.model, self.head, new)
            if self.writer is not None:
                self.writer.add(layer_state(new, self.layout, prefix=self.head + "."))
            release(new)
        for name, stored in self.checkpoint.tensors.items():
            if name.startswith(self.prefix) or (spec is not None and name.startswith(self.head + ".")):
                continue
            if self.writer is not None:
                self.writer.add({name: self.checkpoint.tensor(name)})
            # the skeleton describes what was written: a placeholder of the stored dtype
            owner, _, leaf = name.rpartition(".")
            mod = self.model.get_submodule(owner)
            empty = torch.empty(stored.shape, dtype=DTYPES.get(stored.dtype, torch.float32), device="meta")
            if leaf in mod._parameters:
                mod._parameters[leaf] = nn.Parameter(empty, requires_grad=False)
            elif leaf in mod._buffers:
                mod._buffers[leaf] = empty
        if spec is None and self.head_key is not None and self.head_key != f"{self.head}.weight":
            self.model.get_submodule(self.head).weight = self.model.get_input_embeddings().weight  # tied, as stored
        release_freed_memory()

