"""Readers of the user's files: text files (calibration text, training text; .txt as one text, .jsonl one per
line), cut into windows of tokens the same way for calibration and for distillation; and array files (.npz
without pickle, .safetensors) read into numpy arrays."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import ShrinkError


def read_utf8(path: Path, what: str = "file") -> str:
    """The text of `path`; ShrinkError naming the file when it is missing, a folder, or not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ShrinkError(f"{path}: no such {what}") from None
    except UnicodeDecodeError as e:
        raise ShrinkError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ShrinkError(f"{path}: cannot read the {what} ({e.strerror or e})") from None


def json_lines(path: Path, raw: str):
    """(line number, parsed value) of each non-empty line of a JSON Lines text read from `path`; invalid
    JSON is a ShrinkError naming the file and line."""
    for i, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            yield i, json_value(line, f"{path}:{i}")


def json_value(text: str, where: str):
    """The JSON value of one line of a file; ShrinkError starting with `where` (file:line) when it is not
    JSON, or nests too deep or holds a number too long to read."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ShrinkError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError):  # a number of thousands of digits, or nesting too deep to read
        raise ShrinkError(f"{where}: a value nested too deep, or a number too long, to read") from None


def read_texts(path: str | Path, what: str = "text file") -> list[str]:
    """Texts of a .txt file (one text) or a .jsonl file (one per line: "text", or "input" and optional
    "target" joined); errors name the file and line, and call the file `what`."""
    path = Path(path)
    if not path.is_file():
        raise ShrinkError(f"{path}: {what} not found")
    raw = read_utf8(path, what)
    if path.suffix.lower() not in (".jsonl", ".json"):
        if not raw.strip():
            raise ShrinkError(f"{path}: {what} is empty")
        return [raw]
    texts = []
    for i, obj in json_lines(path, raw):
        if not isinstance(obj, dict):
            raise ShrinkError(f"{path}:{i}: expected a JSON object with a \"text\" or \"input\" field")
        if isinstance(obj.get("text"), str):
            texts.append(obj["text"])
        elif isinstance(obj.get("input"), str):
            target = obj.get("target")
            texts.append(obj["input"] + (f" {target}" if isinstance(target, str) else ""))
        else:
            raise ShrinkError(f"{path}:{i}: missing field \"text\" (or \"input\")")
    if not texts:
        raise ShrinkError(f"{path}: {what} is empty")
    return texts


def token_windows(texts: list[str], tokenizer, seq_len: int, max_windows: int | None = None):
    """(windows [n, seq_len] int64, tokens in all): each text tokenized on its own (no special tokens),
    joined with the tokenizer's end-of-sequence token between texts (its id, never its spelling, which a
    tokenizer may split), and cut into windows of seq_len tokens; the remainder is dropped, and at most
    max_windows are kept."""
    import torch

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for i, t in enumerate(texts):
        if i and eos is not None:
            ids.append(eos)
        ids.extend(tokenizer(t, add_special_tokens=False).input_ids)
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[:n * seq_len], dtype=torch.long).reshape(n, seq_len), len(ids)


def read_arrays(path: str | os.PathLike, what: str = "data file", required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """All arrays of a .npz (loaded with allow_pickle=False) or .safetensors file; errors name the file
    (called `what`) and any of the `required` arrays it lacks."""
    path = Path(path)
    if not path.is_file():
        raise ShrinkError(f"{path}: no such {what}")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
    except Exception as e:
        raise ShrinkError(f"{path}: cannot read tensors ({type(e).__name__}: {e})") from None
    for key in required:
        if key not in arrays:
            raise ShrinkError(f"{path}: missing array {key!r} (have {sorted(arrays)})")
    return arrays


def is_count(x) -> bool:
    """An integer in a JSON config (not a bool, not 4.0)."""
    return isinstance(x, int) and not isinstance(x, bool)
