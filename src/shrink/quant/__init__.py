"""Quantization: format specs, round-to-nearest quantizer, packed QuantLinear and its kernels.

This part knows nothing of evaluation, distillation or search.
"""

from .apply import output_layer_name, plan, quantize
from .conv import QuantConv2d
from .embedding import QuantEmbedding
from .linear import CastLinear, QuantLinear
from .mixed import MixedPrecision
from .recipe import AWQ, GPTQ, METHODS, QAD, Recipe, Rotate, Tune, parse_method
from .spec import QuantSpec, parse_format
from .summary import SizeRow, quantized_bits_per_weight, size_rows

__all__ = [
    "AWQ", "GPTQ", "METHODS", "QAD", "CastLinear", "MixedPrecision", "QuantConv2d", "QuantEmbedding", "QuantLinear", "QuantSpec", "Recipe",
    "Rotate", "SizeRow", "Tune", "output_layer_name", "parse_format", "parse_method", "plan", "quantize", "quantized_bits_per_weight",
    "size_rows",
]
