"""Quantization: format specs, round-to-nearest quantizer, packed QuantLinear and its kernels.

This part knows nothing of evaluation, distillation or search.
"""

from .apply import METHODS, output_layer_name, plan, quantize
from .conv import QuantConv2d
from .embedding import QuantEmbedding
from .linear import CastLinear, QuantLinear
from .spec import QuantSpec, parse_format
from .summary import SizeRow, quantized_bits_per_weight, size_rows

__all__ = ["QuantConv2d", "QuantEmbedding", 
    "METHODS", "CastLinear", "QuantLinear", "QuantSpec", "SizeRow", "output_layer_name", "parse_format",
    "plan", "quantize", "quantized_bits_per_weight", "size_rows",
]
