"""What a model is and where its blocks are. Its kind by what it can do (transformers' own registries of model
classes), not by its class name; its stacks of repeated blocks (a decoder's layers; an encoder's; both stacks
of an encoder-decoder) found from its structure, which calibration walks block by block and a student takes a
subset of. One answer shared by evaluation, quantization, distillation and search."""

from __future__ import annotations

import torch.nn as nn

CAUSAL_LM = "causal LM"
SEQ2SEQ = "encoder-decoder"
SEQUENCE_CLASSIFIER = "sequence classifier"
ENCODER = "encoder"
MASKED_LM = "masked LM"
TENSOR = "tensor classifier"


def _registered(model: nn.Module, mapping: str) -> bool:
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        return False
    return type(model).__name__ in set(getattr(modeling_auto, mapping, {}).values())


def is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` is a Hugging Face causal language model, by transformers' own registry of them
    (GPT2LMHeadModel and the like included), not by its class name."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    return (_registered(model, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES") or type(model).__name__.endswith("ForCausalLM")
            or (hasattr(model, "generate") and getattr(config, "is_decoder", False)))


def model_kind(model: nn.Module) -> str:
    """One of CAUSAL_LM, SEQ2SEQ, SEQUENCE_CLASSIFIER, MASKED_LM, ENCODER (a Hugging Face model without a
    task head) or TENSOR (anything else: a plain PyTorch module taking one tensor)."""
    config = getattr(model, "config", None)
    if is_causal_lm(model):
        return CAUSAL_LM
    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "generate"):
        return SEQ2SEQ
    if config is None:
        return TENSOR
    if (_registered(model, "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES")
            or type(model).__name__.endswith("ForSequenceClassification")):
        return SEQUENCE_CLASSIFIER
    if _registered(model, "MODEL_FOR_MASKED_LM_MAPPING_NAMES") or type(model).__name__.endswith("ForMaskedLM"):
        return MASKED_LM
    if _registered(model, "MODEL_MAPPING_NAMES"):
        return ENCODER
    return TENSOR


def _size(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())


def find_stacks(model: nn.Module, min_blocks: int = 2, layers: tuple = (nn.Linear,)) -> list[tuple[str, nn.ModuleList]]:
    """The model's stacks of repeated blocks, in the order they are defined (an encoder before its
    decoder): ModuleLists of `min_blocks` (default 2) or more modules of one type holding layers of the
    types `layers` (default Linear), none inside another, each at least a tenth of the largest (small lists
    elsewhere, such as heads, are not stacks). min_blocks=1 also finds the one-block stack of a one-layer
    student."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= min_blocks and len({type(c) for c in m}) == 1 and \
                any(isinstance(x, layers) for x in m.modules()):
            found.append((name, m))
    found = [(n, m) for n, m in found if not any(n != o and n.startswith(o + ".") for o, _ in found)]
    if not found:
        return []
    largest = max(_size(m) for _, m in found)
    return [(n, m) for n, m in found if _size(m) * 10 >= largest]
