"""Teacher outputs cached on disk: the top-k logits at every position of the training data, so that
later epochs (and resumed or repeated runs) do not run the teacher again.

The file is named by what determines its content (the data's fingerprint, a fingerprint of the teacher's
weights, k), written atomically, and reused only when all three match.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..core.atomic import atomic_dir
from ..core.model_outputs import main_output
from .data import DistillData, split_padded


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's tensors' names, shapes and a strided sample of their values."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def teacher_topk(teacher: nn.Module, data: DistillData, k: int = 32, cache_dir: str | Path | None = None,
                 batch_size: int = 8, progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values fp16, indices int32) of the teacher's k largest logits for every training example
    (classifiers: [N, k]) or position (LMs: [N, L - 1, k]), computed once and cached in cache_dir."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"teacher-{model_fingerprint(teacher)}-{data.fingerprint}-k{k}"
        if (path / "topk.safetensors").is_file():
            try:
                t = load_file(str(path / "topk.safetensors"))
                if len(t["values"]) == len(data.train_x):
                    return t["values"], t["indices"]
            except (SafetensorError, KeyError):
                pass  # damaged or foreign file: compute again and replace it
    teacher.eval()
    vals, idxs = [], []
    n = len(data.train_x)
    for i in tqdm(range(0, n, batch_size), desc="teacher top-k", unit="batch",
                  disable=None if progress is None else not progress):
        x = data.train_x[i:i + batch_size]
        if data.kind == "text":
            logits = teacher(x, use_cache=False).logits[:, :-1]
        elif data.padded:
            ids, mask = split_padded(x)
            logits = teacher(input_ids=ids, attention_mask=mask).logits
        else:
            logits = main_output(teacher(x))
        v, ix = logits.float().topk(min(k, logits.shape[-1]), -1)
        vals.append(v.half())
        idxs.append(ix.int())
    values, indices = torch.cat(vals), torch.cat(idxs)
    if path is not None:
        with atomic_dir(path, replaceable=lambda p: True) as tmp:
            save_file({"values": values.contiguous(), "indices": indices.contiguous()}, str(tmp / "topk.safetensors"))
    return values, indices
