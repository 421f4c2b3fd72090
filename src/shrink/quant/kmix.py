"""llama.cpp's K-quant mixes (Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M) as shrink formats per layer.

llama-quantize gives most tensors of a Q4_K_M file Q4_K and spends more bits where they pay: Q6_K for the output
layer (or the embedding table it is tied to), and for the attention values and the MLP's down projections of the
first and last eighths of the layers and every third layer between (its `use_more_bits`). `q4k-m` asks shrink for
that mix in the K-quant formats that copy into those types, so a model quantized by GPTQ/AWQ/QAD for it exports
to a GGUF file laid out as llama.cpp's own Q4_K_M (rules of llama.cpp 0.3.36's llama-quant.cpp for dense models;
the Falcon, 70B and 8-expert special cases are not followed). Layers whose inputs are not a multiple of 256 get
llama.cpp's fallbacks (apply._fall_back).
"""

from __future__ import annotations

import re

import torch.nn as nn

from ..core.errors import ShrinkError

# mix -> (the format of most layers, of attention values, of down projections) as functions of (layer, layers)
KMIXES = {
    "q4k-s": ("q4k", lambda i, n: "q5k" if i < 4 else "q4k", lambda i, n: "q5k" if i < n // 8 else "q4k"),
    "q4k-m": ("q4k", lambda i, n: "q6k" if more_bits(i, n) else "q4k", lambda i, n: "q6k" if more_bits(i, n) else "q4k"),
    "q5k-s": ("q5k", lambda i, n: "q5k", lambda i, n: "q5k"),
    "q5k-m": ("q5k", lambda i, n: "q6k" if more_bits(i, n) else "q5k", lambda i, n: "q6k" if more_bits(i, n) else "q5k"),
}
OUTPUT = "q6k"  # every mix's output layer (and an embedding table tied to it)
_INDEX = re.compile(r"\.(\d+)\.")


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighths of `n` layers, and every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def is_mix(spec) -> bool:
    """Whether `spec` names one of KMIXES."""
    return isinstance(spec, str) and spec.strip().lower() in KMIXES


def kquant_mix(model: nn.Module, name: str, output: str | None, layers: list[str]) -> dict[str, str]:
    """{layer: format} for the mix `name` over the weight `layers` of `model` (output: its output layer's name,
    or None), with the embedding table: the output's format where the output is tied to it (the output layer
    then follows its table), else the mix's base. Attention values are the layers named `*.v_proj`, down projections `*.down_proj`, numbered by the first
    index in their names."""
    base, values, downs = KMIXES[name.strip().lower()]
    out = {}
    counts = {suffix: sorted({int(_INDEX.search(n)[1]) for n in layers if n.endswith(suffix) and _INDEX.search(n)})
              for suffix in (".v_proj", ".down_proj")}
    for layer in layers:
        fmt = base
        for suffix, rule in ((".v_proj", values), (".down_proj", downs)):
            idx = _INDEX.search(layer)
            if layer.endswith(suffix) and idx:
                fmt = rule(counts[suffix].index(int(idx[1])), len(counts[suffix]))
        out[layer] = OUTPUT if layer == output else fmt
    get = getattr(model, "get_input_embeddings", None)
    table = get() if callable(get) else None
    if isinstance(table, nn.Embedding):
        emb = next(n for n, m in model.named_modules() if m is table)
        head = model.get_submodule(output) if output else None
        if head is not None and getattr(head, "weight", None) is table.weight:  # tied: the table serves as both
            out.pop(output)
            out[emb] = OUTPUT
        else:
            out[emb] = base
    if not out:
        raise ShrinkError(f"format {name}: the model has no weight layers for llama.cpp's mix")
    return out
