"""Putting quantized layers in place: the round-to-nearest replacement for a layer, and setting a submodule
by its dotted name (what quantize, the calibrated methods and the loaders all do)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .conv import QuantConv2d
from .embedding import QuantEmbedding
from .linear import CastLinear, QuantLinear
from .spec import QuantSpec


def round_to_nearest(linear: nn.Module, spec: QuantSpec, name: str, backend: str | None = None,
                     workspace: torch.Tensor | None = None) -> nn.Module:
    """The replacement for `linear` (a Linear, or an Embedding) in `spec` without calibration: a cast, or a
    round-to-nearest QuantLinear (QuantEmbedding). workspace: float32 memory a Linear is rounded
    in, as `rtn.quantize_weight` takes it (default None: new memory)."""
    if isinstance(linear, nn.Embedding):
        return QuantEmbedding.from_embedding(linear, spec, name=name)
    if isinstance(linear, nn.Conv2d):
        return QuantConv2d.from_conv(linear, spec, name=name)
    if spec.cast:
        return CastLinear.from_linear(linear, spec, name=name)
    return QuantLinear.from_linear(linear, spec, name=name, backend=backend, workspace=workspace)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted `name` ("model.layers.0.mlp.up_proj") with `new`; an online rotation
    of the old one's input (online.py) moves to the new one."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child, None)
    setattr(parent, child, new)
    if getattr(old, "input_rotation", None) is not None:
        from .online import carry

        carry(old, new)


def find_submodule(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule at dotted `name`, or None where `model` has none."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
