"""Does llama.cpp see the tokens shrink measured with? SmolLM2 exported to GGUF from a Hugging Face folder.

SmolLM2-135M-Instruct is saved as a Hugging Face folder (so the export has no GGUF to copy the tokenizer
from and builds it), quantized to int8 and exported twice: as shrink writes it now (pre-tokenizer named as
llama.cpp's converter names it, 'smollm') and as it wrote it before (pre-tokenizer 'default', the read-back
skipped). Each file's tokenizer, as llama.cpp reads it, splits held-out BBC business articles; the table
gives its token count against transformers' and the first position where they differ. Needs llama-cpp-python
(`bash scripts/setup.sh --llama-cpp`). Deterministic: no timings.

    .venv/bin/python benchmarks/export_tokenizer.py [--articles 20] [--out benchmarks/results/export_tokenizer.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import bbc_texts, machine  # noqa: E402

import shrink  # noqa: E402
from shrink.io import (  # noqa: E402
    LoadedModel,
    gguf_meta,  # noqa: E402
    read_model,
)
from shrink.io import export as export_module  # noqa: E402


def _export(loaded, path: Path, pre_as_before: bool) -> None:
    """Export `loaded`; with `pre_as_before`, the pre-tokenizer goes unnamed ('default') and is not read back."""
    saved = gguf_meta.KNOWN_PRE, gguf_meta._converter_table, export_module.llama_cpp_tokens
    if pre_as_before:
        gguf_meta.KNOWN_PRE, gguf_meta._converter_table = {}, lambda: {}
        export_module.llama_cpp_tokens = lambda *a, **k: None
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shrink.export_gguf(loaded, path)
    finally:
        gguf_meta.KNOWN_PRE, gguf_meta._converter_table, export_module.llama_cpp_tokens = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--articles", type=int, default=20, help="BBC business articles 400.. (held out) to tokenize")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_tokenizer.json")
    args = ap.parse_args()
    if importlib.util.find_spec("llama_cpp") is None:
        raise SystemExit("this benchmark needs llama-cpp-python: bash scripts/setup.sh --llama-cpp")
    text = "\n\n".join(bbc_texts("business", 400, args.articles))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        default = read_model("default")
        default.model.save_pretrained(tmp / "hf")
        default.tokenizer.save_pretrained(tmp / "hf")
        loaded = read_model(tmp / "hf")
        model = shrink.quantize(loaded.model, "int8", progress=False)
        ours = list(loaded.tokenizer.encode(text, add_special_tokens=False))
        for label, before in (("shrink now ('smollm')", False), ("shrink before ('default')", True)):
            path = tmp / f"{'before' if before else 'now'}.gguf"
            _export(LoadedModel(model, loaded.tokenizer, {}), path, before)
            pre = gguf_meta_field(path, "tokenizer.ggml.pre")
            theirs = export_module.llama_cpp_tokens(path, text)[0]
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                         None if len(ours) == len(theirs) else min(len(ours), len(theirs)))
            rows.append({"export": label, "pre_tokenizer": pre, "tokens_transformers": len(ours),
                         "tokens_llama_cpp": len(theirs), "identical": theirs == ours, "first_difference": first,
                         "characters": len(text)})
    t = Table(title=f"SmolLM2 from a Hugging Face folder, exported: {len(text):,} characters of held-out BBC text")
    for col in ("export", "pre-tokenizer", "tokens (transformers)", "tokens (llama.cpp)", "identical", "first difference"):
        t.add_column(col, justify="left" if col in ("export", "pre-tokenizer") else "right")
    for r in rows:
        t.add_row(r["export"], r["pre_tokenizer"], f"{r['tokens_transformers']:,}", f"{r['tokens_llama_cpp']:,}",
                  "yes" if r["identical"] else "no", "-" if r["first_difference"] is None else str(r["first_difference"]))
    Console().print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "articles": args.articles, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


def gguf_meta_field(path: Path, key: str):
    import gguf

    return gguf.GGUFReader(str(path)).get_field(key).contents()


if __name__ == "__main__":
    main()
