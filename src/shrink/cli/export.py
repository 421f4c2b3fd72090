"""`shrink export`: a folder saved by shrink as a GGUF file for llama.cpp, codes copied exactly."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ..core.errors import ShrinkError
from .common import FORCE, console, main, mb


@main.command("export")
@click.argument("model")
@click.option("--gguf", "gguf_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The GGUF file to write.")
@click.option("--float", "float_type", type=click.Choice(["f16", "f32"]), default="f16", show_default=True,
              help="Type of the embeddings and the layers kept in full precision.")
@click.option("--requantize", default=None, metavar="TYPE[,TYPE...]",
              help="Re-quantize layers no GGUF type holds exactly (int6, int3, int2, groups of 16) into these GGUF "
                   "types, each layer the first whose block divides its inputs (e.g. Q4_K,Q5_0): llama.cpp's "
                   "quantizers where llama-cpp-python is installed, else gguf-py's (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0). "
                   "Without it such layers are refused.")
@click.option("--imatrix", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="llama-imatrix's importance file: weights the rounding of --requantize (llama.cpp's quantizers).")
@click.option("--calibration", default=None, type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="Text (.txt/.jsonl) on which shrink measures each layer's mean square input, to weigh the rounding "
                   "of --requantize as --imatrix does (the model is loaded whole for it).")
@click.option("--samples", "n_samples", default=32, show_default=True, help="Windows of --calibration text to use.")
@click.option("--seq-len", default=512, show_default=True, help="Tokens per --calibration window.")
@FORCE


def export_command(model, gguf_path, float_type, requantize, imatrix, calibration, n_samples, seq_len, force):
    """Write MODEL (a folder saved by shrink) as a GGUF file for llama.cpp, copying its codes exactly.

    int4 -> Q4_0, int5 -> Q5_0, int8 -> Q8_0, iq4nl -> IQ4_NL, q2k ... q6k -> Q2_K ... Q6_K, int4-asym ->
    Q4_1 and int5-asym -> Q5_1 (offsets rounded to fp16), bf16/fp16 layers as they
    are; q/k rows permuted as llama.cpp expects; the tokenizer and chat template copied from the GGUF file
    the model came from, else built from its tokenizer. The file is read back and checked tensor by
    tensor before it is put in place. Check it in llama.cpp with
    `shrink compare ORIGINAL OUT.gguf --runtime llama.cpp`."""
    from ..io import is_shrink_folder
    from ..io.export import export_gguf

    if not (Path(model).is_dir() and is_shrink_folder(model)):
        raise ShrinkError(f"{model}: not a folder saved by shrink (export takes the --out of shrink quantize)")
    with console.status("exporting"):
        r = export_gguf(model, gguf_path, float_type=float_type, requantize=requantize, imatrix=imatrix,
                        calibration=calibration, n_samples=n_samples, seq_len=seq_len, force=force)
    t = Table(title=f"{model} -> {r.path}")
    for col in ("GGUF type", "tensors", "largest difference read back"):
        t.add_column(col, justify="left" if col == "GGUF type" else "right")
    for kind, n in sorted(r.tensors.items()):
        err = r.max_error.get(kind, 0.0)
        t.add_row(kind, str(n), "0 (exact)" if err == 0 else f"{err:.2g}")
    console.print(t)
    console.print(f"{mb(r.bytes)} MB; {r.metadata_from}")
    if r.requantized:
        share = sum(r.requantized.values()) / len(r.requantized)
        kinds = {}
        for n in r.requantized:
            kinds[r.layers[n]] = kinds.get(r.layers[n], 0) + 1
        into = ", ".join(f"{k} {c}" for k, c in sorted(kinds.items()))
        weights = imatrix or calibration
        console.print(f"[yellow]re-quantized {len(r.requantized)} layers ({into}"
                      f"{', weighted by the inputs of ' + weights if weights else ', unweighted'}): {share:.1%} of "
                      "their weights changed value (these layers differ from what shrink measured)[/yellow]")
    for note in r.notes:
        console.print(f"note: {note}")
