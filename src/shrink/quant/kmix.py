"""llama.cpp's K-quant mixes (Q2_K as q2k-m, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M) as shrink formats per layer.

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

# mix -> its base format and, per role (attention values, down projections, attention outputs), the format as a
# function of the layer's index i among that role's layers, their number n and the model's query heads per kv head
KMIXES = {
    "q2k-m": ("q2k", {"v_proj": lambda i, n, gqa: "q4k" if gqa >= 4 else "q3k", "down_proj": lambda i, n, gqa: "q3k",
                      "o_proj": lambda i, n, gqa: "q3k"}),
    "q3k-s": ("q3k", {}),
    "q3k-m": ("q3k", {"v_proj": lambda i, n, gqa: "q5k" if i < 2 else "q4k",
                      "down_proj": lambda i, n, gqa: "q5k" if i < n // 16 else "q4k", "o_proj": lambda i, n, gqa: "q4k"}),
    "q3k-l": ("q3k", {"v_proj": lambda i, n, gqa: "q5k", "down_proj": lambda i, n, gqa: "q5k",
                      "o_proj": lambda i, n, gqa: "q5k"}),
    "q4k-s": ("q4k", {"v_proj": lambda i, n, gqa: "q5k" if i < 4 else "q4k",
                      "down_proj": lambda i, n, gqa: "q5k" if i < n // 8 else "q4k"}),
    "q4k-m": ("q4k", {"v_proj": lambda i, n, gqa: "q6k" if more_bits(i, n) else "q4k",
                      "down_proj": lambda i, n, gqa: "q6k" if more_bits(i, n) else "q4k"}),
    "q5k-s": ("q5k", {}),
    "q5k-m": ("q5k", {"v_proj": lambda i, n, gqa: "q6k" if more_bits(i, n) else "q5k",
                      "down_proj": lambda i, n, gqa: "q6k" if more_bits(i, n) else "q5k"}),
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
    base, rules = KMIXES[name.strip().lower()]
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    gqa = heads // (getattr(config, "num_key_value_heads", None) or heads) if heads else 1
    index = {role: sorted({int(_INDEX.search(n)[1]) for n in layers if n.endswith("." + role) and _INDEX.search(n)})
             for role in rules}
    out = {}
    for layer in layers:
        fmt = base
        role = layer.rpartition(".")[2]
        idx = _INDEX.search(layer)
        if role in rules and idx:
            fmt = rules[role](index[role].index(int(idx[1])), len(index[role]), gqa)
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
