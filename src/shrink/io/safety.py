"""What loading a model folder must never do: run the folder's code, or allocate more than the machine has.

transformers runs Python files from a model folder when its config.json or tokenizer_config.json names
them (`auto_map`) and the caller trusts remote code; without an explicit `trust_remote_code=False` it may
even ask on stdin. shrink passes False everywhere and, before that, refuses such a folder in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.errors import ShrinkError
from ..core.memory import available_memory, check_fits_memory  # noqa: F401 - here for the loaders

CODE_KEYS = ("auto_map",)
CONFIG_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
                "feature_extractor_config.json", "image_processor_config.json")


def refuse_custom_code(folder: str | os.PathLike) -> None:
    """Raise ShrinkError if a config file in `folder` asks to run code from the folder (`auto_map`)."""
    folder = Path(folder)
    for name in CONFIG_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ShrinkError(f"{path}: not readable JSON ({str(e)[:120]})") from None
        if isinstance(data, dict) and any(k in data for k in CODE_KEYS):
            raise ShrinkError(f"{path}: the folder asks to run its own Python code ('auto_map'); shrink never runs "
                              "code from a model folder. Remove 'auto_map' if the model is built into transformers")


DEPTH_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers")
MAX_DEPTH = 10_000  # the deepest models people run have a few hundred layers


def check_depths(config, where) -> None:
    """Layer counts a config gives are refused past MAX_DEPTH before any module is built: even on the meta
    device each layer is Python objects, so a million of them fill memory before any size check can run."""
    for name in DEPTH_FIELDS:
        n = getattr(config, name, None)
        if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_DEPTH):
            raise ShrinkError(f"{where}: {name!r} is {n!r}; a model has from 0 to {MAX_DEPTH:,} layers")


def _on_meta(cls, config, where):
    """The model `config` describes, all of it on the meta device (nothing allocated), its depth checked first."""
    import torch

    check_depths(config, where)
    try:
        with torch.device("meta"):
            return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    except Exception as e:
        raise ShrinkError(f"{where}: cannot build the model it describes ({type(e).__name__}: {str(e)[:200]})") from None


def check_config_fits(cls, config, where, dtype=None, extra_bytes: int = 0) -> None:
    """The parameters and buffers of the model `config` describes must fit in memory; counted on the meta
    device, so a config that names an absurd size allocates nothing. `where` names the file in errors.
    dtype: the dtype the load gives floating-point tensors (default: as the config builds them), so a bf16
    checkpoint loaded in float32 counts 4 bytes a weight; extra_bytes: what the load holds beside the model
    at its peak (default 0; a weights file being read)."""
    skeleton = _on_meta(cls, config, where)
    tensors = list(skeleton.parameters()) + list(skeleton.buffers())
    size = lambda t: t.element_size() if dtype is None or not t.is_floating_point() else dtype.itemsize  # noqa: E731
    model_bytes = sum(t.numel() * size(t) for t in tensors)
    detail = ""
    if dtype is not None:
        detail = f" ({model_bytes / 1e9:,.1f} GB of weights in {str(dtype).replace('torch.', '')}, as shrink loads them"
        detail += f", and {extra_bytes / 1e9:,.1f} GB of the weights file being read)" if extra_bytes else ")"
    check_fits_memory(model_bytes + extra_bytes, f"{where}: the model it describes", detail)


def skeleton_bytes(cls, config, where) -> int:
    """What building `cls(config)` with its parameters on the meta device holds at once: its largest
    parameter (each is made, then moved to the meta device) and its buffers (made for real), counted on
    the meta device first. ShrinkError naming `where` when the config cannot be built."""
    probe = _on_meta(cls, config, where)
    largest = max((p.numel() * p.element_size() for p in probe.parameters()), default=0)
    return largest + sum(b.numel() * b.element_size() for b in probe.buffers())


def read_config(folder: str | os.PathLike):
    """The Hugging Face config of `folder`, read without running anything of the folder's (a folder asking
    to run its own code is refused first); ShrinkError naming config.json when it cannot be read."""
    from transformers import AutoConfig

    folder = Path(folder)
    refuse_custom_code(folder)
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:
        raise ShrinkError(f"{folder / 'config.json'}: cannot read Hugging Face config ({type(e).__name__}: {e})") from None


def build_empty(cls, config, where):
    """`cls(config)` with its parameters on the meta device (no memory, no random initialisation: a file
    fills them) and its buffers built for real; ShrinkError naming `where` when it cannot be built."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):
            return cls(config)
    except Exception as e:
        raise ShrinkError(f"{where}: cannot build {cls.__name__} from it ({type(e).__name__}: {str(e)[:200]})") from None
