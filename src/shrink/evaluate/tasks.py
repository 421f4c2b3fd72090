"""Tasks: the user's own inputs with a notion of a good output, read from JSON Lines or tensor files.

One example per line of a `.jsonl` file; the fields say the kind of task:

- generation: `{"input": "...", "target": "..."}` (or a list of acceptable targets), scored by
  `"match"`: `exact` (default; case, surrounding space and final punctuation ignored), `contains`,
  `regex`, or `numeric` (the last number in the output, within `"tolerance"`, default 1e-6 relative), or by a Python scorer;
- multiple choice: `{"input": "...", "choices": ["...", ...], "answer": 1}`, scored by the
  log-likelihood of each choice;
- classification: `{"input": "...", "label": "sport"}`, the model's predicted label against `label`;
- perplexity: `{"text": "..."}`, the log-likelihood of the text.

Prompts go through the tokenizer's chat template when it has one; `"chat": false` on an example makes
its input plain text that the answer continues (a cloze on real text, say). Every example may have an
`"id"` (default: its line number) and `"tags"` (slices of the report, such as
"hard" or "edge"). Generation, multiple-choice and classification examples may share a file (a
"mixed" task: each is scored in points as its kind is, batches hold one kind); perplexity examples,
scored in percent of perplexity rather than points, need a file of their own. Tensor tasks for plain
PyTorch classifiers are `.npz` or `.safetensors` files with an input array `x` and integer labels `y`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import ShrinkError
from ..core.readers import json_value, read_arrays, read_utf8

MAX_LINE_BYTES = 1_000_000  # one example; a longer line is a mistake (and would exhaust the tokenizer)
KINDS = ("generation", "choice", "classification", "perplexity", "tensor", "mixed")
MIXABLE = ("generation", "choice", "classification")  # kinds scored in points, which one task may mix
MATCHES = ("exact", "contains", "regex", "numeric")
_FIELDS = {
    "generation": {"id", "input", "target", "match", "tolerance", "tags", "max_new_tokens", "chat"},
    "choice": {"id", "input", "choices", "answer", "tags", "chat"},
    "classification": {"id", "input", "label", "tags", "chat"},
    "perplexity": {"id", "text", "tags"},
}


@dataclass
class Example:
    """One input and what a good output is. `data` holds the kind's fields (target, choices, ...)."""

    id: str
    kind: str
    input: object  # text, or a tensor row for tensor tasks
    data: dict = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    line: int = 0


@dataclass
class Task:
    """Examples from one file (`source`): all of `kind`, or of several point-scored kinds (kind "mixed")."""

    name: str
    kind: str
    examples: list[Example]
    source: str = ""

    def labels(self) -> list[str]:
        """Classification labels in order of first appearance."""
        return list(dict.fromkeys(str(e.data["label"]) for e in self.examples if e.kind == "classification"))

    def kinds(self) -> list[str]:
        """The kinds of its examples, in order of first appearance."""
        return list(dict.fromkeys(e.kind for e in self.examples))


def _kind_of(obj: dict) -> str | None:
    if "choices" in obj:
        return "choice"
    if "label" in obj:
        return "classification"
    if "target" in obj:
        return "generation"
    if "text" in obj and "input" not in obj:
        return "perplexity"
    return None


def _check_example(obj, where: str, line: int) -> Example:
    if not isinstance(obj, dict):
        raise ShrinkError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    kind = _kind_of(obj)
    if kind is None:
        raise ShrinkError(f"{where}: cannot tell the kind of example: give 'target' (generation), 'choices' and "
                          "'answer' (multiple choice), 'label' (classification) or 'text' (perplexity)")
    unknown = set(obj) - _FIELDS[kind]
    if unknown:
        raise ShrinkError(f"{where}: unknown field(s) {sorted(unknown)} for a {kind} example "
                          f"(allowed: {sorted(_FIELDS[kind])})")
    text_field = "text" if kind == "perplexity" else "input"
    if not isinstance(obj.get(text_field), str) or not obj[text_field].strip():
        raise ShrinkError(f"{where}: missing field {text_field!r} (a non-empty string)")
    tags = obj.get("tags", [])
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        raise ShrinkError(f"{where}: 'tags' must be a list of non-empty strings")
    if not isinstance(obj.get("chat", True), bool):
        raise ShrinkError(f"{where}: 'chat' must be true or false (false: the input is text to continue, "
                          "not a chat message)")
    data = {k: v for k, v in obj.items() if k not in ("id", "input", "text", "tags")}
    if kind == "generation":
        t = obj["target"]
        targets = t if isinstance(t, list) else [t]
        if not targets or not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in targets):
            raise ShrinkError(f"{where}: 'target' must be a string or number, or a non-empty list of them")
        match = obj.get("match", "exact")
        if match not in MATCHES:
            raise ShrinkError(f"{where}: unknown match {match!r} (one of {', '.join(MATCHES)})")
        if match == "numeric":
            try:
                [float(x) for x in targets]
            except ValueError:
                raise ShrinkError(f"{where}: numeric match needs numeric targets, got {targets!r}") from None
        if match == "regex":
            import re

            for x in targets:
                try:
                    re.compile(str(x))
                except re.error as e:
                    raise ShrinkError(f"{where}: invalid regular expression {x!r}: {e}") from None
        data["target"] = targets
        data["match"] = match
        mnt = obj.get("max_new_tokens")
        if mnt is not None and (not isinstance(mnt, int) or isinstance(mnt, bool) or mnt < 1):
            raise ShrinkError(f"{where}: 'max_new_tokens' must be a positive integer")
        if "tolerance" in obj:
            tol = obj["tolerance"]
            if (not isinstance(tol, (int, float)) or isinstance(tol, bool) or not math.isfinite(tol) or tol < 0
                    or match != "numeric"):
                raise ShrinkError(f"{where}: 'tolerance' must be a number of 0 or more, for \"match\": \"numeric\" "
                                  f"(got {tol!r:.40})")
    elif kind == "choice":
        ch, ans = obj["choices"], obj.get("answer")
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
            raise ShrinkError(f"{where}: 'choices' must be a list of at least two non-empty strings")
        if not isinstance(ans, int) or isinstance(ans, bool) or not 0 <= ans < len(ch):
            raise ShrinkError(f"{where}: 'answer' must be the index of the right choice (0 to {len(ch) - 1})")
    elif kind == "classification":
        if not isinstance(obj["label"], (str, int)) or obj["label"] == "":
            raise ShrinkError(f"{where}: 'label' must be a non-empty string or an integer")
    ex_id = obj.get("id", line)
    if not isinstance(ex_id, (str, int)):
        raise ShrinkError(f"{where}: 'id' must be a string or an integer")
    return Example(str(ex_id), kind, obj[text_field], data, tuple(tags), line)


def read_jsonl(path: str | os.PathLike, name: str | None = None) -> Task:
    """Read a JSON Lines task file. Errors name the file and line."""
    path = Path(path)
    text = read_utf8(path, "task file")
    examples, kind, seen = [], None, {}
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        if len(raw) > MAX_LINE_BYTES:
            raise ShrinkError(f"{where}: a line of {len(raw):,} characters; an example may have at most "
                              f"{MAX_LINE_BYTES:,}")
        obj = json_value(raw, where)
        ex = _check_example(obj, where, n)
        if kind is None:
            kind = ex.kind
        elif ex.kind != kind and not (ex.kind in MIXABLE and kind in MIXABLE + ("mixed",)):
            raise ShrinkError(f"{where}: a {ex.kind} example in a task of {kind} examples (perplexity examples are "
                              "scored in percent of perplexity, not points: give them a file of their own)")
        elif ex.kind != kind:
            kind = "mixed"
        if ex.id in seen:
            raise ShrinkError(f"{where}: id {ex.id!r} already used on line {seen[ex.id]}")
        seen[ex.id] = n
        examples.append(ex)
    if not examples:
        raise ShrinkError(f"{path}: empty task (no examples)")
    return Task(name or path.stem, kind, examples, str(path))


def read_tensors(path: str | os.PathLike, name: str | None = None) -> Task:
    """A tensor task: `x` (inputs, first axis = examples) and `y` (integer labels) from .npz (no pickle)
    or .safetensors; optional string array `tags` in .npz (one comma-separated string per example)."""
    import numpy as np
    import torch

    path = Path(path)
    arrays = read_arrays(path, "task file", ("x", "y"))
    x, y = arrays["x"], arrays["y"]
    if len(x) == 0:
        raise ShrinkError(f"{path}: empty task (no examples)")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise ShrinkError(f"{path}: 'y' must be integer labels, one per row of 'x' ({len(x)}), got {y.dtype} {y.shape}")
    tags = arrays.get("tags")
    xs = torch.from_numpy(np.ascontiguousarray(x))
    if xs.is_floating_point():
        xs = xs.float()
    examples = []
    for i in range(len(x)):
        t = tuple(s for s in str(tags[i]).split(",") if s) if tags is not None else ()
        examples.append(Example(str(i), "tensor", xs[i], {"label": int(y[i])}, t, i))
    return Task(name or path.stem, "tensor", examples, str(path))


def load_task(task: str | os.PathLike | Task | None = None) -> Task:
    """A Task from a path (.jsonl, .npz, .safetensors), a Task (returned as is), or None (or "default")
    for the built-in task (see `builtin_task`)."""
    if isinstance(task, Task):
        return task
    if task is None or str(task) == "default":
        return default_task()
    path = Path(task)
    if path.suffix in (".npz", ".safetensors"):
        return read_tensors(path)
    return read_jsonl(path)


def default_task() -> Task:
    """The built-in task: several hundred generation, multiple-choice and cloze examples built from what the
    install ships, tagged by kind and by difficulty measured on the default model (see `builtin_task`)."""
    from .builtin_task import builtin_path

    return read_jsonl(builtin_path(), name="default")
