"""Write files and folders so that a crash or an error never leaves a half-written result behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _prefix(target: Path) -> str:
    # the process id lets a later run tell a killed run's leftovers from a running one's (outdir.py)
    return f".{target.name}.{os.getpid()}."


@contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary file's path beside `path`; on success it becomes `path` by an atomic rename, on
    error it is removed. What a killed run left beside `path` is removed first."""
    from .outdir import remove_stale_temporaries

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
def atomic_dir(target: str | Path, replaceable=lambda p: False):
    """Yield a temporary folder beside `target`; on success it becomes `target`, on error it is removed.

    An existing `target` is replaced only if it is empty or `replaceable(target)` is true; otherwise
    FileExistsError is raised before anything is written.
    """
    from .outdir import remove_stale_temporaries

    target = Path(target)
    remove_stale_temporaries(target)
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a folder")
        if any(target.iterdir()) and not replaceable(target):
            raise FileExistsError(f"{target} exists and is not empty; choose another folder or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_prefix(target), suffix=".tmp"))
    try:
        yield tmp
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o666 & ~mask)
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def restore(target: str | Path) -> bool:
    """Put back the folder that `swap_in` had moved aside when its process was killed before the new one
    took its place (outdir.restore_interrupted_swap); True if it did. For readers such as a resume."""
    from .outdir import restore_interrupted_swap

    return restore_interrupted_swap(Path(target))


def swap_in(src: Path, target: Path) -> None:
    """Make folder `src` the new `target`: an existing one is moved aside first (to a temporary that a dead
    process's successor removes) and deleted only once the new one is in place."""
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=_prefix(target), suffix=".old"))
        os.replace(target, old / "x")
        os.replace(src, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, target)
