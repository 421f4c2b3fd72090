"""Where shrink keeps files between runs."""

from __future__ import annotations

from pathlib import Path


def cache_dir() -> Path:
    """shrink's cache: $SHRINK_CACHE, else $XDG_CACHE_HOME/shrink, else ~/.cache/shrink."""
    from .switches import cache_root

    return cache_root()
