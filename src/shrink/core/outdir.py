"""Output folders: shrink writes only into a folder that is new, empty, or exactly what shrink itself
wrote there before, one writer at a time, and it says so before any work starts.

`claim(path, command, names)` is held for the whole of a command's work:
- a lock file beside the folder (`.NAME.lock`, with the holder's process id) keeps a second shrink from
  writing to it at the same time; the operating system releases it when the holder dies, so a killed run
  leaves no lock that blocks the next;
- a folder that is not empty is refused unless it is shrink's own output of the same command and the
  caller said `force` (start again: shrink's files are removed) or `resume` (continue it);
- temporary folders left beside it by a killed run are removed, and said so;
- a folder that cannot be written is refused at once, not after the work.

Which folders are shrink's, at any depth, and which temporaries: ownership.py. Nothing else is ever
replaced or removed: a user's file inside `best/` makes the whole folder the user's.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from . import VERSION
from .atomic import write_json
from .errors import ShrinkError
from .ownership import (
    MARK,
    foreign_entries,
    foreign_in,
    read_mark,
    remove_own,
    remove_stale_temporaries,
    restore_interrupted_swap,
)

_held: dict[str, int] = {}  # folders this process holds, so that a nested claim (CLI, then API) is a no-op


def _key(path: Path) -> str:
    return os.path.abspath(path)


class _Lock:
    """An advisory lock on `.NAME.lock` beside the folder; released by close or by the process's death."""

    def __init__(self, path: Path, command: str):
        self.path = path
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise ShrinkError(f"{path}: a symbolic link where shrink keeps its lock; shrink never follows "
                                      "it (it would overwrite what it points to): remove it") from None
                raise ShrinkError(f"{path}: cannot open the lock file ({e.strerror})") from None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (st.st_size and not _is_lock_record(fd)):
                os.close(fd)
                raise ShrinkError(f"{path}: exists and is not a lock file of shrink's; shrink keeps its lock "
                                  "under this name and never overwrites another file: move it away")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise ShrinkError(f"{path.parent / path.name[1:-5]}: another shrink ({_holder(path)}) is writing "
                                  "it; wait for it to finish, or choose another output") from None
            # the previous holder may have removed the file between our open and our lock: then lock anew
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": command}).encode())
        self.fd = fd

    def release(self) -> None:
        try:
            os.unlink(self.path)  # while still held, so nobody can lock the file being removed
        except FileNotFoundError:
            pass
        os.close(self.fd)


def _is_lock_record(fd: int) -> bool:
    """Whether the open file holds a lock record as _Lock writes it (a process id and a command)."""
    data = os.pread(fd, 4096, 0)
    try:
        info = json.loads(data)
    except ValueError:
        return False
    return isinstance(info, dict) and set(info) == {"pid", "command"}


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text())
        return f"shrink {info.get('command')}, process {int(info['pid'])}"
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return "a process"


def _check_contents(path: Path, command: str, names: set[str], force: bool, resume: bool | None,
                    owned: Callable[[Path], bool] | None) -> bool:
    """Refuse a non-empty folder that is not this command's own output; returns whether it is one that
    is to be started afresh (force, with marker-kept files to remove)."""
    if not path.exists():
        return False
    if not path.is_dir():
        raise ShrinkError(f"{path} exists and is not a folder; choose another --out")
    entries = [p for p in path.iterdir()]
    if not entries:
        return False
    hint = "--force to replace it" if resume is None else "--resume to continue it, or --force to start again"
    if owned is not None:  # a model folder: shrink.json lists its files
        if owned(path):
            if force:
                return False
            raise ShrinkError(f"{path} holds a model shrink saved earlier; pass --force (force=True) to replace it, "
                              "or choose another --out")
        raise ShrinkError(f"{path} exists and is not empty, and is not a folder shrink wrote exactly as it is "
                          "(other files in it, or files changed); shrink replaces only its own output: "
                          "choose another --out, or empty it yourself")
    mark = read_mark(path)
    foreign = foreign_entries(path, names)
    if mark is None and not (resume and not foreign):  # resume: folders written before markers existed
        raise ShrinkError(f"{path} exists and is not empty, and was not written by shrink {command}; "
                          "shrink replaces only its own output: choose another --out, or empty it yourself")
    if mark is not None and mark["command"] != command:
        raise ShrinkError(f"{path} holds the output of shrink {mark['command']}, not of shrink {command}; "
                          "choose another --out")
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ShrinkError(f"{path} holds files shrink {command} did not write ({shown}); shrink replaces only its "
                          "own output: choose another --out, or move them away")
    deep = foreign_in(path, names)
    if deep is not None:
        raise ShrinkError(f"{deep}: shrink {command} did not write this, and never replaces or removes what it did "
                          f"not write; move it out of {path}, or choose another --out")
    if resume:
        return False
    if not force:
        raise ShrinkError(f"{path} holds the output of an earlier shrink {command}; pass {hint}, "
                          "or choose another --out")
    return True


def _check_writable(path: Path) -> None:
    """Refuse at once a place that cannot be written (read-only, no permission), before the work."""
    where = path if path.exists() else path.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ShrinkError(f"{where}: cannot create the output folder ({e.strerror})") from None
    probe = where / f".shrink-probe.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ShrinkError(f"{where}: cannot write there ({e.strerror}); choose another --out") from None


@contextmanager
def claim(path: str | os.PathLike, command: str, names: Iterable[str] = (), *, force: bool = False,
          resume: bool | None = None, owned: Callable[[Path], bool] | None = None, keep: Iterable[str] = ()):
    """Hold `path` as the output folder of `command` for the duration of the block (see the module doc).

    names: the entries the command writes at the top of the folder (for folders with a marker).
    owned: for model folders, a test that the folder is exactly what shrink saved (then no marker is
    written: the folder is made whole at the end by an atomic save). force: replace shrink's own output
    (default False). resume: continue shrink's own output (None: the command cannot resume).
    keep: entries among `names` that starting afresh (force) leaves in place, for the command to reuse
    when they still hold (it checks them itself; default none).
    Nested claims of one folder in one process are allowed and do nothing. An error inside the block
    leaves no folder behind if the claim made it and nothing but the marker was written.
    """
    if force and resume:
        raise ShrinkError(f"{path}: --resume (resume=True) continues shrink's output there and --force (force=True) "
                          "starts it again: give one of them")
    path = Path(path)
    key = _key(path)
    if key in _held:
        _held[key] += 1
        try:
            yield path
        finally:
            _held[key] -= 1
        return
    if path.exists() and not path.is_dir():
        raise ShrinkError(f"{path} exists and is not a folder; choose another --out")
    _check_writable(path)
    lock = _Lock(path.parent / f".{path.name}.lock", command)
    created = False
    marked = False
    try:
        restore_interrupted_swap(path)
        names = set(names)
        fresh = _check_contents(path, command, names, force, resume, owned)
        remove_stale_temporaries(path)  # only once the folder is known to be shrink's to write
        if owned is None:
            if fresh:
                for name in (names - set(keep)) | {MARK}:
                    p = path / name
                    if p.is_dir() and not p.is_symlink():
                        remove_own(p)
                    elif p.exists() or p.is_symlink():
                        p.unlink()
            created = not path.exists()
            path.mkdir(parents=True, exist_ok=True)
            if read_mark(path) is None:
                write_json(path / MARK, {"command": command, "shrink_version": VERSION, "names": sorted(names)})
                marked = True
        _held[key] = 1
        ok = False
        try:
            yield path
            ok = True
        finally:
            _held.pop(key, None)
            if not ok and created and path.is_dir() and [p.name for p in path.iterdir()] == [MARK]:
                shutil.rmtree(path, ignore_errors=True)  # nothing was written: leave nothing behind
            elif not ok and marked and not created and not fresh:
                # a resume of a folder without a marker that failed: it is not known to be shrink's
                (path / MARK).unlink(missing_ok=True)
    finally:
        lock.release()


@contextmanager
def lock_beside(target: str | os.PathLike, command: str):
    """Hold the lock of output `target` (a file, such as an exported GGUF) for the block: `.NAME.lock` beside it,
    as `claim` takes for folders, so that two shrinks never write one output at once."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = _Lock(target.parent / f".{target.name}.lock", command)
    try:
        yield target
    finally:
        lock.release()


def holds(path: str | os.PathLike) -> bool:
    """Whether this process holds `path` through `claim`."""
    return _key(Path(path)) in _held
