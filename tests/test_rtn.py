import pytest
import torch

from shrink.quant.format import dequantize
from shrink.quant.rtn import quantize_weight
from shrink.quant.spec import parse_format


def _w(n=16, k=128, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", ["int8", "int8-g32", "int4-g32", "int4-g64-asym", "int3-g32", "int2-g16-asym", "int4"])
def test_error_within_half_step(fmt):
    spec = parse_format(fmt)
    w = _w()
    q = quantize_weight(w, spec)
    wd = dequantize(q.codes, q.scales.float(), q.zeros, q.zero_const)
    g = spec.group_for(w.shape[1])
    step = q.scales.float().abs().repeat_interleave(g, dim=1)
    # Every weight inside the grid's range is within half a step of its reconstruction.
    err = (wd - w).abs()
    inside = err <= step * 0.5 + 1e-6
    if spec.symmetric and spec.bits < 8:
        # the one code above the top of the grid may clip weights of the opposite sign to the extreme
        assert inside.float().mean() > 0.98
    else:
        assert inside.all()
    assert int(q.codes.max()) < 2 ** spec.bits


def test_symmetric_4bit_uses_full_range_like_q4_0():
    w = torch.tensor([[-1.0, 0.5, 0.25, 0.0] * 16])
    q = quantize_weight(w, parse_format("int4-g64"))
    assert q.codes[0, 0].item() == 0  # the largest magnitude maps to -8
    assert q.scales[0, 0].item() == pytest.approx(1 / 8)
    wd = dequantize(q.codes, q.scales.float(), None, q.zero_const)
    assert torch.allclose(wd, w)  # all these values lie on the grid


def test_asym_reproduces_grid_exactly():
    # weights already on an asymmetric 4-bit grid come back exactly (the SmolLM2 Q4_1 trap)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (4, 64), generator=g).float()
    codes[:, 0], codes[:, 1] = 0, 15  # span the full range in every group
    scale = torch.tensor([[1 / 64], [1 / 32], [3 / 64], [1 / 16]])  # exact in fp16
    w = (codes - 3) * scale
    q = quantize_weight(w, parse_format("int4-asym"))
    assert torch.allclose(dequantize(q.codes, q.scales.float(), q.zeros, 0), w, atol=1e-5)


def test_errors_name_the_layer():
    w = _w(k=96)
    with pytest.raises(ValueError, match=r"layer 'blocks.3.fc'.*group size 64.*input size 96"):
        quantize_weight(w, parse_format("int4-g64"), name="blocks.3.fc")
    w[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'x'.*1 NaN or infinite"):
        quantize_weight(w, parse_format("int8"), name="x")


def test_zero_group_gives_zero_weights():
    w = torch.zeros(2, 64)
    for fmt in ("int4-g32", "int4-g32-asym", "int8"):
        q = quantize_weight(w, parse_format(fmt))
        assert torch.equal(dequantize(q.codes, q.scales.float(), q.zeros, q.zero_const), w)


def _hard_weights(n, k, seed, dtype):
    """Random weights with the cases the arithmetic must agree on: ties between a value and its negation
    (largest first met either way), all-zero groups, values on the grid's half steps, tiny and huge groups."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[0, :32] = 0.0
    w[1, 5], w[1, 9] = 2.5, -2.5
    w[2, 3], w[2, 7] = -3.0, 3.0
    w[3] = torch.randint(-16, 17, (k,), generator=g).float() / 4  # many exact halves of a step
    w[4] *= 1e-30
    w[5] *= 1e4
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["int4-g32", "int4-g64", "int4", "int8", "int8-g32"])
def test_compiled_rounding_gives_the_pytorch_paths_bytes(dtype, fmt):
    from shrink.quant.kernels import native
    from shrink.quant.packing import pack
    from shrink.quant.rtn import round_packed

    if not native.available():
        pytest.skip("native kernel not built on this machine")
    spec = parse_format(fmt)
    for seed, (n, k) in enumerate([(16, 128), (7, 96), (40, 576)]):
        if k % spec.group_for(k):
            continue
        w = _hard_weights(n, k, seed, dtype)
        qweight, scales = round_packed(w, spec, "x")
        q = quantize_weight(w, spec, "x")
        assert torch.equal(qweight, pack(q.codes, spec.bits)), (fmt, n, k)
        assert torch.equal(scales.view(torch.int16), q.scales.view(torch.int16)), (fmt, n, k)  # bit for bit


def test_compiled_rounding_refuses_what_the_pytorch_path_refuses():
    from shrink.quant.kernels import native
    from shrink.quant.rtn import round_packed

    if not native.available():
        pytest.skip("native kernel not built on this machine")
    spec = parse_format("int4-g32")
    w = _w(8, 64)
    w[3, 40] = float("nan")
    w[5, 1] = float("inf")
    with pytest.raises(Exception, match="'blk.q': weight has 2 NaN or infinite"):
        round_packed(w, spec, "blk.q")
    with pytest.raises(Exception, match="too large for fp16 scales"):
        round_packed(_w(8, 64) * 1e6, spec, "blk.q")
    assert round_packed(_w(8, 64), parse_format("int4-g32-asym")) is None  # not its format: PyTorch's
    assert round_packed(_w(8, 40), parse_format("int8")) is None  # 40 inputs: not blocks of 32


@pytest.mark.parametrize("fmt", ["int4-g32", "int3-g32", "int4-g64-asym", "int8"])
def test_rounding_in_a_workspace_gives_the_same_codes(fmt):
    spec = parse_format(fmt)
    w = _hard_weights(16, 128, 1, torch.float32)
    want = quantize_weight(w, spec)
    space = torch.full((5000,), float("nan"))
    for weight in (w.bfloat16(), w):  # made float32 in the workspace; or the float32 weight itself
        ref = quantize_weight(weight, spec)
        got = quantize_weight(weight, spec, workspace=space)
        assert torch.equal(got.codes, ref.codes) and torch.equal(got.scales, ref.scales)
    own = w.clone()
    got = quantize_weight(own, spec, workspace=own)  # its own memory: rounded in place
    assert torch.equal(got.codes, want.codes) and not torch.equal(own, w)
    with pytest.raises(Exception, match="workspace must be contiguous float32 of at least 2048"):
        quantize_weight(w, spec, "x", workspace=torch.empty(100))
