"""What a candidate costs on this machine: bytes on disk, bytes in memory, time per generated token."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

from ...core.architecture import is_causal_lm
from ...evaluate.paired import model_bytes
from ...io import read_manifest, save
from ...io.manifest import weights_file
from ...io.shards import Checkpoint

__all__ = ["disk_bytes", "memory_bytes", "seconds_per_token", "weights_bytes"]

memory_bytes = model_bytes  # parameters and buffers as held in memory, tied tensors once


def disk_bytes(model: nn.Module, folder: Path, tokenizer=None) -> int:
    """Save `model` to `folder` as shrink saves any model and return the size of its weights file
    (config, manifest and tokenizer are the same few kilobytes for every candidate)."""
    save(model, folder, tokenizer=tokenizer)
    return weights_bytes(folder)


def weights_bytes(folder: Path) -> int:
    """The size of the weights files of the model shrink saved in `folder` (one file or shards)."""
    return sum(f.stat().st_size for f in Checkpoint(folder, weights_file(read_manifest(folder))).files)


@torch.no_grad()
def seconds_per_token(model: nn.Module, tokenizer, new_tokens: int = 32, repeats: int = 2) -> float | None:
    """Greedy decoding speed of a Hugging Face causal LM: seconds per new token after a short prompt,
    the best of `repeats` runs (None for models that do not generate)."""
    if tokenizer is None or not is_causal_lm(model):
        return None
    ids = tokenizer("The quick brown fox jumps over the lazy dog. Once upon a time", return_tensors="pt").input_ids
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        best = min(best, time.perf_counter() - t0)
    return best / new_tokens
