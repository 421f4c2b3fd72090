"""The verbs, in one place: what `import shrink` gives. Each lives with the part that does the work;
`info` is defined here because it reads a model or a folder alike."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch.nn as nn

from . import runtime
from .core.errors import ShrinkError
from .entrypoints.compare import compare
from .entrypoints.distill import distill
from .entrypoints.search import search
from .io import load, save
from .io.export import export_gguf
from .quant import quantize as _quantize
from .quant.record import ModelRecord, record_of


@functools.wraps(_quantize)
def quantize(model, *args, **kwargs):
    result = _quantize(model, *args, **kwargs)
    runtime.install(model)  # a Llama-family model then decodes in shrink's runtime (shrink.runtime)
    return result


def info(model: nn.Module | str | os.PathLike) -> ModelRecord:
    """What was done to a model: a module quantize (or a loader) returned, or a folder shrink saved (read
    from its shrink.json, checked as loading checks it, without loading the weights)."""
    if isinstance(model, nn.Module):
        return record_of(model)
    from .io.saved import check, record_from_manifest

    return record_from_manifest(check(Path(model))[0])


__all__ = ["ModelRecord", "ShrinkError", "compare", "distill", "export_gguf", "info", "load", "quantize",
           "save", "search"]
