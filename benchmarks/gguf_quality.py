"""shrink's GGUF exports against llama.cpp's own quantization types, measured by llama.cpp itself.

SmolLM2-135M-Instruct, full precision (shrink's float32 model, dequantized from the package's Q4_1 file), written
as an F32 GGUF. llama.cpp's side: `llama-imatrix` on the calibration text (BBC business articles 200-399, 32
chunks of 512 tokens, as shrink calibrates), then `llama-quantize --imatrix` of that F32 file into each type
(its defaults otherwise: the tied output/embedding table in Q8_0 where Q6_K does not fit 576 columns, K-types
falling back to Q5_0/Q5_1 on 576-wide layers), and Q4_0 without an importance matrix. `mix-iq4nl-int5` is
shrink's analogue of Q4_K_M's mix: iq4nl-g32, with int5-g32 for the attention values and down projections. shrink's side: each
recipe on the same calibration text, the embedding table (tied to the output layer) in int8-g32 as llama.cpp
keeps it (Q8_0), exported with `shrink.export_gguf` (codes copied exactly). `like-Q4_K_M` (any llama.cpp type
measured in the same run) is shrink in exactly the types llama-quantize chose for each tensor of that file (Q4_K ->
q4k, Q6_K -> q6k, Q5_0 -> int5-g32, Q8_0 -> int8-g32, ...): the same file size, shrink's codes against llama.cpp's. Every file goes through
`llama-perplexity --kl-divergence` against the F32 file's logits on held-out text (BBC business articles
000-059): mean KL divergence, perplexity, top-token agreement, and bits per weight from the file size.
shrink's own measurement of its model (PyTorch, the same tokens and positions as llama-perplexity scores:
chunks of 512, the second half of each) is printed beside llama.cpp's figure for the exported file.

    .venv/bin/python benchmarks/gguf_quality.py [--shrink gptq:int4-g32,...] [--llama Q4_0,Q5_0,...]
        [--work /tmp/shrink-gguf] [--out benchmarks/results/gguf_quality.json]

Needs llama.cpp's tools (../shared/tools/build-llama-cpp.sh; ~/.cache/llama.cpp-0.3.36/bin).
"""

from __future__ import annotations

import argparse
import copy
import json
import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import bbc_texts, machine  # noqa: E402
from quant_quality import CALIB_FILES, EVAL_FILES  # noqa: E402

import shrink  # noqa: E402
from shrink.core.atomic import write_json  # noqa: E402
from shrink.io import read_model  # noqa: E402

TOOLS = Path.home() / ".cache" / "llama.cpp-0.3.36" / "bin"
CTX = 512
SHRINK_DEFAULT = ("gptq:int4-g32,gptq:iq4nl-g32,awq+gptq:iq4nl-g32,gptq+qad100:iq4nl-g32,gptq+qad100:int4-g32,"
                  "gptq:int5-g32,gptq:int8-g32,gptq:like-Q4_K_S,gptq:like-Q4_K_M,awq+gptq:like-Q4_K_M")
LLAMA_DEFAULT = "Q4_0-noimatrix,Q4_0,Q4_1,IQ4_NL,Q4_K_S,Q4_K_M,Q5_0,Q5_1,Q8_0"
# GGUF type -> the shrink format that copies into it exactly; GGUF tensor -> the module it comes from
LIKE = {"Q4_0": "int4-g32", "Q4_1": "int4-g32-asym", "Q5_0": "int5-g32", "Q5_1": "int5-g32-asym", "Q8_0": "int8-g32",
        "IQ4_NL": "iq4nl-g32", "Q2_K": "q2k", "Q3_K": "q3k", "Q4_K": "q4k", "Q5_K": "q5k", "Q6_K": "q6k"}
MODULES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}


def run(cmd: list, log: Path) -> str:
    """Run a llama.cpp tool; its output (stdout and stderr) kept in `log` and returned."""
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    log.write_text(r.stdout + r.stderr)
    if r.returncode:
        raise SystemExit(f"{cmd[0]} failed ({r.returncode}); see {log}")
    return r.stdout + r.stderr


def llama_kld(path: Path, base_logits: Path, work: Path) -> dict:
    """llama-perplexity --kl-divergence of `path` against the saved F32 logits: KLD, PPL, top-token agreement."""
    out = run([TOOLS / "llama-perplexity", "-m", path, "--kl-divergence-base", base_logits, "--kl-divergence",
               "-c", CTX, "-t", "2"], work / f"{path.stem}.kld.log")
    def num(label):
        m = re.search(label + r"\s*:\s*([-\d.]+)", out)
        return float(m[1]) if m else None
    return {"kld": num(r"Mean\s+KLD"), "ppl": num(r"Mean PPL\(Q\)"), "ppl_base": num(r"Mean PPL\(base\)"),
            "same_top": num(r"Same top p"), "kld_p99": num(r"99\.0%\s+KLD")}


def shrink_kld(base, model, ids: torch.Tensor) -> float:
    """Mean KL(base || model) over the positions llama-perplexity scores: chunks of CTX tokens (BOS first where
    the tokenizer adds one), the logits of positions CTX/2 .. CTX-2 (each predicting the next token)."""
    first, total, n = CTX // 2, 0.0, 0
    with torch.no_grad():
        for c in range(len(ids) // CTX):
            w = ids[c * CTX:(c + 1) * CTX].unsqueeze(0)
            ref = F.log_softmax(base(w).logits[0, first:CTX - 1].double(), -1)
            lp = F.log_softmax(model(w).logits[0, first:CTX - 1].double(), -1)
            total += (ref.exp() * (ref - lp)).sum().item()
            n += CTX - 1 - first
    return total / n


# shrink's analogue of llama.cpp's Q4_K_M mix (more bits where llama.cpp gives them: attention values and the
# MLP's down projection), in types shrink's codes copy into exactly
MIXES = {"mix-iq4nl-int5": {"*.v_proj": "int5-g32", "*.down_proj": "int5-g32", "*": "iq4nl-g32"}}


def like(path: Path) -> dict:
    """{module: shrink format} giving every tensor of llama.cpp's file `path` the format that copies into its type."""
    import gguf

    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.tensor_type.name in ("F32", "F16", "BF16"):
            continue
        if t.tensor_type.name not in LIKE:
            raise SystemExit(f"{path}: tensor {t.name} is {t.tensor_type.name}, which no shrink format copies into")
        if t.name == "token_embd.weight":
            out["model.embed_tokens"] = LIKE[t.tensor_type.name]
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
        if not m or m[2] not in MODULES:
            raise SystemExit(f"{path}: tensor {t.name} ({t.tensor_type.name}) has no module here")
        out[f"model.layers.{m[1]}.{MODULES[m[2]]}"] = LIKE[t.tensor_type.name]
    return out


def shrink_variant(base, tok, variant: str, calib: Path, samples: int, work: Path):
    """The recipe `method:format` (a format, a name in MIXES, or like-TYPE: llama.cpp's file of that type, tensor
    by tensor) on the calibration text, the tied embedding table in int8-g32 (like-TYPE: in the file's type)."""
    method, fmt = variant.split(":")
    parts = method.split("+")
    qad = [(int(p.lstrip("qadc")), p.startswith("qadc")) for p in parts if p.startswith("qad")]
    recipe = shrink.quant.parse_method("+".join(p for p in parts if not p.startswith("qad")))
    if qad:  # qadcN: the codes trained too, at 5e-3 a step
        recipe = dataclasses.replace(recipe, qad=shrink.quant.QAD(steps=qad[0][0], codes_lr=5e-3 * qad[0][1]))
    m = copy.deepcopy(base)
    kw = {} if recipe.method == "rtn" and not qad else dict(calibration=calib, tokenizer=tok, n_samples=samples,
                                                           seq_len=CTX)
    if fmt.startswith("like-"):
        spec = like(work / f"llama-{fmt[5:]}.gguf")
    else:
        spec = {"model.embed_tokens": "int8-g32", **MIXES.get(fmt, {"*": fmt})}
    shrink.quantize(m, spec, method=recipe, progress=False, **kw)
    return m


def save(args, rows: dict) -> None:
    write_json(args.out, {"machine": machine(), "eval": f"BBC business articles {EVAL_FILES}",
                          "calibration": f"BBC business articles {CALIB_FILES}, {args.samples} x {CTX} tokens",
                          "llama_cpp": "0.3.36 (llama-cpp-python's vendored llama.cpp)", "rows": rows})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shrink", default=SHRINK_DEFAULT, help=f"shrink recipes method:format (default {SHRINK_DEFAULT})")
    ap.add_argument("--llama", default=LLAMA_DEFAULT, help=f"llama-quantize types (default {LLAMA_DEFAULT})")
    ap.add_argument("--samples", type=int, default=32, help="calibration chunks of 512 tokens (default 32)")
    ap.add_argument("--work", default="/tmp/shrink-gguf", help="folder for the GGUF files (default /tmp/shrink-gguf)")
    ap.add_argument("--out", default="benchmarks/results/gguf_quality.json")
    ap.add_argument("--merge", action="store_true", help="keep the rows of an existing --out file not measured now")
    args = ap.parse_args(argv)
    console = Console(width=140)
    if not (TOOLS / "llama-perplexity").exists():
        raise SystemExit(f"llama.cpp's tools are not in {TOOLS}: run ../shared/tools/build-llama-cpp.sh")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    eval_set = set(bbc_texts("business", *EVAL_FILES))
    eval_path = work / "eval.txt"
    eval_path.write_text("\n\n".join(bbc_texts("business", *EVAL_FILES)))
    calib = work / "calibration.txt"
    calib.write_text("\n\n".join(t for t in bbc_texts("business", *CALIB_FILES) if t not in eval_set))

    loaded = read_model()
    base, tok = loaded.model, loaded.tokenizer
    f32 = work / "f32.gguf"
    if not f32.exists():
        shrink.export_gguf(loaded, f32, float_type="f32")
    base_logits = work / "f32.logits"
    if not base_logits.exists():
        run([TOOLS / "llama-perplexity", "-m", f32, "-f", eval_path, "--kl-divergence-base", base_logits,
             "-c", CTX, "-t", "2"], work / "f32.base.log")
    imatrix = work / "imatrix.gguf"
    if not imatrix.exists():
        t = time.perf_counter()
        run([TOOLS / "llama-imatrix", "-m", f32, "-f", calib, "-o", imatrix, "-c", CTX, "--chunks", args.samples,
             "-t", "2"], work / "imatrix.log")
        console.print(f"llama-imatrix: {time.perf_counter() - t:.0f} s")
    params = sum(p.numel() for p in base.parameters())  # the table counted once (tied)

    out_path = Path(args.out)
    rows = json.loads(out_path.read_text())["rows"] if args.merge and out_path.exists() else {}
    for kind in filter(None, args.llama.split(",")):
        qtype, plain = kind.split("-")[0], kind.endswith("-noimatrix")
        path = work / f"llama-{kind}.gguf"
        t = time.perf_counter()
        run([TOOLS / "llama-quantize", *([] if plain else ["--imatrix", imatrix]), f32, path, qtype, "2"],
            work / f"{path.stem}.quantize.log")
        r = {"side": "llama.cpp", "seconds": time.perf_counter() - t, **llama_kld(path, base_logits, work)}
        r["bits_per_weight"] = path.stat().st_size * 8 / params
        rows[f"llama.cpp {kind}"] = r
        save(args, rows)  # after every row: a long run stopped part way keeps what it measured
        console.print(f"llama.cpp {kind}: KLD {r['kld']}, {r['bits_per_weight']:.2f} bits/w")

    ids = tok(eval_path.read_text(), return_tensors="pt").input_ids[0]
    if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None:
        ids = torch.cat([torch.tensor([tok.bos_token_id]), ids])
    for v in filter(None, args.shrink.split(",")):
        t = time.perf_counter()
        m = shrink_variant(base, tok, v, calib, args.samples, work)
        seconds = time.perf_counter() - t
        path = work / f"shrink-{v.replace(':', '-').replace('+', '_')}.gguf"
        rep = shrink.export_gguf(shrink.io.LoadedModel(m, tok, loaded.source), path, force=True)
        r = {"side": "shrink", "seconds": seconds, **llama_kld(path, base_logits, work),
             "kld_shrink": shrink_kld(base, m, ids), "types": rep.tensors}
        r["bits_per_weight"] = path.stat().st_size * 8 / params
        rows[f"shrink {v}"] = r
        save(args, rows)
        console.print(f"shrink {v}: KLD {r['kld']} (shrink measures {r['kld_shrink']:.5f}), "
                      f"{r['bits_per_weight']:.2f} bits/w, {seconds:.0f} s")
        del m

    t = Table(title=f"SmolLM2-135M-Instruct in llama.cpp: llama-perplexity --kl-divergence against F32, "
                    f"{len(ids) // CTX} chunks of {CTX} (second halves scored)")
    for c in ("file", "bits/w", "KLD", "KLD p99", "PPL", "vs F32", "same top", "KLD by shrink", "seconds"):
        t.add_column(c, justify="left" if c == "file" else "right")
    for k, r in sorted(rows.items(), key=lambda kv: kv[1]["bits_per_weight"]):
        t.add_row(k, f"{r['bits_per_weight']:.2f}", f"{r['kld']:.4f}", f"{r['kld_p99'] or 0:.3f}", f"{r['ppl']:.3f}",
                  f"{100 * (r['ppl'] / r['ppl_base'] - 1):+.1f}%", f"{r['same_top']:.1f}%",
                  f"{r['kld_shrink']:.4f}" if "kld_shrink" in r else "", f"{r['seconds']:.0f}")
    console.print(t)
    save(args, rows)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
