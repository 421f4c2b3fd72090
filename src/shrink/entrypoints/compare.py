"""`shrink.compare`: load the two models from wherever they are, compare them on a task, write the report.

The comparison itself (evaluate) takes modules; this layer resolves names and paths through io and
writes the report, so evaluate knows nothing of files of models or of reports.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

from ..core.errors import ShrinkError
from ..core.outdir import claim
from ..evaluate import Comparison, compare_models
from ..evaluate.llamacpp import RUNTIMES
from ..io import resolve

OUT_NAMES = ("results.json", "report.md", "report.html")  # what a comparison writes in its folder


def compare(original, compressed, task=None, *, tokenizer=None, out: str | os.PathLike | None = None,
            force: bool = False, runtime: str = "shrink", **options) -> Comparison:
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
    """
    if runtime not in RUNTIMES:
        raise ShrinkError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if "max_drop" in options:  # search's name for the same thing
        if "tolerance" in options:
            raise ShrinkError("give max_drop or tolerance (its older name), not both")
        options["tolerance"] = options.pop("max_drop")
    with claim(out, "compare", OUT_NAMES, force=force) if out is not None else nullcontext():
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
