"""Whether a tensor holds NaN or infinity, without a mask of its size.

`torch.isfinite(t).all()` builds a boolean tensor as large as `t` and is a hundred times slower than one
pass of `aminmax`, which carries NaN and infinity to its result: on a model of billions of weights the
mask was most of a streamed quantization's arithmetic.
"""

from __future__ import annotations

import torch


def all_finite(t: torch.Tensor) -> bool:
    """True when the floating-point tensor `t` holds no NaN and no infinity (integer and empty tensors: True)."""
    if not t.is_floating_point() or t.numel() == 0 or t.is_meta:
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def count_non_finite(t: torch.Tensor, slab: int = 1 << 22) -> int:
    """How many values of `t` are NaN or infinite, counted a slab at a time (for the error message of a
    tensor `all_finite` refused; a mask of a large table at once would double it)."""
    if not t.is_floating_point() or t.is_meta:
        return 0
    return sum(int((~torch.isfinite(part)).sum()) for part in t.detach().reshape(-1).split(slab))
