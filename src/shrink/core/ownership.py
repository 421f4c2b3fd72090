"""What shrink may replace or remove, and the temporaries it leaves while writing: the one owner of both
rules (atomic.py writes through them, outdir.py claims output folders with them).

- A model folder is shrink's when its shrink.json lists exactly the files in it (`is_own_folder`).
- A folder of compare, distill or search is shrink's when it holds the marker `.shrink-out.json` naming its
  command, and only the entries that command writes (`read_mark`).
- A folder shrink put in place (atomic.atomic_dir, atomic.swap_in) is shrink's while it holds no more than its
  seal `.shrink-files.json` lists, at the sizes listed (`seal`). `foreign_in` walks a folder by these rules,
  at any depth, and names the first thing that is not shrink's.
- Temporaries are folders `.NAME.PID.RANDOM.tmp|old` beside their target holding an owner record
  (`.shrink-owner.json`); only those whose recorded process is gone are removed by a later run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import ShrinkError

MARK = ".shrink-out.json"          # in a folder of compare, distill or search: the command that writes it
SEAL = ".shrink-files.json"        # inside a folder shrink put in place: what it held then
OWNER = ".shrink-owner.json"       # inside a temporary folder: the process that made it
MODEL_MANIFEST = "shrink.json"     # a model folder's list of its files (io.manifest reads the rest of it)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prefix(target: Path) -> str:
    # the process id lets a later run tell a killed run's leftovers from a running one's
    return f".{target.name}.{os.getpid()}."


def temporary_box(target: Path, suffix: str) -> Path:
    """A new folder `.NAME.PID.RANDOM<suffix>` beside `target` holding its owner's record (OWNER): only such
    folders, whose process is gone, are removed by a later run (remove_stale_temporaries)."""
    box = Path(tempfile.mkdtemp(dir=target.parent, prefix=_prefix(target), suffix=suffix))
    (box / OWNER).write_text(json.dumps({"pid": os.getpid(), "target": target.name}))
    return box


# temporary_box names temporaries .NAME.PID.RANDOM.tmp (and .old); _TEMP reads the name back
_TEMP = re.compile(r"^\.(.+)\.(\d+)\.[^.]+\.(tmp|old)$")


def _dead_owner(box: Path, pid: int) -> bool:
    """Whether `box` is a temporary folder shrink made (its owner record names process `pid`) and that
    process is gone. A file or folder that merely has such a name is not shrink's."""
    if box.is_symlink() or not box.is_dir():
        return False
    try:
        owner = json.loads((box / OWNER).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(owner, dict) and owner.get("pid") == pid and not _pid_alive(pid)


def restore_interrupted_swap(target: Path) -> bool:
    """Put back the folder a killed shrink had moved aside to replace `target` (atomic.swap_in), when it was
    killed before the new one took its place, so that `target` is never lost; True if it did."""
    target = Path(target)
    if target.exists() or not target.parent.is_dir():
        return False
    for p in target.parent.iterdir():
        m = _TEMP.match(p.name)
        if m and m.group(1) == target.name and m.group(3) == "old" and (p / "x").is_dir() \
                and _dead_owner(p, int(m.group(2))):
            os.replace(p / "x", target)
            print(f"note: restored {target} from {p}, moved aside by a shrink run that was killed while "
                  f"replacing it (process {m.group(2)})", file=sys.stderr)
            return True
    return False


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporary folders that a killed shrink left beside `target` (they record their owner
    process, and it is gone); returns what was removed. A line on stderr names each one. Anything else
    that merely looks like one is left alone."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    restore_interrupted_swap(target)
    removed = []
    for p in parent.iterdir():
        m = _TEMP.match(p.name)
        if not m or m.group(1) != target.name or not _dead_owner(p, int(m.group(2))):
            continue
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            removed.append(p)
            print(f"note: removed {p}, left by a shrink run that was killed (process {m.group(2)})", file=sys.stderr)
    return removed


def read_mark(path: Path) -> dict | None:
    """The marker of a folder written by shrink compare/distill/search, or None when it has none."""
    try:
        mark = json.loads((Path(path) / MARK).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return mark if isinstance(mark, dict) and isinstance(mark.get("command"), str) else None


def foreign_entries(path: Path, names: set[str]) -> list[str]:
    """Entries of `path` that are not among `names` (nor the marker, nor a temporary or lock of one of them)."""
    out = []
    for p in sorted(path.iterdir()):
        base = p.name
        m = _TEMP.match(base) or re.match(r"^\.(.+)\.lock$", base)
        if base in names or base == MARK or (m and m.group(1) in names):
            continue
        out.append(base)
    return out


def _listing(folder: Path) -> dict[str, int]:
    """{relative path: bytes (-1 for a folder, -2 for anything else)} of everything under `folder`."""
    out = {}
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if rel == SEAL:
            continue
        out[rel] = -2 if p.is_symlink() else -1 if p.is_dir() else p.stat().st_size if p.is_file() else -2
    return out


def seal(folder: Path) -> None:
    """Record in `folder` everything it holds now, so that a later run replaces or removes it only while it
    holds nothing more (foreign_in)."""
    folder = Path(folder)
    (folder / SEAL).unlink(missing_ok=True)
    (folder / SEAL).write_text(json.dumps({"entries": _listing(folder)}, sort_keys=True))


def _read_seal(folder: Path) -> dict | None:
    try:
        seal_ = json.loads((folder / SEAL).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    entries = seal_.get("entries") if isinstance(seal_, dict) else None
    return entries if isinstance(entries, dict) else None


def foreign_in(path: Path, names: Iterable[str] | None = None) -> Path | None:
    """The first thing under folder `path` that shrink did not write (None when there is none): a folder
    shrink sealed may hold only what its seal lists, at the sizes listed; a folder with a marker only the
    entries its command writes, each checked in turn; a model folder only what its shrink.json lists;
    any other folder (`students/`) only such folders. `names`: the entries allowed at the top (a claim's)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return path if path.is_symlink() or path.exists() else None
    entries = _read_seal(path)
    if entries is not None:
        for rel, size in sorted(_listing(path).items()):
            if rel not in entries or size != entries[rel] or size == -2:
                return path / rel
        return None
    mark = read_mark(path) if names is None else {"names": list(names)}
    if mark is not None:
        allowed = set(mark.get("names") or ())
        extra = foreign_entries(path, allowed)
        if extra:
            return path / extra[0]
        for p in sorted(path.iterdir()):
            if p.is_symlink():
                return p
            found = foreign_in(p) if p.is_dir() and p.name in allowed else None
            if found is not None:
                return found
        return None
    if is_own_folder(path):
        return None
    for p in sorted(path.iterdir()):
        if p.is_symlink() or not p.is_dir():
            return p
        if _read_seal(p) is None and read_mark(p) is None and not is_own_folder(p):
            return p
        found = foreign_in(p)
        if found is not None:
            return found
    return None


def check_replaceable(target: Path, replaceable: Callable[[Path], bool] | None) -> None:
    """Raise ShrinkError unless `target` is absent, an empty folder, or one shrink may replace:
    `replaceable(target)`, or by default nothing in it that shrink did not write (foreign_in)."""
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ShrinkError(f"{target} exists and is not a folder shrink wrote; it is never replaced")
    if not target.exists() or not any(target.iterdir()):
        return
    if replaceable is not None:
        if replaceable(target):
            return
        raise ShrinkError(f"{target} exists and is not a folder shrink wrote; it is never replaced: move it away")
    found = foreign_in(target)
    if found is not None:
        raise ShrinkError(f"{found}: shrink did not write this, so {target} is never replaced or removed; "
                          "move it away")


def remove_own(path: Path) -> None:
    """Remove folder `path` (nothing if absent) after checking that nothing in it is a user's (foreign_in)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    check_replaceable(path, None)
    shutil.rmtree(path)


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _present(directory: Path) -> dict[str, int]:
    """{relative path: bytes} of the files under `directory` (anything not a plain file: -2), and -1 for a
    folder that holds none of them (an empty folder is something shrink did not write, too); the seal aside."""
    listing = _listing(directory)
    files = {rel: size for rel, size in listing.items() if size != -1}
    parents = {q.as_posix() for rel in files for q in Path(rel).parents}
    return {**files, **{rel: -1 for rel, size in listing.items() if size == -1 and rel not in parents}}


def is_own_folder(directory: str | Path) -> bool:
    """True if `directory` is exactly what shrink saved as a model folder: its shrink.json lists every other
    file in it, with the same sizes and contents (the weights file by size alone, for speed), and nothing
    else is in it. Only such a folder is shrink's to replace. (Reading shrink.json for loading, with its
    whole schema, is io.manifest's.)"""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MODEL_MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not files or not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()):
        return False
    present = _present(directory)
    present.pop(MODEL_MANIFEST, None)
    if present != {k: v["bytes"] for k, v in files.items()}:
        return False
    return all(sha256(directory / k) == v["sha256"] for k, v in files.items() if not k.endswith(".safetensors"))
