"""Reading the user's array files (.npz without pickle, .safetensors) into numpy arrays."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import ShrinkError


def read_arrays(path: str | os.PathLike, what: str = "data file", required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """All arrays of a .npz (loaded with allow_pickle=False) or .safetensors file; errors name the file
    (called `what`) and any of the `required` arrays it lacks."""
    path = Path(path)
    if not path.is_file():
        raise ShrinkError(f"{path}: no such {what}")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
    except Exception as e:
        raise ShrinkError(f"{path}: cannot read tensors ({type(e).__name__}: {e})") from None
    for key in required:
        if key not in arrays:
            raise ShrinkError(f"{path}: missing array {key!r} (have {sorted(arrays)})")
    return arrays
