"""shrink.json: read and checked against its schema, the files it lists, and the weights file's header,
before anything is allocated. Every error names the file and the field.

The fields (format_version 1):
    format_version  int, 1 to FORMAT_VERSION             shrink_version  str
    kind            "transformers" or "torch"            architecture    str or null
    method          null or one of quant.METHODS         source          object
    modules         {name: {"format": str, "in_features": int, "out_features": int, "bias": bool,
                            "input_order": true (only when the layer has one), "embedding": true (a
                            QuantEmbedding: in = its dimension, out = its rows), "tied_to": name (an output
                            layer over that embedding's codes, stored once), "conv2d": {in_channels,
                            kernel_size, stride, padding, dilation, groups} (a QuantConv2d: in = in_channels /
                            groups * kh * kw), "done": {"method": str, "notes": [str]} (what really
                            produced the layer's weights: quant/record.py), "stored_as": [name, ...]
                            (pack-quantized only: the layer's rows are stored as these layers', an equal
                            share each, in order: a mixture's expert as the checkpoint's per-expert
                            tensors, gate then up)}}
    kept_full_precision  [str]                           calibration     object or null
    check           object or null: the forward check after quantizing (relative_error, input, skipped)
    rotation        object (optional): the rotation folded into the weights before quantizing (quant/rotate.py)
    fallbacks       {name: str} (optional): layers given another format than the one asked, and why
                    (a group that does not divide the layer's inputs)
    files           {relative path: {"bytes": int, "sha256": hex}}, every file but shrink.json
                    (absent in folders written before it was added; then nothing is verified)
    layout          (format_version 2) "pack-quantized": model.safetensors in compressed-tensors' layout,
                    loadable by transformers and vLLM (symmetric formats only), tensors named as the
                    original checkpoint names them (transformers' renamings undone); "shrink": shrink's own packed
                    layout in model.shrink.safetensors: transformers and vLLM find no model.safetensors,
                    llama.cpp's converter (any *.safetensors) cannot map its tensor names; all fail loudly.
                    Format 1 folders hold shrink's layout in model.safetensors.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..core.errors import ShrinkError
from ..core.ownership import MODEL_MANIFEST, is_own_folder, sha256  # noqa: F401 - is_own_folder: for io's callers
from ..core.readers import read_utf8
from ..quant import METHODS, parse_format
from ..quant.packing import packed_width
from ..quant.spec import SUPERBLOCK

FORMAT_VERSION = 2
MANIFEST = MODEL_MANIFEST
WEIGHTS = "model.safetensors"  # pack-quantized (and format 1)
WEIGHTS_NATIVE = "model.shrink.safetensors"  # shrink's own layout: other loaders stop rather than misread it
LAYOUTS = ("pack-quantized", "shrink")
MAX_FEATURES = 1 << 20  # a layer wider than a million inputs or outputs is a corrupt manifest, not a model
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _int(value, lo: int, hi: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)


def read_json(path: Path, what: str = "file"):
    """JSON from `path`; ShrinkError naming the file (and line) when it is not JSON."""
    text = read_utf8(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ShrinkError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # numbers of thousands of digits, nesting too deep
        raise ShrinkError(f"{path}: unreadable JSON ({str(e)[:120]})") from None


def validate(manifest, path: Path) -> dict:
    """Check a manifest's fields (types, ranges, each module); returns it, or raises ShrinkError naming
    `path` and the first field that is wrong."""
    def bad(field: str, want: str, got=None) -> ShrinkError:
        shown = json.dumps(got)[:60] if got is not None else "nothing"
        return ShrinkError(f"{path}: field {field!r} must be {want} (got {shown})")

    if not isinstance(manifest, dict):
        raise ShrinkError(f"{path}: expected a JSON object")
    version = manifest.get("format_version")
    if not _int(version, 1):
        raise bad("format_version", f"an integer from 1 to {FORMAT_VERSION}", version)
    if version > FORMAT_VERSION:
        raise ShrinkError(f"{path} has format version {version}, newer than this shrink reads ({FORMAT_VERSION}); "
                          "upgrade shrink")
    if manifest.get("kind") not in ("transformers", "torch"):
        raise bad("kind", "'transformers' or 'torch'", manifest.get("kind"))
    for field in ("architecture", "shrink_version"):
        if manifest.get(field) is not None and not isinstance(manifest[field], str):
            raise bad(field, "a string", manifest[field])
    if manifest.get("method") is not None and manifest["method"] not in METHODS:
        raise bad("method", f"null or one of {', '.join(METHODS)}", manifest["method"])
    for field in ("source", "calibration", "check", "rotation"):
        if manifest.get(field) is not None and not isinstance(manifest[field], dict):
            raise bad(field, "an object", manifest[field])
    fallbacks = manifest.get("fallbacks", {})
    if not (isinstance(fallbacks, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in fallbacks.items())):
        raise bad("fallbacks", "an object of module name -> reason", fallbacks)
    modules = manifest.get("modules")
    if not isinstance(modules, dict):
        raise bad("modules", "an object of module name -> format and shape", modules)
    for name, info in modules.items():
        where = f"modules.{name}"
        if not name or not isinstance(info, dict):
            raise bad(where, "an object with format, in_features, out_features, bias", info)
        try:
            spec = parse_format(info.get("format"))
        except (ValueError, TypeError) as e:
            raise ShrinkError(f"{path}: field '{where}.format': {e}") from None
        for dim in ("in_features", "out_features"):
            if not _int(info.get(dim), 1, MAX_FEATURES):
                raise bad(f"{where}.{dim}", f"an integer from 1 to {MAX_FEATURES}", info.get(dim))
        if not isinstance(info.get("bias"), bool):
            raise bad(f"{where}.bias", "true or false", info.get("bias"))
        if not isinstance(info.get("input_order", False), bool) or (info.get("input_order") and spec.cast):
            raise bad(f"{where}.input_order", "true or false (integer formats only)", info.get("input_order"))
        if not isinstance(info.get("embedding", False), bool) or (info.get("embedding") and spec.cast):
            raise bad(f"{where}.embedding", "true or false (integer formats only)", info.get("embedding"))
        conv = info.get("conv2d")
        if conv is not None:
            ok = isinstance(conv, dict) and _int(conv.get("in_channels"), 1, MAX_FEATURES) and \
                _int(conv.get("groups"), 1, MAX_FEATURES) and conv["in_channels"] % conv["groups"] == 0 and \
                all(isinstance(conv.get(k), list) and len(conv[k]) == 2 and all(_int(v, 0, 1 << 16) for v in conv[k])
                    for k in ("kernel_size", "stride", "dilation")) and \
                (conv.get("padding") in ("same", "valid") or (isinstance(conv.get("padding"), list) and
                 len(conv["padding"]) == 2 and all(_int(v, 0, 1 << 16) for v in conv["padding"])))
            if not ok or spec.cast or conv["in_channels"] // conv["groups"] * conv["kernel_size"][0] * \
                    conv["kernel_size"][1] != info["in_features"]:
                raise bad(f"{where}.conv2d", "the geometry of a convolution (in_channels, kernel_size, stride, "
                          "padding, dilation, groups) matching in_features", conv)
        done = info.get("done")
        if done is not None and not (isinstance(done, dict) and isinstance(done.get("method"), str) and
                                     isinstance(done.get("notes", []), list) and
                                     all(isinstance(n, str) for n in done.get("notes", []))):
            raise bad(f"{where}.done", 'an object {"method": "...", "notes": ["...", ...]}', done)
        tied = info.get("tied_to")
        if tied is not None and not (isinstance(tied, str) and (modules.get(tied) or {}).get("embedding")
                                     and modules[tied]["format"] == info.get("format")):
            raise bad(f"{where}.tied_to", "the name of a quantized embedding of the same format", tied)
        parts = info.get("stored_as")
        if parts is not None and not (isinstance(parts, list) and 1 <= len(parts) <= 8 and
                                      all(isinstance(p, str) and p for p in parts) and len(set(parts)) == len(parts)
                                      and not spec.cast and info["out_features"] % len(parts) == 0):
            raise bad(f"{where}.stored_as", "a list of 1 to 8 layer names sharing the rows of an integer format's "
                      "layer equally", parts)
        if not spec.cast and info["in_features"] % spec.group_for(info["in_features"]):
            raise ShrinkError(f"{path}: field '{where}': group size {spec.group_size} of {spec.name} does not divide "
                              f"in_features {info['in_features']}")
    layout = manifest.get("layout")
    if version >= 2 and layout not in LAYOUTS:
        raise bad("layout", f"one of {', '.join(LAYOUTS)}", layout)
    if version == 1 and layout is not None:
        raise bad("layout", "absent in format version 1", layout)
    for name, info in modules.items():
        if info.get("stored_as") is not None and layout != "pack-quantized":
            raise bad(f"modules.{name}.stored_as", "absent outside layout 'pack-quantized'", info["stored_as"])
    if layout == "pack-quantized":
        for name, info in modules.items():
            spec = parse_format(info["format"])
            if not spec.cast and (not spec.symmetric or spec.grid or spec.kquant):
                raise ShrinkError(f"{path}: field 'modules.{name}.format': {spec.name} cannot be stored "
                                  "pack-quantized (layout); asymmetric, grid and K-quant formats use layout 'shrink'")
    kept = manifest.get("kept_full_precision", [])
    if not isinstance(kept, list) or not all(isinstance(k, str) and k for k in kept):
        raise bad("kept_full_precision", "a list of module names", kept)
    files = manifest.get("files")
    if files is not None:
        if not isinstance(files, dict) or not files:
            raise bad("files", "an object of file -> bytes and sha256", files)
        for rel, f in files.items():
            p = Path(rel)
            if p.is_absolute() or ".." in p.parts or rel == MANIFEST:
                raise bad(f"files.{rel}", "a path inside the folder", rel)
            if not isinstance(f, dict) or not _int(f.get("bytes"), 0) or not _HEX64.match(str(f.get("sha256"))):
                raise bad(f"files.{rel}", "an object with bytes (an integer) and sha256 (64 hex digits)", f)
    return manifest


def read_manifest(directory: str | Path) -> dict:
    """Read shrink.json and check it against the schema; ShrinkError names the file and the field."""
    directory = Path(directory)
    if not directory.exists():
        raise ShrinkError(f"{directory}: no such folder")
    path = directory / MANIFEST
    if not path.is_file():
        raise ShrinkError(f"{directory} is not a shrink folder (no {MANIFEST})")
    return validate(read_json(path, "manifest"), path)


def file_record(directory: Path) -> dict:
    """{relative path: {"bytes", "sha256"}} of every file under `directory` but shrink.json."""
    from concurrent.futures import ThreadPoolExecutor

    files = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST]
    # the shards of a large model hashed side by side (hashlib and file reads let other threads run)
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(sha256, files))
    return {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": d}
            for p, d in zip(files, digests)}


def verify_files(directory: Path, manifest: dict) -> None:
    """The weights file and config files must be the ones shrink.json lists (sizes and SHA-256)."""
    for rel, f in (manifest.get("files") or {}).items():
        p = directory / rel
        if not rel.endswith((".safetensors", ".json")):
            continue  # tokenizer files and the like are checked by their own loaders
        if not p.is_file():
            raise ShrinkError(f"{p}: missing (listed in {directory / MANIFEST})")
        if p.stat().st_size != f["bytes"]:
            raise ShrinkError(f"{p}: {p.stat().st_size} bytes, but {MANIFEST} records {f['bytes']}; "
                              "the file was changed or cut short since shrink wrote it")
        if sha256(p) != f["sha256"]:
            raise ShrinkError(f"{p}: checksum does not match the one in {MANIFEST}; the file was changed or "
                              "damaged since shrink wrote it")


def header_shapes(weights: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor: (shape, dtype)} from a safetensors header, without reading the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except FileNotFoundError:
        raise ShrinkError(f"{weights}: missing weights file") from None
    except Exception as e:
        raise ShrinkError(f"{weights}: cannot read ({type(e).__name__}: {str(e)[:200]})") from None


def layout(manifest: dict) -> str:
    """The folder's tensor layout ("pack-quantized" or "shrink")."""
    return manifest.get("layout") or "shrink"


def weights_file(manifest: dict) -> str:
    """The name of the folder's weights file."""
    return WEIGHTS_NATIVE if manifest["format_version"] >= 2 and layout(manifest) == "shrink" else WEIGHTS


def expected_module_tensors(name: str, info: dict, packed: str = "shrink") -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors a quantized module of the manifest stores in layout `packed`: {tensor: (shape, dtype)}."""
    spec = parse_format(info["format"])
    i, o = info["in_features"], info["out_features"]
    if info.get("tied_to"):
        return {f"{name}.bias": ((o,), "F32")} if info["bias"] else {}  # its codes are the table's
    if packed == "pack-quantized" and not spec.cast:
        from .packformat import expected

        return expected(name, spec, i, o, info["bias"], info.get("stored_as"))
    if spec.cast:
        dt = "BF16" if spec.cast == "bf16" else "F16"
        out = {f"{name}.weight": ((o, i), dt)}
        if info["bias"]:
            out[f"{name}.bias"] = ((o,), dt)
        return out
    groups = i // spec.group_for(i)
    out = {f"{name}.qweight": ((o, packed_width(i, spec.bits)), "U8"), f"{name}.scales": ((o, groups), "F16")}
    if not spec.symmetric:
        out[f"{name}.zeros"] = ((o, groups), "U8")
    if spec.kquant:
        out[f"{name}.superscales"] = ((o, i // SUPERBLOCK, 1 if spec.symmetric else 2), "F16")
    if info["bias"]:
        out[f"{name}.bias"] = ((o,), "F32")
    if info.get("input_order"):
        out[f"{name}.input_order"] = ((i,), "I64")
    return out


def check_modules_against_header(manifest: dict, header: dict, weights: Path, manifest_path: Path) -> None:
    """Every module the manifest declares must be in the weights file with the shapes its format implies,
    checked before any layer is built (a manifest cannot make shrink allocate more than the file holds)."""
    for name, info in manifest["modules"].items():
        for key, (shape, dtype) in expected_module_tensors(name, info, layout(manifest)).items():
            if key not in header:
                raise ShrinkError(f"{manifest_path}: module {name!r} ({info['format']}) needs tensor {key!r}, "
                                  f"which {weights.name} does not hold")
            if header[key] != (shape, dtype):
                raise ShrinkError(f"{manifest_path}: module {name!r} ({info['format']}, {info['in_features']} -> "
                                  f"{info['out_features']}) needs {key!r} of shape {shape} {dtype}; {weights.name} "
                                  f"holds {header[key][0]} {header[key][1]}")
    listed = {n for name, info in manifest["modules"].items() for n in (name, *info.get("stored_as", []))}
    for key in header:
        module, _, leaf = key.rpartition(".")
        if leaf in ("qweight", "scales", "zeros", "superscales", "weight_packed", "weight_scale", "weight_shape") and \
                module not in listed:
            raise ShrinkError(f"{weights}: holds quantized tensors of {module!r}, a module {manifest_path.name} "
                              "does not list")


FLOAT_DTYPES = ("F16", "BF16", "F32")


def check_tensor(weights: Path, layer: str, key: str, header: dict, shape: tuple, dtypes: tuple[str, ...],
                 what: str = "") -> None:
    """ShrinkError naming the file, layer and tensor unless `key` is in the safetensors `header` with `shape`
    and one of `dtypes` (safetensors' names: I32, F16, ...): read as another type its bits are other numbers."""
    got = header.get(key)
    if got is None or tuple(got[0]) != tuple(shape):
        raise ShrinkError(f"{weights}: layer {layer!r}{what} needs {key!r} of shape {tuple(shape)}, "
                          f"found {tuple(got[0]) if got else 'none'}")
    if got[1] not in dtypes:
        raise ShrinkError(f"{weights}: layer {layer!r}{what}: {key!r} is {got[1]}, but must be "
                          f"{' or '.join(dtypes)}; read as it is, its bits would be other numbers")

