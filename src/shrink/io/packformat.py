"""compressed-tensors' `pack-quantized` layout, the checkpoint format transformers and vLLM load without
shrink, for the formats whose codes it stores exactly: symmetric integer formats, per channel or per group.

A quantized Linear `L` is stored as `L.weight_packed` (int32, 32 codes in `bits` words, each code offset
by 2^(bits-1), which is exactly shrink's stored code), `L.weight_scale` (fp16, one per group; shrink's
scales as they are) and `L.weight_shape` ([out, in]). The packing itself is compressed-tensors' own
(`pack_to_int32` / `unpack_from_int32`). Asymmetric formats do not load in transformers (zero-point
shape mismatch), so they keep shrink's own layout.
"""

from __future__ import annotations

import sys

import torch

from ..quant import QuantLinear, QuantSpec
from ..quant.packing import pack, unpack

SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")


def _ct(module: str):
    """A compressed-tensors module; ShrinkError saying how to install it when it is missing."""
    import importlib

    try:
        return importlib.import_module(f"compressed_tensors.{module}")
    except ImportError as e:
        from ..core.errors import ShrinkError

        raise ShrinkError(f"compressed-tensors checkpoints need the compressed-tensors package ({e}); "
                          "pip install 'compressed-tensors>=0.20'") from None


def exportable(spec: QuantSpec) -> bool:
    """Whether a format's codes and scales are stored exactly in pack-quantized (symmetric integer grids: a
    grid format's levels and a K-quant format's two scale levels have no compressed-tensors scheme)."""
    return not spec.cast and spec.symmetric and spec.grid is None and spec.kquant is None


def module_tensors(layer: QuantLinear) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one layer (names relative to the layer)."""
    out = {"weight_packed": _words(unpack(layer.qweight, layer.spec.bits, layer.in_features), layer.spec.bits,
                                   layer.zero_const),
           "weight_scale": layer.scales.detach().clone(),
           "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)}
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().clone()
    return out


def split_rows(tensors: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """One layer's pack-quantized tensors (`module_tensors`) as those of `n` layers, each a consecutive
    equal share of its rows (the words and scales are per row: exact)."""
    out_features, in_features = (int(x) for x in tensors["weight_shape"])
    rows = out_features // n
    parts = []
    for i in range(n):
        at = slice(i * rows, (i + 1) * rows)
        part = {k: tensors[k][at].clone() for k in ("weight_packed", "weight_scale")}
        part["weight_shape"] = torch.tensor([rows, in_features], dtype=torch.int64)
        if "bias" in tensors:
            part["bias"] = tensors["bias"][at].clone()
        parts.append(part)
    return parts


def _words(codes: torch.Tensor, bits: int, zero_const: int) -> torch.Tensor:
    """pack_to_int32's words of the unsigned codes [out, in] uint8 (shrink's stored code: the signed value
    + 2^(bits-1)). Widths that divide a byte, rows filling whole words, are laid straight into the words'
    bytes (code i at bit i*bits, little endian), in one pass instead of compressed-tensors' int32 scatter;
    others through compressed-tensors."""
    n, k = codes.shape
    if bits in (2, 4, 8) and sys.byteorder == "little" and zero_const == 1 << (bits - 1) and (k * bits) % 32 == 0:
        per = 8 // bits
        b = codes.contiguous().reshape(n, k // per, per)
        byte = b[..., 0].clone()
        for i in range(1, per):
            byte |= b[..., i] << (i * bits)
        return byte.view(torch.int32)
    pack_to_int32 = _ct("compressors.pack_quantized.helpers").pack_to_int32
    return pack_to_int32((codes.to(torch.int16) - zero_const).to(torch.int8), bits)


def expected(name: str, spec: QuantSpec, in_features: int, out_features: int, bias: bool, parts=None) -> dict:
    """{tensor: (shape, safetensors dtype)} of one pack-quantized layer; stored as the layers `parts` (each an
    equal share of its rows, `split_rows`), theirs."""
    if parts:
        return {k: v for part in parts for k, v in expected(part, spec, in_features, out_features // len(parts),
                                                            bias).items()}
    groups = in_features // spec.group_for(in_features)
    out = {f"{name}.weight_packed": ((out_features, -(-in_features * spec.bits // 32)), "I32"),
           f"{name}.weight_scale": ((out_features, groups), "F16"),
           f"{name}.weight_shape": ((2,), "I64")}
    if bias:
        out[f"{name}.bias"] = ((out_features,), "F32")
    return out


def _codes(packed: torch.Tensor, bits: int, shape: list[int]) -> torch.Tensor:
    """The unsigned codes [out, in] uint8 (signed value + 2^(bits-1), shrink's stored code) of pack-quantized
    words. Widths that divide a byte are read straight from the words' bytes (code i at bit i*bits, little
    endian, as `pack_to_int32` lays them out), 8 bits without a copy; others through compressed-tensors."""
    if bits in (2, 4, 8) and sys.byteorder == "little" and packed.dtype == torch.int32 and packed.dim() == 2:
        b = packed.contiguous().view(torch.uint8)
        if bits != 8:
            b = torch.stack([(b >> s) & ((1 << bits) - 1) for s in range(0, 8, bits)], -1).reshape(len(b), -1)
        if b.shape[1] >= shape[1]:
            return b[:, :shape[1]]
    unpack_from_int32 = _ct("compressors.pack_quantized.helpers").unpack_from_int32
    signed = unpack_from_int32(packed, bits, torch.Size(shape))
    return (signed.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)


def to_shrink(state: dict, name: str, spec: QuantSpec, in_features: int, out_features: int, parts=None) -> None:
    """Replace a layer's pack-quantized tensors in `state` by QuantLinear's qweight and scales, in place; a layer
    stored as the layers `parts` (`split_rows`) from theirs, its rows in their order."""
    codes, scales, biases = [], [], []
    for part in parts or [name]:
        rows = out_features // len(parts or [name])
        packed = state.pop(f"{part}.weight_packed")
        shape = [int(x) for x in state.pop(f"{part}.weight_shape")]
        if shape != [rows, in_features]:
            raise ValueError(f"{part}.weight_shape {shape} is not [{rows}, {in_features}]")
        codes.append(_codes(packed, spec.bits, shape))
        scales.append(state.pop(f"{part}.weight_scale").to(torch.float16))
        if parts and f"{part}.bias" in state:
            biases.append(state.pop(f"{part}.bias"))
    state[f"{name}.qweight"] = pack(codes[0] if len(codes) == 1 else torch.cat(codes), spec.bits)
    state[f"{name}.scales"] = scales[0] if len(scales) == 1 else torch.cat(scales)
    if biases:
        state[f"{name}.bias"] = torch.cat(biases)


def weights_args(spec: QuantSpec) -> dict:
    """The `weights` entry of a compressed-tensors config group for `spec`."""
    return {"num_bits": spec.bits, "type": "int", "symmetric": True,
            "strategy": "group" if spec.group_size else "channel", "group_size": spec.group_size,
            "dynamic": False, "observer": "minmax", "actorder": None, "block_structure": None}


def quantization_config(formats: dict[str, QuantSpec], linear_names: list[str], experts: QuantSpec | None = None,
                        ignore=()) -> dict:
    """The `quantization_config` of config.json: one config group per format, targeting its layers by
    name; every other Linear layer (kept in full precision, or cast to bf16/fp16) is in `ignore`, with the
    names in `ignore`. experts: the one format of a mixture's experts (stored one tensor per expert, which
    no module of transformers' fused model is named after), in a first group: targeting "Linear" where every
    quantized layer has that format, as llm-compressor writes mixtures (transformers' loader takes the first
    group with a class-name target for the experts, vLLM looks up "Linear" for its fused experts); otherwise
    targeting the experts by a pattern, the other layers by name in their own groups."""
    by_format: dict[str, list[str]] = {}
    for name, spec in formats.items():
        by_format.setdefault(spec.name, []).append(name)
    specs = {spec.name: spec for spec in formats.values()}
    if experts is not None and set(by_format) <= {experts.name}:
        by_format = {}  # "Linear" is all of them (naming them again makes compressed-tensors warn)

    def group(targets, spec):
        return {"targets": targets, "weights": weights_args(spec), "input_activations": None,
                "output_activations": None, "format": "pack-quantized"}
    # every layer of one format: "Linear"; else a pattern naming the experts, which transformers' loading with
    # dequantize=True takes for them, and the first of the other groups for every other layer (one group: right)
    groups = [group(["re:.*experts.*"] if by_format else ["Linear"], experts)] if experts is not None else []
    groups += [group(sorted(names), specs[f]) for f, names in sorted(by_format.items())]
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {f"group_{i}": g for i, g in enumerate(groups)},
            "ignore": sorted({n for n in linear_names if n not in formats} | set(ignore)),
            "quantization_status": "compressed"}


def formats_of(qc: dict, model, where: str, experts=()) -> dict[str, QuantSpec]:
    """The shrink format of each Linear layer a compressed-tensors `quantization_config` quantizes, matched
    by compressed-tensors' own target rules; ShrinkError naming `where` and the group or layer for a scheme
    shrink's formats cannot hold exactly (activation quantization, asymmetric, float, other bit widths or
    group sizes, dynamic activation order). experts: the paths of fused expert modules, whose experts are
    stored one tensor per expert (`experts_format`): what a target matches there is theirs, and a config
    matching no other layer is then not an error."""
    import torch.nn as nn
    match_named_modules = _ct("utils.match").match_named_modules

    from ..core.errors import ShrinkError

    if qc.get("format") != "pack-quantized":
        raise ShrinkError(f"{where}: quantization_config format {qc.get('format')!r} is not supported; shrink reads "
                          "compressed-tensors checkpoints in the 'pack-quantized' format")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ShrinkError(f"{where}: quantization_config has no config_groups")
    out: dict[str, QuantSpec] = {}
    for gname, group in groups.items():
        at = f"{where}: quantization_config.config_groups.{gname}"
        spec = _group_format(group, at)
        targets = group.get("targets") or []
        for name, module in match_named_modules(model, targets, qc.get("ignore") or []):
            if any(name == p or name.startswith(p + ".") for p in experts):
                continue
            if not isinstance(module, nn.Linear):
                raise ShrinkError(f"{at}: layer {name!r} is a {type(module).__name__}; shrink reads Linear layers")
            if module.in_features % spec.group_for(module.in_features):
                raise ShrinkError(f"{at}: layer {name!r}: group size {spec.group_size} does not divide "
                                  f"{module.in_features}")
            out.setdefault(name, spec)
    if not out and not experts:
        raise ShrinkError(f"{where}: quantization_config matches no Linear layer of the model")
    return out


def _group_format(group, at: str) -> QuantSpec:
    """The shrink format of a compressed-tensors config group's weight scheme; ShrinkError naming `at` for a
    scheme shrink's formats cannot hold exactly."""
    from ..core.errors import ShrinkError
    from ..core.readers import is_count
    from ..quant.spec import BITS, GROUP_SIZES

    w = group.get("weights") if isinstance(group, dict) else None
    if not isinstance(w, dict):
        raise ShrinkError(f"{at}: no 'weights' scheme")
    if group.get("input_activations") or group.get("output_activations"):
        raise ShrinkError(f"{at}: quantizes activations; shrink reads weight-only schemes")
    strategy, gs, bits = w.get("strategy"), w.get("group_size"), w.get("num_bits")
    why = None
    if w.get("type", "int") != "int":
        why = f"type {w.get('type')!r} (shrink holds integer codes)"
    elif not w.get("symmetric", True):
        why = "asymmetric (zero points are not read)"
    elif not is_count(bits) or bits not in BITS:
        why = f"{bits!r} bits (num_bits: shrink has the integers {', '.join(map(str, BITS))})"
    elif strategy not in ("group", "channel") or (strategy == "group" and (not is_count(gs) or gs not in GROUP_SIZES)):
        why = f"strategy {strategy!r} with group size {gs} (shrink has channel, or groups of " \
              f"{', '.join(map(str, GROUP_SIZES))})"
    elif w.get("actorder") not in (None, "weight", "static"):
        why = f"activation order {w.get('actorder')!r} (a g_idx permutation shrink's layout does not hold)"
    if why:
        raise ShrinkError(f"{at}: {why}")
    return QuantSpec(bits=bits, group_size=gs if strategy == "group" else None)


def experts_format(qc: dict, where: str) -> QuantSpec:
    """The format of a mixture's experts stored one tensor per expert, chosen from the config groups as
    transformers' loader chooses it: the first group with a `re:` target naming experts, else the first with
    a class-name or layer-name target (e.g. "Linear": the experts were Linear layers when written)."""
    groups = list((qc.get("config_groups") or {}).items())
    targets = [(n, g, [t for t in (g.get("targets") or []) if isinstance(t, str)]) for n, g in groups
               if isinstance(g, dict)]
    pick = next((x for x in targets if any(t.startswith("re:") and "experts" in t for t in x[2])), None) or \
        next((x for x in targets if any(not t.startswith("re:") for t in x[2])), None) or next(iter(targets), None)
    if pick is None:
        from ..core.errors import ShrinkError

        raise ShrinkError(f"{where}: quantization_config has no config group for the experts")
    return _group_format(pick[1], f"{where}: quantization_config.config_groups.{pick[0]}")
