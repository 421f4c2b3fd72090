"""Matrix-multiply backends behind QuantLinear.

`native`: the compiled AVX2 kernel (int8 activations per block of 32, integer dot products), used
when it builds on this machine and the layer's shapes suit it (input size and group size multiples
of 32). `torch`: dequantize and `F.linear`, always available and exact for the stored weights.
"""

from __future__ import annotations

import os

from . import native, reference

BACKENDS = ("auto", "native", "torch")


def default_backend() -> str:
    """$SHRINK_BACKEND if set (auto, native or torch), else auto."""
    b = os.environ.get("SHRINK_BACKEND", "auto")
    if b not in BACKENDS:
        raise ValueError(f"SHRINK_BACKEND={b!r}: expected one of {', '.join(BACKENDS)}")
    return b


def native_supports(in_features: int, group_size: int) -> bool:
    """Shapes the native kernel handles: multiples of 32, at most 1024 groups per row."""
    return in_features % 32 == 0 and group_size % 32 == 0 and in_features // group_size <= 1024


__all__ = ["BACKENDS", "default_backend", "native", "native_supports", "reference"]
