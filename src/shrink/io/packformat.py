"""compressed-tensors' `pack-quantized` layout, the checkpoint format transformers and vLLM load without
shrink, for the formats whose codes it stores exactly: symmetric integer formats, per channel or per group.

A quantized Linear `L` is stored as `L.weight_packed` (int32, 32 codes in `bits` words, each code offset
by 2^(bits-1), which is exactly shrink's stored code), `L.weight_scale` (fp16, one per group; shrink's
scales as they are) and `L.weight_shape` ([out, in]). The packing itself is compressed-tensors' own
(`pack_to_int32` / `unpack_from_int32`). Asymmetric formats do not load in transformers (zero-point
shape mismatch), so they keep shrink's own layout.
"""

from __future__ import annotations

import torch

from ..quant import QuantLinear, QuantSpec
from ..quant.packing import pack, unpack

SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")


def exportable(spec: QuantSpec) -> bool:
    """Whether a format's codes and scales are stored exactly in pack-quantized."""
    return not spec.cast and spec.symmetric


def module_tensors(layer: QuantLinear) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one layer (names relative to the layer)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    signed = unpack(layer.qweight, layer.spec.bits, layer.in_features).to(torch.int16) - layer.zero_const
    out = {"weight_packed": pack_to_int32(signed.to(torch.int8), layer.spec.bits),
           "weight_scale": layer.scales.detach().clone(),
           "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)}
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().clone()
    return out


def expected(name: str, spec: QuantSpec, in_features: int, out_features: int, bias: bool) -> dict:
    """{tensor: (shape, safetensors dtype)} of one pack-quantized layer."""
    groups = in_features // spec.group_for(in_features)
    out = {f"{name}.weight_packed": ((out_features, -(-in_features * spec.bits // 32)), "I32"),
           f"{name}.weight_scale": ((out_features, groups), "F16"),
           f"{name}.weight_shape": ((2,), "I64")}
    if bias:
        out[f"{name}.bias"] = ((out_features,), "F32")
    return out


def to_shrink(state: dict, name: str, spec: QuantSpec, in_features: int, out_features: int) -> None:
    """Replace a layer's pack-quantized tensors in `state` by QuantLinear's qweight and scales, in place."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    packed = state.pop(f"{name}.weight_packed")
    shape = [int(x) for x in state.pop(f"{name}.weight_shape")]
    if shape != [out_features, in_features]:
        raise ValueError(f"weight_shape {shape} is not [{out_features}, {in_features}]")
    signed = unpack_from_int32(packed, spec.bits, torch.Size(shape))
    codes = signed.to(torch.int16) + (1 << (spec.bits - 1))
    state[f"{name}.qweight"] = pack(codes.to(torch.uint8), spec.bits)
    state[f"{name}.scales"] = state.pop(f"{name}.weight_scale").to(torch.float16)


def weights_args(spec: QuantSpec) -> dict:
    """The `weights` entry of a compressed-tensors config group for `spec`."""
    return {"num_bits": spec.bits, "type": "int", "symmetric": True,
            "strategy": "group" if spec.group_size else "channel", "group_size": spec.group_size,
            "dynamic": False, "observer": "minmax", "actorder": None, "block_structure": None}


def quantization_config(formats: dict[str, QuantSpec], linear_names: list[str]) -> dict:
    """The `quantization_config` of config.json: one config group per format, targeting its layers by
    name; every other Linear layer (kept in full precision, or cast to bf16/fp16) is in `ignore`."""
    by_format: dict[str, list[str]] = {}
    for name, spec in formats.items():
        by_format.setdefault(spec.name, []).append(name)
    specs = {spec.name: spec for spec in formats.values()}
    groups = {f"group_{i}": {"targets": sorted(names), "weights": weights_args(specs[f]), "input_activations": None,
                             "output_activations": None, "format": "pack-quantized"}
              for i, (f, names) in enumerate(sorted(by_format.items()))}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": groups,
            "ignore": sorted(n for n in linear_names if n not in formats), "quantization_status": "compressed"}
