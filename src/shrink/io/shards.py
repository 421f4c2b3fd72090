"""A Hugging Face folder's weights as one checkpoint, whether in one safetensors file or in shards listed by
`model.safetensors.index.json`: checked as a whole from the files' headers (nothing of the tensors is read),
then read a tensor at a time in its stored dtype, which is what lets a model larger than memory be walked
block by block.

The checks are the ones a damaged or hand-assembled shard set fails: an index that is not the JSON it
should be, a shard it names that is not in the folder, a tensor the index places in a shard whose header
does not hold it, a tensor held by two shards, a shard holding a tensor the index does not list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import ShrinkError
from ..core.readers import read_utf8
from .manifest import header_shapes

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a checkpoint is, and what its header says of it."""

    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: BF16, F32, ...


class Checkpoint:
    """The tensors of a folder's safetensors weights, by name. `Checkpoint(folder)` checks the index and every
    shard's header (ShrinkError naming the file and tensor); `tensor(name)` reads one tensor as stored."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            self.tensors = _sharded(self.folder, index)
        elif (self.folder / SINGLE).is_file():
            self.tensors = {k: StoredTensor(self.folder / SINGLE, tuple(s), d)
                            for k, (s, d) in header_shapes(self.folder / SINGLE).items()}
        else:
            raise ShrinkError(f"{self.folder}: no {SINGLE} nor {INDEX} (safetensors weights) in the folder")

    @property
    def files(self) -> list[Path]:
        """The weights files, in order."""
        return sorted({t.file for t in self.tensors.values()})

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read from its file in its stored dtype (a copy of its own, in aligned memory)."""
        from safetensors import safe_open

        stored = self.tensors.get(name)
        if stored is None:
            raise ShrinkError(f"{self.folder}: the weights hold no tensor {name!r}")
        with safe_open(str(stored.file), framework="pt") as f:
            return f.get_tensor(name).clone()


def _sharded(folder: Path, index: Path) -> dict[str, StoredTensor]:
    try:
        data = json.loads(read_utf8(index, "index file"))
    except (ValueError, RecursionError) as e:
        raise ShrinkError(f"{index}: not readable JSON ({str(e)[:120]})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise ShrinkError(f"{index}: 'weight_map' must map each tensor's name to the file holding it")
    for name, file in weight_map.items():
        if Path(file).name != file or not file.endswith(".safetensors"):
            raise ShrinkError(f"{index}: tensor {name!r} is placed in {file!r}, which is not a .safetensors file "
                              "beside the index")
    headers = {}
    for file in sorted(set(weight_map.values())):
        if not (folder / file).is_file():
            first = next(k for k, v in weight_map.items() if v == file)
            raise ShrinkError(f"{index}: places {first!r} in {file}, which is not in the folder")
        headers[file] = header_shapes(folder / file)
    holders: dict[str, list[str]] = {}
    for file, header in headers.items():
        for name in header:
            holders.setdefault(name, []).append(file)
    out = {}
    for name, files in holders.items():
        if len(files) > 1:
            raise ShrinkError(f"{folder}: tensor {name!r} is in two shards, {files[0]} and {files[1]}; which one "
                              "the model would get is not knowable")
        if name not in weight_map:
            raise ShrinkError(f"{folder / files[0]}: holds tensor {name!r}, which {INDEX} does not list")
        if weight_map[name] != files[0]:
            raise ShrinkError(f"{index}: places {name!r} in {weight_map[name]}, but it is in {files[0]}")
        shape, dtype = headers[files[0]][name]
        out[name] = StoredTensor(folder / files[0], tuple(shape), dtype)
    for name, file in weight_map.items():
        if name not in out:
            raise ShrinkError(f"{index}: places {name!r} in {file}, whose header does not hold it")
    return out

