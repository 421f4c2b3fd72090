"""Resident memory of a loaded quantized model against its weights file, on SmolLM2-135M-Instruct.

For each format the default model is quantized and saved once (under --work, reused), then a fresh process per
folder measures resident memory (VmRSS): after importing shrink, torch, transformers, the architecture's modeling code and
shrink's compiled code (the baseline), after
`shrink.load`, after one forward pass (the kernels' working copies are built on first use), and after decoding
16 tokens in shrink's runtime. Beside the growth it reports what the process holds by count: the model's own
tensors (unique storages, the tiled layouts the layers hold included), the tiled weights alone and the
runtime's key/value cache.
The goal (issue 29): growth after decoding at most 1.2x the weights file plus the runtime's cache.

    .venv/bin/python benchmarks/memory.py [--formats int4-g32,int8] [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

NEW_TOKENS = 16
PROMPT = "Write a short paragraph about why the sea is salty."


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(folder: str) -> None:
    """In a fresh process: resident memory at each step of loading and running `folder`, as JSON."""
    import gc

    import torch
    import transformers  # noqa: F401  (part of the baseline: every load imports it)

    import shrink
    from shrink.quant import QuantLinear
    from shrink.quant.kernels import tiled
    from shrink.runtime import decoder_for

    torch.set_num_threads(2)
    # The baseline holds the code a load brings in, which is the process's and not the model's: the
    # architecture's modeling module (transformers imports about 130 MB of it on first use) and shrink's
    # compiled kernel and runtime.
    import importlib

    from shrink.quant.kernels import native
    from shrink.runtime.llama import extension

    kind = json.loads((Path(folder) / "config.json").read_text())["model_type"]
    importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    native.load(), extension()
    gc.collect()
    out = {"baseline": _rss()}
    model = shrink.load(folder)
    gc.collect()
    out["loaded"] = _rss()
    ids = torch.tensor([[1, 504, 3458, 314, 260, 3587, 30]])
    with torch.no_grad():
        model(ids)
    gc.collect()
    out["forward"] = _rss()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    gc.collect()
    out["decoded"] = _rss()
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    out["model_tensor_bytes"] = sum(storages.values())
    out["tiled_bytes"] = sum(tiled.nbytes(m) for m in model.modules() if isinstance(m, QuantLinear))
    out["row_copies_beside_tiles"] = sum(1 for m in model.modules() if isinstance(m, QuantLinear) and
                                         m.__dict__.get("_tiled") is not None and m.__dict__["_tiled"].tiled is not None)
    decoder = decoder_for(model)  # its cache and logits scratch, as sized for this one decode (runtime/llama.py)
    out["cache_bytes"] = None if decoder is None else \
        decoder.cache_bytes(1, ids.shape[1] + NEW_TOKENS) + 2 * decoder.vocab * 4
    print(json.dumps(out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="int4-g32,int8", help="comma-separated formats (default int4-g32,int8)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "shrink-bench-memory"),
                    help="where the saved folders are kept between runs (default: a folder under the temp dir)")
    ap.add_argument("--out", default="benchmarks/results/memory.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)

    import copy

    import shrink
    from shrink.core.atomic import write_json
    from shrink.io import read_model

    console = Console(width=150)
    work = Path(args.work)
    base = None
    rows = {}
    for fmt in args.formats.split(","):
        folder = work / fmt
        if not (folder / "shrink.json").is_file():
            if base is None:
                base = read_model()
            console.print(f"quantizing and saving {fmt} ...")
            shrink.save(shrink.quantize(copy.deepcopy(base.model), fmt, progress=False), folder,
                        tokenizer=base.tokenizer)
        file_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        res = subprocess.run([sys.executable, __file__, "--child", str(folder)], capture_output=True, text=True)
        if res.returncode:
            console.print(f"[red]{fmt}: the measuring process failed[/red]\n{res.stderr[-2000:]}")
            continue
        m = json.loads(res.stdout.strip().splitlines()[-1])
        grown = m["decoded"] - m["baseline"]
        cache = m["cache_bytes"] or 0
        rows[fmt] = {**m, "file_bytes": file_bytes, "growth_loaded": m["loaded"] - m["baseline"],
                     "growth_forward": m["forward"] - m["baseline"], "growth_decoded": grown,
                     "growth_over_file": (grown - cache) / file_bytes}

    t = Table(title="Resident memory of a loaded model (MB); growth over the process after importing shrink")
    for c in ("format", "weights file", "after load", "after a forward", "after decoding", "model tensors",
              "tiled weights", "runtime cache", "(decoded - cache) / file"):
        t.add_column(c, justify="left" if c == "format" else "right")
    mb = lambda b: f"{b / 1e6:,.0f}" if b is not None else "-"  # noqa: E731
    for fmt, r in rows.items():
        t.add_row(fmt, mb(r["file_bytes"]), mb(r["growth_loaded"]), mb(r["growth_forward"]), mb(r["growth_decoded"]),
                  mb(r["model_tensor_bytes"]), mb(r["tiled_bytes"]), mb(r["cache_bytes"]),
                  f"{r['growth_over_file']:.2f}x")
    console.print(t)
    write_json(Path(args.out), {"machine": machine(), "model": "SmolLM2-135M-Instruct", "new_tokens": NEW_TOKENS,
                                "rows": rows})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
