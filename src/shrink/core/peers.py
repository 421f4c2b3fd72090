"""Peer tools shrink runs beside its own code when they are installed: llama.cpp (through llama-cpp-python)
as an evaluation runtime and to read an exported GGUF back. Whether one is here is asked in one place."""

from __future__ import annotations

import importlib.util

LLAMA_CPP_HINT = "llama-cpp-python is not installed; `bash scripts/setup.sh --llama-cpp` builds it (15-20 minutes)"


def llama_cpp_missing() -> str | None:
    """None when llama.cpp (llama-cpp-python) can be run here, else why not (with how to install it)."""
    return None if importlib.util.find_spec("llama_cpp") else LLAMA_CPP_HINT
