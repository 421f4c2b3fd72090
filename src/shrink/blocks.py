"""A model's stacks of repeated blocks (a decoder's layers; an encoder's; both stacks of an encoder-decoder),
found from its structure: what calibration walks block by block and what a student takes a subset of."""

from __future__ import annotations

import torch.nn as nn


def _size(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())


def find_stacks(model: nn.Module, min_blocks: int = 2) -> list[tuple[str, nn.ModuleList]]:
    """The model's stacks of repeated blocks, in the order they are defined (an encoder before its
    decoder): ModuleLists of `min_blocks` (default 2) or more modules of one type holding Linear layers,
    none inside another, each at least a tenth of the largest (small lists elsewhere, such as heads, are
    not stacks). min_blocks=1 also finds the one-block stack of a one-layer student."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= min_blocks and len({type(c) for c in m}) == 1 and \
                any(isinstance(x, nn.Linear) for x in m.modules()):
            found.append((name, m))
    found = [(n, m) for n, m in found if not any(n != o and n.startswith(o + ".") for o, _ in found)]
    if not found:
        return []
    largest = max(_size(m) for _, m in found)
    return [(n, m) for n, m in found if _size(m) * 10 >= largest]
