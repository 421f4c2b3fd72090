"""Where shrink keeps files between runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """shrink's cache: $SHRINK_CACHE, else $XDG_CACHE_HOME/shrink, else ~/.cache/shrink."""
    if os.environ.get("SHRINK_CACHE"):
        return Path(os.environ["SHRINK_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "shrink"
