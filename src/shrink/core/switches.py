"""Every environment variable shrink honours, read here and nowhere else (the compiled kernel reads
SHRINK_VNNI itself, at its first call, by the rule written here). docs/cli.md lists them from SWITCHES.

Each is read when asked, not at import, so a test or a user can set it in the process before the work.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ShrinkError

# name -> (default, what it does)
SWITCHES = {
    "SHRINK_BACKEND": ("auto", "kernel for quantized layers: auto (the compiled kernel where the shapes allow), "
                               "native (the compiled kernel or an error), torch (PyTorch alone)"),
    "SHRINK_NATIVE": ("1", "0 turns all compiled code off (the kernel and the decoding runtime): PyTorch paths only"),
    "SHRINK_RUNTIME": ("1", "0 turns shrink's decoding runtime off: transformers decodes and scores"),
    "SHRINK_VNNI": ("1", "0 makes the compiled kernel run its AVX2 loops on a CPU with AVX512-VNNI"),
    "SHRINK_CACHE": ("$XDG_CACHE_HOME/shrink or ~/.cache/shrink", "where compiled code, converted models and "
                                                                  "tasks are kept between runs"),
    "SHRINK_LLAMA_CPP_DIR": ("~/.cache/llama.cpp-*", "a llama.cpp source folder whose converter's table of "
                                                     "pre-tokenizers the GGUF export reads (as data)"),
    "WORLD_SIZE": ("1", "set by torchrun: distillation and calibrated quantization join a process group when it "
                        "is more than 1"),
}
BACKENDS = ("auto", "native", "torch")


def _get(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def backend() -> str:
    """SHRINK_BACKEND (auto, native or torch; default auto)."""
    b = _get("SHRINK_BACKEND") or "auto"
    if b not in BACKENDS:
        raise ShrinkError(f"SHRINK_BACKEND={b!r}: expected one of {', '.join(BACKENDS)}")
    return b


def native_enabled() -> bool:
    """False when SHRINK_NATIVE=0."""
    return _get("SHRINK_NATIVE") != "0"


def runtime_enabled() -> bool:
    """False when SHRINK_RUNTIME=0."""
    return _get("SHRINK_RUNTIME") != "0"


def vnni_enabled() -> bool:
    """False when SHRINK_VNNI=0 (the kernel's C++ applies the same rule)."""
    return _get("SHRINK_VNNI") != "0"


def cache_root() -> Path:
    """SHRINK_CACHE, else $XDG_CACHE_HOME/shrink, else ~/.cache/shrink."""
    if _get("SHRINK_CACHE"):
        return Path(os.environ["SHRINK_CACHE"])
    return Path(_get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")) / "shrink"


def llama_cpp_dirs() -> list[Path]:
    """SHRINK_LLAMA_CPP_DIR if set, then the llama.cpp folders scripts and benchmarks build in ~/.cache."""
    given = [Path(os.environ["SHRINK_LLAMA_CPP_DIR"])] if _get("SHRINK_LLAMA_CPP_DIR") else []
    return given + sorted(Path.home().glob(".cache/llama.cpp-*"))


def world_size() -> int:
    """WORLD_SIZE as torchrun sets it (default 1)."""
    value = _get("WORLD_SIZE") or "1"
    try:
        return int(value)
    except ValueError:
        raise ShrinkError(f"WORLD_SIZE={value!r}: expected a whole number (torchrun sets it)") from None
