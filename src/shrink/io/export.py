"""Export a quantized model to llama.cpp's GGUF, copying shrink's integer codes exactly.

shrink's 4-bit layout (byte j of a block of 32 holds code j and code j+16, x = d*(q-8)) is GGUF Q4_0's
`qs` byte for byte, so a symmetric int4 layer becomes Q4_0 blocks by putting its fp16 scale in front of
each block (repeated per block of 32 for groups of 64/128 or one scale per row). Symmetric int8 becomes
Q8_0 the same way, and asymmetric int4 becomes Q4_1 (x = d*q + m with m = -d*z, which fp16 rounds). 5-bit
codes are Q5_0/Q5_1's: shrink's 5-bit block is their qs (low nibbles, as 4 bits) then qh (the fifth bits).
The K-quant formats hold what Q2_K ... Q6_K hold (codes, integer group scales and minimums, fp16 d and dmin
per 256 inputs), laid out again in ggml's order.
Nothing is re-quantized unless asked: gguf-py's quantizers would change many of the codes that were
measured. The written file is read back and every tensor compared with the model before success is said.

llama.cpp's Llama kernels expect the rows of the q and k projections permuted (its rope pairs dimension
i with i + head_dim/2 within a head the other way round); a row permutation moves whole rows of codes
and scales, so it stays exact.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..core import VERSION
from ..core.atomic import atomic_file
from ..core.errors import ShrinkError
from ..core.outdir import lock_beside
from ..core.peers import LLAMA_CPP_HINT, llama_cpp_missing
from ..quant.experts import LinearExperts
from ..quant.online import refuse_online
from ..quant import CastLinear, QuantEmbedding, QuantLinear
from ..quant.record import record_of
from ..quant.spec import KQUANTS, SUPERBLOCK
from .gguf_meta import CHECK_TEXT, write_metadata
from .manifest import read_manifest
from .requant import Requant, plan
from .saved import is_shrink_folder

FLOAT_TYPES = ("f16", "f32")
EXACT_BLOCKS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL",  # GGUF types shrink's codes are copied into
                "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
EXPORTED_BY = "shrink.exported_by"  # metadata key: which shrink wrote the file
# model_type of the Hugging Face config -> gguf-py architecture name, and whether q/k rows are permuted
ARCHITECTURES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False),
                 "mixtral": ("LLAMA", True), "qwen2_moe": ("QWEN2MOE", False)}


@dataclass
class ExportReport:
    """What `export_gguf` wrote: the file, its tensors by GGUF type, where the metadata and tokenizer came
    from, the layers re-quantized (with the share of their weights that changed value) and notes."""

    path: Path
    bytes: int
    tensors: dict[str, int] = field(default_factory=dict)       # GGUF type name -> count
    layers: dict[str, str] = field(default_factory=dict, repr=False)  # module name -> GGUF type
    metadata_from: str = ""
    requantized: dict[str, float] = field(default_factory=dict)  # module name -> share of weights changed
    max_error: dict[str, float] = field(default_factory=dict)    # GGUF type -> largest |difference| read back
    notes: list[str] = field(default_factory=list)
    f16_change: float = 0.0  # largest change of a full-precision value written as F16


def exact_type(layer: nn.Module) -> str | None:
    """The GGUF type that holds `layer`'s weights exactly (Q4_0, Q5_0, Q8_0; Q4_1, Q5_1 for -asym formats;
    IQ4_NL for iq4nl; Q2_K ... Q6_K for q2k ... q6k; F16, BF16), or None."""
    if isinstance(layer, CastLinear):
        return "F16" if layer.spec.cast == "fp16" else "BF16"
    if not isinstance(layer, (QuantLinear, QuantEmbedding)) or layer.in_features % 32 or layer.input_order is not None:
        return None  # GGUF blocks hold contiguous inputs
    spec = layer.spec
    if spec.kquant:
        return KQUANTS[spec.kquant].gguf
    if spec.group_size is not None and spec.group_size % 32:
        return None
    if spec.grid == "iq4nl":
        return "IQ4_NL"
    if spec.bits in (4, 5):
        return f"Q{spec.bits}_0" if spec.symmetric else f"Q{spec.bits}_1"
    if spec.bits == 8 and spec.symmetric:
        return "Q8_0"
    return None


def _block_scales(layer: QuantLinear) -> torch.Tensor:
    """[out, in/32] fp16: each block of 32 inputs gets its group's scale."""
    return layer.scales.repeat_interleave(layer.spec.group_for(layer.in_features) // 32, dim=1)


def _blocks(layer: QuantLinear, kind: str, name: str = "") -> np.ndarray:
    """The layer's weights as GGUF blocks, [out, in/32 * block bytes] uint8, codes copied as they are."""
    from ..quant.packing import unpack

    if kind.endswith("_K"):
        return _kquant_blocks(layer, kind, name)
    out, nb = layer.out_features, layer.in_features // 32
    d = _block_scales(layer).contiguous().view(torch.uint8).reshape(out, nb, 2)
    if kind == "Q8_0":
        codes = unpack(layer.qweight, 8, layer.in_features).to(torch.int16) - layer.zero_const
        parts = [d, codes.to(torch.int8).view(torch.uint8).reshape(out, nb, 32)]
    elif kind in ("Q4_0", "Q4_1", "IQ4_NL", "Q5_0", "Q5_1"):
        # shrink's 4-bit block is these types' qs (IQ4_NL's codes stand for its levels); its 5-bit block is qs
        # then qh, which GGUF puts first
        qb = layer.qweight.reshape(out, nb, -1)
        qs = [qb[..., 16:20], qb[..., :16]] if kind.startswith("Q5") else [qb]
        if kind.endswith("_1"):  # x = d*q + m, m = -d*z (rounded to fp16)
            z = layer.zeros.repeat_interleave(layer.spec.group_for(layer.in_features) // 32, dim=1).float()
            m = (-_block_scales(layer).float() * z).to(torch.float16)
            parts = [d, m.contiguous().view(torch.uint8).reshape(out, nb, 2), *qs]
        else:
            parts = [d, *qs]
    else:
        raise ValueError(kind)
    return torch.cat(parts, dim=2).reshape(out, -1).numpy()


def _kquant_blocks(layer: QuantLinear, kind: str, name: str) -> np.ndarray:
    """A K-quant layer as GGUF Q2_K ... Q6_K super-blocks of 256 inputs, [out, in/256 * block bytes] uint8:
    its codes, integer scales (and minimums) and fp16 d (and dmin) copied, laid out as ggml lays them."""
    from ..quant.packing import unpack

    out, nsb = layer.out_features, layer.in_features // SUPERBLOCK
    kq = KQUANTS[layer.spec.kquant]
    lo = -(1 << (kq.scale_bits - 1)) if not kq.minimum else 0
    for what, v in (("scales", layer.scales), ("minimums", layer.zeros)):
        if v is not None and not (torch.equal(v.float(), v.float().round()) and int(v.min()) >= lo
                                  and int(v.max()) < lo + (1 << kq.scale_bits)):
            raise ShrinkError(f"layer {name!r} ({layer.spec.name}): its group {what} are not "
                              f"integers of {kq.scale_bits} bits, so {kind} cannot hold them; was the folder edited?")
    q = unpack(layer.qweight, layer.spec.bits, layer.in_features).reshape(out, nsb, SUPERBLOCK)
    sup = layer.superscales.contiguous().view(torch.uint8).reshape(out, nsb, -1)  # d (, dmin) as fp16 bytes
    if kind in ("Q2_K", "Q3_K"):  # 2-bit planes: byte 32*half + l holds value 128*half + 32*j + l at bits 2j
        h = q.reshape(out, nsb, 2, 4, 32)
        qs = ((h & 3).to(torch.int32) << (2 * torch.arange(4).reshape(4, 1))).sum(3).to(torch.uint8).reshape(out, nsb, 64)
        if kind == "Q2_K":  # scale in the low nibble, minimum in the high one; then d, dmin
            sc = layer.scales.to(torch.uint8).reshape(out, nsb, 16) | (layer.zeros.reshape(out, nsb, 16) << 4)
            parts = [sc, qs, sup]
        else:  # hmask bit 4*half + j of byte l: bit 2 of that value; the 6-bit scales + 32 packed in 12 bytes
            hm = (((h >> 2) & 1).to(torch.int32) << torch.arange(8).reshape(2, 4, 1)).sum((2, 3)).to(torch.uint8)
            s6 = (layer.scales.float() + 32).to(torch.uint8).reshape(out, nsb, 16)
            low = (s6[..., :8] & 0xF) | ((s6[..., 8:] & 0xF) << 4)
            top = (s6 >> 4).reshape(out, nsb, 4, 4)  # [j // 4, j % 4]
            high = (top.to(torch.int32) << (2 * torch.arange(4).reshape(4, 1))).sum(2).to(torch.uint8)
            parts = [hm, qs, low, high, sup]
    elif kind == "Q6_K":
        sc = layer.scales.float().to(torch.int8).view(torch.uint8).reshape(out, nsb, 16)
        h = q.reshape(out, nsb, 2, 4, 32)  # [half, quarter, l]: value 128*half + 32*quarter + l
        ql = torch.cat([(h[:, :, :, 0] & 0xF) | ((h[:, :, :, 2] & 0xF) << 4),
                        (h[:, :, :, 1] & 0xF) | ((h[:, :, :, 3] & 0xF) << 4)], -1)  # [out, nsb, 2, 64]
        qh = (h[:, :, :, 0] >> 4) | ((h[:, :, :, 1] >> 4) << 2) | ((h[:, :, :, 2] >> 4) << 4) | ((h[:, :, :, 3] >> 4) << 6)
        parts = [ql.reshape(out, nsb, 128), qh.reshape(out, nsb, 64), sc, sup]
    else:
        sc = layer.scales.to(torch.uint8).reshape(out, nsb, 8)
        m = layer.zeros.reshape(out, nsb, 8)
        lo, hi = slice(0, 4), slice(4, 8)  # sub-blocks 4..7 keep their low 4 bits in bytes 8..11, top 2 bits above
        packed = torch.cat([sc[..., lo] | ((sc[..., hi] >> 4) << 6), m[..., lo] | ((m[..., hi] >> 4) << 6),
                            (sc[..., hi] & 0xF) | ((m[..., hi] & 0xF) << 4)], -1)
        c = q.reshape(out, nsb, 4, 2, 32)  # [chunk of 64, half, l]
        qs = ((c[:, :, :, 0] & 0xF) | ((c[:, :, :, 1] & 0xF) << 4)).reshape(out, nsb, 128)
        parts = [sup, packed]
        if kind == "Q5_K":  # bit 2*chunk (+1 for the second half) of qh[l] is the fifth bit of that value
            bit = (c >> 4).to(torch.int32) << (2 * torch.arange(4).reshape(4, 1, 1) + torch.arange(2).reshape(2, 1))
            parts.append(bit.sum((2, 3)).to(torch.uint8))
        parts.append(qs)
    return torch.cat(parts, dim=2).reshape(out, -1).numpy()


def _qk_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives a q or k projection with `n_head` heads."""
    return torch.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(-1)


def export_gguf(model, path: str | os.PathLike, *, float_type: str = "f16", requantize: str | None = None,
                imatrix: str | os.PathLike | None = None, calibration=None, n_samples: int = 32,
                seq_len: int = 512, source_gguf: str | os.PathLike | None = None, force: bool = False) -> ExportReport:
    """Write `model` (a quantized module, a LoadedModel, or a shrink folder) to the GGUF file `path`.

    Quantized layers become exact block copies (int4 -> Q4_0, int5 -> Q5_0, int8 -> Q8_0; int4-asym -> Q4_1,
    int5-asym -> Q5_1; iq4nl -> IQ4_NL; q2k ... q6k -> Q2_K ... Q6_K);
    bf16/fp16 layers stay as they are; embeddings and full-precision layers are written as `float_type`
    ("f16", default, or "f32"); norms as F32; a tied output layer once. Layers with no exact GGUF type
    (int6, int3, int2, groups of 16, inputs not a multiple of 32) are refused, naming them, unless `requantize`
    names GGUF types to re-quantize them into ("Q4_K,Q5_0": each layer the first whose block divides its
    inputs; llama.cpp's quantizers where llama-cpp-python is installed, weighted by the mean square inputs
    measured on `calibration` (text, `n_samples` windows of `seq_len` tokens, default 32 x 512; the model is
    loaded whole for it) or read from `imatrix`, llama-imatrix's file; else gguf-py's); the report says how
    much that changed.
    Metadata and tokenizer are copied from the GGUF file the model came from (`source_gguf`, default: the
    one its source record names, if any) and otherwise built from its config and tokenizer. An existing
    `path` is replaced only with force=True and only if it is a GGUF file. The file is written to a
    temporary name, read back and compared tensor by tensor with the model, then moved into place."""
    if float_type not in FLOAT_TYPES:
        raise ShrinkError(f"float type {float_type!r}: choose one of {', '.join(FLOAT_TYPES)}")
    requant = plan(requantize, imatrix, calibration is not None)
    path = Path(path)
    with lock_beside(path, "export"):
        _check_target(path, force)
        if isinstance(model, (str, os.PathLike)) and is_shrink_folder(model):  # (before any measurement)
            online = ((read_manifest(model).get("rotation") or {}).get("online") or {}).get("layers")
            refuse_online(online, f"cannot export {model} to GGUF")
        if calibration is not None:
            _measure(model, requant, calibration, n_samples, seq_len)
        if isinstance(model, (str, os.PathLike)) and is_shrink_folder(model):
            return _export_streamed(Path(model), path, float_type, requant, source_gguf)
        return _export(model, path, float_type, requant, source_gguf)


def _measure(model, requant: Requant, calibration, n_samples: int, seq_len: int) -> None:
    """Fill `requant.by_module` with the mean square inputs of the model's layers on the calibration data (a
    folder is loaded whole for it, then let go)."""
    from .models import resolve, tokenizer_or_none
    from .requant import measure_importance

    if isinstance(model, (str, os.PathLike)) and is_shrink_folder(model):
        from .saved import load

        module, tokenizer = load(model), tokenizer_or_none(Path(model))
    else:
        module, tokenizer, _ = resolve(model)
    requant.by_module = measure_importance(module, calibration, tokenizer, n_samples, seq_len)


def _export(model, path: Path, float_type: str, requant, source_gguf) -> ExportReport:
    import gguf

    from .models import resolve

    module, tokenizer, _ = resolve(model)
    config = module.config if hasattr(module, "config") else None
    arch, permute, names = _architecture(module, config, requant)
    report = ExportReport(path=path, bytes=0)
    tensors = _collect(module, config, names, float_type, requant, permute, report)
    src = Path(source_gguf) if source_gguf else source_gguf_of(module)
    with atomic_file(path) as tmp:
        _write(tmp, gguf.MODEL_ARCH_NAMES[arch], tensors, config, tokenizer, src, report)
        _verify(tmp, tensors, report)
        if tokenizer is not None:
            _verify_tokens(tmp, path, tokenizer, report)
    report.bytes = path.stat().st_size
    return report


def _architecture(module: nn.Module, config, requant):
    """(gguf-py architecture, whether q/k rows are permuted, its tensor name map) of the model; ShrinkError
    for an architecture shrink does not export, or layers no GGUF type holds (nor, with `requant`, any of its types fits)."""
    import gguf

    mtype = getattr(config, "model_type", None)
    if mtype not in ARCHITECTURES:
        raise ShrinkError(f"cannot export a {type(module).__name__} (model_type {mtype!r}) to GGUF: shrink exports "
                          f"{', '.join(sorted(ARCHITECTURES))} models")
    refuse_online(module, "cannot export to GGUF")
    _refuse_inexact(module, requant)
    arch_name, permute = ARCHITECTURES[mtype]
    arch = gguf.MODEL_ARCH[arch_name]
    return arch, permute, gguf.get_tensor_name_map(arch, config.num_hidden_layers)


def _export_streamed(folder: Path, path: Path, float_type: str, requant, source_gguf) -> ExportReport:
    """A shrink folder exported a module at a time: each read from the weights, made into its GGUF tensors,
    checked against the values the model computes with, written (gguf-py's temporary file holds the
    tensors' bytes until the header, which comes first, can be written) and let go; the finished file is
    read back: its tensor list, types and shapes, and each tensor's bytes by checksum."""
    import hashlib

    import gguf
    from tqdm.auto import tqdm

    from .models import tokenizer_or_none
    from .saved import fill_module, open_folder
    from .shards import release

    module, manifest, checkpoint = open_folder(folder)
    tokenizer = tokenizer_or_none(folder)
    config = module.config
    arch, permute, names = _architecture(module, config, requant)
    report = ExportReport(path=path, bytes=0)

    def fill(name):
        fill_module(module, name, manifest, checkpoint)
        return lambda: release(module.get_submodule(name))

    src = Path(source_gguf) if source_gguf else source_gguf_of(module)
    written: dict[str, tuple] = {}  # name -> (type, shape in elements, sha256 of its bytes)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch], use_temp_file=True)
        _metadata(writer, config, tokenizer, src, report)
        bar = tqdm(desc="export", unit="tensor", total=len(module.state_dict()), disable=None)
        tied = {n for n, info in manifest["modules"].items() if info.get("tied_to")}
        for t in _each_tensor(module, config, names, float_type, requant, permute, report, fill=fill, tied=tied):
            if t.expect is not None:  # quantized blocks: they must be the model's values (floats are as given)
                _check_values(t, t.data, path, report)
            writer.add_tensor(t.name, t.data, raw_dtype=gguf.GGMLQuantizationType[t.kind])
            qtype = gguf.GGMLQuantizationType[t.kind]
            shape = gguf.quant_shape_from_byte_shape(t.data.shape, qtype) if t.data.dtype == np.uint8 else t.data.shape
            written[t.name] = (t.kind, tuple(shape), hashlib.sha256(np.ascontiguousarray(t.data).data).hexdigest())
            bar.update()
            del t
        bar.close()
        _count([kind for kind, _, _ in written.values()], report)
        _finish(writer, report)
        _verify_bytes(tmp, path, written)
        if tokenizer is not None:
            _verify_tokens(tmp, path, tokenizer, report)
    report.bytes = path.stat().st_size
    return report


def _verify_bytes(tmp: Path, path: Path, written: dict[str, tuple]) -> None:
    """The file read back: the tensors written, each of its type and shape and with the bytes written
    (SHA-256, read a tensor at a time from the file, not mapped)."""
    import hashlib

    import gguf

    reader = gguf.GGUFReader(str(tmp))
    found = {t.name: t for t in reader.tensors}
    if set(found) != set(written):
        odd = sorted(set(found) ^ set(written))
        raise ShrinkError(f"{path}: tensor {odd[0]} is {'missing from' if odd[0] in written else 'unexpected in'} the "
                          "file read back; nothing was written")
    with open(tmp, "rb") as f:
        for name, (kind, shape, digest) in written.items():
            t = found[name]
            if t.tensor_type.name != kind or tuple(reversed([int(n) for n in t.shape])) != shape:
                raise ShrinkError(f"{path}: tensor {name} did not read back as {kind} of shape {shape}; nothing was "
                                  "written")
            f.seek(int(t.data_offset))
            h, left = hashlib.sha256(), int(t.n_bytes)
            while left:
                block = f.read(min(left, 16 << 20))
                if not block:
                    break
                h.update(block)
                left -= len(block)
            if left or h.hexdigest() != digest:
                raise ShrinkError(f"{path}: tensor {name} ({kind}) reads back with other bytes than were written; "
                                  "nothing was written")


def _metadata(writer, config, tokenizer, src: Path | None, report: ExportReport) -> None:
    """Metadata and tokenizer (first: a model without a tokenizer is refused before any tensor is made)."""
    report.metadata_from, notes = write_metadata(writer, config, tokenizer, src)
    report.notes.extend(notes)
    writer.add_string(EXPORTED_BY, f"shrink {VERSION}")  # the mark that lets --force replace it later


def _finish(writer, report: ExportReport) -> None:
    """The file type, then the header and the tensors added to `writer`."""
    import gguf

    writer.add_file_type(_file_type(report.tensors))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write(path: Path, arch: str, tensors: list, config, tokenizer, src: Path | None, report: ExportReport) -> None:
    """The GGUF file: metadata and tokenizer, file type, then the tensors as they are."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    _metadata(writer, config, tokenizer, src, report)
    for t in tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=gguf.GGMLQuantizationType[t.kind])
    _finish(writer, report)


def _refuse_inexact(module: nn.Module, requant: Requant | None) -> None:
    """ShrinkError naming, by format, the quantized layers no GGUF type holds exactly (without `requant`), or
    those whose inputs no type of `requant` fits."""
    if requant is not None:
        unfit = [(n, m.in_features) for n, m in module.named_modules()
                 if isinstance(m, (QuantLinear, QuantEmbedding)) and exact_type(m) is None
                 and requant.type_for(m.in_features) is None]
        if unfit:
            import gguf

            blocks = ", ".join(f"{t.name} {gguf.GGML_QUANT_SIZES[t][0]}" for t in requant.types)
            shown = ", ".join(f"{n} ({k} inputs)" for n, k in unfit[:3]) + (
                f" ... ({len(unfit)} layers)" if len(unfit) > 3 else "")
            raise ShrinkError(f"--requantize {requant.names()}: no type's block ({blocks}) divides the inputs of "
                              f"{shown}; add a type after it for those (e.g. --requantize {requant.names()},Q5_0, "
                              "llama.cpp's own fallback for Q4_K)")
        return
    refused: dict[str, list[str]] = {}
    for n, m in module.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and exact_type(m) is None:
            why = m.spec.name if m.in_features % 32 == 0 else f"{m.in_features} inputs, not a multiple of 32"
            refused.setdefault(f"{why} in activation order" if m.input_order is not None else why, []).append(n)
    if refused:
        shown = "; ".join(f"{f}: {', '.join(ns[:3])}" + (f" ... ({len(ns)} layers)" if len(ns) > 3 else "")
                          for f, ns in refused.items())
        raise ShrinkError(f"no GGUF type holds these layers exactly: {shown}. GGUF has int4/int5/int8 in blocks of 32 "
                          "(Q4_0, Q5_0, Q8_0, Q4_1, Q5_1); pass --requantize Q4_0 (or other types) to re-quantize them")


@dataclass
class _Tensor:
    name: str
    kind: str            # GGUF type name
    data: np.ndarray     # what is written: float arrays, or GGUF blocks as uint8
    expect: np.ndarray | None  # float32 values the file must read back as (rows as written); None: data's own
    exact: bool = True   # False where the type rounds the model's values (Q4_1/Q5_1 offsets, re-quantized)

    def expected(self) -> np.ndarray:
        """The float32 values the file must read back as."""
        return self.expect if self.expect is not None else self.data.astype(np.float32)


def _collect(module: nn.Module, config, names, float_type: str, requant, permute: bool,
             report: ExportReport) -> list[_Tensor]:
    """Every tensor of the model under its GGUF name, in the GGUF type chosen for it: the weight-bearing
    layers first (quantized, cast or full precision), then everything else (embeddings, norms)."""
    out = list(_each_tensor(module, config, names, float_type, requant, permute, report))
    _count([t.kind for t in out], report)
    return out


def _count(kinds: list[str], report: ExportReport) -> None:
    """The report's count of tensors by GGUF type (`kinds`, one per tensor), and its note on float tensors."""
    for kind in kinds:
        report.tensors[kind] = report.tensors.get(kind, 0) + 1
    if report.f16_change > 0:
        report.notes.append(f"embeddings and full-precision layers written as F16 (largest change "
                            f"{report.f16_change:.2g}); float_type f32 keeps them exact")


def _each_tensor(module: nn.Module, config, names, float_type: str, requant, permute: bool,
                 report: ExportReport, fill=None, tied=frozenset()):
    """The tensors of `_collect`, one at a time. fill: where the model's tensors are on the meta device (a
    folder walked a module at a time), `fill(name)` gives module `name` its tensors and returns a function
    that lets them go, called once that module's tensors are made (default None: the model is in memory);
    tied: the output layers such a folder's manifest says are tied to their table (in memory, they are seen
    to share its codes)."""
    fill = fill or (lambda name: (lambda: None))
    fkind = float_type.upper()
    heads = {"q_proj": config.num_attention_heads,
             "k_proj": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    emb = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    state = module.state_dict(keep_vars=True)
    unnamed, handled = [], set()
    for lname, layer in list(module.named_modules()):
        if isinstance(layer, LinearExperts):  # one 3-D tensor per projection, the experts stacked
            handled.update(k for k in state if k.startswith(lname + "."))
            done = fill(lname)
            yield from _experts_tensors(lname, layer, names, fkind, requant, report, unnamed)
            done()
            continue
        if not isinstance(layer, (QuantLinear, QuantEmbedding, CastLinear, nn.Linear)) or ".experts." in f".{lname}.":
            continue
        handled.update(k for k in state if k.startswith(lname + "."))
        gname = names.get_name(f"{lname}.weight", try_suffixes=(".weight", ".bias"))
        if gname is None:
            unnamed.append(f"{lname}.weight")
            continue
        if lname in tied or (isinstance(layer, nn.Linear) and emb is not None and layer.weight is getattr(emb, "weight", None)) or (
                isinstance(layer, QuantLinear) and isinstance(emb, QuantEmbedding) and layer.qweight is emb.qweight):
            # written once, as the token embedding, which llama.cpp then uses as output
            report.notes.append("output layer tied to the token embedding: written once, as token_embd")
            continue
        leaf = lname.rpartition(".")[2]
        rows = _qk_rows(layer.out_features, heads[leaf]) if permute and leaf in heads else None
        done = fill(lname)
        tensor = _layer_tensor(gname, lname, layer, rows, fkind, requant, report)
        if gname.endswith("ffn_gate_inp_shexp.weight") and tensor.data.shape[0] == 1:  # llama.cpp's is a vector
            tensor = _Tensor(tensor.name, tensor.kind, tensor.data.reshape(-1),
                             None if tensor.expect is None else tensor.expect.reshape(-1), tensor.exact)
        bias = None
        if getattr(layer, "bias", None) is not None:
            b = layer.bias.detach().float()
            b = (b[rows] if rows is not None else b).numpy()
            bias = _Tensor(gname[: -len(".weight")] + ".bias", "F32", b, b)
        done()
        yield tensor
        if bias is not None:
            yield bias
    seen: set[int] = set()
    for key, t in state.items():
        # a layer's (above), or a tied tensor already written (on the meta device, tied tensors are one object)
        ident = id(t) if t.is_meta else t.data_ptr()
        if key in handled or not t.numel() or ident in seen:
            continue
        seen.add(ident)
        if not key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gname is None:
                if not key.endswith("rotary_emb.inv_freq"):  # llama.cpp computes it from the config
                    unnamed.append(key)
                continue
        owner, _, leaf = key.rpartition(".")
        done = fill(owner)
        v = getattr(module.get_submodule(owner), leaf).detach().float()
        if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):  # experts kept fused, in full precision
            made = _fused_experts_tensors(key, v, names, fkind, report, unnamed)
        else:  # norms, and the routers a mixture's every choice of experts depends on: F32
            made = [_float_tensor(gname, v, "F32" if v.dim() == 1 or ROUTER in gname else fkind, report)]
        del v
        done()
        yield from made
    if unnamed:
        raise ShrinkError(f"no GGUF name for {', '.join(unnamed[:4])}" + (f" ... ({len(unnamed)} in all)"
                          if len(unnamed) > 4 else "") + f" in gguf-py's tensor map of {type(module).__name__}")


ROUTER = "ffn_gate_inp"  # (and ffn_gate_inp_shexp): written F32, as llama.cpp's converter does


def _fused_experts_tensors(key: str, w: torch.Tensor, names, fkind: str, report: ExportReport, unnamed: list) -> list:
    """Fused full-precision experts ([experts, 2 x ff, hidden] gate and up; [experts, hidden, ff] down) under
    GGUF's names, gate and up apart."""
    base = key.rpartition(".")[0]
    parts = {"down_proj": w} if key.endswith("down_proj") else \
        {"gate_proj": w[:, : w.shape[1] // 2], "up_proj": w[:, w.shape[1] // 2:]}
    return [_float_tensor(gname, v.contiguous(), fkind, report) for proj, v in parts.items()
            if (gname := _expert_name(names, base, proj, unnamed))]


def _expert_name(names, path: str, proj: str, unnamed: list) -> str | None:
    """GGUF's name for the stacked `proj` (gate_proj, up_proj, down_proj) of the experts at `path`; None,
    and `path.proj` added to `unnamed`, where gguf-py's map has none."""
    gname = names.get_name(f"{path}.{proj}.weight", try_suffixes=(".weight",))
    if gname is None:
        unnamed.append(f"{path}.{proj}")
    return gname


def _experts_tensors(lname: str, experts: LinearExperts, names, fkind: str, requant, report: ExportReport,
                     unnamed: list) -> list[_Tensor]:
    """A mixture's experts as GGUF stores them: `ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`, each the
    experts' weights stacked [experts, rows, inputs] (gate and up are the two halves of each expert's
    gate_up layer's rows: quantized rows split exactly). Every expert of a projection must take one type."""
    inter = experts.intermediate_dim
    parts = {"gate_proj": [(lin, slice(0, inter), "gate_up") for lin in experts.gate_up],
             "up_proj": [(lin, slice(inter, 2 * inter), "gate_up") for lin in experts.gate_up],
             "down_proj": [(lin, slice(None), "down") for lin in experts.down]}
    out = []
    for proj, layers in parts.items():
        gname = _expert_name(names, lname, proj, unnamed)
        if gname is None:
            continue
        tensors = [_layer_tensor(gname, f"{lname}.{proj}.{e}", lin, torch.arange(lin.out_features)[rows], fkind,
                                 requant, report, expert=e, module=f"{lname}.{part}.{e}")
                   for e, (lin, rows, part) in enumerate(layers)]
        kinds = {t.kind for t in tensors}
        if len(kinds) != 1:
            raise ShrinkError(f"{lname}: the experts' {proj} layers are of several GGUF types ({', '.join(sorted(kinds))}); "
                              "GGUF stacks a projection's experts in one tensor of one type")
        expect = None if any(t.expect is None for t in tensors) else np.stack([t.expect for t in tensors])
        out.append(_Tensor(gname, kinds.pop(), np.stack([t.data for t in tensors]), expect,
                           exact=all(t.exact for t in tensors)))
    return out


def _float_tensor(gname: str, w: torch.Tensor, kind: str, report: ExportReport) -> _Tensor:
    """A float32 tensor written as F16 or F32 (the rounding to F16 is asked for, and reported; measured a
    slab of rows at a time, so a large vocabulary's table is not copied whole in float32 twice over)."""
    data = w.numpy().astype(np.float16 if kind == "F16" else np.float32)
    if kind == "F16":
        flat, back = w.reshape(-1).numpy(), data.reshape(-1)
        for i in range(0, flat.size, 1 << 22):
            change = np.abs(back[i:i + (1 << 22)].astype(np.float32) - flat[i:i + (1 << 22)]).max(initial=0.0)
            report.f16_change = max(report.f16_change, float(change))
    return _Tensor(gname, kind, data, None)


def _layer_tensor(gname: str, lname: str, layer: nn.Module, rows, fkind: str, requant: Requant | None,
                  report: ExportReport, expert: int | None = None, module: str | None = None) -> _Tensor:
    """One layer's weight: exact GGUF blocks for quantized layers, BF16/F16 for cast ones, `fkind` for
    full-precision ones; re-quantized (by `requant`, with the importance measured for the module `module`,
    default `lname`, or read for `gname`, its row `expert` for stacked experts) only where no type holds it
    exactly and that was asked for."""
    module = module or lname
    import gguf

    w = _float(layer)
    w = w[rows] if rows is not None else w
    kind = ("F32" if ROUTER in gname else fkind) if isinstance(layer, nn.Linear) else exact_type(layer)
    report.layers[lname] = kind
    if isinstance(layer, nn.Linear):
        return _float_tensor(gname, w, kind, report)
    if kind in EXACT_BLOCKS:
        data = _blocks(layer, kind, lname)
        data = data[rows.numpy()] if rows is not None else data
        return _Tensor(gname, kind, data, w.numpy(), exact=not kind.endswith("_1"))  # _1: offsets rounded to fp16
    if kind == "BF16":
        bf = layer.weight.detach()
        bf = bf[rows] if rows is not None else bf
        return _Tensor(gname, kind, bf.contiguous().view(torch.int16).numpy().view(np.uint8), w.numpy())
    if kind == "F16":
        return _Tensor(gname, kind, w.numpy().astype(np.float16), w.numpy())
    qtype = requant.type_for(layer.in_features)  # (checked before the work: every such layer has one)
    data = requant.quantize(w.numpy(), qtype, gname, expert, module)
    back = torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(w.shape)
    report.requantized[lname] = float((back != w).float().mean())
    report.layers[lname] = qtype.name
    if requant.weighted() and not requant.covers(gname, module):
        report.notes.append(f"{lname}: no importance for {gname}; rounded unweighted")
    return _Tensor(gname, qtype.name, data, w.numpy(), exact=False)


def _float(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, (QuantLinear, QuantEmbedding, CastLinear)):
        return layer.dequantized_weight().detach().float()
    return layer.weight.detach().float()


def _check_target(path: Path, force: bool) -> None:
    """Refuse a target that is not a new file, or (with force) a GGUF file shrink exported: never a
    folder, a pipe or device (whose opening would block or write elsewhere), a link, or another file."""
    if path.is_symlink():
        raise ShrinkError(f"{path} is a symbolic link; shrink writes only a file of its own there, never through a link")
    if path.is_dir():
        raise ShrinkError(f"{path} is a folder; give the GGUF file's path (e.g. {path / 'model.gguf'})")
    if not path.exists():
        return
    if not stat.S_ISREG(path.lstat().st_mode):
        raise ShrinkError(f"{path} exists and is not a regular file (a pipe or a device); give a file's path")
    if not force:
        raise ShrinkError(f"{path} exists; pass --force to replace a GGUF file shrink exported")
    if not exported_by_shrink(path):
        raise ShrinkError(f"{path} exists and is not a GGUF file shrink exported; it is never replaced")


def exported_by_shrink(path: Path) -> bool:
    """Whether `path` is a whole, readable GGUF file that carries shrink's export mark."""
    import gguf

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        field = gguf.GGUFReader(str(path)).get_field(EXPORTED_BY)
    except Exception:  # noqa: BLE001 - any damage means "not a file shrink wrote as it is"
        return False
    return field is not None


# the converter's check text, then plain prose, numbers and code: where pre-tokenizers differ
READBACK_TEXT = CHECK_TEXT + ("\nThe quick brown fox jumps over the lazy dog. In 2024, 1,234,567 people paid $89.99 "
                              "each; def f(x):\n    return x**2  # squared\n")


def llama_cpp_tokens(path: Path, text: str) -> tuple[list[int], list[int]] | None:
    """The ids llama.cpp's tokenizer gives `text` from the GGUF file `path` (vocabulary only, in a child
    process), and those it gives "a" with the special tokens it adds (its BOS rule); None where
    llama-cpp-python is not installed."""
    import json
    import subprocess
    import sys

    if llama_cpp_missing() is not None:
        return None
    code = ("import json, sys, llama_cpp\n"
            "m = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)\n"
            "t = sys.stdin.read().encode()\n"
            "print(json.dumps([m.tokenize(t, add_bos=False, special=False), m.tokenize(b'a', add_bos=True)]))")
    r = subprocess.run([sys.executable, "-c", code, str(path)], input=text, capture_output=True, text=True,
                       timeout=300)
    if r.returncode:
        why = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise ShrinkError(f"{path}: llama.cpp cannot read the file's tokenizer ({why[:200]}); nothing was written")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _verify_tokens(tmp: Path, path: Path, tokenizer, report: ExportReport) -> None:
    """The exported tokenizer, as llama.cpp reads it, must split READBACK_TEXT into the tokens the model's own
    tokenizer gives (the ones shrink measured with); ShrinkError naming the first differing token."""
    got = llama_cpp_tokens(tmp, READBACK_TEXT)
    if got is None:
        report.notes.append(f"tokenization not read back ({LLAMA_CPP_HINT}); the tensors were")
        return
    theirs, theirs_a = got
    ours, ours_a = list(tokenizer.encode(READBACK_TEXT, add_special_tokens=False)), list(tokenizer.encode("a"))
    if theirs_a != ours_a:
        raise ShrinkError(f"{path}: llama.cpp adds other special tokens to a prompt than the model's tokenizer "
                          f"({theirs_a} vs {ours_a} for 'a': the BOS rule differs); nothing was written")
    if theirs != ours:
        i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        def show(ids):
            return f"{ids[i]} ({tokenizer.decode([ids[i]])!r})" if i < len(ids) else "the end"
        raise ShrinkError(f"{path}: llama.cpp splits a check text into other tokens than the model's tokenizer, from "
                          f"token {i} on: {show(ours)} in the tokenizer, {show(theirs)} in llama.cpp "
                          f"({len(ours)} vs {len(theirs)} tokens in all); nothing was written")
    report.notes.append(f"tokenization read back in llama.cpp: the {len(ours)} tokens of a check text are the "
                        "tokenizer's")


def source_gguf_of(module: nn.Module) -> Path | None:
    """The GGUF file `module` was loaded from, as its source record says (None if none, or gone)."""
    src = record_of(module).source
    for key in ("gguf", "path"):
        p = src.get(key) if isinstance(src, dict) else None
        if p and str(p).lower().endswith(".gguf") and Path(p).is_file():
            return Path(p)
    return None


def _file_type(counts: dict[str, int]) -> int:
    import gguf

    quant = {k: v for k, v in counts.items() if k.startswith(("Q", "IQ"))}
    main = max(quant, key=quant.get) if quant else ("F16" if counts.get("F16") else "F32")
    # K-types name their mixes: a file mostly of one K-type is called its medium mix, as llama.cpp calls them
    named = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "F32": "ALL_F32"}.get(main, main)
    return getattr(gguf.LlamaFileType, named if named == "ALL_F32" else f"MOSTLY_{named}", gguf.LlamaFileType.ALL_F32)


def _check_values(t: _Tensor, data: np.ndarray, path: Path, report: ExportReport) -> None:
    """`data` (t's GGUF blocks or floats, as written or read back) must dequantize to the values the model
    computes with: exactly, but for Q4_1/Q5_1 offsets rounded to fp16 and re-quantized layers (measured)."""
    import gguf

    expect = t.expected()
    values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[t.kind]).reshape(expect.shape)
    err = float(np.abs(values.astype(np.float32) - expect).max()) if expect.size else 0.0
    report.max_error[t.kind] = max(report.max_error.get(t.kind, 0.0), err)
    if err > 0 and t.exact:
        raise ShrinkError(f"{path}: tensor {t.name} ({t.kind}) reads back different from the model "
                          f"(largest difference {err:.3g}); nothing was written")


def _verify(path: Path, tensors: list[_Tensor], report: ExportReport) -> None:
    """Read the file back: every tensor present, of its type and shape, and dequantizing to the values the
    model computes with (exactly, but for Q4_1/Q5_1 offsets rounded to fp16 and re-quantized layers)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    found = {t.name: t for t in reader.tensors}
    for t in tensors:
        got = found.get(t.name)
        if got is None or got.tensor_type.name != t.kind:
            raise ShrinkError(f"{path}: tensor {t.name} did not read back as {t.kind}")
        _check_values(t, got.data, path, report)
    extra = set(found) - {t.name for t in tensors}
    if extra:
        raise ShrinkError(f"{path}: unexpected tensors {sorted(extra)[:4]}")

