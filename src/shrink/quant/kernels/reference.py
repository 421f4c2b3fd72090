"""Pure-PyTorch paths, always available.

`dequant_linear` is the plain path every machine can run: rebuild the float weight from the packed
codes and call `F.linear`. `int8_activation_linear` computes, in PyTorch, exactly what the native
kernel computes (activations quantized to int8 per block of 32, integer dot products), so the tests
can check the kernel against it to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..format import dequantize
from ..packing import BLOCK, unpack


def dequant_weight(qweight, scales, zeros, zero_const: int, bits: int, in_features: int,
                   grid: torch.Tensor | None = None, superscales: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 [out, in] weight from packed storage (codes standing for `grid`'s levels where given; a
    K-quant format's integer scales with its `superscales`)."""
    return dequantize(unpack(qweight, bits, in_features), scales, zeros, zero_const, grid, superscales)


def dequant_linear(x, qweight, scales, zeros, zero_const, bias, bits: int, in_features: int,
                   grid: torch.Tensor | None = None, superscales: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + b with W dequantized in full; x is [..., K] float32."""
    w = dequant_weight(qweight, scales, zeros, zero_const, bits, in_features, grid, superscales)
    return F.linear(x, w, bias)


def quantize_activations(x: torch.Tensor, group_size: int):
    """int8 codes [M, K], block scales [M, K/32], and per-group sums of scale * block code sum.

    Mirrors the kernel: d = max|x| / 127 per block of 32, codes = round-half-even(x * (1/d)).
    """
    m, k = x.shape
    xb = x.reshape(m, k // BLOCK, BLOCK)
    d = xb.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv.unsqueeze(-1)).clamp(-127, 127)
    bsum = q.sum(-1) * d  # exact integer sums times the block scale
    gsum = bsum.reshape(m, k // group_size, group_size // BLOCK).sum(-1)
    return q.reshape(m, k).to(torch.int8), d, gsum


def int8_activation_linear(x, qweight, scales, zeros, zero_const, bias, bits: int, in_features: int, group_size: int):
    """The native kernel's arithmetic in float64 PyTorch (slow; for tests)."""
    m, k = x.shape
    n = qweight.shape[0]
    codes = unpack(qweight, bits, in_features).to(torch.float64)
    xq, d, gsum = quantize_activations(x, group_size)
    nb = k // BLOCK
    # Integer dot product per (row, output, block): exact in float64.
    dots = torch.einsum("mbj,nbj->mnb", xq.to(torch.float64).reshape(m, nb, BLOCK), codes.reshape(n, nb, BLOCK))
    s = scales.to(torch.float64)  # [n, groups]
    bpg = group_size // BLOCK
    s_blocks = s.repeat_interleave(bpg, dim=1)  # [n, nb]
    y = (dots * d.to(torch.float64).unsqueeze(1) * s_blocks.unsqueeze(0)).sum(-1)
    z = zeros.to(torch.float64) if zeros is not None else torch.full_like(s, float(zero_const))
    y = y - torch.einsum("ng,mg->mn", s * z, gsum.to(torch.float64))
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(torch.float32)
