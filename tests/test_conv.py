"""Conv2d layers quantized like Linear ones: the kernel flattened per output channel (groups along
in_channels x kh x kw), the same formats, packing and save/load; the forward is the convolution of the
dequantized kernel."""

import pytest
import torch

import shrink
from shrink.quant import QuantConv2d, size_rows
from shrink.quant.check import relative_error, run, sample_input
from shrink.quant.format import dequantize
from shrink.quant.rtn import quantize_weight


class SmallCNN(torch.nn.Module):
    """3 -> 32 (3x3) -> depthwise 32 (3x3, stride 2) -> 64 (1x1) -> pooled -> Linear 10."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.dw = torch.nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32, bias=False)
        self.pw = torch.nn.Conv2d(32, 64, 1)
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.stem(x))))))
        return self.head(x.mean((2, 3)))


def cnn():
    torch.manual_seed(0)
    return SmallCNN().eval()


X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_a_quantized_convolution_is_the_convolution_of_its_dequantized_kernel():
    conv = cnn().stem
    q = QuantConv2d.from_conv(conv, "int4")  # 3 x 3 x 3 = 27 inputs a row: one scale per output channel
    ref = quantize_weight(conv.weight.detach().reshape(32, -1), q.spec, "stem")
    kernel = dequantize(ref.codes, ref.scales, ref.zeros, ref.zero_const).reshape(conv.weight.shape)
    assert torch.equal(q(X), torch.nn.functional.conv2d(X, kernel, conv.bias, 1, 1))


def test_a_cnn_is_quantized_with_its_convolutions_and_saves_and_loads(tmp_path):
    # the stem's rows hold 27 inputs and the depthwise one's 9: per channel; the 1x1 conv's 32: groups of 32
    model = shrink.quantize(cnn(), {"stem": "int4", "dw": "int8", "*": "int4-g32"}, progress=False)
    assert all(isinstance(getattr(model, n), QuantConv2d) for n in ("stem", "dw", "pw"))
    assert type(model.head) is torch.nn.Linear  # the output layer is kept
    # the check's figure is the relative error of the outputs on its inputs, recomputed here, and int4 in places
    # costs more than int8 everywhere
    inputs, what = sample_input(cnn())
    assert what == shrink.info(model).check.input == "2 random 3x32x32 inputs"
    assert shrink.info(model).check.relative_error == pytest.approx(relative_error(run(cnn(), inputs), run(model, inputs)))
    assert shrink.info(model).check.relative_error > shrink.info(shrink.quantize(cnn(), "int8", progress=False)).check.relative_error
    kinds = {r.kind for r in size_rows(model)}
    assert {"Conv2d int4-g32", "Conv2d int8", "Conv2d int4"} <= kinds
    shrink.save(model, tmp_path / "q")
    back = shrink.load(tmp_path / "q", model=SmallCNN())
    with torch.no_grad():
        assert torch.equal(back(X), model(X))


def test_a_kernel_row_no_group_divides_falls_back_per_channel_and_says_so():
    # a glob's layers fall back (said per layer), a layer named exactly is refused
    with pytest.warns(UserWarning, match=r"2 layers kept per channel, not in groups: stem \(27 inputs\), dw \(9 inputs\)"):
        model = shrink.quantize(cnn(), "int4-g32", progress=False)
    info = shrink.info(model)
    assert info.formats["stem"] == "int4" and info.formats["dw"] == "int4" and info.formats["pw"] == "int4-g32"
    assert set(info.fallbacks) == {"stem", "dw"} and "groups of 32 do not divide the layer's 27 inputs" in info.fallbacks["stem"]
    from shrink.quant import quantized_bits_per_weight

    convs = [m for m in model.modules() if isinstance(m, QuantConv2d)]
    by_hand = sum(8 * m.weight_bytes() for m in convs) / sum(m.in_features * m.out_features for m in convs)
    assert 4 < quantized_bits_per_weight(model) == pytest.approx(by_hand)  # convolutions count (they read 0 before)
    with pytest.raises(ValueError, match=r"layer 'stem': group size 32 of format int4-g32 does not divide its input size 27"):
        shrink.quantize(cnn(), {"stem": "int4-g32", "*": "int8"}, progress=False)
    with pytest.raises(ValueError, match=r"layer 'stem': convolutions take integer formats"):
        shrink.quantize(cnn(), {"stem": "bf16"}, progress=False)


def test_calibrated_methods_round_convolutions_to_nearest_and_say_so():
    calib = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    model = shrink.quantize(cnn(), {"stem": "int8", "dw": "int8", "*": "int4-g32"}, method="gptq",
                            calibration=calib, progress=False)
    assert "a convolution: round to nearest" in shrink.info(model).calibration["layers"]["pw"]["note"]
    assert isinstance(model.pw, QuantConv2d)


class SamePadConv(torch.nn.Conv2d):
    """A convolution with TensorFlow's 'same' padding computed in its own forward (as EfficientNet's and
    timm's convolutions do), and a child module it uses."""

    def __init__(self, *a, **k):
        super().__init__(*a, padding=0, **k)
        self.pad = torch.nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x):
        return torch.nn.functional.conv2d(self.pad(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SameCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = SamePadConv(3, 32, 2)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.stem(x).mean((2, 3)))


def test_a_conv2d_subclass_keeps_its_own_forward_and_children(tmp_path):
    torch.manual_seed(0)
    ref = SameCNN().eval()
    model = shrink.quantize(SameCNN().eval().requires_grad_(False), "int8", progress=False)
    assert isinstance(model.stem, QuantConv2d) and isinstance(model.stem.pad, torch.nn.ZeroPad2d)
    want = torch.nn.functional.conv2d(torch.nn.functional.pad(X, (0, 1, 0, 1)), model.stem.weight, model.stem.bias)
    with torch.no_grad():
        assert torch.equal(model.stem(X), want)
        assert model.stem(X).shape == ref.stem(X).shape == (4, 32, 32, 32)
    assert shrink.info(model).check.relative_error < 0.02
    shrink.save(model, tmp_path / "q")
    back = shrink.load(tmp_path / "q", model=SameCNN())
    with torch.no_grad():
        assert torch.equal(back(X), model(X))


def test_shrink_json_says_what_was_done_to_each_layer(tmp_path):
    import json

    calib = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    model = shrink.quantize(cnn(), {"head": "bf16", "*": "int8"}, method="gptq", calibration=calib, progress=False)
    shrink.save(model, tmp_path / "q")
    modules = json.loads((tmp_path / "q" / "shrink.json").read_text())["modules"]
    assert modules["stem"]["done"]["method"] == "rtn"
    assert "a convolution: round to nearest" in modules["stem"]["done"]["notes"][0]
    assert modules["head"]["done"] == {"method": "cast", "notes": []}
    from shrink.quant.record import layers_done, summary_line

    line = summary_line(layers_done(model, "gptq", shrink.info(model).calibration), "gptq")
    assert line.startswith("applied: rtn to 3 layers (asked: gptq")
    rtn = shrink.quantize(cnn(), "int8", progress=False)
    assert summary_line(layers_done(rtn, "rtn", None), "rtn") is None


def test_fast_paths_match_the_reference_convolution():
    from shrink.quant import kernels

    if not kernels.native.available():
        pytest.skip("the compiled kernel does not build here; only the PyTorch path runs")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 96, 1)
    q = QuantConv2d.from_conv(conv, "int8")
    w = quantize_weight(conv.weight.detach().reshape(96, -1), q.spec, "pw")
    ref = dequantize(w.codes, w.scales, w.zeros, q.zero_const).reshape(96, 64, 1, 1)
    assert torch.equal(q.weight, ref)  # the compiled dequantization gives the same kernel
    q.backend = "torch"
    assert torch.equal(q.weight, ref)
    x = torch.randn(1, 64, 7, 7)
    want = torch.nn.functional.conv2d(x, ref, q.bias)
    q.backend = "auto"
    assert torch.equal(q(x), want)


def test_a_subclass_that_is_a_plain_convolution_runs_as_one():
    class Same1x1(SamePadConv):
        def forward(self, x):  # 'same' padding of a 1x1 kernel at stride 1 is none
            return torch.nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    torch.manual_seed(0)
    q = QuantConv2d.from_conv(Same1x1(8, 16, 1), "int8")
    assert q._conv_forward is None
    q = QuantConv2d.from_conv(SamePadConv(8, 16, 2), "int8")
    assert q._conv_forward is not None  # its padding changes the output: its own forward stays
