"""How much memory the machine has free, the refusal of work that would not fit in it (before allocating),
and handing memory freed by a load back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .errors import ShrinkError


def _proc_bytes(path: str, field: str) -> int | None:
    """A `field:  N kB` line of a /proc file, in bytes (None where it cannot be read)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> int | None:
    """Bytes of memory available now (MemAvailable), or None where it cannot be read."""
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def check_fits_memory(nbytes: int, what: str, detail: str = "") -> None:
    """Refuse to allocate `nbytes` for `what` when the machine does not have that much memory available;
    `detail` (default none) says in the message what the figure is made of."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise ShrinkError(f"{what} needs {nbytes / 1e9:,.1f} GB{detail}, more than the {avail / 1e9:,.1f} GB of "
                          "memory available; the file or its config is wrong, or the model is too large for this machine")


def resident_memory() -> int:
    """Bytes this process holds in memory now (VmRSS), 0 where it cannot be read."""
    return _proc_bytes("/proc/self/status", "VmRSS") or 0


@dataclass
class MemoryEstimate:
    """A job's peak memory, estimated before it starts from shapes, dtypes and options: what the process
    holds already, and what each phase adds (the peak is the largest phase: they do not overlap)."""

    what: str
    baseline: int
    phases: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> {part: bytes}

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: sum(self.phases[p].values())) if self.phases else ""

    @property
    def total(self) -> int:
        return self.baseline + (sum(self.phases[self.peak_phase].values()) if self.phases else 0)

    def line(self) -> str:
        parts = self.phases.get(self.peak_phase, {})
        shown = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 1e7)
        return (f"estimated peak memory {self.total / 1e9:.2f} GB ({self.what}; at its largest, {self.peak_phase}: "
                f"{shown + ' GB' if shown else 'each part under 0.01 GB'}, beside the {self.baseline / 1e9:.2f} GB the process holds)")

    def to_dict(self) -> dict:
        return {"what": self.what, "total_bytes": self.total, "baseline_bytes": self.baseline,
                "peak_phase": self.peak_phase, "phases": self.phases}

    def refuse_unless_fits(self, lower: str = "") -> None:
        """ShrinkError in one line when the estimate exceeds the memory available: the estimate, what is
        available, and `lower` (the options that lower it)."""
        avail = available_memory()
        if avail is not None and self.total > avail + self.baseline:
            raise ShrinkError(f"{self.what}: estimated peak memory {self.total / 1e9:.1f} GB ({self.peak_phase}), "
                              f"more than the {(avail + self.baseline) / 1e9:.1f} GB available"
                              f"{'; ' + lower if lower else ''}")


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
