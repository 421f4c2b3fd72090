"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding error
onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

The Hessian is H = 2/n * sum x x^T over the calibration inputs of the layer. Groups are compatible
with the packed format: each group's scale and zero point are computed, the moment the group starts,
from the weights as GPTQ has updated them (or, with activation order, from the original weights, so
that groups stay contiguous in the stored layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import ShrinkError
from .format import (KScales, QuantizedWeight, check_weight, grid_levels, group_params, kquant_scales, levels_of,
                     nearest_level, plain_spec, rounded, scale_offset_search, symmetric_zero)
from .spec import SUPERBLOCK, QuantSpec

CLIP_RATIOS = tuple(1.0 - 0.04 * i for i in range(11))  # 1.0 down to 0.6


@dataclass
class GPTQResult:
    """Codes, scales and zeros, plus how much dampening the Hessian needed."""

    weight: QuantizedWeight
    damp: float  # relative dampening finally used (fraction of the mean diagonal)
    retries: int  # times dampening was raised because the Hessian was not positive definite
    refit_ratio: float | None = None  # mean per-row output error after / before refit_scales


def hessian_inverse_chol(h: torch.Tensor, damp: float, max_retries: int = 6, perm: torch.Tensor | None = None,
                         diagonal: torch.Tensor | None = None) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of H^-1 after adding damp * mean(diag H) to the diagonal; `h` is not changed.

    A Hessian that is singular even after that is dampened ten times more, up to `max_retries` times;
    the dampening used is returned so it can be reported, never silently skipped. perm: the order of the
    inputs (default theirs): the factor of H[perm][:, perm]. diagonal: H's diagonal to use instead of its
    own (default its own; GPTQ's dead inputs get 1).
    """
    diagonal = (torch.diag(h) if diagonal is None else diagonal).clone()
    if perm is not None:
        diagonal = diagonal[perm]
    mean = diagonal.mean().item() or 1.0
    for retry in range(max_retries + 1):
        # one k x k matrix at a time beside h (a 14336-input layer's is 1.6 GB in float64), only this
        # function holding it: the dampened copy, its factor, the inverse, the inverse's factor, each let
        # go when the next is made
        dampened = _permuted(h, perm) if perm is not None else h.clone()
        dampened.diagonal().copy_(diagonal + damp * mean)
        try:
            chol = torch.linalg.cholesky(dampened)
            del dampened
            hinv = torch.cholesky_inverse(chol)
            del chol
            return torch.linalg.cholesky(hinv, upper=True), damp, retry
        except torch.linalg.LinAlgError:
            damp *= 10
    raise ShrinkError(f"Hessian is not positive definite even with dampening {damp:g}")


def _permuted(h: torch.Tensor, perm: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """h[perm][:, perm], built a slab of rows at a time (no second k x k temporary)."""
    out = torch.empty_like(h)
    for r in range(0, h.shape[0], rows):
        out[r:r + rows] = h[perm[r:r + rows]][:, perm]
    return out


def search_group_clip(wg: torch.Tensor, h: torch.Tensor, spec: QuantSpec, name: str = "<weight>"):
    """Scale and zero for one group of columns wg [out, g], choosing per row the clipping ratio in
    CLIP_RATIOS whose rounding error e costs least on the layer's output, e^T H e with H the group's
    [g, g] block of the input Hessian. Returns (scale [out], zero [out])."""
    best_err = best_s = best_z = None
    for r in CLIP_RATIOS:
        sc, zr = group_params(wg, spec, r, name)
        e = rounded(wg, sc.unsqueeze(1), zr.unsqueeze(1), spec) - wg
        err = ((e @ h) * e).sum(1)
        if best_err is None:
            best_err, best_s, best_z = err, sc, zr
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, sc, best_s), torch.where(better, zr, best_z)
    return best_s, best_z


def refit_scales(weight: torch.Tensor, hessian: torch.Tensor, q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Best fp16 group scales for fixed codes: per row, the scales s minimising the output error
    (w - Q s)^T H (w - Q s) of the original weight row w, where Q holds the row's codes minus zero
    points, one column per group. A least-squares problem of one unknown per group, solved exactly.
    For a K-quant format the unknowns are each super-block's d (and dmin), the integer scales and minimums
    fixed: the result is then the new superscales [out, super-blocks, 2|1].

    Returns (scales [out, groups] fp16, error ratio per row new/old). Rows where the fp16-rounded
    solution is not better keep their old scales, so the error never grows.
    """
    h = hessian.detach().to(torch.float64)
    n, k = q.codes.shape
    # rows are separate problems: solved ROWS at a time, so the [rows, groups, groups] systems stay small
    # (all 4096 rows of a 14336-input layer in groups of 64 at once would be 1.6 GB, several times over)
    out = [_refit_rows(weight[r:r + REFIT_ROWS], h, q, r) for r in range(0, n, REFIT_ROWS)]
    scales = torch.cat([o[0] for o in out])
    if q.superscales is not None:  # [d of every super-block, dmin of every one] -> [super-blocks, (d, dmin)]
        scales = scales.reshape(n, q.superscales.shape[-1], -1).transpose(1, 2).contiguous()
    return scales, torch.cat([o[1] for o in out])


REFIT_ROWS = 512


def _bases(q: QuantizedWeight, rows: slice) -> tuple[list[torch.Tensor], int, torch.Tensor]:
    """What the refit's unknowns multiply, for the rows: a list of [n, k] float64 level tensors, each with one
    unknown per span of columns; the span; and the unknowns' current values [n, unknowns]."""
    n, k = q.codes[rows].shape
    groups = q.scales.shape[1]
    g = k // groups
    if q.superscales is None:
        z = q.zeros[rows].to(torch.float32).repeat_interleave(g, 1) if q.zeros is not None else float(q.zero_const)
        c = levels_of(q.codes[rows], z, q.grid).to(torch.float64)  # [n, k] the levels the scales multiply
        return [c], g, q.scales[rows].to(torch.float64)
    # K-quant: w = d * (sc * code) - dmin * m per super-block (or d * sc * (code - 32))
    sc = q.scales[rows].to(torch.float64).repeat_interleave(g, 1)
    c = q.codes[rows].to(torch.float64)
    sup = q.superscales[rows].to(torch.float64)
    if q.zeros is None:
        return [sc * (c - q.zero_const)], SUPERBLOCK, sup[..., 0]
    m = q.zeros[rows].to(torch.float64).repeat_interleave(g, 1)
    return [sc * c, -m], SUPERBLOCK, torch.cat([sup[..., 0], sup[..., 1]], 1)


def _refit_rows(weight: torch.Tensor, h: torch.Tensor, q: QuantizedWeight, r0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """refit_scales for the rows r0 .. r0 + len(weight) of the layer: [n, unknowns] fp16 and the ratios."""
    n = weight.shape[0]
    k = q.codes.shape[1]
    bases, g, old = _bases(q, slice(r0, r0 + n))
    spans = k // g
    w = weight.detach().to(torch.float64)
    cgs = [c.reshape(n, spans, g) for c in bases]
    u = len(bases) * spans
    # A[r, a, b] = c_ra^T H_ab c_rb; b[r, a] = c_ra^T (H w_r)_a, over the unknowns of every basis
    a_mat = torch.empty(n, u, u, dtype=torch.float64)
    for i, ci in enumerate(cgs):
        for a in range(spans):
            ch = (ci[:, a] @ h[a * g:(a + 1) * g]).reshape(n, spans, g)
            for j, cj in enumerate(cgs):
                a_mat[:, i * spans + a, j * spans:(j + 1) * spans] = (ch * cj).sum(-1)
    wh = w @ h
    rhs = torch.cat([(wh.reshape(n, spans, g) * cg).sum(-1) for cg in cgs], 1)
    const = (wh * w).sum(1)
    ridge = 1e-9 * a_mat.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-30)
    new = torch.linalg.solve(a_mat + torch.diag_embed(ridge.unsqueeze(1).expand(n, u)), rhs.unsqueeze(-1)).squeeze(-1)
    new = new.to(torch.float16).to(torch.float64)

    def err(sc):  # (w - Q s)^T H (w - Q s), expanded so no k x k product is needed again
        return const - 2 * (sc * rhs).sum(1) + (sc.unsqueeze(1) @ a_mat @ sc.unsqueeze(2)).reshape(n)

    e_old, e_new = err(old), err(new)
    better = torch.isfinite(new).all(1) & (e_new < e_old)
    scales = torch.where(better.unsqueeze(1), new, old).to(torch.float16)
    ratio = torch.where(e_old > 0, torch.where(better, e_new, e_old) / e_old.clamp(min=1e-300), 1.0)
    return scales, ratio


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, clip_search: bool = True,
                  refit: bool = False, name: str = "<weight>") -> GPTQResult:
    """GPTQ for one [out, in] weight given its input Hessian [in, in].

    damp: dampening as a fraction of the mean Hessian diagonal (default 0.01).
    block_size: columns per lazy batch update (default 128).
    act_order: quantize columns in order of decreasing Hessian diagonal (default False).
    clip_search: choose each group's range by search_group_clip rather than its extremes (default True).
    refit: afterwards re-solve the group scales for the chosen codes by refit_scales (default False).
    """
    check_weight(weight, spec, name)
    h = hessian.detach().to(torch.float64)  # read, never changed: the copies below are GPTQ's own
    w = weight.detach().to(torch.float32).clone()
    n, k = w.shape
    g = spec.group_for(k)
    diagonal = torch.diag(h).clone()
    dead = diagonal == 0  # inputs that were always zero: any weight works, use 0 (and 1 on H's diagonal)
    diagonal[dead] = 1
    w[:, dead] = 0

    perm = torch.argsort(diagonal, descending=True) if act_order else torch.arange(k)
    order = perm.tolist()
    groups = k // g
    kq = spec.kquant is not None
    span = SUPERBLOCK if kq else g  # columns whose parameters are set together (a K-quant super-block's scale)
    scales = torch.zeros(n, groups)
    zeros = torch.zeros(n, groups)  # a K-quant format with minimums: the offsets dmin*m to subtract instead
    kparts = {}  # K-quant: super-block -> its format.KScales

    # the clipping search reads only each group's [g, g] diagonal block of H: kept apart, so H itself can go
    blocks = None
    if clip_search and not (kq and not spec.symmetric):  # (a K-quant with a minimum searches its own way)
        blocks = [h[i * g:(i + 1) * g, i * g:(i + 1) * g].float() for i in range(groups)]
        for i, b in enumerate(blocks):
            b.diagonal().copy_(diagonal[i * g:(i + 1) * g])
    plain = plain_spec(spec) if kq else spec

    def params(wg, grp):
        if clip_search:
            return search_group_clip(wg, blocks[grp], plain, name)
        return group_params(wg, plain, name=name)

    def set_params(ws, first):
        """Parameters of the groups first .. of the columns ws [n, span] (a K-quant super-block: its groups' scales
        and offsets, then both levels quantized)."""
        per = ws.shape[1] // g
        sl = slice(first, first + per)
        if kq and not spec.symmetric:  # scale and offset searched together, each input weighted by H's diagonal
            s_f, o_f = scale_offset_search(ws.reshape(n, per, g), spec.bits,
                                           diagonal[first * g:(first + per) * g].float().reshape(per, g))
            ks = kquant_scales(s_f, o_f, spec, name)
        else:
            for j in range(per):
                scales[:, first + j], zeros[:, first + j] = params(ws[:, j * g:(j + 1) * g], first + j)
            if not kq:
                return
            ks = kquant_scales(scales[:, sl], None, spec, name)
        kparts[first // per] = ks
        scales[:, sl], off = ks.effective()
        zeros[:, sl] = float(symmetric_zero(spec.bits)) if off is None else off

    if act_order:
        # Static groups: computed on the original weights, so groups stay contiguous when stored.
        for first in range(0, k, span):
            set_params(w[:, first:first + span], first // g)
        w = w[:, perm]
    hinv64, used_damp, retries = hessian_inverse_chol(h, damp, perm=perm if act_order else None, diagonal=diagonal)
    hinv = hinv64.float()
    del hinv64

    codes = torch.zeros(n, k)
    levels = float((1 << spec.bits) - 1)
    grid = grid_levels(spec)
    offset = kq and not spec.symmetric  # a weight is code * s - o
    s = z = safe_s = None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order[i1 + i]
            grp = col // g
            if act_order or col % g == 0 or s is None:
                if not act_order and col % span == 0:
                    # Group (super-block) starts here: its parameters come from the weights as updated so far
                    # (a span running past this block of columns reads the rest from w, updated up to here).
                    set_params(w1[:, i:i + span] if i + span <= i2 - i1 else
                               torch.cat([w1[:, i:], w[:, i2:]], 1)[:, :span], grp)
                s, z = scales[:, grp], zeros[:, grp]
                safe_s = torch.where(s == 0, torch.ones_like(s), s)
            x = w1[:, i]
            if offset:  # K-quant with minimums: as format.kquant_codes rounds
                c = torch.clamp(torch.round((x + z) / safe_s), 0, levels)
                val = c * s - z
            elif grid is None:
                c = torch.clamp(torch.round(x / safe_s) + z, 0, levels)  # as format.codes_for rounds
                val = (c - z) * s
            else:  # the nearest level of a grid format
                c = nearest_level(x / safe_s, grid)
                val = grid[c] * s
            codes[:, col] = c
            e = (x - val) / hinv1[i, i]
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1)
            err1[:, i] = e
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1)
    if kq:
        q = KScales.cat([kparts[b] for b in range(len(kparts))]).weight(codes, spec)
    else:
        q = QuantizedWeight(
            codes=codes.to(torch.uint8),
            scales=scales.to(torch.float16),
            zeros=None if spec.symmetric else zeros.to(torch.uint8),
            zero_const=symmetric_zero(spec.bits) if spec.symmetric else 0,
            grid=grid,
        )
    ratio = None
    if refit:
        fitted, rows = refit_scales(weight, hessian, q)
        if kq:
            q.superscales = fitted
        else:
            q.scales = fitted
        ratio = float(rows.mean())
    return GPTQResult(weight=q, damp=used_damp, retries=retries, refit_ratio=ratio)
