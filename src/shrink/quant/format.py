"""Quantized weights and the grid arithmetic every method shares: codes, fp16 scales and zero points of
one weight matrix, the parameters of a group, the codes for given scales, and back to floats.

A weight is `scale[g] * (code - zero[g])`. Symmetric formats below 8 bits use the whole code range,
as llama.cpp's Q4_0 does: the weight of largest magnitude in a group maps to the most negative code,
so 4 bits give 16 levels rather than 15. Asymmetric formats span [min(w, 0), max(w, 0)] of the group.
Scales are stored in fp16, and codes are computed against the rounded fp16 scale so that storage
adds no error of its own. A grid format (`iq4nl`) stands codes for fixed levels instead: weight =
scale[g] * levels[code], the scale putting the group's value of largest magnitude on the outermost level.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import ShrinkError
from ..core.finite import all_finite, count_non_finite
from .spec import GRIDS, QuantSpec


@dataclass
class QuantizedWeight:
    """Unpacked result of quantizing a [out, in] weight: codes [out, in] uint8, scales [out, groups]
    fp16, zeros [out, groups] uint8 or None for symmetric formats (whose zero is `zero_const`); grid: the
    levels codes stand for in a grid format (float32 [2^bits]), else None."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    zero_const: int
    grid: torch.Tensor | None = None


_GRID_TENSORS: dict[str, torch.Tensor] = {}


def grid_levels(spec: QuantSpec | None) -> torch.Tensor | None:
    """The float32 levels of a grid format's codes (None for integer formats)."""
    if spec is None or spec.grid is None:
        return None
    if spec.grid not in _GRID_TENSORS:
        _GRID_TENSORS[spec.grid] = torch.tensor(GRIDS[spec.grid], dtype=torch.float32)
    return _GRID_TENSORS[spec.grid]


def levels_of(codes: torch.Tensor, zero, grid: torch.Tensor | None) -> torch.Tensor:
    """The float32 levels codes stand for (the scale multiplies them): code - zero, or the grid's level."""
    if grid is not None:
        return grid[codes.long()]
    return codes.to(torch.float32) - zero


def symmetric_zero(bits: int) -> int:
    """The implicit zero point of a symmetric format: codes are stored offset by half the range."""
    return 1 << (bits - 1)


def check_weight(weight: torch.Tensor, spec: QuantSpec, name: str) -> None:
    """Raise ValueError, naming the layer, for weights a format cannot hold."""
    if weight.dim() != 2:
        raise ShrinkError(f"layer {name!r}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    if not all_finite(weight):
        bad = count_non_finite(weight)
        raise ShrinkError(f"layer {name!r}: weight has {bad} NaN or infinite values; cannot quantize")
    k = weight.shape[1]
    g = spec.group_for(k)
    if k % g:
        raise ShrinkError(
            f"layer {name!r}: group size {g} of format {spec.name} does not divide its input size {k}; "
            f"choose a group size that divides {k} or keep this layer in full precision"
        )


def group_params(wg: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | float = 1.0, name: str = "<weight>"):
    """Scales (fp32 values exactly representable in fp16) and zero points for groups of weights.

    wg: [..., group] float32. clip: factor (scalar or [...] tensor) shrinking the range before the scale
    is computed (1.0: no clipping). Returns (scale [...], zero [...] float, zero for symmetric formats is
    the constant offset).
    """
    levels = (1 << spec.bits) - 1
    if spec.grid is not None:  # the signed extreme on the outermost level (grids are symmetric in range)
        g = grid_levels(spec)
        scale = _to_fp16(signed_extreme(wg) / g[0] * clip, name)
        return scale, torch.zeros(wg.shape[:-1])
    if spec.symmetric:
        zero = torch.full(wg.shape[:-1], float(symmetric_zero(spec.bits)))
        if spec.bits == 8:
            scale = wg.abs().amax(-1) / 127.0
        else:
            # Signed value of largest magnitude maps to code 0, i.e. -2**(bits-1) after the offset.
            scale = signed_extreme(wg) / -float(symmetric_zero(spec.bits))
        scale = _to_fp16(scale * clip, name)
    else:
        lo = wg.amin(-1).clamp(max=0) * clip
        hi = wg.amax(-1).clamp(min=0) * clip
        scale = _to_fp16((hi - lo) / levels, name)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.clamp(torch.round(-lo / safe), 0, levels)
    return scale, zero


def signed_extreme(wg: torch.Tensor) -> torch.Tensor:
    """Per group (last dimension), the value of largest magnitude with its sign; where a value and its
    negation tie, the one met first (argmax's rule). Two reductions along the groups instead of a float
    copy of |w| and an argmax over it: a third of the time on a large layer."""
    hi, lo = wg.amax(-1), wg.amin(-1)
    pick = torch.where(hi >= -lo, hi, lo)
    tie = (hi == -lo) & (hi != 0)
    if bool(tie.any()):
        tied = wg[tie]
        pick[tie] = tied.gather(-1, tied.abs().argmax(-1, keepdim=True)).squeeze(-1)
    return pick


def codes_for(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, overwrite: bool = False,
              grid: torch.Tensor | None = None) -> torch.Tensor:
    """Round `w` to codes on the grid scale * (code - zero), or scale * grid[code] for a grid format (the
    nearest level); shapes broadcast. Float codes. overwrite: the codes are computed in `w`'s own memory (a
    float32 tensor of the result's shape; default False: `w` is left as it was)."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    # at most one new tensor: rounding, offset and range applied in place
    q = w.div_(safe) if overwrite else torch.div(w, safe)
    if grid is not None:
        return nearest_level(q, grid).to(torch.float32)
    return q.round_().add_(zero).clamp_(0, (1 << bits) - 1)


def rounded(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`w` rounded to the format's grid for the given scale and zero (shapes broadcast), back in float32."""
    grid = grid_levels(spec)
    return levels_of(codes_for(w, scale, zero, spec.bits, grid=grid), zero, grid) * scale


def nearest_level(q: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index of the level of `grid` (ascending) nearest each value of `q` (int64)."""
    mids = (grid[1:] + grid[:-1]) / 2
    return torch.bucketize(q, mids)


def _to_fp16(scale: torch.Tensor, name: str) -> torch.Tensor:
    # + 0: a zero scale (an all-zero group) is +0 whatever sign of zero the reductions met first
    s16 = (scale + 0.0).to(torch.float16)
    if not all_finite(s16):
        raise ShrinkError(f"layer {name!r}: weights too large for fp16 scales (max |w| = {scale.abs().max():.3g})")
    return s16.to(torch.float32)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, zero_const: int,
               grid: torch.Tensor | None = None) -> torch.Tensor:
    """Weights in float32 from codes [out, in], scales [out, groups] and zeros (or the constant zero), or
    the levels of `grid` for a grid format."""
    n, k = codes.shape
    groups = scales.shape[1]
    z = zeros.to(torch.float32).unsqueeze(-1) if zeros is not None else float(zero_const)
    w = levels_of(codes.reshape(n, groups, k // groups), z, grid) * scales.to(torch.float32).unsqueeze(-1)
    return w.reshape(n, k)
