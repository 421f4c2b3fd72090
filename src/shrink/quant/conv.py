"""QuantConv2d: an `nn.Conv2d` whose kernel is stored as QuantLinear stores a weight.

The kernel [out, in/groups, kh, kw] is flattened to [out, in/groups * kh * kw], each output channel a
row, so groups run along the input channels times the kernel's positions and the same formats, packing
and save/load apply. The forward dequantizes the kernel and convolves (PyTorch's own conv).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .linear import PackedRows, _apply_keeping_dtypes
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
            raise ValueError(f"layer {name!r}: padding mode {conv.padding_mode!r} is not supported (only 'zeros')")
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
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The float32 kernel [out, in/groups, kh, kw], dequantized on every access (for models whose code
        reads it, as ViT's patch embedding reads its dtype)."""
        return self.dequantized_weight().reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 kernel, flattened to [out, in/groups * kh * kw]."""
        return kernels.reference.dequant_weight(self.qweight, self.scales, self.zeros, self.zero_const,
                                                self.spec.bits, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._conv_forward is not None:
            return self._conv_forward(self, x)
        y = F.conv2d(x.float(), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        return _apply_keeping_dtypes(self, fn, ("scales", "bias"), recurse)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, format={self.spec.name}, bias={self.bias is not None}")
