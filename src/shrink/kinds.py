"""What a model is, by what it can do (transformers' own registries of model classes), not by its class
name: one answer shared by evaluation, distillation and search."""

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
