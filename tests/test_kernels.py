"""The native kernel against the PyTorch reference of the same arithmetic, and against dequantize+matmul."""

import pytest
import torch

from shrink.core.errors import ShrinkError
from shrink.quant.kernels import native, reference, tiled
from shrink.quant.linear import QuantLinear
from shrink.quant.packing import unpack

needs_native = pytest.mark.skipif(not native.available(), reason="native kernel not built on this machine")

FORMATS = ["int8", "int8-g32-asym", "int8-g128", "int4-g32", "int4-g64", "int4-g128-asym", "int4", "int3-g32",
           "int3-g64-asym", "int2-g32", "int2-g64-asym"]


def _layer(fmt, k=256, n=40, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    return lin, QuantLinear.from_linear(lin, fmt, backend="native")


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@needs_native
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 33])
def test_native_matches_reference_arithmetic(fmt, m):
    lin, q = _layer(fmt)
    x = torch.randn(m, 256) * 3
    y = q(x)
    ref = reference.int8_activation_linear(x, q.qweight, q.scales, q.zeros, q.zero_const, q.bias, q.spec.bits,
                                           256, q.spec.group_for(256))
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@needs_native
@pytest.mark.parametrize("fmt", ["int8", "int4-g64", "int2-g32-asym"])
def test_native_close_to_dequantized_weights(fmt):
    # Activation quantization (int8 per block of 32) adds well under 1% relative error.
    lin, q = _layer(fmt, k=512, n=64)
    x = torch.randn(8, 512)
    exact = reference.dequant_linear(x, q.qweight, q.scales, q.zeros, q.zero_const, q.bias, q.spec.bits, 512)
    assert _rel(q(x), exact) < 0.01


@needs_native
def test_activation_quantizer_matches_reference():
    ext = native.load()
    x = torch.randn(7, 128) * torch.logspace(-3, 2, 128)  # blocks of very different magnitude
    x[3, :32] = 0  # an all-zero block
    xq, d, gsum = ext.quantize_x(x, 64)
    rq, rd, rgsum = reference.quantize_activations(x, 64)
    assert torch.equal(xq, rq)
    assert torch.equal(d, rd)
    assert torch.allclose(gsum, rgsum, rtol=1e-6, atol=1e-6)


@needs_native
def test_native_handles_3d_input_and_no_bias():
    lin, q = _layer("int4-g32", bias=False)
    x = torch.randn(2, 3, 256)
    y = q(x)
    assert y.shape == (2, 3, 40)
    flat = q(x.reshape(6, 256)).reshape(2, 3, 40)
    assert torch.equal(y, flat)


def test_torch_backend_is_exact_for_stored_weights():
    lin, q = _layer("int4-g64")
    q.backend = "torch"
    x = torch.randn(4, 256)
    w = q.dequantized_weight()
    assert torch.allclose(q(x), x @ w.T + q.bias, atol=1e-5)


def test_unsupported_shapes_fall_back_to_torch():
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 8)  # 48 is not a multiple of 32: torch path even with backend=auto
    q = QuantLinear.from_linear(lin, "int4-g16")
    assert not q.uses_native()
    x = torch.randn(3, 48)
    assert torch.allclose(q(x), x @ q.dequantized_weight().T + q.bias, atol=1e-5)
    q.backend = "native"
    with pytest.raises(RuntimeError, match="in_features=48"):
        q(x)


@needs_native
@pytest.mark.parametrize("fmt", ["int8", "int4-g64-asym", "int3-g32", "int2-g128"])
def test_native_dequantize_is_exact(fmt):
    lin, q = _layer(fmt, k=256, n=24)
    ext = native.load()
    zeros = q.zeros if q.zeros is not None else torch.empty(0, dtype=torch.uint8)
    w = ext.dequantize(q.qweight, q.scales, zeros, q.zero_const, q.spec.bits, q.spec.group_for(256), 256)
    assert torch.equal(w, q.dequantized_weight())


@needs_native
@pytest.mark.parametrize("fmt", ["int4-g32", "int8", "int4-g64-asym"])
def test_large_batches_compute_what_small_ones_do(fmt):
    # without a tiled copy (36 outputs), a float GEMM on the weight the kernel dequantizes, with the kernel's
    # int8 activations: each row is what the row kernel gives it alone (up to float rounding)
    from shrink.quant.kernels import int8_activations, reference
    from shrink.quant.linear import LARGE_BATCH

    lin, q = _layer(fmt, n=36)
    assert tiled.for_layer(q) is None
    x = torch.randn(LARGE_BATCH + 3, 256)
    big = q(x)
    alone = torch.cat([q(x[i:i + 1]) for i in range(len(x))])
    assert torch.allclose(big, alone, rtol=1e-5, atol=1e-5)
    want = reference.int8_activation_linear(x, q.qweight, q.scales, q.zeros, q.zero_const, q.bias, q.spec.bits, 256,
                                            q.spec.group_for(256))
    assert torch.allclose(big, want, rtol=1e-5, atol=1e-5)
    xq, d, _ = reference.quantize_activations(x, 32)
    assert torch.equal(int8_activations(x), (xq.float().view(len(x), -1, 32) * d.unsqueeze(-1)).view(x.shape))


@needs_native
def test_the_kernels_are_dispatcher_ops_that_torch_compile_keeps():
    # torch.ops.shrink.qlinear / dequantize compute what the direct calls do, trace with their registered
    # shapes, and a compiled layer gives the eager layer's output exactly (the same kernel runs)
    lin, q = _layer("int4-g32", bias=True)
    x = torch.randn(3, 256)
    zeros = torch.empty(0, dtype=torch.uint8)
    args = (x, q.qweight, q.scales, zeros, q.zero_const, q.bias, 4, 32)
    assert torch.equal(torch.ops.shrink.qlinear(*args), native.load().qlinear(*args))
    assert torch.equal(torch.ops.shrink.dequantize(q.qweight, q.scales, zeros, q.zero_const, 4, 32, 256),
                       q.dequantized_weight())
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        assert torch.ops.shrink.qlinear(torch.empty(3, 256), *args[1:]).shape == (3, 40)
    with torch.no_grad():
        eager = q(x)  # the layer decides native or PyTorch once, on its first call
        compiled = torch.compile(q, dynamic=False, fullgraph=True)  # fullgraph: no break at the kernel
        assert torch.equal(compiled(x), eager)


def _reference(q, x):
    return reference.int8_activation_linear(x, q.qweight, q.scales, q.zeros, q.zero_const, q.bias, q.spec.bits,
                                            q.in_features, q.spec.group_for(q.in_features))


@needs_native
@pytest.mark.parametrize("fmt", FORMATS)
def test_tiled_kernel_matches_reference_and_rows_do_not_depend_on_the_batch(fmt):
    # tiles of 4 activation rows, a tail of single rows, and more than one block of 64 rows
    lin, q = _layer(fmt, k=256, n=48)
    assert tiled.for_layer(q) is not None
    x = torch.randn(135, 256) * 3
    x[7] = 0  # an all-zero row: every block scale 0
    y = q(x)
    ref = _reference(q, x)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    for m in (1, 2, 3, 4, 5, 9, 64, 67):
        assert torch.equal(q(x[:m]), y[:m]), f"batch {m} changed a row's result"
    assert torch.equal(q(x[70:71]), y[70:71])


def _untile(t: tiled.TiledWeight, n: int, k: int) -> torch.Tensor:
    """Codes [n, k] back from the tiled layout, following the layout tiled_core.inc documents."""
    nb = k // 32
    if t.bits == 8:  # [tile, block, j, output, i] = code of input 4j + i
        c = t.codes.view(n // 8, nb, 8, 8, 4).permute(0, 3, 1, 2, 4)
    else:  # [tile, block, j, output, i]: input 8j + i in the low nibble, 8j + 4 + i in the high
        b = t.codes.view(n // 8, nb, 4, 8, 4)
        c = torch.stack([b & 0x0F, b >> 4], dim=3).reshape(n // 8, nb, 8, 8, 4).permute(0, 3, 1, 2, 4)
    return c.reshape(n, k).to(torch.uint8)


@pytest.mark.parametrize("fmt", ["int8-g64-asym", "int4-g32", "int3-g32", "int2-g64-asym"])
def test_tiled_layout_holds_the_same_codes_scales_and_zeros(fmt):
    lin, q = _layer(fmt, k=128, n=16)
    t = tiled.tile(q.qweight, q.scales, q.zeros, q.zero_const, q.spec.bits, 128, q.spec.group_for(128))
    assert torch.equal(_untile(t, 16, 128), unpack(q.qweight, q.spec.bits, 128))
    groups = 128 // q.spec.group_for(128)
    s = t.scales.permute(0, 2, 1).reshape(16, groups)
    assert s.dtype == torch.float16 and torch.equal(s, q.scales)  # as many bytes as stored, the same values
    if q.zeros is None:
        assert t.zeros is None and t.zero_const == q.zero_const
    else:
        assert torch.equal(t.zeros.permute(0, 2, 1).reshape(16, groups), q.zeros)
    with pytest.raises(ValueError, match="12 outputs"):
        tiled.tile(q.qweight[:12], q.scales[:12], None, 8, q.spec.bits, 128, 32)


@needs_native
def test_tiled_copy_follows_the_stored_weights():
    # a stale copy would be silently wrong: loading another layer's state, or changing codes in place,
    # must change what the layer computes
    _, a = _layer("int4-g32", seed=1)
    _, b = _layer("int4-g32", seed=2)
    x = torch.randn(3, 256)
    ya, yb = a(x), b(x)
    assert not torch.allclose(ya, yb)
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), yb)
    a.qweight.zero_()
    assert torch.allclose(a(x), _reference(a, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_untile_gives_back_the_row_layout_exactly(fmt):
    _, q = _layer(fmt, k=128, n=16)
    t = tiled.tile(q.qweight, q.scales, q.zeros, q.zero_const, q.spec.bits, 128, q.spec.group_for(128))
    qweight, scales = tiled.untile(t, 16, 128)
    assert torch.equal(qweight, q.qweight) and scales.dtype == torch.float16 and torch.equal(scales, q.scales)


def _reference_weight(state: dict, q) -> torch.Tensor:
    return reference.dequant_weight(state["qweight"], state["scales"], state.get("zeros"), q.zero_const, q.spec.bits,
                                    q.in_features)


@needs_native
@pytest.mark.parametrize("fmt", ["int4-g32", "int8", "int3-g64-asym"])
def test_a_layer_holds_its_weight_once_in_the_tiled_layout_after_a_forward(fmt):
    _, q = _layer(fmt)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    x = torch.randn(5, 256)
    y = q(x)
    assert "qweight" not in q._buffers and "scales" not in q._buffers and "tiled_codes" in q._buffers
    if fmt in ("int4-g32", "int8"):  # the tiles take what the row form took (3-bit codes are tiled as 4)
        assert tiled.nbytes(q) == q.weight_bytes()
    after = q.state_dict()  # the row form, as it was, in the same order
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert q.weight_bytes() == before["qweight"].numel() + before["scales"].numel() * 2 + (
        before["zeros"].numel() if "zeros" in before else 0)
    assert torch.equal(q(x), y)
    assert torch.equal(q.weight, _reference_weight(before, q)) and "tiled_codes" in q._buffers  # kept when dequantized
    assert torch.equal(q.qweight, before["qweight"]) and "tiled_codes" not in q._buffers  # rows back when read
    assert torch.equal(q(x), y) and "qweight" not in q._buffers  # and tiled again by the next forward


@needs_native
def test_threads_running_a_layers_first_forward_together_all_get_its_product():
    # one of them tiles the layer and lets its rows go; the others must find the tiles, not a missing buffer
    from concurrent.futures import ThreadPoolExecutor

    x = torch.randn(3, 256)
    for seed in range(5):
        _, q = _layer("int4-g32", seed=seed)
        want = _reference(q, x)
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda _: q(x), range(8)))
        assert "qweight" not in q._buffers
        assert all(torch.equal(g, got[0]) for g in got)
        assert torch.allclose(got[0], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@needs_native
def test_layers_without_a_tiled_copy_use_the_row_kernel():
    lin, q = _layer("int4-g32", n=36)  # 36 outputs: not a multiple of 8
    assert tiled.for_layer(q) is None and q.uses_native()
    x = torch.randn(5, 256)
    assert torch.allclose(q(x), _reference(q, x), rtol=1e-5, atol=1e-5)


def test_an_input_of_the_wrong_width_is_refused_with_the_layer_named():
    lin, q = _layer("int4-g32")
    with pytest.raises(ShrinkError, match="in_features=256.*last dimension is 512"):
        q(torch.randn(2, 512))


_FORCED_AVX2 = """
import sys, torch
from shrink.quant.kernels import native
from shrink.quant.linear import QuantLinear
assert not native.vnni()
saved = torch.load(sys.argv[1], weights_only=True)
outs = []
for fmt in sys.argv[3].split(","):
    q = QuantLinear(256, 48, fmt, bias=True)
    q.load_state_dict(saved[fmt])
    outs.append(q(saved["x"]))
torch.save(outs, sys.argv[2])
"""


@needs_native
@pytest.mark.skipif(not native.vnni(), reason="this CPU has no AVX512-VNNI: only the AVX2 copy runs here")
def test_the_vnni_and_avx2_copies_compute_the_same_floats(tmp_path):
    # the same integer dot products, then the same float operations: bit for bit equal, at every batch size
    import os
    import subprocess
    import sys

    fmts = ["int8", "int8-g64-asym", "int4-g32", "int3-g64-asym", "int2-g32"]
    layers = [_layer(fmt, k=256, n=48)[1] for fmt in fmts]
    x = torch.randn(70, 256) * 3
    torch.save({"x": x, **{f: q.state_dict() for f, q in zip(fmts, layers)}}, tmp_path / "in.pt")
    subprocess.run([sys.executable, "-c", _FORCED_AVX2, str(tmp_path / "in.pt"), str(tmp_path / "out.pt"),
                    ",".join(fmts)], check=True, env={**os.environ, "SHRINK_VNNI": "0"})
    for q, y in zip(layers, torch.load(tmp_path / "out.pt", weights_only=True)):
        assert torch.equal(q(x), y), q


def test_five_and_six_bit_layers_compute_in_pytorch_and_say_so_when_native_is_asked():
    """The compiled kernels decode 2, 3, 4 and 8 bits: int5/int6 layers take the PyTorch path on their own,
    and a layer told to use the native kernel refuses, naming the widths it decodes."""
    lin = torch.nn.Linear(64, 16)
    for fmt in ("int5-g32", "int6-g32-asym"):
        q = QuantLinear.from_linear(lin, fmt)
        assert not q.uses_native()
        x = torch.randn(3, 64)
        assert torch.allclose(q(x), torch.nn.functional.linear(x, q.dequantized_weight(), q.bias))
        q.backend = "native"
        if native.available():
            with pytest.raises(RuntimeError, match="it decodes integer codes of 2, 3, 4, 8 bits"):
                q.uses_native()
