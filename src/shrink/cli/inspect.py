"""`shrink inspect`: what a saved shrink folder holds, checked as loading checks it, or a model's sizes."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from .common import console, main, mb, size_table


@main.command("inspect")
@click.argument("path", default="default")


def inspect_command(path):
    """Show what a saved shrink folder holds (formats, sizes, source), or the sizes of a model.

    A shrink folder is checked as loading checks it (shrink.json's fields, the files' checksums, every
    module against the weights file); anything that loading would refuse exits with code 1."""
    from ..io import is_shrink_folder, read_model
    from ..io.saved import check
    from ..quant import output_layer_name, size_rows

    if Path(path).is_dir() and is_shrink_folder(path):
        m, header = check(path)
        if m["kind"] == "transformers":
            from ..io import load

            load(path)  # the rest of what loading checks (config.json, every tensor of the model); a plain
            # PyTorch model cannot be rebuilt without its class, so only the checks above apply to it
        rows = _folder_rows(m, header)
        t = Table(title=f"{path}: shrink format {m['format_version']}, {m.get('architecture')}, method {m.get('method')}")
        for col in ("tensors of", "modules", "tensors", "MB"):
            t.add_column(col, justify="left" if col == "tensors of" else "right")
        for kind, (mods, n, b) in rows.items():
            t.add_row(kind, str(mods), str(n), mb(b), style="bold" if kind == "total" else None)
        console.print(t)
        src = m.get("source") or {}
        console.print(f"source: {src.get('name') or src.get('path') or 'unknown'} ({src.get('kind', '?')}); "
                      f"written by shrink {m.get('shrink_version')}")
        if m.get("kept_full_precision"):
            console.print(f"kept in full precision: {', '.join(m['kept_full_precision'])}")
        rotation = m.get("rotation") or {}
        if rotation:
            console.print(f"rotated before quantizing: residual stream {rotation.get('residual')}, attention values "
                          f"{rotation.get('heads')}" + ("; output layer untied from the embedding"
                                                        if rotation.get("untied") else ""))
            online = rotation.get("online") or {}
            if online:
                console.print(f"rotated online: the inputs of {len(online.get('layers', []))} down projections "
                              f"(Hadamard blocks {', '.join(online.get('blocks', {}).values())}); only shrink runs "
                              "this model (no GGUF export, no transformers loading)")
        qad = (m.get("calibration") or {}).get("qad") or {}
        if qad:
            console.print(f"quantization-aware distillation: {qad.get('steps')} steps, held-out KL "
                          f"{qad.get('kl_before', 0):.4f} -> {qad.get('kl_after', 0):.4f}"
                          + ("" if qad.get("kept") else " (not kept: it did not go down)"))
        console.print("checksums verified" if m.get("files") else
                      "[yellow]no checksums recorded (written by an earlier shrink): files not verified[/yellow]")
        return
    loaded = read_model(path)
    console.print(size_table(size_rows(loaded.model, output_layer_name(loaded.model)), f"{path}"))


def _folder_rows(manifest: dict, header: dict) -> dict:
    """(modules, tensors, bytes) per kind of tensor, from the weights file's header."""
    rows: dict[str, list] = {}
    module_fmt = manifest["modules"]
    # a layer stored as several (a mixture's expert, as per-expert tensors) is counted as itself
    owner = {part: name for name, info in module_fmt.items() for part in info.get("stored_as", [])}
    seen_modules: dict[str, set] = {}
    for k, (shape, dtype) in header.items():
        n = 1
        for d in shape:
            n *= d
        mod = k.rsplit(".", 1)[0]
        mod = owner.get(mod, mod)
        kind = f"Linear {module_fmt[mod]['format']}" if mod in module_fmt else "full precision"
        r = rows.setdefault(kind, [0, 0, 0])
        seen_modules.setdefault(kind, set()).add(mod)
        r[1] += 1
        r[2] += n * _dtype_bytes(dtype)
    for kind, mods in seen_modules.items():
        rows[kind][0] = len(mods)
    rows["total"] = [sum(r[0] for r in rows.values()), len(header), sum(r[2] for r in rows.values())]
    return {k: tuple(v) for k, v in rows.items()}


def _dtype_bytes(name: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}.get(name, 4)
