"""`shrink.compare`: load the two models from wherever they are, compare them on a task, write the report.

The comparison itself (evaluate) takes modules; this layer resolves names and paths through io and
writes the report, so evaluate knows nothing of files of models or of reports.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

from ..core.errors import ShrinkError
from ..core.outdir import claim
from ..evaluate import Comparison, compare_models, load_task
from ..evaluate.llamacpp import RUNTIMES
from ..io import resolve
from ..io.models import check_model_path, model_path

ORIGINAL_OUTCOMES = "original-outcomes"  # the original's outcomes on the task, reused by a later comparison
OUT_NAMES = ("results.json", "report.md", "report.html", ORIGINAL_OUTCOMES)  # what a comparison writes in its folder


def compare(original, compressed, task=None, *, tokenizer=None, out: str | os.PathLike | None = None,
            force: bool = False, runtime: str = "shrink", one_at_a_time: bool | None = None, **options) -> Comparison:
    """Compare `compressed` against `original` on `task`, example by example, and return the Comparison.

    original, compressed: a module, a LoadedModel, or a name/path for `shrink.io.read_model` ("default",
    a .gguf file, a Hugging Face folder, a shrink folder). tokenizer: used for both when given (else each
    model's own). task: a .jsonl/.npz/.safetensors path, a Task, or None for the built-in default task.
    out: a folder to write report.md, report.html and results.json into: new or empty, or (force=True,
    default False) the folder of an earlier comparison, checked before any work. Other options go to
    `shrink.evaluate.compare` (max_drop=1.0 points absolute, as `shrink.search` calls it, or by its older
    name tolerance; relative=False, scorer=None,
    chat_template=None, max_new_tokens=32, progress=None). runtime: what runs `compressed`: "shrink"
    (default: shrink's own PyTorch model) or "llama.cpp" (a .gguf file run by llama.cpp, so the verdict
    is on what llama.cpp computes; needs llama-cpp-python).

    one_at_a_time: with both models given by name or path, run the original alone first, keep its
    outcomes in `out`/original-outcomes (a temporary folder without `out`) and let it go before the
    compressed model is loaded (default None: when the two, loaded, would not fit in memory together).
    A later comparison into the same folder (force=True) with the same original (its files unchanged),
    task and options reuses stored outcomes without loading the original, whatever this says.
    """
    if runtime not in RUNTIMES:
        raise ShrinkError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if "max_drop" in options:  # search's name for the same thing
        if "tolerance" in options:
            raise ShrinkError("give max_drop or tolerance (its older name), not both")
        options["tolerance"] = options.pop("max_drop")
    with claim(out, "compare", OUT_NAMES, force=force, keep=(ORIGINAL_OUTCOMES,)) if out is not None else nullcontext(), \
            (nullcontext(out) if out is not None else tempfile.TemporaryDirectory(prefix="shrink-compare-")) as where:
        stored = None
        if isinstance(original, (str, os.PathLike)) and isinstance(compressed, (str, os.PathLike)):
            for spec in (original, compressed):
                check_model_path(spec)  # before the original runs, not after
            task = load_task(task)
            _check_before_running(task, options)
            stored = _original_alone(original, compressed, task, tokenizer, Path(where), out is not None,
                                     one_at_a_time, options)
        if stored is not None:
            a, tok_a, name_a, options["cache"] = stored
        else:
            a, tok_a, name_a = resolve(original, tokenizer)
        if runtime == "llama.cpp":
            b, tok_b, name_b = _in_llama_cpp(compressed, tokenizer or tok_a, options)
        else:
            b, tok_b, name_b = resolve(compressed, tokenizer)
        names = options.pop("names", (name_a or "original", name_b or "compressed"))
        if names[0] == names[1]:
            names = (f"{names[0]} (original)", f"{names[1]} (compressed)")
        try:
            result = compare_models(a, b, task, tokenizer=tok_a, compressed_tokenizer=tok_b, names=names, **options)
        finally:
            if runtime == "llama.cpp":
                b.runtime.close()
        if out is not None:
            from ..report import write_comparison_report

            write_comparison_report(result, out)
    return result


def _check_before_running(task, options: dict) -> None:
    """What compare_models checks before any model runs, checked before the original runs alone (it is said
    once: compare_models then does not warn of a small task again)."""
    import warnings

    from ..evaluate.paired import check_batch_size, check_options, task_too_small

    check_options(task, options.get("tolerance", 1.0), options.get("scorer"))
    check_batch_size(options.get("batch_size", 16))
    small = task_too_small(task, options.get("tolerance", 1.0), options.get("relative", False)) \
        if options.get("warn_small", True) else None
    if small:
        warnings.warn(small, stacklevel=3)
    options["warn_small"] = False


def _original_alone(original, compressed, task, tokenizer, where: Path, reuse: bool, one_at_a_time: bool | None,
                    options: dict):
    """(stand-in adapter, tokenizer, name, stored outcomes) of the original named by `original`: its outcomes
    on `task` read from `where`/original-outcomes when they were stored for this model, task and options
    (`reuse`), else, when one model at a time is asked for or needed, computed with the model loaded alone,
    stored there, and the model let go. None: the two models are to be run together."""
    import gc

    from ..core.memory import available_memory, release_freed_memory
    from ..evaluate import StoredOutcomes, store_original
    from ..io.models import loaded_size, read_tokenizer

    run = {k: options[k] for k in ("scorer", "chat_template", "max_new_tokens", "batch_size") if k in options}
    key = outcomes_key(original, task, tokenizer, run)
    folder = where / ORIGINAL_OUTCOMES
    stored = StoredOutcomes.open(folder, key) if reuse else None
    if stored is not None:
        print(f"note: the original's outcomes on this task are those stored in {folder} (its files, the task and the "
              "options are unchanged); the original is not run again (delete that folder to run it)", file=sys.stderr)
        return stored.adapter(), tokenizer or read_tokenizer(original), str(original), stored
    if one_at_a_time is None:
        need, avail = loaded_size(original) + loaded_size(compressed), available_memory()
        one_at_a_time = avail is not None and need > 0.8 * avail
        if one_at_a_time:
            print(f"note: the two models need about {need / 1e9:.1f} GB loaded together, more than the "
                  f"{avail / 1e9:.1f} GB available allows: the original runs alone first, its outcomes kept in {folder} "
                  "(its log-probabilities take positions x vocabulary x 4 bytes of disk)", file=sys.stderr)
    if not one_at_a_time:
        return None
    model, tok, name = resolve(original, tokenizer)
    stored = store_original(model, task, folder, key, tokenizer=tok, progress=options.get("progress"), **run)
    del model
    gc.collect()
    release_freed_memory()
    return stored.adapter(), tok, name, stored


def outcomes_key(original, task, tokenizer, run: dict) -> str:
    """What the original's outcomes depend on: its files (names, sizes, modification times), the task's
    examples, a given tokenizer's vocabulary and the options that change what it computes."""
    import hashlib
    import json

    from ..evaluate import task_digest

    path = model_path(original)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    model = [[p.relative_to(path).as_posix() if path.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns]
             for p in files]
    vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else None
    h = hashlib.sha256(json.dumps([str(path.resolve()), model, task_digest(task), repr(vocab), repr(sorted(run.items()))],
                                  default=str).encode())
    return h.hexdigest()[:32]


def _in_llama_cpp(compressed, tokenizer, options: dict):
    """(adapter, tokenizer, name) for a .gguf file run by llama.cpp, fed token ids by `tokenizer` (the
    original's, so both models see the same tokens) or else the GGUF file's own."""
    from ..evaluate.llamacpp import LlamaCppAdapter
    from ..io.models import gguf_tokenizer

    if not isinstance(compressed, (str, os.PathLike)) or not str(compressed).lower().endswith(".gguf"):
        raise ShrinkError(f"runtime llama.cpp runs a .gguf file; got {compressed!r} (export one with shrink export)")
    tok = tokenizer or gguf_tokenizer(compressed)
    adapter = LlamaCppAdapter(compressed, tok, options.get("chat_template"), options.get("max_new_tokens", 32))
    return adapter, tok, str(compressed)
