import pytest
import torch

from shrink.quant.format import codes_for, dequantize
from shrink.quant.gptq import CLIP_RATIOS, gptq_quantize, hessian_inverse_chol, search_group_clip
from shrink.quant.rtn import quantize_weight
from shrink.quant.spec import parse_format


def _correlated_inputs(n=2048, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    return z @ mix * torch.linspace(0.2, 3, k)  # correlated, with uneven channel scales


def _hessian(x):
    return 2 * x.T.double() @ x.double() / x.shape[0]


def _out_err(x, w, q):
    wq = dequantize(q.codes, q.scales.float(), q.zeros, q.zero_const)
    return ((x @ (w - wq).T) ** 2).mean().item()


@pytest.mark.parametrize("fmt", ["int4-g32", "int3-g64-asym", "int8", "int2-g32"])
def test_diagonal_hessian_reduces_to_round_to_nearest(fmt):
    # With no correlation between inputs there is nothing to compensate: GPTQ equals RTN exactly.
    spec = parse_format(fmt)
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    h = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(2)) + 0.5).double()
    res = gptq_quantize(w, h, spec, clip_search=False)
    ref = quantize_weight(w, spec)
    assert torch.equal(res.weight.codes, ref.codes)
    assert torch.equal(res.weight.scales, ref.scales)


@pytest.mark.parametrize("fmt,act_order", [("int4-g32", False), ("int4-g64", True), ("int3-g32", False),
                                           ("int4", False), ("int4-g32-asym", True)])
def test_gptq_lowers_output_error(fmt, act_order):
    spec = parse_format(fmt)
    x = _correlated_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    rtn = _out_err(x, w, quantize_weight(w, spec))
    res = gptq_quantize(w, _hessian(x), spec, act_order=act_order)
    gptq = _out_err(x, w, res.weight)
    assert gptq < 0.8 * rtn, (gptq, rtn)
    assert res.weight.scales.shape == (64, 128 // spec.group_for(128))
    assert int(res.weight.codes.max()) < 2 ** spec.bits


@pytest.mark.parametrize("fmt", ["int4-g32", "int3-g32-asym"])
def test_group_clip_search_is_the_best_ratio_per_row(fmt):
    # Brute force: every ratio of the grid, each row's H-weighted error; the search must pick the minimum.
    spec = parse_format(fmt)
    x = _correlated_inputs(k=32)
    h = _hessian(x).float()
    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(4))
    w[0, 5] = 8.0  # an outlier, where clipping pays
    s, z = search_group_clip(w, h, spec)
    e = (codes_for(w, s.unsqueeze(1), z.unsqueeze(1), spec.bits) - z.unsqueeze(1)) * s.unsqueeze(1) - w
    got = ((e @ h) * e).sum(1)
    errs = []
    for r in CLIP_RATIOS:
        q = quantize_weight(w, spec, clip=torch.full((12, 1), r))
        d = dequantize(q.codes, q.scales.float(), q.zeros, q.zero_const) - w
        errs.append(((d @ h) * d).sum(1))
    best = torch.stack(errs).min(0).values
    assert torch.allclose(got, best, rtol=1e-4)
    assert (best < errs[0] * 0.999).any()  # clipping helps some row (the outlier's)


def test_dead_inputs_and_singular_hessian():
    x = _correlated_inputs(n=64)  # fewer samples than... enough, but kill some inputs
    x[:, :10] = 0
    w = torch.randn(8, 128)
    res = gptq_quantize(w, _hessian(x), parse_format("int4-g32"))
    wq = dequantize(res.weight.codes, res.weight.scales.float(), None, res.weight.zero_const)
    assert torch.isfinite(wq).all()


def test_non_positive_definite_is_dampened_further_and_reported():
    h = -torch.eye(32, dtype=torch.float64)  # no amount of 1% dampening fixes this at first
    h[0, 0] = 50.0
    _, damp, retries = hessian_inverse_chol(h, 0.01)
    assert retries > 0 and damp > 0.01
    with pytest.raises(ValueError, match="not positive definite"):
        hessian_inverse_chol(-torch.eye(4, dtype=torch.float64) * 1e9 + torch.eye(4, dtype=torch.float64) * 0, 0.01, max_retries=1)


@pytest.mark.parametrize("fmt", ["int4-g32", "int3-g32-asym"])
def test_refit_scales_solves_the_weighted_least_squares(fmt):
    # Reference: per row, the scales minimising ||X (w - Q s)|| by torch.linalg.lstsq on X Q.
    from shrink.quant.gptq import refit_scales

    spec = parse_format(fmt)
    x = _correlated_inputs(n=512, k=64)
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(5))
    q = gptq_quantize(w, _hessian(x), spec, act_order=True).weight
    scales, ratio = refit_scales(w, _hessian(x), q)
    g = spec.group_for(64)
    z = q.zeros.double().repeat_interleave(g, 1) if q.zeros is not None else float(q.zero_const)
    levels = q.codes.double() - z
    for r in range(w.shape[0]):
        design = torch.zeros(64, 64 // g, dtype=torch.float64)
        for a in range(64 // g):
            design[a * g:(a + 1) * g, a] = levels[r, a * g:(a + 1) * g]
        best = torch.linalg.lstsq(x.double() @ design, x.double() @ w[r].double()).solution
        assert torch.allclose(scales[r].double(), best.half().double(), rtol=2e-3, atol=1e-6)
    before, after = _out_err(x, w, q), _out_err(x, w, type(q)(q.codes, scales, q.zeros, q.zero_const))
    assert after < before and (ratio <= 1).all()


def test_refit_never_makes_a_row_worse():
    # Rows already at their optimum (codes from scales that solve the problem) keep their scales.
    from shrink.quant.gptq import refit_scales

    spec = parse_format("int4-g32")
    x = _correlated_inputs(n=512, k=64)
    q = quantize_weight(torch.randn(4, 64, generator=torch.Generator().manual_seed(6)), spec)
    w = dequantize(q.codes, q.scales.float(), q.zeros, q.zero_const)  # exactly representable
    scales, ratio = refit_scales(w, _hessian(x), q)
    assert torch.equal(scales, q.scales)
    assert torch.all(ratio == 1)


def test_gptq_on_a_grid_format_rounds_to_its_levels_and_beats_rounding_to_nearest():
    """GPTQ on iq4nl-g32 (llama.cpp's IQ4_NL levels): every weight is scale x a level of the grid, and the
    output error on the calibration inputs is below round-to-nearest's on the same grid."""
    from shrink.quant.format import dequantize, grid_levels
    from shrink.quant.gptq import gptq_quantize
    from shrink.quant.rtn import quantize_weight
    from shrink.quant.spec import parse_format

    g = torch.Generator().manual_seed(0)
    spec = parse_format("iq4nl-g32")
    w = torch.randn(48, 128, generator=g)
    x = torch.randn(512, 128, generator=g) * torch.linspace(0.2, 3, 128)  # uneven inputs, as in models
    h = x.T @ x / len(x)
    q = gptq_quantize(w, h, spec, refit=True).weight
    levels = grid_levels(spec)
    assert q.grid is levels or torch.equal(q.grid, levels)
    got = dequantize(q.codes, q.scales, None, q.zero_const, levels)
    per_level = got.reshape(48, 4, 32) / q.scales.float().unsqueeze(-1)
    assert torch.isin(per_level.round(), levels).all()
    r = quantize_weight(w, spec)
    naive = dequantize(r.codes, r.scales, None, r.zero_const, levels)
    err = lambda v: ((x @ (v - w).T) ** 2).mean()  # noqa: E731
    assert err(got) < 0.9 * err(naive)
