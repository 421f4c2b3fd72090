"""Write files and folders so that a crash or an error never leaves a half-written result behind."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .ownership import check_replaceable, remove_stale_temporaries, restore_interrupted_swap, seal, temporary_box


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary file's path beside `path` (inside a temporary folder that records its owner
    process); on success it becomes `path` by an atomic rename, on error it is removed. What a killed
    run left beside `path` is removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    box = temporary_box(path, ".tmp")
    tmp = box / path.name
    tmp.touch()
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(box, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and an atomic rename."""
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | Path, data) -> None:
    """Atomically write `data` as indented JSON."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_dir(target: str | Path, replaceable=None, sealed: bool = True):
    """Yield a temporary folder beside `target`; on success it becomes `target`, on error it is removed.

    An existing `target` is replaced only if it is empty, or `replaceable(target)` is true (default: it is
    a folder shrink wrote, ownership.foreign_in finds nothing else in it); otherwise ShrinkError is raised
    before anything is written. The new folder is sealed (ownership.seal, unless `sealed` is False: model
    folders, whose shrink.json lists their files already) so that a later run can tell it is shrink's.
    """
    target = Path(target)
    remove_stale_temporaries(target)
    check_replaceable(target, replaceable)
    target.parent.mkdir(parents=True, exist_ok=True)
    box = temporary_box(target, ".tmp")
    tmp = box / "x"
    tmp.mkdir()
    try:
        yield tmp
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o666 & ~mask)
        swap_in(tmp, target, check=False, sealed=sealed)
    finally:
        shutil.rmtree(box, ignore_errors=True)


def restore(target: str | Path) -> bool:
    """Put back the folder that `swap_in` had moved aside when its process was killed before the new one
    took its place (ownership.restore_interrupted_swap); True if it did. For readers such as a resume."""
    return restore_interrupted_swap(Path(target))


def swap_in(src: Path, target: Path, check: bool = True, sealed: bool = True) -> None:
    """Make folder `src` the new `target`, sealed as shrink's (ownership.seal): an existing one is moved aside
    first (to a temporary that a dead process's successor removes) and deleted only once the new one is in
    place. With `check` (default), an existing `target` that holds anything shrink did not write is
    refused (ShrinkError) and left as it is."""
    if sealed:
        seal(src)
    if check:
        check_replaceable(target, None)
    if target.exists():
        old = temporary_box(target, ".old")
        os.replace(target, old / "x")
        os.replace(src, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, target)
