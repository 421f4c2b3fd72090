"""Matrix-multiply backends behind the packed layers, behind two entries: `qlinear(x, layer)` and
`dequantize(layer)`, which choose between them.

`native`: the compiled AVX2 kernels (int8 activations per block of 32, integer dot products), used
when they build on this machine and the layer's shapes suit them (input size and group size multiples
of 32); over a tiled copy of the weight (`tiled`) where the output count is a multiple of 8. One extension
module holds them and the decoding runtime. `torch` (`reference`): dequantize and `F.linear`, always
available and exact for the stored weights.
"""

from __future__ import annotations

import torch

from ...core import switches
from ...core.switches import BACKENDS
from ..format import grid_levels
from . import native, reference, tiled

# From this many rows on a float GEMM on weights dequantized by the kernel beats the row kernel on this
# class of CPU (measured crossover: 32 to 64 rows); the tiled kernel, where a layer has it, beats both.
LARGE_BATCH = 64
_NO_U8 = torch.empty(0, dtype=torch.uint8)  # the extension's "no zero points" / "no bias"
_NO_F32 = torch.empty(0, dtype=torch.float32)
_NO_F16 = torch.empty(0, dtype=torch.float16)



def default_backend() -> str:
    """$SHRINK_BACKEND if set (auto, native or torch), else auto."""
    return switches.backend()


NATIVE_BITS = (2, 3, 4, 8)  # code widths the compiled kernels decode; 5 and 6 bits run in PyTorch


def native_supports(in_features: int, group_size: int, bits: int, grid: str | None = None,
                    kquant: str | None = None) -> bool:
    """Layers the native kernel handles: integer codes (no grid or K-quant format) of 2, 3, 4 or 8 bits, input
    and group sizes multiples of 32, at most 1024 groups per row."""
    return (grid is None and kquant is None and bits in NATIVE_BITS and in_features % 32 == 0 and group_size % 32 == 0
            and in_features // group_size <= 1024)


def dequantize(layer, native_kernel: bool) -> torch.Tensor:
    """The float32 weight [rows, in_features] of a packed layer (qweight, scales, zeros, zero_const, spec,
    in_features), by the compiled kernel when `native_kernel`, else in PyTorch: the same values."""
    if not native_kernel:
        return reference.dequant_weight(layer.qweight, layer.scales, layer.zeros, layer.zero_const, layer.spec.bits,
                                        layer.in_features, grid_levels(layer.spec), getattr(layer, "superscales", None))
    args = (layer.qweight, layer.scales, _NO_U8 if layer.zeros is None else layer.zeros, layer.zero_const,
            layer.spec.bits, layer.spec.group_for(layer.in_features), layer.in_features)
    if torch.compiler.is_compiling():
        return torch.ops.shrink.dequantize(*args)
    return native.load().dequantize(*args)


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x [rows, K] as the integer kernel sees it: int8 codes per block of 32 times the block's scale."""
    xq, xd, _ = native.load().quantize_x(x, 32)
    return (xq.view(x.shape[0], -1, 32).to(torch.float32) * xd.unsqueeze(-1)).view(x.shape)


def qlinear(x: torch.Tensor, layer, native_kernel: bool) -> torch.Tensor:
    """x [..., in_features] (float32) times a packed layer's weight, plus its bias: [..., out_features]. With
    `native_kernel`: int8 activations per block of 32 and integer dot products, by the path the compiled
    `linear` chooses (packed_linear.h, the one place it is chosen, for the runtime too): over the layer's tiled
    copy where its shapes have one, else the row kernel below LARGE_BATCH rows and a float GEMM of the same
    int8 activations with the dequantized weight from there on. Either way a row's result does not depend on
    how many rows come with it. Without `native_kernel`: dequantize in PyTorch and `F.linear` on the float
    activations."""
    if not native_kernel:
        return reference.dequant_linear(x, layer.qweight, layer.scales, layer.zeros, layer.zero_const, layer.bias,
                                        layer.spec.bits, layer.in_features, grid_levels(layer.spec),
                                        getattr(layer, "superscales", None))
    t = tiled.for_layer(layer)
    b = layer._buffers  # a layer holding the tiled layout alone has no row form, and needs none here
    args = (x, b.get("qweight", _NO_U8), b.get("scales", _NO_F16), _NO_U8 if layer.zeros is None else layer.zeros,
            layer.zero_const,
            _NO_F32 if layer.bias is None else layer.bias, layer.spec.bits, layer.spec.group_for(layer.in_features),
            *((_NO_U8, _NO_F16, _NO_U8) if t is None else (t.codes, t.scales, _NO_U8 if t.zeros is None else t.zeros)),
            LARGE_BATCH)
    # the dispatcher op stays in a compiled graph; eagerly, the direct call is about 3 us a call cheaper
    return torch.ops.shrink.linear(*args) if torch.compiler.is_compiling() else native.load().linear(*args)


__all__ = ["BACKENDS", "LARGE_BATCH", "NATIVE_BITS", "default_backend", "dequantize", "int8_activations", "native",
           "native_supports", "qlinear", "reference", "tiled"]
