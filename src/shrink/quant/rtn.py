"""Round-to-nearest quantization of one weight matrix into codes, scales and zero points (the grid is
format.py's: fp16 scales, the whole code range of symmetric formats)."""

from __future__ import annotations

import torch

from ..core.errors import ShrinkError
from ..core.finite import all_finite
from .format import (QuantizedWeight, check_weight, codes_for, grid_levels, group_params, kquant_codes, kquant_params,
                     symmetric_zero)
from .spec import QuantSpec


def quantize_weight(weight: torch.Tensor, spec: QuantSpec, name: str = "<weight>",
                    clip: torch.Tensor | float = 1.0, workspace: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of a [out, in] weight to `spec` (an integer format).

    clip: optional range factor per group ([out, groups]) or scalar, as chosen by a clipping search.
    workspace: a float32 tensor of at least the weight's size that the weight is made float32 in and rounded
    in, its contents lost (default None: new memory); it may be `weight` itself when that is contiguous
    float32 and nothing reads it again. The codes are the same either way: only where they are computed differs
    (a streamed job rounds every layer in one buffer instead of a new one per layer).
    """
    check_weight(weight, spec, name)
    n, k = weight.shape
    if workspace is None:
        w = weight.detach().to(torch.float32)
    elif workspace.dtype != torch.float32 or not workspace.is_contiguous() or workspace.numel() < n * k:
        raise ShrinkError(f"layer {name!r}: the workspace must be contiguous float32 of at least {n * k} values")
    else:
        w = workspace.view(-1)[: n * k].view(n, k)
        if w.data_ptr() != weight.data_ptr():
            w.copy_(weight.detach())
    g = spec.group_for(k)
    wg = w.reshape(n, k // g, g)
    if spec.kquant:
        return kquant_weight(wg, kquant_params(wg, spec, clip, name), spec)
    scale, zero = group_params(wg, spec, clip, name)
    grid = grid_levels(spec)
    codes = codes_for(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), spec.bits, overwrite=workspace is not None,
                      grid=grid)
    return QuantizedWeight(
        codes=codes.reshape(n, k).to(torch.uint8),
        scales=scale.to(torch.float16),
        zeros=None if spec.symmetric else zero.to(torch.uint8),
        zero_const=symmetric_zero(spec.bits) if spec.symmetric else 0,
        grid=grid,
    )


def kquant_weight(wg: torch.Tensor, ks, spec: QuantSpec) -> QuantizedWeight:
    """The QuantizedWeight of weights grouped [out, groups, group] rounded to a K-quant format's scales `ks`
    (format.KScales)."""
    s, o = ks.effective()
    codes = kquant_codes(wg, s.unsqueeze(-1), None if o is None else o.unsqueeze(-1), spec)
    return ks.weight(codes.reshape(wg.shape[0], -1), spec)


def round_packed(weight: torch.Tensor, spec: QuantSpec, name: str = "<weight>") -> tuple[torch.Tensor, torch.Tensor] | None:
    """Round to nearest straight to the row layout of packing.py: (qweight uint8, scales fp16), by the compiled
    kernel in one pass over the weight as stored (float32, bf16 or fp16), no float32 copy: the same bytes as
    `quantize_weight` then `packing.pack`. None where it does not apply (asymmetric or 2/3-bit formats, an
    input size not a multiple of 32, no compiled code here): the caller takes the PyTorch path. Weights the
    format cannot hold are refused as `quantize_weight` refuses them."""
    from .kernels import native

    if not (spec.symmetric and spec.grid is None and spec.kquant is None and spec.bits in (4, 8) and weight.dim() == 2 and weight.shape[1] % 32 == 0
            and weight.dtype in (torch.float32, torch.bfloat16, torch.float16)):
        return None
    g = spec.group_for(weight.shape[1])
    if weight.shape[1] % g or g % 8 or not native.available():
        return None
    qweight, scales = native.load().round_rows(weight.detach().contiguous(), spec.bits, g)
    if not all_finite(scales):
        check_weight(weight, spec, name)  # NaN or infinite weights: refused, counted
        raise ShrinkError(f"layer {name!r}: weights too large for fp16 scales (max |w| = {weight.abs().max():.3g})")
    return qweight, scales
