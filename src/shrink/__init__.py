"""shrink: make trained models smaller, and know when small has become too small.

    import shrink
    model = shrink.quantize(model, "int4-g64")   # packed 4-bit weights, fp16 scales per group of 64
    shrink.save(model, "out/")                    # model.safetensors + shrink.json (+ config, tokenizer)
    model = shrink.load("out/")                   # outputs bit-identical to the saved model
    shrink.compare("default", "out/", "task.jsonl", out="report/")  # per example, slices, verdict
    student, run = shrink.distill("default", "every-other", "text.txt", out="student/", steps=500)
    found = shrink.search("default", "task.jsonl", out="search/")  # the smallest model within tolerance
    shrink.export_gguf("out/", "out.gguf")        # llama.cpp's GGUF, codes copied exactly (Q4_0, Q5_0, Q8_0, IQ4_NL)
    shrink.info(model)                            # what was done to it, per layer (as shrink.json says)
"""

import os as _os
import sys as _sys

from .core import VERSION as __version__

# Tensors of 2 MB and more on transparent huge pages (PyTorch's allocator does it when THP_MEM_ALLOC_ENABLE is set
# before torch starts): touching fresh memory, which a comparison does for every row of logits it keeps, takes
# fewer page faults. Set THP_MEM_ALLOC_ENABLE=0 to keep it off; no effect when torch was imported first.
if "torch" not in _sys.modules:
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .api import ModelRecord, ShrinkError, compare, distill, export_gguf, info, load, quantize, save, search  # noqa: E402
from .quant import QuantLinear, QuantSpec, parse_format  # noqa: E402

__all__ = ["ModelRecord", "QuantLinear", "QuantSpec", "ShrinkError", "__version__", "compare", "distill", "export_gguf",
           "info", "load", "parse_format", "quantize", "save", "search"]
