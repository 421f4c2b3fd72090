"""Calibration data: the user's text or tensors, turned into model inputs, with the split recorded.

A calibration source is a text file (.txt: the whole text), a JSON Lines file (.jsonl: one object a
line with a "text" field, or "input" and optional "target"), or an iterable of tensors (token ids for
language models, input tensors otherwise). Text is tokenized and cut into non-overlapping windows of
`seq_len` tokens; the first `n_samples` windows are used. What was used is described by
`CalibrationData.record` (file, hash, token range), which shrink.json keeps.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import ShrinkError
from ..core.readers import read_texts, token_windows

DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 512


@dataclass
class CalibrationData:
    """Model inputs for calibration, and a record of where they came from."""

    samples: list[torch.Tensor]
    record: dict = field(default_factory=dict)


def check_tokenizer(tokenizer, model, where: str) -> None:
    """Refuse a tokenizer whose vocabulary does not fit the model's embedding."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ShrinkError(
            f"{where}: tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab}; "
            "the tokenizer does not match the model"
        )


def from_file(path: str | Path, tokenizer, model=None, n_samples: int = DEFAULT_SAMPLES,
              seq_len: int = DEFAULT_SEQ_LEN) -> CalibrationData:
    """Calibration windows from a text or JSON Lines file (defaults: 128 windows of 512 tokens)."""
    path = Path(path)
    if tokenizer is None:
        raise ShrinkError(f"{path}: a tokenizer is needed to read text calibration data")
    if model is not None:
        check_tokenizer(tokenizer, model, str(path))
    windows, total = token_windows(read_texts(path, "calibration file"), tokenizer, seq_len, n_samples)
    if not len(windows):
        raise ShrinkError(f"{path}: {total} tokens, shorter than one calibration sequence of {seq_len}")
    n = len(windows)
    samples = [w.unsqueeze(0) for w in windows]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    record = {"source": str(path), "sha256": digest, "samples": n, "seq_len": seq_len,
              "tokens_used": [0, n * seq_len], "tokens_in_file": int(total)}
    return CalibrationData(samples, record)


def from_tensors(items, model=None) -> CalibrationData:
    """Calibration from an iterable of tensors (token ids [L] or [1, L], or model inputs)."""
    samples = []
    for i, t in enumerate(items):
        if not torch.is_tensor(t):
            raise ShrinkError(f"calibration item {i}: expected a tensor, got {type(t).__name__}")
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if not t.is_floating_point():
            vocab = getattr(getattr(model, "config", None), "vocab_size", None)
            if vocab is not None and int(t.max()) >= vocab:
                raise ShrinkError(f"calibration item {i}: token id {int(t.max())} is outside the model's vocabulary "
                                  f"({vocab}); the tokenizer does not match the model")
        samples.append(t)
    if not samples:
        raise ShrinkError("calibration data is empty")
    return CalibrationData(samples, {"source": "tensors", "samples": len(samples)})


def prepare(calibration, tokenizer=None, model=None, n_samples: int = DEFAULT_SAMPLES,
            seq_len: int = DEFAULT_SEQ_LEN) -> CalibrationData:
    """Whatever the user passed (path, CalibrationData, or iterable of tensors) as CalibrationData."""
    if isinstance(calibration, CalibrationData):
        return calibration
    if isinstance(calibration, (str, Path)):
        return from_file(calibration, tokenizer, model, n_samples, seq_len)
    return from_tensors(calibration, model)
