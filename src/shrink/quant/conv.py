"""QuantConv2d: an `nn.Conv2d` whose kernel is stored as QuantLinear stores a weight.

The kernel [out, in/groups, kh, kw] is flattened to [out, in/groups * kh * kw], each output channel a
row, so groups run along the input channels times the kernel's positions and the same formats, packing
and save/load apply. The forward dequantizes the kernel (by the compiled kernel where shapes suit it,
the same values) and convolves with PyTorch's own conv. (Pointwise convolutions through the integer
kernel, with the pixels as rows, measured no faster on EfficientNet-Lite0, at any pixel count.)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import ShrinkError
from . import kernels
from .linear import PackedRows, apply_keeping_dtypes
from .rtn import quantize_weight
from .spec import QuantSpec, parse_format


class QuantConv2d(PackedRows):
    """2-D convolution with packed integer kernels (buffers qweight, scales, zeros, bias as QuantLinear's);
    same forward as the `nn.Conv2d` it came from. Inference only."""

    input_order = None
    _conv_forward = None  # the forward of an nn.Conv2d subclass this layer replaced (see `adopt`)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, spec: QuantSpec | str, stride=1,
                 padding=0, dilation=1, groups: int = 1, bias: bool = False):
        super().__init__()
        spec = parse_format(spec)
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self.in_features = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        self.out_features = out_channels
        self._register_packed(out_channels, self.in_features, spec)
        self.backend = kernels.default_backend()  # as QuantLinear's: "auto" uses the compiled kernel where it applies
        if bias:
            self.register_buffer("bias", torch.zeros(out_channels, dtype=torch.float32))
        else:
            self.bias = None

    def conv_args(self) -> dict:
        """The convolution's geometry, as shrink.json records it."""
        return {"in_channels": self.in_channels, "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups}

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, spec: QuantSpec | str, name: str = "<conv>") -> "QuantConv2d":
        """Quantize an `nn.Conv2d` by round-to-nearest, one row per output channel."""
        if conv.padding_mode != "zeros":
            raise ShrinkError(f"layer {name!r}: padding mode {conv.padding_mode!r} is not supported (only 'zeros')")
        spec = parse_format(spec)
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, spec, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=conv.bias is not None)
        layer.fill(quantize_weight(conv.weight.detach().reshape(conv.out_channels, -1), spec, name))
        if conv.bias is not None:
            layer.bias.copy_(conv.bias.detach().float())
        return layer.adopt(conv)

    def adopt(self, conv: nn.Conv2d) -> "QuantConv2d":
        """Keep what a subclass of nn.Conv2d adds around the convolution (TensorFlow-style 'same' padding
        in EfficientNet's and timm's convolutions): its forward runs on this layer, whose `weight` is the
        dequantized kernel, with the child modules it uses. The forward check after quantizing is what
        confirms the result equals the original's."""
        if type(conv).forward is not nn.Conv2d.forward:
            self._conv_forward = type(conv).forward
            for name, child in conv.named_children():
                self.add_module(name, child)
            if self._same_as_plain_conv():
                self._conv_forward = None  # e.g. 'same' padding of a 1x1 kernel at stride 1: nothing to add
        return self

    @torch.no_grad()
    def _same_as_plain_conv(self) -> bool:
        """Whether the adopted forward computes exactly the plain convolution, on two probe inputs."""
        g = torch.Generator().manual_seed(0)
        for size in (9, 16):
            x = torch.randn(1, self.in_channels, size, size, generator=g)
            try:
                a, b = self._conv_forward(self, x), self._plain(x)
            except Exception:
                return False
            if a.shape != b.shape or not torch.equal(a, b):
                return False
        return True

    @property
    def weight(self) -> torch.Tensor:
        """The float32 kernel [out, in/groups, kh, kw], dequantized on every access (what the forward
        convolves with; also for models whose code reads it, as ViT's patch embedding reads its dtype)."""
        w = kernels.dequantize(self, native_kernel=self._native())
        return w.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def _native(self) -> bool:
        return (self.backend != "torch" and self.qweight.is_cpu and
                kernels.native_supports(self.in_features, self.spec.group_for(self.in_features), self.spec.bits,
                                        self.spec.grid, self.spec.kquant) and
                kernels.native.available())

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 kernel, flattened to [out, in/groups * kh * kw]."""
        return kernels.dequantize(self, native_kernel=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._conv_forward is not None:
            return self._conv_forward(self, x)
        return self._plain(x)

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x.float(), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        return apply_keeping_dtypes(self, fn, ("scales", "bias", "superscales"), recurse)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, format={self.spec.name}, bias={self.bias is not None}")
