"""How much memory the machine has free, the refusal of work that would not fit in it (before allocating),
and handing memory freed by a load back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache
from pathlib import Path

from .errors import ShrinkError


def available_memory() -> int | None:
    """Bytes of memory available now (MemAvailable), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits_memory(nbytes: int, what: str, detail: str = "") -> None:
    """Refuse to allocate `nbytes` for `what` when the machine does not have that much memory available;
    `detail` (default none) says in the message what the figure is made of."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise ShrinkError(f"{what} needs {nbytes / 1e9:,.1f} GB{detail}, more than the {avail / 1e9:,.1f} GB of "
                          "memory available; the file or its config is wrong, or the model is too large for this machine")


@lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> bool:
    """Return memory the C allocator holds freed to the system (glibc's malloc_trim); whether it could.
    Loading reads every tensor of a file into fresh memory and frees what it replaced; glibc keeps such
    blocks for reuse, so without this a loaded model's process stays larger than its tensors by about
    half the file (benchmarks/memory.py). A no-op where the C library has no malloc_trim."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
