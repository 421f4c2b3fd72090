"""Quantized weights and the grid arithmetic every method shares: codes, fp16 scales and zero points of
one weight matrix, the parameters of a group, the codes for given scales, and back to floats.

A weight is `scale[g] * (code - zero[g])`. Symmetric formats below 8 bits use the whole code range,
as llama.cpp's Q4_0 does: the weight of largest magnitude in a group maps to the most negative code,
so 4 bits give 16 levels rather than 15. Asymmetric formats span [min(w, 0), max(w, 0)] of the group.
Scales are stored in fp16, and codes are computed against the rounded fp16 scale so that storage
adds no error of its own. A grid format (`iq4nl`) stands codes for fixed levels instead: weight =
scale[g] * levels[code], the scale putting the group's value of largest magnitude on the outermost level.
A K-quant format (`q4k`, `q6k`) quantizes the group scales too: `scales` then hold each group's integer scale
sc (and `zeros` its integer minimum m), and `superscales` one fp16 d (and dmin) per super-block of 256 inputs;
a weight is d*sc*code - dmin*m (Q4_K, Q5_K) or d*sc*(code - 32) (Q6_K), computed as llama.cpp computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import ShrinkError
from ..core.finite import all_finite, count_non_finite
from .spec import GRIDS, KQUANTS, SUPERBLOCK, QuantSpec


@dataclass
class QuantizedWeight:
    """Unpacked result of quantizing a [out, in] weight: codes [out, in] uint8, scales [out, groups]
    fp16, zeros [out, groups] uint8 or None for symmetric formats (whose zero is `zero_const`); grid: the
    levels codes stand for in a grid format (float32 [2^bits]), else None. In a K-quant format, scales hold
    the groups' integer scales and zeros their integer minimums (None for q6k), and superscales [out,
    in/256, 2] fp16 each super-block's d and dmin ([..., 1]: d alone for q6k); else superscales is None."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    zero_const: int
    grid: torch.Tensor | None = None
    superscales: torch.Tensor | None = None


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
    if spec.kquant and k % SUPERBLOCK:
        raise ShrinkError(
            f"layer {name!r}: format {spec.name} works in super-blocks of {SUPERBLOCK} inputs, which do not divide "
            f"its input size {k}; llama.cpp gives such a layer {KQUANTS[spec.kquant].fallback} (so does shrink "
            "where a format is given to many layers by a pattern)")
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
               grid: torch.Tensor | None = None, superscales: torch.Tensor | None = None) -> torch.Tensor:
    """Weights in float32 from codes [out, in], scales [out, groups] and zeros (or the constant zero), or
    the levels of `grid` for a grid format, or a K-quant format's integer scales and `superscales`."""
    n, k = codes.shape
    groups = scales.shape[1]
    if superscales is not None:
        s, o = kquant_effective(scales, zeros, superscales)
        c = codes.reshape(n, groups, k // groups).to(torch.float32)
        w = s.unsqueeze(-1) * (c if o is not None else c - zero_const)
        return (w - o.unsqueeze(-1) if o is not None else w).reshape(n, k)
    z = zeros.to(torch.float32).unsqueeze(-1) if zeros is not None else float(zero_const)
    w = levels_of(codes.reshape(n, groups, k // groups), z, grid) * scales.to(torch.float32).unsqueeze(-1)
    return w.reshape(n, k)


@dataclass
class KScales:
    """A K-quant layer's two-level scales: d [out, super-blocks] and dmin (None for q6k) fp16 values in
    float32, and per group the integer scale sc and minimum m (None for q6k) as float32 [out, groups]."""

    d: torch.Tensor
    dmin: torch.Tensor | None
    sc: torch.Tensor
    m: torch.Tensor | None

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per group, the scale d*sc and the offset dmin*m (None for q6k) a weight is computed with."""
        per = self.sc.shape[1] // self.d.shape[1]
        s = self.d.repeat_interleave(per, 1) * self.sc
        return s, None if self.m is None else self.dmin.repeat_interleave(per, 1) * self.m

    def superscales(self) -> torch.Tensor:
        """[out, super-blocks, 2 or 1] fp16: d (and dmin) as stored."""
        parts = [self.d] if self.dmin is None else [self.d, self.dmin]
        return torch.stack(parts, -1).to(torch.float16)

    def weight(self, codes: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
        """The QuantizedWeight of `codes` [out, in] on these scales, as stored."""
        return QuantizedWeight(
            codes=codes.to(torch.uint8),
            scales=self.sc.to(torch.float16),
            zeros=None if self.m is None else self.m.to(torch.uint8),
            zero_const=symmetric_zero(spec.bits) if spec.symmetric else 0,
            superscales=self.superscales(),
        )

    @staticmethod
    def cat(parts: list["KScales"]) -> "KScales":
        """Super-blocks' scales side by side along the inputs, in order."""
        def joined(name):
            return None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts], 1)
        return KScales(joined("d"), joined("dmin"), joined("sc"), joined("m"))


def kquant_effective(scales: torch.Tensor, zeros: torch.Tensor | None, superscales: torch.Tensor):
    """The effective per-group scale and offset (None for q6k) of a K-quant layer's stored values."""
    ss = superscales.to(torch.float32)
    k = KScales(ss[..., 0], ss[..., 1] if zeros is not None else None, scales.to(torch.float32),
                zeros.to(torch.float32) if zeros is not None else None)
    return k.effective()


def plain_spec(spec: QuantSpec) -> QuantSpec:
    """The one-level format a K-quant format refines: its codes and groups, fp16 scales (q4k: int4-g32-asym)."""
    return QuantSpec(bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric)


def kquant_scales(scale: torch.Tensor, offset: torch.Tensor | None, spec: QuantSpec, name: str = "<weight>") -> KScales:
    """Quantize groups' float scales [out, groups] (and offsets dmin*m >= 0 to subtract, for formats with a
    minimum) to a K-quant format's two levels, as llama.cpp does: per super-block, d (dmin) puts the largest
    scale (offset) on the largest integer, and each group's integer is the nearest. A q6k scale keeps its sign
    (the largest in magnitude goes to -128)."""
    kq = KQUANTS[spec.kquant]
    n, groups = scale.shape
    per = SUPERBLOCK // kq.group
    top = (1 << kq.scale_bits) - 1

    def two_level(v, signed):
        vb = v.reshape(n, groups // per, per)
        if signed:
            d = _to_fp16(signed_extreme(vb) / -float(1 << (kq.scale_bits - 1)), name)
            lo, hi = -float(1 << (kq.scale_bits - 1)), float((1 << (kq.scale_bits - 1)) - 1)
        else:
            d = _to_fp16(vb.amax(-1).clamp(min=0) / top, name)
            lo, hi = 0.0, float(top)
        safe = torch.where(d == 0, torch.ones_like(d), d)
        q = torch.round(vb / safe.unsqueeze(-1)).clamp_(lo, hi)
        return d, q.reshape(n, groups)

    d, sc = two_level(scale, signed=not kq.minimum)
    if not kq.minimum:
        return KScales(d, None, sc, None)
    dmin, m = two_level(offset, signed=False)
    return KScales(d, dmin, sc, m)


def kquant_codes(w: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Float codes of `w` on a K-quant grid with per-group scale s and offset o (shapes broadcast): the nearest
    of s*code - o, or s*(code - 32) for q6k."""
    safe = torch.where(s == 0, torch.ones_like(s), s)
    top = float((1 << spec.bits) - 1)
    if o is None:
        return torch.round(w / safe).add_(symmetric_zero(spec.bits)).clamp_(0, top)
    return torch.round((w + o) / safe).clamp_(0, top)


def kquant_params(wg: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | float = 1.0,
                  name: str = "<weight>") -> KScales:
    """K-quant scales for weights grouped [out, groups, group]: each group's scale (and offset: scale_offset_search)
    as the plain format finds it (`clip` as group_params takes it), then both levels quantized (kquant_scales)."""
    if not spec.symmetric and (not torch.is_tensor(clip) and clip == 1.0):
        scale, offset = scale_offset_search(wg, spec.bits)
        return kquant_scales(scale, offset, spec, name)
    scale, zero = group_params(wg, plain_spec(spec), clip, name)
    return kquant_scales(scale, None if spec.symmetric else zero * scale, spec, name)


OFFSET_STEPS = tuple(-0.9 + 0.05 * i for i in range(37))  # llama.cpp's make_qkx3_quants' search for Q4_K/Q5_K


def scale_offset_search(wg: torch.Tensor, bits: int, weights: torch.Tensor | None = None):
    """Float scale s and offset o >= 0 per group of wg [..., group] for weights s*code - o (codes 0..2^bits-1)
    minimising sum(weights * error^2), as llama.cpp searches a K-quant group: codes from the range [min(w, 0),
    max(w)] split into 2^bits - 1 + t steps for t in OFFSET_STEPS, then s and o solved by weighted least squares
    for those codes; the best of them, and of the plain range. weights: [..., group] or broadcastable (default
    ones). Returns (scale [...], offset [...]), float32."""
    top = float((1 << bits) - 1)
    w = torch.ones_like(wg) if weights is None else weights.expand_as(wg)
    lo = wg.amin(-1).clamp(max=0)
    span = (wg.amax(-1) - lo).clamp(min=1e-30)
    best_s, best_o = span / top, -lo
    x = wg - lo.unsqueeze(-1)
    best_e = (w * (wg - (torch.round(x / best_s.unsqueeze(-1)).clamp(0, top) * best_s.unsqueeze(-1) + lo.unsqueeze(-1))) ** 2).sum(-1)
    sw, swx = w.sum(-1), (w * wg).sum(-1)
    for t in OFFSET_STEPS:
        q = torch.round(x * ((top + t) / span).unsqueeze(-1)).clamp_(0, top)
        swq, swqq, swqx = (w * q).sum(-1), (w * q * q).sum(-1), (w * q * wg).sum(-1)
        det = sw * swqq - swq * swq
        ok = det > 0
        safe = torch.where(ok, det, torch.ones_like(det))
        s = (sw * swqx - swq * swx) / safe
        m = (swqq * swx - swq * swqx) / safe  # w = s*q + m, with m = -o <= 0
        pos = m > 0  # an offset below zero is not stored: then the least squares for s alone, m = 0
        s = torch.where(pos, swqx / swqq.clamp(min=1e-30), s)
        m = torch.where(pos, torch.zeros_like(m), m)
        e = (w * (wg - (s.unsqueeze(-1) * q + m.unsqueeze(-1))) ** 2).sum(-1)
        better = ok & (s > 0) & (e < best_e)
        best_e = torch.where(better, e, best_e)
        best_s, best_o = torch.where(better, s, best_s), torch.where(better, -m, best_o)
    return best_s, best_o
