"""QuantLinear: a drop-in `nn.Linear` whose weight is packed low-bit integers plus fp16 scales.

Buffers (all saved in the state dict, nothing else needed to rebuild the layer):
  qweight  uint8 [out, packed bytes]   codes packed in blocks of 32 inputs (see packing.py)
  scales   fp16  [out, groups]
  zeros    uint8 [out, groups]         only for -asym formats
  superscales fp16 [out, in/256, 2|1]  only for K-quant formats (scales and zeros then hold integers)
  bias     fp32  [out]                 when the original layer had one
  input_order int64 [in]               only for weights whose groups are not contiguous inputs (GPTQ's
                                       activation order): the kernel sees x[:, input_order]
The forward pass runs the native AVX2 kernel where it applies and the PyTorch path otherwise. A layer whose
kernel is the tiled one holds its weight in that layout alone after its first forward (adopt_tiled):
qweight and scales then are made again from it when read, which puts the layer back in the row layout
until its next forward; its state dict holds the row form either way.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import ShrinkError
from ..core.finite import all_finite
from . import kernels
from .format import QuantizedWeight, grid_levels, symmetric_zero
from .kernels import LARGE_BATCH  # noqa: F401  (re-exported: where tests and benchmarks look for it)
from .packing import pack, packed_width
from .rtn import quantize_weight, round_packed
from .spec import SUPERBLOCK, QuantSpec, parse_format


class PackedRows(nn.Module):
    """What QuantLinear, QuantEmbedding and QuantConv2d share: a weight of `rows` rows of `inputs` codes
    in an integer format, held as the buffers qweight, scales and (for -asym formats) zeros."""

    def _register_packed(self, rows: int, inputs: int, spec: QuantSpec) -> None:
        if spec.cast:
            raise ValueError(f"{type(self).__name__} holds integer formats, not {spec.name}")
        self.spec = spec
        self.packed_shape = (rows, inputs)  # rows of codes, codes a row
        groups = inputs // spec.group_for(inputs)
        # codes left unset: with every scale zero the layer's weight is zero whatever they are (and
        # writing a layer's worth of zero codes, replaced at once by fill or a load, cost 5% of a streamed job)
        self.register_buffer("qweight", torch.empty(rows, packed_width(inputs, spec.bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(rows, groups, dtype=torch.float16))
        if spec.symmetric:
            self.zeros = None
        else:
            self.register_buffer("zeros", torch.zeros(rows, groups, dtype=torch.uint8))
        if spec.kquant:
            if inputs % SUPERBLOCK:
                raise ShrinkError(f"{type(self).__name__}: format {spec.name} needs inputs in super-blocks of "
                                  f"{SUPERBLOCK}, not {inputs}")
            parts = 1 if spec.symmetric else 2
            self.register_buffer("superscales", torch.zeros(rows, inputs // SUPERBLOCK, parts, dtype=torch.float16))
        else:
            self.superscales = None

    def fill(self, q: QuantizedWeight) -> None:
        """Store computed codes, scales and zero points (and a K-quant format's superscales)."""
        if (q.superscales is None) != (self.superscales is None):
            raise ShrinkError(f"{type(self).__name__} in {self.spec.name}: given "
                              f"{'no ' if q.superscales is None else ''}super-block scales")
        if q.superscales is not None:
            self.superscales.copy_(q.superscales)
        self.fill_packed(pack(q.codes, self.spec.bits), q.scales, q.zeros)

    def fill_packed(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None) -> None:
        """Store codes already in the row layout (packing.pack's), scales and zero points (-asym formats); a
        K-quant layer's superscales are set apart (`fill`, or in place)."""
        if qweight.shape != self.qweight.shape or qweight.dtype != torch.uint8:  # (reading qweight: the row layout)
            raise ShrinkError(f"{type(self).__name__}: packed codes of shape {tuple(qweight.shape)} for a weight of "
                              f"{self.packed_shape[0]} rows of {self.packed_shape[1]}")
        if self.__dict__.get("shares_buffers"):  # a tied output layer: the table reads the same bytes
            self.qweight.copy_(qweight)
        else:  # a new tensor, no copy: tiled copies built from the old codes see it is not theirs
            self.qweight = qweight.contiguous()
        self.scales.copy_(scales)
        if self.zeros is not None:
            self.zeros.copy_(zeros)

    @property
    def zero_const(self) -> int:
        """The zero point of symmetric formats (codes are stored offset by it); 0 for -asym."""
        return symmetric_zero(self.spec.bits) if self.spec.symmetric else 0

    def weight_bytes(self) -> int:
        """Bytes of packed codes, scales and zero points as stored (bias excluded), from the shapes: reading
        the buffers would make a layer holding the tiled layout build its row form."""
        rows, inputs = self.packed_shape
        groups = inputs // self.spec.group_for(inputs)
        held = rows * (packed_width(inputs, self.spec.bits) + groups * (2 + (0 if self.spec.symmetric else 1)))
        if self.spec.kquant:  # and d (and dmin) in fp16 per super-block (GGUF packs the integers tighter)
            held += rows * (inputs // SUPERBLOCK) * 2 * (1 if self.spec.symmetric else 2)
        return held


class QuantLinear(PackedRows):
    """Linear layer with packed integer weights; same forward signature as `nn.Linear`.

    backend: "auto" (native kernel where it applies, else PyTorch), "native" or "torch";
    defaults to $SHRINK_BACKEND or "auto". input_order: the packed weight's columns are the inputs in
    the order of the `input_order` buffer (default False: inputs in their own order). Inference only:
    the weights carry no gradient.
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec | str, bias: bool = False,
                 backend: str | None = None, input_order: bool = False):
        super().__init__()
        spec = parse_format(spec)
        if spec.cast:
            raise ValueError(f"QuantLinear holds integer formats; use CastLinear for {spec.name}")
        self.in_features = in_features
        self.out_features = out_features
        self._register_packed(out_features, in_features, spec)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None
        if input_order:
            self.register_buffer("input_order", torch.arange(in_features, dtype=torch.int64))
        else:
            self.input_order = None
        self.backend = backend or kernels.default_backend()
        self._group = spec.group_for(in_features)
        self._native, self._native_for = False, None  # whether to use the kernel, and for which backend

    def adopt_tiled(self, t) -> bool:
        """Hold the weight as the tiled layout `t` (kernels.tiled.TiledWeight, built from this layer's buffers)
        alone, the row-layout codes and scales let go; False (nothing changed) for a layer sharing its buffers
        with another (an output layer tied to its embedding table), which keeps both."""
        if self.__dict__.get("shares_buffers"):
            return False
        self.register_buffer("tiled_codes", t.codes, persistent=False)
        self.register_buffer("tiled_scales", t.scales, persistent=False)
        if t.zeros is not None:  # (an asymmetric layer's zero points stay in `zeros` too: a byte a group)
            self.register_buffer("tiled_zeros", t.zeros, persistent=False)
        for name in ("qweight", "scales"):  # last: a reader finds the tiles or the rows, never neither
            del self._buffers[name]
        return True

    def _row_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        from .kernels import tiled

        return tiled.untile(tiled.for_layer(self), self.out_features, self.in_features)

    def __getattr__(self, name: str):
        # qweight and scales of a layer holding the tiled layout: the row layout comes back, kept (so that
        # reading and changing them in place works as on any layer), until the next forward tiles it again
        if name in ("qweight", "scales") and "tiled_codes" in self.__dict__.get("_buffers", ()):
            qweight, scales = self._row_form()
            rest = {k: v for k, v in self._buffers.items() if not k.startswith("tiled_")}
            self._non_persistent_buffers_set.difference_update({"tiled_codes", "tiled_scales", "tiled_zeros"})
            self._buffers.clear()
            self._buffers.update(qweight=qweight, scales=scales, **rest)  # in the order they were registered
            return self._buffers[name]
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # the state dict holds the row form whatever the layer holds, in the buffers' registration order
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if "tiled_codes" in self._buffers:
            qweight, scales = self._row_form()
            rest = {k: destination.pop(k) for k in list(destination) if k.startswith(prefix) and
                    k[len(prefix):] in self._buffers}
            destination[prefix + "qweight"], destination[prefix + "scales"] = qweight, scales
            destination.update(rest)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if "tiled_codes" in self._buffers:
            self.qweight  # noqa: B018  (back to the row layout, which the state dict fills)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        """The float32 weight, dequantized on every access (nothing float is stored). For models whose own
        code reads a layer's weight (T5 and ViT read its dtype in every forward): right, not fast."""
        return self.dequantized_weight()

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec | str, name: str = "<linear>",
                    backend: str | None = None, workspace: torch.Tensor | None = None) -> "QuantLinear":
        """Quantize an `nn.Linear` by round-to-nearest (`name` is used in error messages). workspace: float32
        memory to round in, as `rtn.quantize_weight` takes it (default None: new memory)."""
        spec = parse_format(spec)
        packed = round_packed(linear.weight, spec, name)  # one compiled pass where it applies: the same bytes
        if packed is None:
            q = quantize_weight(linear.weight, spec, name, workspace=workspace)
            return cls.from_quantized(q, linear.in_features, linear.out_features, spec, linear.bias, backend)
        layer = cls._with_bias(linear.in_features, linear.out_features, spec, linear.bias, backend)
        layer.fill_packed(*packed)
        return layer

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, in_features: int, out_features: int, spec: QuantSpec,
                       bias: torch.Tensor | None = None, backend: str | None = None) -> "QuantLinear":
        """Build from already computed codes, scales and zero points (any quantization method)."""
        layer = cls._with_bias(in_features, out_features, spec, bias, backend)
        layer.fill(q)
        return layer

    @classmethod
    def _with_bias(cls, in_features: int, out_features: int, spec: QuantSpec, bias, backend) -> "QuantLinear":
        layer = cls(in_features, out_features, spec, bias=bias is not None, backend=backend)
        if bias is not None:
            layer.bias.copy_(bias.detach().to(torch.float32))
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight these codes stand for, its columns in the inputs' own order. A layer holding the
        tiled layout keeps it: models whose code reads `weight` in every forward (T5, ViT) would otherwise
        swap layouts twice a forward."""
        b = self._buffers
        qweight, scales = (b["qweight"], b["scales"]) if "qweight" in b else self._row_form()
        w = kernels.reference.dequant_weight(qweight, scales, self.zeros, self.zero_const, self.spec.bits,
                                             self.in_features, grid_levels(self.spec), self.superscales)
        if self.input_order is not None:
            w = torch.empty_like(w).index_copy_(1, self.input_order, w)
        return w

    def uses_native(self) -> bool:
        """Whether forward runs the compiled kernel on this machine (decided once per backend)."""
        if self._native_for != self.backend:
            self._native = self._decide_native()
            self._native_for = self.backend
        return self._native

    def _decide_native(self) -> bool:
        if self.backend == "torch":
            return False
        ok = (kernels.native_supports(self.in_features, self._group, self.spec.bits, self.spec.grid, self.spec.kquant)
              and kernels.native.available())
        if self.backend == "native" and not ok:
            raise RuntimeError(
                f"native backend requested but unavailable for in_features={self.in_features}, format {self.spec.name} "
                + (f"(it decodes integer codes of {', '.join(map(str, kernels.NATIVE_BITS))} bits with fp16 group "
                   "scales; input and group sizes must be multiples of 32)" if kernels.native.available() else
                   f"({kernels.native.unavailable_reason()})")
            )
        return ok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ShrinkError(f"{self.extra_repr()}: given an input whose last dimension is {x.shape[-1]}")
        xf = x if self.input_order is None else x.index_select(-1, self.input_order)
        if xf.dtype != torch.float32:
            xf = xf.to(torch.float32)
        y = kernels.qlinear(xf, self, native_kernel=xf.is_cpu and self.uses_native())  # on GPUs: PyTorch
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # .half(), .to(torch.bfloat16), .to(device): the storage moves but keeps its types (codes uint8,
        # scales fp16, bias fp32), since the kernels read exactly those; compute follows the input's dtype.
        return apply_keeping_dtypes(self, fn, ("scales", "bias", "tiled_scales", "superscales"), recurse)

    def weight_bytes(self) -> int:
        """Bytes of packed weights, scales, zero points and input order (bias excluded)."""
        return super().weight_bytes() + (self.input_order.numel() * 8 if self.input_order is not None else 0)

    def extra_repr(self) -> str:
        order = ", input_order=True" if self.input_order is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.spec.name}, "
                f"bias={self.bias is not None}{order}")


class CastLinear(nn.Module):
    """Linear layer stored in bf16 or fp16 and computed in the input's dtype (a size baseline)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec | str, bias: bool = False):
        super().__init__()
        spec = parse_format(spec)
        if not spec.cast:
            raise ValueError(f"CastLinear holds bf16/fp16, not {spec.name}")
        dtype = torch.bfloat16 if spec.cast == "bf16" else torch.float16
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=dtype))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec | str, name: str = "<linear>") -> "CastLinear":
        """Cast an `nn.Linear`'s weight (and bias) to the format's dtype."""
        layer = cls(linear.in_features, linear.out_features, spec, bias=linear.bias is not None)
        if not all_finite(linear.weight):
            raise ShrinkError(f"layer {name!r}: weight has NaN or infinite values")
        layer.weight.copy_(linear.weight.detach())
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.to(torch.float32)

    def _apply(self, fn, recurse=True):
        # the weight stays in its format's dtype through .half() / .to(dtype); compute follows the input
        return apply_keeping_dtypes(self, fn, ("weight", "bias"), recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), b)

    def weight_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.spec.name}, bias={self.bias is not None}"


def apply_keeping_dtypes(module: nn.Module, fn, names: tuple[str, ...], recurse: bool) -> nn.Module:
    """`Module._apply(fn)` with the buffers `names` moved to fn's device but never converted to its dtype."""
    kept = {n: module._buffers.pop(n) for n in names if module._buffers.get(n) is not None}
    try:
        nn.Module._apply(module, fn, recurse)
    finally:
        for n, t in kept.items():
            device = fn(torch.empty(0, dtype=t.dtype, device=t.device)).device  # where fn sends tensors
            module._buffers[n] = t.to(device=device)
    return module
