"""A folder's weights as one checkpoint, whether in one safetensors file or in shards listed by an index
(`model.safetensors.index.json`, Hugging Face's convention): checked as a whole from the files' headers
(nothing of the tensors is read), then read a module at a time in its stored dtype, which is what lets a
model larger than memory be walked block by block; and `ShardWriter`, which writes one the same way.

The checks are the ones a damaged or hand-assembled shard set fails: an index that is not the JSON it
should be, a shard it names that is not in the folder, a tensor the index places in a shard whose header
does not hold it, a tensor held by two shards, a shard holding a tensor the index does not list.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import ShrinkError
from ..core.readers import read_utf8
from .manifest import header_shapes

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Shards of at most about 2 GB (each file small enough for any tool that reads it whole; Hugging Face's own
# default is 5 GB). The writer holds nothing in memory, so this costs no memory either way.
SHARD_BYTES = 2 * 10**9
# bytes kept before a shard's tensors for its header, so that the tensors are written once, in place (a header
# of a 2 GB shard of a large model's layers takes some tens of KB); a multiple of 8, so they start aligned
HEADER_ROOM = 256 * 1024
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
_NAMES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a checkpoint is, and what its header says of it."""

    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: BF16, F32, ...
    key: str = ""  # its name in the file, where the checkpoint knows it by another (`Checkpoint.rename`)


class Checkpoint:
    """The tensors of a folder's safetensors weights, by name. `Checkpoint(folder, weights="model.safetensors")`
    reads `weights`, or the shards its index (`weights` + ".index.json") lists, checking the index and every
    shard's header (ShrinkError naming the file and tensor); `tensor(name)` reads one tensor as stored,
    `fill(module, prefix)` a module's."""

    def __init__(self, folder: str | Path, weights: str = SINGLE):
        self.folder = Path(folder)
        self._reader = self._ahead = None  # the background reader of `read_ahead`, and what it is reading
        # read by mapping each tensor's bytes (copy on write) rather than copying them into new memory: for
        # a job that reads each tensor once and lets it go (a streamed quantization), see `read`. (The files'
        # sizes are checked against their headers when read; a file cut short under a running job would fault.)
        self.mapped = False
        self.index = self.folder / (weights + ".index.json")
        self.where = self.index if self.index.is_file() else self.folder / weights  # named in errors
        if self.index.is_file():
            self.tensors = _sharded(self.folder, self.index)
        elif (self.folder / weights).is_file():
            self.tensors = {k: StoredTensor(self.folder / weights, tuple(s), d)
                            for k, (s, d) in header_shapes(self.folder / weights).items()}
        else:
            raise ShrinkError(f"{self.folder / weights}: missing weights file (nor is there an index of shards, "
                              f"{self.index.name})")

    def rename(self, new_name) -> None:
        """Know each tensor by `new_name(name)` from now on (read from its file under its own name); two
        tensors given one name is an error naming both."""
        renamed = {}
        for name, t in self.tensors.items():
            new = new_name(name)
            if new in renamed:
                raise ShrinkError(f"{self.where}: tensors {renamed[new].key!r} and {name!r} are both {new!r} once renamed")
            renamed[new] = StoredTensor(t.file, t.shape, t.dtype, t.key or name)
        self.tensors = renamed

    @property
    def header(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """{tensor: (shape, safetensors dtype)} over every file, as `manifest.header_shapes` gives one file's."""
        return {k: (t.shape, t.dtype) for k, t in self.tensors.items()}

    def nbytes(self, names=None) -> int:
        """Bytes the tensors `names` (default all) take as stored."""
        names = self.tensors if names is None else names
        return sum(math.prod(self.tensors[n].shape) * _ITEMSIZE.get(self.tensors[n].dtype, 4) for n in names)

    def read_ahead(self, names) -> None:
        """Start reading the tensors `names` in the background (one thread: the disk works while the caller
        computes); `read` takes them from there. Tensors read ahead and not asked for by the next call to
        `read_ahead` are let go."""
        from concurrent.futures import ThreadPoolExecutor

        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shrink-read-ahead")
        names = list(names)
        self._ahead = (set(names), self._reader.submit(self._read, names)) if names else None

    def read(self, names) -> dict[str, torch.Tensor]:
        """The tensors `names`, read as stored, each file opened once. Each is read straight into memory of
        its own unless `mapped` is set (a mapping of the whole file would keep every page read counted in
        the process's memory, and a copy out of it would double the largest tensor at the peak). Those `read_ahead` fetched are
        taken from there (an error it met is raised here). With `mapped` set, each tensor is instead a private
        mapping of its own bytes, let go with it: no copy and no new memory to clear, for jobs that read a tensor
        once and drop it (the pages it touched count as resident until then); `read_ahead` then asks the
        kernel to fetch them."""
        names = list(names)
        got = {}
        if self._ahead is not None and not self._ahead[0].isdisjoint(names):
            ready = self._ahead[1].result()
            got = {n: ready.pop(n) for n in names if n in ready}
            if not ready:
                self._ahead = None
        got.update(self._read([n for n in names if n not in got]))
        return {n: got[n] for n in names}

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.tensors:
                raise ShrinkError(f"{self.where}: the weights hold no tensor {name!r}")
            by_file.setdefault(self.tensors[name].file, []).append(name)
        out = {}
        for file, keys in by_file.items():
            offsets = _offsets(file)
            try:
                with open(file, "rb") as f:
                    for k in keys:
                        stored = self.tensors[k]
                        start, end = offsets[stored.key or k]
                        buf = _mapped(f, start, end) if self.mapped and end > start else None
                        if buf is None:
                            buf = torch.empty(end - start, dtype=torch.uint8)
                            f.seek(start)
                            if f.readinto(buf.numpy()) != end - start:
                                raise ShrinkError(f"{file}: cut short inside tensor {k!r}")
                        out[k] = buf.view(DTYPES[stored.dtype]).reshape(stored.shape)
            except (OSError, KeyError) as e:
                raise ShrinkError(f"{file}: cannot read ({type(e).__name__}: {str(e)[:160]})") from None
        return out

    def fill(self, module: torch.nn.Module, prefix: str = "", float_dtype: torch.dtype | None = None,
             only=None) -> list[str]:
        """Give `module` its own parameters and persistent buffers from the checkpoint's tensors named
        `prefix` + their names (floating ones cast to `float_dtype` unless None: as stored), replacing
        placeholders (meta tensors) without copying into them; `only(name)` chooses which (default all).
        ShrinkError naming the tensor when one is missing or of another shape. Returns the names read."""
        wanted = {}
        for mod_name, mod in module.named_modules():
            for kind in ("_parameters", "_buffers"):
                for leaf, t in getattr(mod, kind).items():
                    if t is None or (kind == "_buffers" and leaf in mod._non_persistent_buffers_set):
                        continue
                    rel = f"{mod_name}.{leaf}" if mod_name else leaf
                    if only is None or only(prefix + rel):
                        wanted[prefix + rel] = (mod, kind, leaf, tuple(t.shape))
        for key, (_, _, _, shape) in wanted.items():
            stored = self.tensors.get(key)
            if stored is None:
                raise ShrinkError(f"{self.where}: the model needs tensor {key!r}, which the weights do not hold")
            if stored.shape != shape:
                raise ShrinkError(f"{stored.file}: tensor {key!r} has shape {stored.shape}, the model's config "
                                  f"gives {shape}")
        for key, t in self.read(list(wanted)).items():
            mod, kind, leaf, _ = wanted[key]
            if float_dtype is not None and t.is_floating_point():
                t = t.to(float_dtype)
            if kind == "_parameters":
                mod._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
            else:
                mod._buffers[leaf] = t
        return list(wanted)

    @property
    def files(self) -> list[Path]:
        """The weights files, in order."""
        return sorted({t.file for t in self.tensors.values()})

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read from its file in its stored dtype (a copy of its own, in aligned memory)."""
        return self.read([name])[name]


def _mapped(f, start: int, end: int) -> torch.Tensor | None:
    """Bytes start..end of the open file `f` as a uint8 tensor over a private mapping of just them (unmapped when
    the tensor goes), the kernel asked to read them ahead; None where they would not be aligned for their dtype."""
    import mmap

    lead = start % mmap.ALLOCATIONGRANULARITY
    if lead % 8:  # safetensors aligns tensors to 8 bytes from the end of its header
        return None
    m = mmap.mmap(f.fileno(), end - start + lead, access=mmap.ACCESS_COPY, offset=start - lead)
    m.madvise(mmap.MADV_WILLNEED)
    return torch.frombuffer(m, dtype=torch.uint8, count=end - start, offset=lead)


def _offsets(file: Path) -> dict[str, tuple[int, int]]:
    """{tensor: (first byte, end)} in `file`, from its safetensors header (checked by header_shapes already:
    a JSON object after its 8-byte little-endian length; offsets count from the end of the header)."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    size = file.stat().st_size
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        start, end = (8 + n + int(o) for o in v["data_offsets"])
        if not start <= end <= size:
            raise ShrinkError(f"{file}: tensor {k!r} lies past the end of the file")
        out[k] = (start, end)
    return out


def placeholder(module: torch.nn.Module, leaf: str, shape, dtype: torch.dtype) -> None:
    """Make `module`'s own parameter or buffer `leaf` an empty tensor of `shape` and `dtype` on the meta
    device (what a written and released tensor leaves: its description, no memory); nothing for another name."""
    empty = torch.empty(tuple(shape), dtype=dtype, device="meta")
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(empty, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = empty


def release(module: torch.nn.Module) -> None:
    """Let `module`'s tensors go: each parameter and buffer becomes a placeholder of its shape on the meta
    device (the module keeps its structure, so what it is can still be described and saved)."""
    for mod in module.modules():
        for leaf, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is not None and not t.is_meta:
                placeholder(mod, leaf, t.shape, t.dtype)


class ShardWriter:
    """Writes tensors into `folder` as one safetensors file, or as shards of at most about `max_bytes` each
    with an index, the way Hugging Face names them (`model-00001-of-00003.safetensors` and
    `model.safetensors.index.json` for weights "model.safetensors"). Each tensor's bytes go to disk as it is
    added (after room kept for the shard's header, which comes first in the file and is written when the
    shard is complete), so the writer holds no tensor in memory; `close()` names the files (a single
    file when everything fit in one shard) and returns their names. rename: each tensor is stored under
    `rename(name)` (default: its own name)."""

    def __init__(self, folder: Path, weights: str = SINGLE, max_bytes: int = SHARD_BYTES, metadata: dict | None = None,
                 rename=None):
        self.folder, self.weights, self.max_bytes = Path(folder), weights, max_bytes
        self.rename = rename
        self.metadata = {k: str(v) for k, v in (metadata or {"format": "pt"}).items()}
        self.parts: list[Path] = []
        self.names: dict[str, Path] = {}  # tensor -> its shard
        self.entries: dict[str, dict] = {}  # the open shard's header
        self.raw, self.raw_bytes, self.total = None, 0, 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write `tensors` (name -> tensor) to the open shard, starting a new one when it is full; a name
        given twice is an error."""
        for name, t in tensors.items():
            name = self.rename(name) if self.rename is not None else name
            if name in self.names or name in self.entries:
                raise ShrinkError(f"tensor {name!r} written twice to {self.folder}")
            dtype = _NAMES.get(t.dtype)
            if dtype is None:
                raise ShrinkError(f"tensor {name!r}: {t.dtype} is not a type safetensors stores")
            nbytes = t.numel() * t.element_size()
            if self.entries and self.raw_bytes + nbytes > self.max_bytes:
                self.flush()  # a shard holds whole tensors: one larger than max_bytes is a shard alone
            if self.raw is None:
                self.raw = self._open()
            data = t.detach().contiguous().reshape(-1).view(torch.uint8)
            self.raw.write(memoryview(data.numpy()))
            self.entries[name] = {"dtype": dtype, "shape": list(t.shape),
                                  "data_offsets": [self.raw_bytes, self.raw_bytes + nbytes]}
            self.raw_bytes += nbytes

    def _open(self):
        """A new shard's file, its tensors' bytes to follow the room kept for its header."""
        f = open(self.folder / f".part-{len(self.parts):05d}.data", "w+b")
        f.seek(8 + HEADER_ROOM)
        return f

    def flush(self) -> None:
        """Complete the open shard: its header in the room kept before its tensors' bytes (padded with
        spaces, which safetensors' JSON header allows), or, for a header larger than the room or a small
        shard (where the room would be most of the file), the bytes copied after a header of its own size."""
        import shutil

        if self.raw is None:
            return
        header = json.dumps({"__metadata__": self.metadata, **self.entries}, separators=(",", ":")).encode()
        raw = Path(self.raw.name)
        part = raw.with_suffix(".safetensors")
        if len(header) <= HEADER_ROOM and self.raw_bytes >= 64 * HEADER_ROOM:
            header += b" " * (HEADER_ROOM - len(header))
            self.raw.seek(0)
            self.raw.write(len(header).to_bytes(8, "little"))
            self.raw.write(header)
            self.raw.close()
            raw.rename(part)
        else:
            self.raw.close()
            header += b" " * (-len(header) % 8)  # the tensors' bytes start 8-aligned
            with open(part, "wb") as out, open(raw, "rb") as src:
                out.write(len(header).to_bytes(8, "little"))
                out.write(header)
                src.seek(8 + HEADER_ROOM)
                shutil.copyfileobj(src, out, 16 << 20)
            raw.unlink()
        self.parts.append(part)
        self.names.update({k: part for k in self.entries})
        self.total += self.raw_bytes
        self.entries, self.raw, self.raw_bytes = {}, None, 0

    def close(self) -> list[str]:
        """Complete the last shard, give the shards their final names, write the index when there are several."""
        if self.raw is None and not self.parts:  # nothing was added: one empty file, still a checkpoint
            self.raw = self._open()
        self.flush()
        if len(self.parts) == 1:
            self.parts[0].rename(self.folder / self.weights)
            return [self.weights]
        stem = self.weights.removesuffix(".safetensors")
        n = len(self.parts)
        final = {p: f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i, p in enumerate(self.parts)}
        for p, name in final.items():
            p.rename(self.folder / name)
        index = {"metadata": {"total_size": self.total}, "weight_map": {k: final[p] for k, p in sorted(self.names.items())}}
        (self.folder / (self.weights + ".index.json")).write_text(json.dumps(index, indent=2) + "\n")
        return [*final.values(), self.weights + ".index.json"]


def _sharded(folder: Path, index: Path) -> dict[str, StoredTensor]:
    try:
        data = json.loads(read_utf8(index, "index file"))
    except (ValueError, RecursionError) as e:
        raise ShrinkError(f"{index}: not readable JSON ({str(e)[:120]})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise ShrinkError(f"{index}: 'weight_map' must map each tensor's name to the file holding it")
    for name, file in weight_map.items():
        if Path(file).name != file or not file.endswith(".safetensors"):
            raise ShrinkError(f"{index}: tensor {name!r} is placed in {file!r}, which is not a .safetensors file "
                              "beside the index")
    headers = {}
    for file in sorted(set(weight_map.values())):
        if not (folder / file).is_file():
            first = next(k for k, v in weight_map.items() if v == file)
            raise ShrinkError(f"{index}: places {first!r} in {file}, which is not in the folder")
        headers[file] = header_shapes(folder / file)
    holders: dict[str, list[str]] = {}
    for file, header in headers.items():
        for name in header:
            holders.setdefault(name, []).append(file)
    out = {}
    for name, files in holders.items():
        if len(files) > 1:
            raise ShrinkError(f"{folder}: tensor {name!r} is in two shards, {files[0]} and {files[1]}; which one "
                              "the model would get is not knowable")
        if name not in weight_map:
            raise ShrinkError(f"{folder / files[0]}: holds tensor {name!r}, which {index.name} does not list")
        if weight_map[name] != files[0]:
            raise ShrinkError(f"{index}: places {name!r} in {weight_map[name]}, but it is in {files[0]}")
        shape, dtype = headers[files[0]][name]
        out[name] = StoredTensor(folder / files[0], tuple(shape), dtype)
    for name, file in weight_map.items():
        if name not in out:
            raise ShrinkError(f"{index}: places {name!r} in {file}, whose header does not hold it")
    return out

