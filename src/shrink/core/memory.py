"""How much memory the machine has free, and the refusal of work that would not fit in it (before allocating)."""

from __future__ import annotations

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


def check_fits_memory(nbytes: int, what: str) -> None:
    """Refuse to allocate `nbytes` for `what` when the machine does not have that much memory available."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise ShrinkError(f"{what} needs {nbytes / 1e9:,.1f} GB, more than the {avail / 1e9:,.1f} GB of memory "
                          "available; the file or its config is wrong, or the model is too large for this machine")
