"""Scoring one generated output against an example's targets: exact, contains, regex, numeric, or a
user's Python function named `module:function`."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import string
import sys
from collections.abc import Callable
from pathlib import Path

from ..core.errors import ShrinkError

_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def normalize(text: str) -> str:
    """Lower case, inner whitespace collapsed, surrounding whitespace and punctuation removed."""
    return " ".join(str(text).split()).casefold().strip(string.punctuation + " ")


def exact(output: str, target: str) -> bool:
    """Equal after `normalize`."""
    return normalize(output) == normalize(target)


def contains(output: str, target: str) -> bool:
    """The normalized target appears in the normalized output as whole words."""
    t = normalize(target)
    return bool(t) and re.search(rf"(?<!\w){re.escape(t)}(?!\w)", normalize(output)) is not None


def regex(output: str, pattern: str) -> bool:
    """The regular expression matches somewhere in the output."""
    return re.search(pattern, output) is not None


def last_number(text: str) -> float | None:
    """The last number written in `text` ("1,234.5" reads as 1234.5), or None. The last, because
    models restate the question ("2 + 3 = 5") before they answer."""
    found = _NUMBER.findall(text)
    for m in reversed(found):
        try:
            return float(m.replace(",", "").rstrip("."))
        except ValueError:
            continue
    return None


def numeric(output: str, target, tolerance: float = 1e-6) -> bool:
    """The last number in the output is within `tolerance` (relative to |target|, at least absolute
    `tolerance` near zero) of the target."""
    x, t = last_number(str(output)), float(target)
    return x is not None and abs(x - t) <= tolerance * max(1.0, abs(t))


MATCHERS = {"exact": exact, "contains": contains, "regex": regex}


def score_generation(output: str, data: dict) -> float:
    """1.0 when the output matches any of the example's targets by its `match`, else 0.0."""
    match = data.get("match", "exact")
    for t in data["target"]:
        ok = numeric(output, t, float(data.get("tolerance", 1e-6))) if match == "numeric" else MATCHERS[match](output, str(t))
        if ok:
            return 1.0
    return 0.0


def checked_score(value, ref: str = "the scorer") -> float:
    """A scorer's result as a float in [0, 1]; a bool counts as 0 or 1. Anything else (NaN, 5.0, a string)
    raises ShrinkError, so the example fails visibly instead of skewing the scores."""
    if isinstance(value, bool):
        return float(value)
    import numbers

    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isfinite(v) and 0.0 <= v <= 1.0:
            return v
    raise ShrinkError(f"{ref} returned {value!r:.60}; a score must be a number from 0 to 1, or True/False")


def load_scorer(ref: str) -> Callable:
    """The function named `module:function` (a module importable from here or the current folder) or
    `path/to/file.py:function`, called as f(output, example) -> float in [0, 1] or bool.
    Importing runs the module's top-level code: pass only a file you trust."""
    if ref.count(":") != 1:
        raise ShrinkError(f"scorer {ref!r}: expected 'module:function' or 'file.py:function', e.g. 'my_scorers:exact_date'")
    mod_name, fn_name = ref.split(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise ShrinkError(f"scorer {ref!r}: no such file {path}")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            added = os.getcwd() not in sys.path
            if added:  # the command line does not put the current folder on the path
                sys.path.insert(0, os.getcwd())
            try:
                mod = importlib.import_module(mod_name)
            finally:
                if added:
                    sys.path.remove(os.getcwd())
    except ShrinkError:
        raise
    except Exception as e:
        raise ShrinkError(f"scorer {ref!r}: cannot import {mod_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ShrinkError(f"scorer {ref!r}: module {mod_name!r} has no function {fn_name!r}")
    return fn
