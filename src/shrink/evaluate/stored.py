"""The original model's outcomes on a task, kept in a folder, so that a comparison holds one model at a time.

A comparison needs, per example, what the original did (its answer, score, confidence, the tokens it
measured on and its log-probabilities over them) beside what the compressed model does on the same tokens.
Run together, both models are in memory at once; for a model of billions of parameters that is twice what
fits. `run_original` runs the original alone over the task, writing each batch's outcomes to the folder as
it goes (safetensors for the tensors, JSON for the rest: nothing is unpickled); `StoredOutcomes` reads them
back an example at a time as the compressed model reaches it, and stands in for the original's adapter
(its kind, the digest of its tokenizer or labels, its size and times), so the comparison runs exactly as
with the model at hand. `key` names what the outcomes depend on (the caller's digest of the model's files,
the task and the options): a folder whose key differs is not reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..core.atomic import atomic_dir
from ..core.errors import ShrinkError
from .adapters import Adapter, Outcome
from .tasks import Task

STORE_VERSION = 1
INDEX = "outcomes.json"
_TENSORS = ("logprobs", "embedding", "ids")


def signature_digest(adapter: Adapter) -> str:
    """A short digest of what must match between two models (`Adapter.signature`: the tokenizer's vocabulary,
    the labels), stored in place of the signature itself."""
    return hashlib.sha256(repr(adapter.signature()).encode()).hexdigest()[:32]


def task_digest(task: Task) -> str:
    """A digest of a task's examples (ids, kinds, inputs, fields, tags)."""
    h = hashlib.sha256()
    for ex in task.examples:
        inp = ex.input if isinstance(ex.input, str) else ex.input.detach().cpu().contiguous().numpy().tobytes().hex()
        h.update(json.dumps([ex.id, ex.kind, inp, ex.data, list(ex.tags)], sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


class StoredAdapter(Adapter):
    """The original model as its stored outcomes describe it, in place of its adapter: its kind, the tasks it
    ran, the digest of its signature (compared to the other model's) and its size; it runs nothing."""

    def __init__(self, index: dict):
        self.kind, self.tasks = index["kind"], tuple(index["tasks"])
        self.digest, self.labels, self.bytes = index["signature"], index.get("labels"), index.get("bytes")

    def signature(self):
        return ("labels", tuple(self.labels)) if self.labels is not None else ("stored",)

    def size_bytes(self):
        return self.bytes

    def run_batch(self, examples, task, ids=None, scorer=None):
        raise ShrinkError(f"example {examples[0].id!r}: the original's outcomes hold no such example")


def _well_formed(rec) -> bool:
    """Whether one example's stored record has the fields it is read by: an error, or a batch file beside
    the index (a bare name) with the outcome's output, score and confidence; and its seconds."""
    num = (int, float)
    if not isinstance(rec, dict) or not isinstance(rec.get("seconds"), num):
        return False
    if rec.get("error") is not None:
        return isinstance(rec["error"], str)
    f = rec.get("file")
    return (isinstance(f, str) and Path(f).name == f and f.endswith(".safetensors") and isinstance(rec.get("output"), str)
            and isinstance(rec.get("score"), num) and isinstance(rec.get("confidence"), num))


def same_inputs(a: Adapter, b: Adapter) -> bool:
    """Whether two adapters see the same inputs (a stored original by its digest)."""
    da = a.digest if isinstance(a, StoredAdapter) else signature_digest(a)
    db = b.digest if isinstance(b, StoredAdapter) else signature_digest(b)
    return da == db


class StoredOutcomes(Mapping):
    """The stored outcomes of a folder written by `run_original`: example id -> (Outcome, or the error it
    raised, seconds), each read from its batch's file when asked for."""

    def __init__(self, folder: Path, index: dict):
        self.folder, self.index = folder, index
        self.examples = index["examples"]

    @classmethod
    def open(cls, folder: str | Path, key: str) -> "StoredOutcomes | None":
        """The outcomes in `folder` if they are complete and were stored under `key`; None otherwise (absent,
        another model, task or options, or an unreadable index)."""
        folder = Path(folder)
        try:
            index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return None
        if not (isinstance(index, dict) and index.get("version") == STORE_VERSION and index.get("key") == key
                and isinstance(index.get("examples"), dict) and isinstance(index.get("kind"), str)
                and isinstance(index.get("tasks"), list) and isinstance(index.get("signature"), str)
                and all(_well_formed(r) for r in index["examples"].values())):
            return None  # another model, task or options, or a damaged index: the original runs again
        return cls(folder, index)

    def adapter(self) -> StoredAdapter:
        """The stand-in for the original's adapter."""
        return StoredAdapter(self.index)

    def __contains__(self, example_id) -> bool:
        return example_id in self.examples

    def __iter__(self):
        return iter(self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, example_id):
        rec = self.examples[example_id]
        if rec.get("error") is not None:
            return ShrinkError(rec["error"]), rec["seconds"]
        tensors = {}
        path = self.folder / rec["file"]
        try:
            with safe_open(str(path), framework="pt") as f:
                for leaf in _TENSORS:
                    if f"{example_id}/{leaf}" in f.keys():
                        tensors[leaf] = f.get_tensor(f"{example_id}/{leaf}")
        except (OSError, SafetensorError) as e:
            raise ShrinkError(f"{path}: the original's stored outcomes cannot be read ({e}); delete "
                              f"{self.folder} to run the original again") from None
        return Outcome(rec["output"], rec["score"], rec["confidence"], **tensors), rec["seconds"]


def run_original(adapter: Adapter, task: Task, folder: str | Path, key: str, batches: list[list[int]], run,
                 size_bytes: int | None = None, progress: bool | None = None) -> StoredOutcomes:
    """Run the original (`adapter`) alone over `task` in `batches` (lists of example indices; `run(adapter,
    examples)` gives each batch's (Outcome or exception, seconds)), writing each batch's outcomes to `folder`
    as they come (into a temporary folder that becomes `folder` when complete), with the model's size
    (`size_bytes`, as the comparison reports it); the stored outcomes."""
    try:
        with atomic_dir(folder) as tmp:  # whole or not at all; sealed, so a later run knows it is shrink's
            return _write(adapter, task, Path(folder), tmp, key, batches, run, size_bytes, progress)
    except OSError as e:  # a full disk, most likely: the log-probabilities take positions x vocabulary x 4 bytes
        raise ShrinkError(f"{folder}: cannot write the original's outcomes ({e.strerror or e}); nothing of them was "
                          "kept: free some disk space, or choose another --out") from None


def _write(adapter, task, folder: Path, tmp: Path, key, batches, run, size_bytes, progress) -> StoredOutcomes:
    examples = {}
    bar = tqdm(total=len(task.examples), desc="original", unit="example",
               disable=None if progress is None else not progress)
    for n, idx in enumerate(batches):
        batch = [task.examples[i] for i in idx]
        file = f"batch-{n:05d}.safetensors"
        tensors = {}
        for ex, (out, secs) in zip(batch, run(adapter, batch)):
            if isinstance(out, Exception):
                examples[ex.id] = {"error": f"{type(out).__name__}: {out}", "seconds": secs}
                continue
            examples[ex.id] = {"file": file, "output": out.output, "score": out.score,
                               "confidence": out.confidence, "seconds": secs}
            for leaf in _TENSORS:
                t = getattr(out, leaf)
                if t is not None:
                    tensors[f"{ex.id}/{leaf}"] = t.detach().cpu().contiguous()
        save_file(tensors, str(tmp / file))
        bar.update(len(batch))
    bar.close()
    sig = adapter.signature()
    index = {"version": STORE_VERSION, "key": key, "kind": adapter.kind, "tasks": list(adapter.tasks),
             "signature": signature_digest(adapter),
             "labels": list(sig[1]) if isinstance(sig, tuple) and sig and sig[0] == "labels" else None,
             "bytes": size_bytes, "examples": examples}
    (tmp / INDEX).write_text(json.dumps(index), encoding="utf-8")
    return StoredOutcomes(folder, index)
