"""Save and load compressed models as a folder: weights in safetensors + shrink.json (+ HF config, tokenizer).

Where every quantized layer's format is symmetric, the folder is also a Hugging Face checkpoint in
compressed-tensors' pack-quantized layout (packformat.py): transformers and vLLM load it without shrink.
Otherwise the weights are in shrink's own layout under a name no other loader reads, so they fail loudly.

Loading never executes code from the folder: tensors come from safetensors, the manifest is JSON,
and a Hugging Face model is rebuilt from `config.json` with a class built into transformers.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from ..core import VERSION
from ..core.atomic import atomic_dir, write_json
from ..core.errors import ShrinkError
from ..core.memory import release_freed_memory
from ..core.outdir import claim
from ..quant import CastLinear, QuantConv2d, QuantEmbedding, QuantLinear, parse_format
from ..quant.check import ForwardCheck, refuse_non_finite
from ..quant.embedding import share_buffers
from ..quant.experts import LinearExperts, expert_layers, fused_experts, unfuse_experts
from ..quant.online import attach_recorded, online_rotated
from ..quant.record import LayerDone, ModelRecord, record_of, update_record
from ..quant.replace import find_submodule, set_submodule
from . import packformat
from .hfnames import CheckpointNames, checkpoint_names
from .manifest import (
    FORMAT_VERSION,
    MANIFEST,
    check_modules_against_header,
    file_record,
    is_own_folder,
    layout,
    read_manifest,
    verify_files,
    weights_file,
)
from .safety import build_empty, check_config_fits, check_fits_memory, read_config, refuse_custom_code, skeleton_bytes
from .shards import SHARD_BYTES, Checkpoint, ShardWriter


def is_shrink_folder(path: str | Path) -> bool:
    """True if `path` is a folder holding a shrink.json."""
    return (Path(path) / MANIFEST).is_file()


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def manifest_for(model: nn.Module, source: dict | None = None) -> dict:
    """The shrink.json content describing `model`'s quantized layers."""
    modules = {}
    tables = {m.qweight.data_ptr(): n for n, m in model.named_modules() if isinstance(m, QuantEmbedding)}
    for name, m in model.named_modules():
        if isinstance(m, QuantEmbedding):
            modules[name] = {"format": m.spec.name, "in_features": m.embedding_dim, "out_features": m.num_embeddings,
                             "bias": False, "embedding": True}
        elif isinstance(m, QuantConv2d):
            modules[name] = {"format": m.spec.name, "in_features": m.in_features, "out_features": m.out_features,
                             "bias": m.bias is not None, "conv2d": m.conv_args()}
        elif isinstance(m, (QuantLinear, CastLinear)):
            modules[name] = {"format": m.spec.name, "in_features": m.in_features,
                             "out_features": m.out_features, "bias": m.bias is not None}
            if getattr(m, "input_order", None) is not None:
                modules[name]["input_order"] = True
            # an output layer over the table's codes (a layer holding the tiled layout alone shares nothing)
            codes = m._buffers.get("qweight") if isinstance(m, QuantLinear) else None
            if codes is not None and codes.data_ptr() in tables:
                modules[name]["tied_to"] = tables[codes.data_ptr()]
    record = record_of(model)
    for name, d in record.layers.items():
        modules[name]["done"] = d.to_dict()
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    convs = any(isinstance(m, QuantConv2d) for m in model.modules())
    experts = expert_layers(model)
    # (a layer rotated online is not what transformers' model computes: shrink's layout, which it does not load)
    linear_in_architecture = not tables and not convs and not online_rotated(model) and \
        all(packformat.exportable(m.spec) and m.input_order is None for m in quant.values()) and \
        _linear_in_architecture(model, [n for n in quant if n not in experts]) and \
        _experts_packable(model, {n: m.spec for n, m in quant.items()})
    if linear_in_architecture:
        for name, parts in stored_as(model, checkpoint_names_of(model)).items():
            modules[name]["stored_as"] = parts
    return {
        "format_version": FORMAT_VERSION,
        "shrink_version": VERSION,
        "kind": "transformers" if _is_hf(model) else "torch",
        "architecture": type(model).__name__,
        "method": record.method,
        "source": source or record.source,
        "modules": modules,
        "kept_full_precision": record.kept_full_precision,
        "calibration": record.calibration,
        "check": record.check.to_dict() if record.check else None,
        **({"fallbacks": record.fallbacks} if record.fallbacks else {}),
        **({"rotation": record.rotation} if record.rotation else {}),
        "layout": "pack-quantized" if linear_in_architecture else "shrink",
    }


def planned_layout(model: nn.Module, assignment: dict) -> str:
    """The layout `manifest_for` will give `model` once quantized as `assignment` says (layer -> QuantSpec or
    None), decided before any weight is written: pack-quantized when every integer layer is a symmetric
    Linear of the architecture transformers builds, or an expert of a mixture whose experts all take one
    such format (`_experts_packable`), else shrink's own."""
    quant = [n for n, s in assignment.items() if s is not None and not s.cast]
    plain = all(isinstance(model.get_submodule(n), nn.Linear) for n in quant)
    experts = expert_layers(model)
    return "pack-quantized" if plain and all(assignment[n].symmetric for n in quant) and \
        _linear_in_architecture(model, [n for n in quant if n not in experts]) and \
        _experts_packable(model, assignment) else "shrink"


def checkpoint_names_of(model: nn.Module) -> CheckpointNames:
    """How checkpoints of `model`'s type name its tensors (hfnames; none for a plain PyTorch model)."""
    config = getattr(model, "config", None) if _is_hf(model) else None
    return checkpoint_names(getattr(config, "model_type", None)) if config is not None else CheckpointNames()


def _experts_packable(model: nn.Module, specs: dict) -> bool:
    """Whether `model`'s experts (one Linear layer each) can be stored pack-quantized, as the original
    checkpoint stores them one tensor per expert: every expert layer in one symmetric integer format (`specs`:
    layer -> QuantSpec or None; the loaders of transformers and vLLM take one scheme for all experts) and
    a model type whose checkpoints name experts one by one. True for a model without such experts."""
    experts = expert_layers(model)
    if not experts:
        return True
    got = {specs.get(n) for n in experts}
    spec = next(iter(got))
    return len(got) == 1 and spec is not None and not spec.cast and spec.symmetric and \
        checkpoint_names_of(model).per_expert


def stored_as(module: nn.Module, names: CheckpointNames) -> dict[str, list[str]]:
    """{expert layer: the layers its rows are stored as, in order} for the experts of each LinearExperts in
    `module`, under the original checkpoint's per-expert names (`names.leaves`): a gate_up layer's first half
    of rows is the gate projection (Mixtral's w1), the second the up projection (w3); a down layer is one.
    ShrinkError when `module` has such experts and `names` no per-expert names."""
    out = {}
    for path, m in module.named_modules():
        if not isinstance(m, LinearExperts):
            continue
        if not names.per_expert:
            raise ShrinkError(f"{path}: no per-expert tensor names are known for this model type; its experts are "
                              "kept in shrink's own layout")
        (gate, up), (down,) = ([leaf.removesuffix(".weight") for leaf in names.leaves[k]] for k in ("gate_up", "down"))
        for e in range(m.num_experts):
            out[f"{path}.gate_up.{e}"] = [f"{path}.{e}.{gate}", f"{path}.{e}.{up}"]
            out[f"{path}.down.{e}"] = [f"{path}.{e}.{down}"]
    return out


def _linear_in_architecture(model: nn.Module, names: list[str]) -> bool:
    """Whether every layer in `names` is an nn.Linear in the architecture transformers builds from the
    model's config (compressed-tensors replaces only those; GPT-2's Conv1D layers it would leave random)."""
    if not _is_hf(model) or not names:
        return True

    try:
        with torch.device("meta"):
            fresh = type(model)(model.config)
        return all(isinstance(fresh.get_submodule(n), nn.Linear) for n in names)
    except Exception:  # an architecture that cannot be rebuilt from its config: keep shrink's own layout
        return False


def layer_state(module: nn.Module, layout_name: str, prefix: str = "", tied=(),
                names: CheckpointNames | None = None) -> dict:
    """`module`'s tensors under `prefix` as a saved folder stores them: each QuantLinear in compressed-tensors'
    pack-quantized layout (`layout_name` "pack-quantized") or shrink's own, the rest as they are; shared
    tensors once, under their first name (an input embedding and the output layer transformers ties to it);
    a layer named in `tied` (an output layer over a quantized table's codes) is left out: it is rebuilt
    over the table's tensors. Pack-quantized experts are stored one tensor per expert and projection under
    the per-expert names `names` gives (`stored_as`)."""
    quant = {n: m for n, m in module.named_modules() if isinstance(m, QuantLinear)} \
        if layout_name == "pack-quantized" else {}
    parts = stored_as(module, names or CheckpointNames()) if quant else {}
    state, seen = {}, set()
    for rel, t in module.state_dict().items():
        owner = rel.rpartition(".")[0]
        if prefix + owner in tied or owner in quant:
            continue
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and not t.is_meta and key in seen:
            continue
        seen.add(key)
        state[prefix + rel] = t.detach().contiguous()
    for name, layer in quant.items():
        tensors = packformat.module_tensors(layer)
        if name in parts:
            for part, t in zip(parts[name], packformat.split_rows(tensors, len(parts[name]))):
                state.update({f"{prefix}{part}.{k}": v for k, v in t.items()})
        else:
            state.update({f"{prefix}{name}{'.' if name else ''}{k}": v for k, v in tensors.items()})
    return state


def _add_quantization_config(path: Path, model: nn.Module) -> None:
    """config.json gains the quantization_config transformers and vLLM read for pack-quantized weights.
    torch_dtype float16: vLLM makes its scale tensors in the model's dtype, and the scales are fp16."""
    cfg = json.loads(path.read_text())
    experts = expert_layers(model)
    quant = {n: m.spec for n, m in model.named_modules() if isinstance(m, QuantLinear) and n not in experts}
    linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear, CastLinear))
              and n not in experts]
    expert_spec = next((model.get_submodule(n).spec for n in experts), None)
    cfg["quantization_config"] = packformat.quantization_config(quant, linear, experts=expert_spec,
                                                                ignore=_routers(model) if experts else ())
    cfg["torch_dtype"] = "float16"
    write_json(path, cfg)


def _routers(model: nn.Module) -> list[str]:
    """The layers beside each mixture's experts holding a weight matrix and kept in full precision (its router,
    Qwen2-MoE's shared expert gate), under the names transformers gives them and those the original checkpoint
    does (vLLM builds Mixtral's router as a Linear layer named as stored: `ignore` must name it)."""
    names = checkpoint_names_of(model)
    out = set()
    for path in set(expert_layers(model).values()):
        block = path.rpartition(".")[0]
        for child, m in model.get_submodule(block).named_children():
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 2 and not isinstance(m, (QuantLinear, LinearExperts)):
                name = f"{block}.{child}"
                out.update({name, names.stored(name + ".weight").removesuffix(".weight")})
    return sorted(out)


def save(model: nn.Module, directory: str | Path, tokenizer=None, source: dict | None = None, *,
         results: dict | None = None, force: bool = False, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write `model` to `directory` (model.safetensors, shrink.json, and for Hugging Face models
    config.json and the tokenizer if given; `results` as results.json). The folder appears whole or not at
    all. Weights past `shard_bytes` (default 2 GB) are split into shards with an index, named the Hugging
    Face way. shrink.json lists every file with its size and SHA-256, so `load` can verify them and a later
    save can tell the folder is shrink's own. An existing folder is replaced only with force=True (default
    False) and only if it is exactly what shrink saved; anything else there is never touched. Returns the
    folder's path. `model` may also be what `read_model` returns (a LoadedModel): its tokenizer and source
    are then saved unless given."""
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "model", None), nn.Module):
        model, tokenizer, source = model.model, tokenizer or model.tokenizer, source or model.source
    directory = Path(directory)
    refuse_non_finite(model)
    manifest = manifest_for(model, source)
    tied = {n for n, i in manifest["modules"].items() if i.get("tied_to")}
    names = checkpoint_names_of(model)
    with writing_folder(directory, manifest, force=force, shard_bytes=shard_bytes, names=names) as (tmp, writer):
        writer.add(layer_state(model, manifest["layout"], tied=tied, names=names))
        finish_folder(model, tmp, writer, manifest, tokenizer=tokenizer, results=results)
    return directory


@contextmanager
def writing_folder(directory: Path, manifest: dict, force: bool = False, shard_bytes: int = SHARD_BYTES,
                   names: CheckpointNames | None = None):
    """The temporary folder a saved model is written in, and the ShardWriter for its weights (named by
    the manifest's layout); on success it becomes `directory` (see `save` for what may be replaced). In the
    pack-quantized layout, which other loaders read, tensors are stored under the names the original
    checkpoint gives them (`names.stored`: Mixtral's `block_sparse_moe`), as transformers' own save does."""
    meta = {"format": "pt", "shrink_format_version": str(FORMAT_VERSION)}
    rename = names.stored if names is not None and names.renamings and layout(manifest) == "pack-quantized" else None
    with claim(directory, "quantize", owned=is_own_folder, force=force), \
            atomic_dir(directory, replaceable=lambda p: force and is_own_folder(p), sealed=False) as tmp:
        yield tmp, ShardWriter(tmp, weights_file(manifest), max_bytes=shard_bytes, metadata=meta, rename=rename)


def finish_folder(model: nn.Module, tmp: Path, writer: ShardWriter, manifest: dict, tokenizer=None,
                  results: dict | None = None) -> None:
    """Close the weights, write config, generation config, tokenizer, results.json and, last, shrink.json
    listing every file's size and checksum."""
    writer.close()
    if manifest["kind"] == "transformers":
        cfg = model.config
        if getattr(cfg, "quantization_config", None) is not None:
            del cfg.quantization_config  # the GGUF origin is in shrink.json; transformers must not re-quantize
        cfg.architectures = [type(model).__name__]
        if getattr(cfg, "tie_word_embeddings", False) and isinstance(
                model.get_output_embeddings(), (QuantLinear, CastLinear)):
            cfg.tie_word_embeddings = False  # the output layer was quantized on its own: no longer tied
        cfg.save_pretrained(tmp)
        if manifest["layout"] == "pack-quantized" and manifest["modules"]:
            _add_quantization_config(tmp / "config.json", model)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    if results is not None:
        write_json(tmp / "results.json", results)
    manifest["files"] = file_record(tmp)
    write_json(tmp / MANIFEST, manifest)


def check(directory: str | Path) -> tuple[dict, dict]:
    """Everything about a shrink folder that can be checked without building the model: shrink.json against
    its schema, the files against its sizes and checksums, every module against the weights file's header.
    Returns (manifest, header: tensor -> (shape, dtype)); raises ShrinkError naming the file and field."""
    manifest, weights = _checked(directory)
    return manifest, weights.header


def _checked(directory: str | Path) -> tuple[dict, Checkpoint]:
    directory = Path(directory)
    manifest = read_manifest(directory)
    refuse_custom_code(directory)
    verify_files(directory, manifest)
    weights = Checkpoint(directory, weights_file(manifest))
    if manifest["kind"] == "transformers" and layout(manifest) == "pack-quantized":
        names = checkpoint_names(_model_type(directory))
        if names.renamings:  # stored under the original checkpoint's names: known by the modules' names
            weights.rename(names.loaded)
    check_modules_against_header(manifest, weights.header, weights.where, directory / MANIFEST)
    return manifest, weights


def _model_type(directory: Path) -> str | None:
    """config.json's model_type (None when it has none)."""
    from .manifest import read_json

    config = read_json(directory / "config.json", "model config") if (directory / "config.json").is_file() else {}
    kind = config.get("model_type") if isinstance(config, dict) else None
    return kind if isinstance(kind, str) else None


def load(directory: str | Path, model: nn.Module | None = None, backend: str | None = None) -> nn.Module:
    """Load a folder written by `save`.

    Hugging Face models are rebuilt from config.json. A plain PyTorch model cannot be rebuilt from
    data alone: pass `model`, an instance of the same architecture in full precision, and its layers
    are replaced and filled. `backend` selects the kernel backend of the quantized layers.
    Strict: shrink.json is checked against its schema, the files against the sizes and checksums it
    records, every module against the weights file's header before anything is allocated, and every
    tensor the model expects must be in the file with its shape (and nothing else).
    """
    directory = Path(directory)
    manifest, checkpoint = _checked(directory)
    header, weights = checkpoint.header, checkpoint.where
    if model is None:
        if manifest["kind"] != "transformers":
            raise ShrinkError(
                f"{directory} holds a plain PyTorch model ({manifest.get('architecture')}); "
                "pass an instance of its architecture: shrink.load(dir, model=MyModel())"
            )
        model = build_skeleton(directory, manifest.get("architecture"), nbytes=_loaded_bytes(manifest, checkpoint))
    _quantized_modules(directory, manifest, model, backend)
    _check_state_shapes(model, header, weights)
    state = checkpoint.read(list(header))
    tied = {n: i["tied_to"] for n, i in manifest["modules"].items() if i.get("tied_to")}
    for head, table in tied.items():  # stored once, under the table's name
        for k in model.get_submodule(table).state_dict():
            if f"{table}.{k}" in state:
                state[f"{head}.{k}"] = state[f"{table}.{k}"]
    if layout(manifest) == "pack-quantized":
        _to_shrink(state, manifest, weights)
    _load_state(model, state, weights)
    for head, table in tied.items():
        share_buffers(model.get_submodule(head), model.get_submodule(table))
    record = record_from_manifest(manifest)  # as quantize made it, kept by a later save
    update_record(model, method=record.method, formats=record.formats, calibration=record.calibration,
                  check=record.check, source=record.source, fallbacks=record.fallbacks, rotation=record.rotation)
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise ShrinkError(f"{weights}: {len(empty)} tensors of the model were not filled from the file "
                          f"({', '.join(empty[:3])}{' ...' if len(empty) > 3 else ''})")
    release_freed_memory()
    model.eval()
    return model


def open_folder(directory: str | Path) -> tuple[nn.Module, dict, Checkpoint]:
    """A Hugging Face model's shrink folder, checked as `load` checks it, as (the model with its quantized
    layers in place and every tensor on the meta device, its manifest, its weights), for work that takes
    the model a module at a time (`fill_module`, then `shards.release`) instead of loading it whole."""
    directory = Path(directory)
    manifest, checkpoint = _checked(directory)
    if manifest["kind"] != "transformers":
        raise ShrinkError(f"{directory} holds a plain PyTorch model ({manifest.get('architecture')}), which only "
                          "shrink.load(dir, model=...) can rebuild")
    largest = max((checkpoint.nbytes([k]) for k in checkpoint.tensors), default=0)
    model = build_skeleton(directory, manifest.get("architecture"), nbytes=2 * largest)
    _quantized_modules(directory, manifest, model, None)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # an output layer tied to its table is the table's tensor (stored once)
    _check_state_shapes(model, checkpoint.header, checkpoint.where)
    record = record_from_manifest(manifest)
    update_record(model, method=record.method, formats=record.formats, calibration=record.calibration,
                  check=record.check, source=record.source, fallbacks=record.fallbacks, rotation=record.rotation)
    return model.eval(), manifest, checkpoint


def fill_module(model: nn.Module, name: str, manifest: dict, checkpoint: Checkpoint) -> None:
    """Give the module `name` of an `open_folder` model its tensors from the folder's weights, as `load`
    gives them (pack-quantized layers in shrink's layout, float tensors stored in bf16/fp16 in float32, an
    output layer tied to its table read under the table's name). ShrinkError naming the file and tensor
    when they do not match the module."""
    module = model.get_submodule(name)
    source = manifest["modules"].get(name, {}).get("tied_to") or name
    keys = [k for k in checkpoint.tensors if k.startswith(source + ".")]
    state = {name + k[len(source):]: t for k, t in checkpoint.read(keys).items()}
    if layout(manifest) == "pack-quantized":
        _to_shrink(state, manifest, checkpoint.where, under=name)
    own = module.state_dict()
    rel = {k[len(name) + 1:]: t for k, t in state.items()}
    bad = sorted(set(own) ^ set(rel))
    if bad:
        raise ShrinkError(f"{checkpoint.where}: tensor {name}.{bad[0]} does not match the model (missing, or unexpected)")
    _as_loaded(own, rel, checkpoint.where, prefix=name + ".")
    module.load_state_dict(rel, strict=True, assign=True)


def _to_shrink(state: dict, manifest: dict, weights: Path, under: str | None = None) -> None:
    """Pack-quantized layers' tensors in `state` into shrink's layout, in place (those of module `under` and
    its submodules, or all)."""
    for name, info in manifest["modules"].items():
        if under is not None and name != under and not name.startswith(under + "."):
            continue
        spec = parse_format(info["format"])
        if not spec.cast:
            try:
                packformat.to_shrink(state, name, spec, info["in_features"], info["out_features"],
                                     parts=info.get("stored_as"))
            except (ValueError, RuntimeError, KeyError) as e:
                raise ShrinkError(f"{weights}: module {name!r}: {e}") from None


def _quantized_modules(directory: Path, manifest: dict, model: nn.Module, backend) -> None:
    """Put the manifest's quantized modules in place in `model` (their tensors on the meta device)."""
    missing = [n for n in manifest["modules"] if find_submodule(model, n) is None]
    if missing:  # a mixture's experts saved one Linear layer per expert: the fused modules become that first
        unfuse_experts(model, {n for n, _ in fused_experts(model) if any(m.startswith(n + ".") for m in missing)})
    for name, info in manifest["modules"].items():
        try:
            spec = parse_format(info["format"])
            _check_fits(model, name, info)
            if info.get("embedding"):
                old = model.get_submodule(name)
                new = QuantEmbedding(info["out_features"], info["in_features"], spec, getattr(old, "padding_idx", None))
            elif info.get("conv2d"):
                c = info["conv2d"]
                new = QuantConv2d(c["in_channels"], info["out_features"], tuple(c["kernel_size"]), spec,
                                  tuple(c["stride"]), c["padding"] if isinstance(c["padding"], str) else tuple(c["padding"]),
                                  tuple(c["dilation"]), c["groups"], bias=info["bias"]).adopt(model.get_submodule(name))
            elif spec.cast:
                with torch.device("meta"):  # placeholders: the file's tensors are adopted, not copied in
                    new = CastLinear(info["in_features"], info["out_features"], spec, bias=info["bias"])
            else:
                with torch.device("meta"):
                    new = QuantLinear(info["in_features"], info["out_features"], spec, bias=info["bias"],
                                      backend=backend, input_order=info.get("input_order", False))
            set_submodule(model, name, new)
        except (KeyError, ValueError, AttributeError, TypeError) as e:
            raise ShrinkError(f"{directory / MANIFEST}: module {name!r}: {e}") from None
    attach_recorded(model, manifest.get("rotation"), str(directory / MANIFEST))  # (signs: from the weights)


def _check_fits(model: nn.Module, name: str, info: dict) -> None:
    """ValueError unless the architecture's own layer at `name` is what shrink.json says it was: an embedding,
    a convolution, or a Linear (Conv1D) layer, of the sizes it records; flags that contradict the model
    would otherwise build another kind of layer in its place."""
    from ..quant.apply import is_conv1d

    old = model.get_submodule(name)
    if isinstance(old, (QuantLinear, CastLinear, QuantEmbedding, QuantConv2d)):
        return  # a model the caller passed in already quantized: the shapes are checked with the tensors
    if info.get("embedding"):
        kind, ok = "an embedding", isinstance(old, nn.Embedding) and \
            (old.num_embeddings, old.embedding_dim) == (info["out_features"], info["in_features"])
    elif info.get("conv2d"):
        c = info["conv2d"]
        kind, ok = "a convolution", isinstance(old, nn.Conv2d) and old.out_channels == info["out_features"] and \
            old.in_channels == c.get("in_channels") and list(old.kernel_size) == list(c.get("kernel_size", []))
    else:
        w = old.weight if isinstance(old, nn.Linear) or is_conv1d(old) else None
        shape = None if w is None else tuple(w.shape) if isinstance(old, nn.Linear) else tuple(w.shape[::-1])
        kind, ok = "a Linear layer", shape == (info["out_features"], info["in_features"])
    if not ok:
        size = f"{info['in_features']} -> {info['out_features']}"
        raise ValueError(f"shrink.json says it is {kind} ({size}), but the model's {name!r} is a {type(old).__name__}"
                         f"{'' if not hasattr(old, 'weight') else f' of weight {tuple(old.weight.shape)}'}")


def record_from_manifest(manifest: dict) -> ModelRecord:
    """The ModelRecord a (checked) shrink.json holds: what `shrink.info` of a folder returns."""
    modules = manifest["modules"]
    formats = {n: m["format"] for n, m in modules.items()}
    formats.update({n: None for n in manifest.get("kept_full_precision", [])})
    layers = {n: LayerDone(m["done"]["method"], list(m["done"].get("notes", []))) for n, m in modules.items()
              if m.get("done")}
    return ModelRecord(method=manifest.get("method"), formats=formats, calibration=manifest.get("calibration"),
                       check=ForwardCheck.from_dict(manifest.get("check")), source=manifest.get("source") or {},
                       layers=layers, fallbacks=dict(manifest.get("fallbacks") or {}),
                       rotation=manifest.get("rotation"))


def _check_state_shapes(model: nn.Module, header: dict, weights: Path) -> None:
    """Every tensor the model has must be in the file's header with its shape, before the file is read."""
    own = model.state_dict()
    for k, t in own.items():
        if k in header and tuple(t.shape) != header[k][0]:
            raise ShrinkError(f"{weights}: tensor {k!r} has shape {header[k][0]}, the model expects {tuple(t.shape)}")


def _load_state(model: nn.Module, state: dict, weights: Path) -> None:
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # so tied parameters are one object before we look for them
    own = model.state_dict()
    # save_model keeps one name of each group of tied tensors; give the others the same tensor.
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    for names in groups.values():
        present = [n for n in names if n in state]
        for n in names:
            if present and n not in state:
                state[n] = state[present[0]]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise ShrinkError(f"{weights}: tensors do not match the model: {'; '.join(parts)}")
    _as_loaded(own, state, weights)
    # safetensors may hand out tensors at any byte offset of the file; float kernels round differently
    # (and run slower) on unaligned memory, so the loaded model would not compute exactly what was saved
    copies: dict[int, torch.Tensor] = {}
    for k, t in state.items():
        if t.data_ptr() % 64:
            state[k] = copies.setdefault(id(t), t.clone())  # tied names keep sharing one tensor
    # assign=True adopts the loaded tensors instead of copying into (possibly meta) placeholders.
    model.load_state_dict(state, strict=True, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _as_loaded(own: dict, state: dict, weights: Path, prefix: str = "") -> None:
    """The file's tensors `state` as the model `own`s them, in place: those kept in bf16/fp16 on disk (a
    streamed job wrote the original's dtype) made float32 where the model computes in float32; ShrinkError
    naming the tensor (`prefix` + its name) for any other shape or dtype."""
    for k, t in state.items():
        if own[k].dtype == torch.float32 and t.dtype in (torch.bfloat16, torch.float16) and own[k].shape == t.shape:
            state[k] = t = t.float()
        if own[k].shape != t.shape or own[k].dtype != t.dtype:
            raise ShrinkError(f"{weights}: tensor {prefix + k!r} has shape {tuple(t.shape)} {t.dtype}, expected "
                              f"{tuple(own[k].shape)} {own[k].dtype}")


def _loaded_bytes(manifest: dict, checkpoint: Checkpoint) -> int:
    """What loading the folder holds: its tensors as stored, the full-precision ones stored in bf16 or fp16
    twice over (computed in float32), and the largest tensor once more (the skeleton makes each tensor
    before putting it on the meta device)."""
    quantized = tuple(n + "." for name, info in manifest["modules"].items() for n in (name, *info.get("stored_as", [])))
    total, largest = 0, 0
    for name, t in checkpoint.tensors.items():
        n = checkpoint.nbytes([name])
        wide = 2 * n if t.dtype in ("BF16", "F16") and not name.startswith(quantized) else n
        total += wide
        largest = max(largest, wide)
    return total + largest


def build_skeleton(directory: Path, architecture: str | None = None, nbytes: int | None = None) -> nn.Module:
    """The Hugging Face model `directory/config.json` describes, its parameters on the meta device (to be
    filled from a weights file) and any quantization_config dropped (shrink fills its own quantized layers).
    The class must be built into transformers and the model must fit in memory: its config's size, or
    `nbytes` when the caller knows what loading holds (a quantized folder); ShrinkError otherwise."""
    import transformers

    config = read_config(directory)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # shrink fills its own quantized layers; transformers must not
    archs = getattr(config, "architectures", None) or ([architecture] if architecture else [])
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ShrinkError(f"{directory / 'config.json'}: 'architectures' must be a list of class names, got {archs!r}")
    cls = getattr(transformers, archs[0], None) if archs else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ShrinkError(f"{directory / 'config.json'}: unknown architecture {archs!r} (a model class of transformers)")
    if nbytes is None:
        check_config_fits(cls, config, directory / "config.json")
    else:
        check_fits_memory(nbytes + skeleton_bytes(cls, config, directory / "config.json"),
                          f"{directory / 'config.json'}: the model it describes", " (the weights files' tensors, "
                          "the full-precision ones in float32, and the model's skeleton as it is built)")
    # Parameters start on the meta device: the file fills them all, so loading never holds a full-precision
    # copy of the model.
    return build_empty(cls, config, directory / "config.json")
