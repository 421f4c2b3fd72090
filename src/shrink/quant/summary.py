"""Sizes of a model by kind of module, before and after quantization.

"Before" is the size the same weights take in float32, which is what shrink's loaders produce;
"after" is what the module holds now. Tied tensors (an output layer sharing the embedding matrix)
are counted once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .conv import QuantConv2d
from .embedding import QuantEmbedding
from .linear import CastLinear, QuantLinear


@dataclass
class SizeRow:
    """One kind of module: how many, how many weights, bytes in fp32 and now, bits per weight."""

    kind: str
    modules: int = 0
    parameters: int = 0
    bytes_fp32: int = 0
    bytes_now: int = 0

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes_now / self.parameters if self.parameters else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "bits_per_weight": round(self.bits_per_weight, 4)}


def _kind(module: nn.Module, name: str, output_name: str | None, output_ptr: int | None = None) -> str:
    if isinstance(module, QuantEmbedding):
        return f"Embedding {module.spec.name}" + (f" (tied to {output_name})" if output_name and isinstance(
            output_ptr, int) and _identity(module.qweight) == output_ptr else "")
    if isinstance(module, QuantConv2d):
        return f"Conv2d {module.spec.name}"
    if isinstance(module, (QuantLinear, CastLinear)):
        return f"Linear {module.spec.name}"
    if isinstance(module, nn.Linear):
        kept = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(module.weight.dtype, "fp32")  # as held (streamed: as stored)
        return f"Linear {kept} (output, kept)" if name == output_name else f"Linear {kept} (kept)"
    if isinstance(module, nn.Embedding):
        tied = output_ptr is not None and _identity(module.weight) == output_ptr
        return f"Embedding (kept, tied to {output_name})" if tied else "Embedding (kept)"
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() >= 2:  # a weight-bearing layer shrink does not quantize
        return f"{type(module).__name__} (kept: unsupported)"
    if fused_expert_tensors(module, recurse=False):
        return "fused experts (kept: 3-D tensors are not quantized yet)"
    return "other (norms, biases, ...)"


def fused_expert_tensors(model: nn.Module, recurse: bool = True) -> list[tuple[str, int]]:
    """(name, elements) of the 3-D weight tensors outside convolutions: a mixture of experts' weights fused
    into one tensor per projection ([experts, out, in], as transformers stores Mixtral's, Qwen-MoE's and
    OLMoE's), which shrink does not quantize yet."""
    found = []
    for name, module in model.named_modules() if recurse else [("", model)]:
        if isinstance(module, nn.modules.conv._ConvNd):
            continue
        for pname, p in module.named_parameters(recurse=False):
            # [experts, out, in]; a ViT's [1, 1, hidden] class token or [1, positions, hidden] table is no expert
            if p.dim() == 3 and p.is_floating_point() and min(p.shape) >= 2:
                found.append((f"{name}.{pname}" if name else pname, p.numel()))
    return found


def _identity(t: torch.Tensor) -> int:
    """What tells tensors apart: their memory, or for placeholders on the meta device (a streamed model's
    skeleton, whose tensors were written and let go) the tensor object."""
    return id(t) if t.is_meta else t.data_ptr()


def size_rows(model: nn.Module, output_name: str | None = None) -> list[SizeRow]:
    """Rows by kind of module plus a final "total" row."""
    rows: dict[str, SizeRow] = {}
    seen: set[int] = set()
    out = model.get_submodule(output_name) if output_name else None
    codes = out._buffers.get("qweight") if isinstance(out, QuantLinear) else None  # none: tiled alone, tied to nothing
    output_ptr = _identity(out.weight) if isinstance(out, nn.Linear) else \
        _identity(codes) if codes is not None else None
    for name, module in model.named_modules():
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        fresh = [t for t in tensors if _identity(t) not in seen or t.numel() == 0]
        seen.update(_identity(t) for t in fresh)
        if not fresh:
            continue
        kind = _kind(module, name, output_name, output_ptr)
        row = rows.setdefault(kind, SizeRow(kind))
        row.modules += 1
        if isinstance(module, QuantEmbedding):
            n = module.num_embeddings * module.embedding_dim
            row.parameters += n
            row.bytes_fp32 += 4 * n
            row.bytes_now += module.weight_bytes()
        elif isinstance(module, (QuantLinear, CastLinear, QuantConv2d)):
            n = module.in_features * module.out_features
            row.parameters += n
            row.bytes_fp32 += 4 * n
            row.bytes_now += module.weight_bytes()
            if module.bias is not None:
                row.parameters += module.bias.numel()
                row.bytes_fp32 += 4 * module.bias.numel()
                row.bytes_now += module.bias.numel() * module.bias.element_size()
        else:
            for t in fresh:
                row.parameters += t.numel()
                row.bytes_fp32 += 4 * t.numel() if t.is_floating_point() else t.numel() * t.element_size()
                row.bytes_now += t.numel() * t.element_size()
    ordered = sorted(rows.values(), key=lambda r: -r.bytes_fp32)
    total = SizeRow("total")
    for r in ordered:
        total.modules += r.modules
        total.parameters += r.parameters
        total.bytes_fp32 += r.bytes_fp32
        total.bytes_now += r.bytes_now
    return ordered + [total]


def quantized_bits_per_weight(model: nn.Module) -> float:
    """Average storage bits per weight over the quantized Linear and Conv2d layers (scales and zeros included)."""
    bits = n = 0
    for m in model.modules():
        if isinstance(m, (QuantLinear, CastLinear, QuantConv2d)):
            bits += 8 * m.weight_bytes()
            n += m.in_features * m.out_features
    return bits / n if n else 0.0
