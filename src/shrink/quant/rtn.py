"""Round-to-nearest quantization of one weight matrix into codes, scales and zero points (the grid is
format.py's: fp16 scales, the whole code range of symmetric formats)."""

from __future__ import annotations

import torch

from .format import QuantizedWeight, check_weight, codes_for, group_params, symmetric_zero
from .spec import QuantSpec


def quantize_weight(weight: torch.Tensor, spec: QuantSpec, name: str = "<weight>",
                    clip: torch.Tensor | float = 1.0, overwrite: bool = False) -> QuantizedWeight:
    """Round-to-nearest quantization of a [out, in] weight to `spec` (an integer format).

    clip: optional range factor per group ([out, groups]) or scalar, as chosen by a clipping search.
    overwrite: a contiguous float32 `weight` may be used as the codes' workspace, leaving it meaningless
    (default False; for weights nothing else reads, such as a streamed block's, read from disk for this).
    """
    check_weight(weight, spec, name)
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    g = spec.group_for(k)
    wg = w.reshape(n, k // g, g)
    scale, zero = group_params(wg, spec, clip, name)
    in_place = overwrite and w.is_contiguous() and w.data_ptr() == weight.data_ptr()
    codes = codes_for(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), spec.bits, overwrite=in_place)
    return QuantizedWeight(
        codes=codes.reshape(n, k).to(torch.uint8),
        scales=scale.to(torch.float16),
        zeros=None if spec.symmetric else zero.to(torch.uint8),
        zero_const=symmetric_zero(spec.bits) if spec.symmetric else 0,
    )
