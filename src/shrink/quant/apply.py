"""`quantize(model, spec)`: swap a model's `nn.Linear` layers for quantized ones, in place.

A spec is one format string for every Linear layer, or a mapping from module-name globs to format
strings (first matching glob wins; `None` keeps the layer in full precision; unmatched layers stay in
full precision). The output layer (`lm_head`, or the last Linear of a plain model) is kept in full
precision unless `keep_output=False` or the mapping names it exactly. Embeddings are not Linear layers
and always stay as they are.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

import torch.nn as nn
from tqdm.auto import tqdm

from .linear import CastLinear, QuantLinear
from .spec import QuantSpec, parse_format

METHODS = ("rtn",)

Spec = str | QuantSpec | Mapping[str, "str | QuantSpec | None"]


def output_layer_name(model: nn.Module) -> str | None:
    """Name of the model's output layer: the HF output embeddings, else its last `nn.Linear`."""
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            out = get()
        except (AttributeError, NotImplementedError):
            out = None
        if isinstance(out, nn.Linear):
            for name, module in model.named_modules():
                if module is out:
                    return name
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return last


def plan(model: nn.Module, spec: Spec, keep_output: bool = True) -> dict[str, QuantSpec | None]:
    """The format each `nn.Linear` of `model` will get (None: kept in full precision)."""
    if isinstance(spec, Mapping):
        rules = [(pattern, parse_format(fmt) if fmt is not None else None) for pattern, fmt in spec.items()]
        explicit = set(spec)
    else:
        rules = [("*", parse_format(spec))]
        explicit = set()
    out_name = output_layer_name(model) if keep_output else None
    result: dict[str, QuantSpec | None] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        chosen = None
        for pattern, fmt in rules:
            if fnmatch.fnmatchcase(name, pattern):
                chosen = fmt
                break
        if name == out_name and name not in explicit:
            chosen = None
        result[name] = chosen
    return result


def quantize(model: nn.Module, spec: Spec = "int8", *, method: str = "rtn", calibration=None,
             keep_output: bool = True, backend: str | None = None, progress: bool | None = None) -> nn.Module:
    """Quantize `model`'s Linear layers in place and return it.

    spec: a format string (default "int8") or a mapping of module-name globs to formats or None.
    method: "rtn" (round to nearest, default; needs no calibration data).
    keep_output: keep the output layer in full precision (default True).
    backend: kernel backend for the new layers ("auto", "native", "torch"; default $SHRINK_BACKEND or auto).
    progress: show a progress bar (default: when writing to a terminal).
    The chosen formats are recorded on the model as `model.shrink_formats` (name -> format or None).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: available methods are {', '.join(METHODS)}")
    if calibration is not None and method == "rtn":
        raise ValueError("method 'rtn' uses no calibration data; leave calibration=None")
    assignment = plan(model, spec, keep_output=keep_output)
    todo = [(n, s) for n, s in assignment.items() if s is not None]
    modules = dict(model.named_modules())
    for name, fmt in tqdm(todo, desc="quantize", unit="layer", disable=None if progress is None else not progress):
        linear = modules[name]
        if fmt.cast:
            new = CastLinear.from_linear(linear, fmt, name=name)
        else:
            new = QuantLinear.from_linear(linear, fmt, name=name, backend=backend)
        _set_submodule(model, name, new)
    previous = getattr(model, "shrink_formats", {}) or {}
    model.shrink_formats = {**previous, **{n: (s.name if s else previous.get(n)) for n, s in assignment.items()}}
    model.shrink_method = method
    return model


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
