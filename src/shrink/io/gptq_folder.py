"""Read GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum layout) into shrink's QuantLinear layers, exactly.

A GPTQ layer `L` stores `L.qweight` (int32 [in * bits/32, out]: word i of column j holds the codes of
inputs 32/bits*i ... in its low bits first), `L.qzeros` (int32 [groups, out * bits/32], packed the same
way along the outputs), `L.scales` ([groups, out]) and `L.g_idx` (int32 [in], the group of each input);
x = scale * (code - zero). The original `gptq` checkpoint format stores each zero minus one (modulo
2^bits); `gptq_v2` stores it as it is. With activation order (`desc_act`) a group's inputs are scattered:
shrink sorts the inputs by group and keeps that order in the layer's `input_order`, so the codes and
scales are still copied exactly.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..core.errors import ShrinkError
from ..quant import QuantLinear, QuantSpec
from ..quant.format import QuantizedWeight
from ..quant.record import update_record
from ..quant.spec import GROUP_SIZES

BITS = (2, 4, 8)  # bit widths whose codes tile an int32 word (3-bit GPTQ codes straddle words)


@dataclass(frozen=True)
class GPTQConfig:
    """What a GPTQ checkpoint's quantization_config (or quantize_config.json) says."""

    bits: int
    group_size: int  # -1: one group per output channel
    desc_act: bool
    sym: bool
    version: int  # 1: zeros stored minus one ("gptq"); 2: as they are ("gptq_v2")


def read_config(qc: dict, where: str) -> GPTQConfig:
    """The GPTQ settings of `qc`; ShrinkError naming `where` and the field for what shrink cannot read."""
    from ..core.readers import is_count

    bits, gs = qc.get("bits"), qc.get("group_size", -1)
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if not is_count(bits) or bits not in BITS:
        raise ShrinkError(f"{where}: GPTQ with {bits} bits is not read (shrink reads {', '.join(map(str, BITS))}-bit "
                          "GPTQ; 3-bit codes straddle int32 words)")
    if not is_count(gs) or (gs != -1 and gs not in GROUP_SIZES):
        raise ShrinkError(f"{where}: GPTQ group_size {gs!r} does not map onto shrink's formats (groups of "
                          f"{', '.join(map(str, GROUP_SIZES))}, or -1 for one per output channel)")
    if fmt not in ("gptq", "gptq_v2"):
        raise ShrinkError(f"{where}: GPTQ checkpoint_format {fmt!r} is not read (shrink reads 'gptq' and "
                          "'gptq_v2'; other packings such as marlin or exllama are repacked for one kernel)")
    return GPTQConfig(bits, gs, bool(qc.get("desc_act", False)), bool(qc.get("sym", True)), 2 if fmt == "gptq_v2" else 1)


def _unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] -> codes [R * 32/bits, C]: word r holds rows r*per ... r*per+per-1, low bits first."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32).view(1, per, 1)
    codes = (words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1, words.shape[1])


def _unpack_cols(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] -> codes [R, C * 32/bits], packed along the columns."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32).view(1, 1, per)
    codes = (words.unsqueeze(2) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(words.shape[0], -1)


def expected(name: str, cfg: GPTQConfig, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    """{tensor: shape} of one GPTQ layer."""
    groups = 1 if cfg.group_size == -1 else in_features // cfg.group_size
    per = 32 // cfg.bits
    return {f"{name}.qweight": (in_features // per, out_features), f"{name}.qzeros": (groups, out_features // per),
            f"{name}.scales": (groups, out_features)}


def to_layer(state: dict, name: str, cfg: GPTQConfig, linear: nn.Linear) -> QuantLinear:
    """One GPTQ layer's tensors (popped from `state`) as a QuantLinear holding the same codes and scales."""
    i, o = linear.in_features, linear.out_features
    gs = i if cfg.group_size == -1 else cfg.group_size
    groups = i // gs
    where = f"layer {name!r}"
    codes = _unpack_rows(state.pop(f"{name}.qweight"), cfg.bits).t()  # [out, in]
    zeros = _unpack_cols(state.pop(f"{name}.qzeros"), cfg.bits)[:, :o]  # [groups, out]
    if cfg.version == 1:
        zeros = (zeros + 1) & ((1 << cfg.bits) - 1)
    scales = state.pop(f"{name}.scales").t().contiguous()  # [out, groups]
    g_idx = state.pop(f"{name}.g_idx", None)
    order = None
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64)
        if g_idx.shape != (i,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise ShrinkError(f"{where}: g_idx must give each of the {i} inputs a group from 0 to {groups - 1}")
        if not torch.equal(g_idx, torch.arange(i) // gs):
            counts = torch.bincount(g_idx, minlength=groups)
            if not bool((counts == gs).all()):
                raise ShrinkError(f"{where}: g_idx puts {int(counts.min())} to {int(counts.max())} inputs in a group, "
                                  f"not {gs}; shrink's groups hold exactly group_size inputs")
            order = torch.argsort(g_idx, stable=True)
            codes = codes[:, order]
    mid = 1 << (cfg.bits - 1)
    symmetric = bool((zeros == mid).all())
    if cfg.sym and not symmetric:
        raise ShrinkError(f"{where}: config says symmetric, but its zero points are not all {mid}")
    half = scales.to(torch.float16)
    if not torch.isfinite(half).all():
        raise ShrinkError(f"{where}: scales outside the range of float16")
    spec = QuantSpec(bits=cfg.bits, group_size=None if cfg.group_size == -1 else gs, symmetric=symmetric)
    bias = state.pop(f"{name}.bias", None)
    layer = QuantLinear(i, o, spec, bias=bias is not None, input_order=order is not None)
    layer.fill(QuantizedWeight(codes.to(torch.uint8), half, None if symmetric else zeros.t().to(torch.uint8),
                               layer.zero_const))
    if bias is not None:
        layer.bias.copy_(bias)
    if order is not None:
        layer.input_order.copy_(order)
    return layer


def load_gptq(path: Path, qc: dict) -> tuple[nn.Module, dict]:
    """A GPTQ folder (config.json with quant_method "gptq", one model.safetensors) as a model of
    QuantLinear layers running shrink's kernels, and its source record; refused, naming the field or layer, where its layout
    does not map onto shrink's formats."""
    from safetensors.torch import load_file

    from ..quant.replace import set_submodule
    from . import saved
    from .manifest import WEIGHTS
    from .manifest import FLOAT_DTYPES, check_tensor, header_shapes

    cfg = read_config(qc, str(path / "config.json"))
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ShrinkError(f"{path}: no {WEIGHTS} (sharded or .bin GPTQ checkpoints are not read)")
    header = header_shapes(weights)
    names = sorted(k[: -len(".qweight")] for k in header if k.endswith(".qweight"))
    if not names:
        raise ShrinkError(f"{weights}: no '.qweight' tensors, though config.json says GPTQ")
    model = saved.build_skeleton(path)
    for name in names:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear):
            raise ShrinkError(f"{weights}: {name!r} holds GPTQ tensors but is not a Linear layer of the model")
        if lin.out_features % (32 // cfg.bits) or (cfg.group_size != -1 and lin.in_features % cfg.group_size):
            raise ShrinkError(f"{weights}: layer {name!r} ({lin.in_features} -> {lin.out_features}) does not fit "
                              f"{cfg.bits}-bit GPTQ with group_size {cfg.group_size}")
        for key, shape in expected(name, cfg, lin.in_features, lin.out_features).items():
            check_tensor(weights, name, key, header, shape, FLOAT_DTYPES if key.endswith(".scales") else ("I32",))
        if f"{name}.g_idx" in header:
            check_tensor(weights, name, f"{name}.g_idx", header, (lin.in_features,), ("I32", "I64"))
        if f"{name}.bias" in header:
            check_tensor(weights, name, f"{name}.bias", header, (lin.out_features,), FLOAT_DTYPES)
    state = load_file(str(weights))
    layers = {}
    for name in names:
        layers[name] = to_layer(state, name, cfg, model.get_submodule(name))
        set_submodule(model, name, layers[name])
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # fp16 embeddings, norms
    for name, layer in layers.items():
        state.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
    saved._load_state(model, state, weights)
    ordered = sum(model.get_submodule(n).input_order is not None for n in names)
    note = f"{ordered} layers in activation order (inputs reordered, codes exact)" if ordered else None
    if note:
        print(f"note: {path}: {note}", file=sys.stderr)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    source = {"kind": "gptq", "path": str(path), **({"note": note} if note else {})}
    # method None: what made the checkpoint is the source's to say
    update_record(model, method=None, source=source,
                  formats={**{n: model.get_submodule(n).spec.name for n in names}, **{n: None for n in linear}})
    model.eval()
    return model, source
