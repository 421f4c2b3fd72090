"""Models of the sizes people compress, with random weights: peak resident memory and wall time of shrink's jobs.

Writes bf16 sharded Hugging Face folders shaped like real models (nothing is downloaded; the weights are
random, written a shard at a time so the writer holds one shard): `1b` (Llama-3.2-1B: 1.24B parameters,
2.5 GB), `8b` (Llama-3.1-8B: 8.0B, 16 GB), `moe` (Mixtral-shaped, 8 experts, about 1.6B). Then runs, each in
a fresh process measured by the kernel (its peak resident set, by /usr/bin/time): round-to-nearest int4-g64
(`shrink quantize DIR --format int4-g64`). A job shrink refuses up front (the model does not fit in memory
as it is loaded) is reported as refused with its one line. llama.cpp's `llama-quantize` is not run here yet.

    .venv/bin/python benchmarks/scale.py [--shapes 1b] [--work /tmp/shrink-scale] [--out benchmarks/results/scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

SHAPES = {
    "1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         tie_word_embeddings=True, rope_theta=500000.0)),
    "8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         tie_word_embeddings=False, rope_theta=500000.0)),
    "moe": ("mixtral", dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=12,
                            num_attention_heads=16, num_key_value_heads=8, num_local_experts=8,
                            num_experts_per_tok=2, max_position_embeddings=32768, tie_word_embeddings=False)),
}
SHARD_BYTES = 2 * 10**9


def write_model(shape: str, folder: Path) -> dict:
    """A bf16 sharded folder of `shape` with random weights (std 0.02, norms 1), unless one is there already;
    what was written (parameters, bytes, seconds)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, fields = SHAPES[shape]
    done = folder / "model.safetensors.index.json"
    if done.is_file():
        index = json.loads(done.read_text())
        return {"parameters": index["metadata"]["total_parameters"], "bytes": index["metadata"]["total_size"],
                "seconds": 0.0}
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model(kind, **fields)
    config.architectures = [{"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}[kind]]
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = {k: v for k, v in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    g = torch.Generator().manual_seed(0)
    shards, current, size, weight_map, total = [], {}, 0, {}, 0
    for name, meta in names.items():
        t = torch.ones(meta.shape, dtype=torch.bfloat16) if meta.dim() == 1 else \
            (torch.randn(meta.shape, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        current[name] = t
        size += t.numel() * 2
        total += t.numel()
        if size >= SHARD_BYTES:
            shards.append(current)
            _flush(folder, shards, weight_map)
            current, size = {}, 0
    if current:
        shards.append(current)
        _flush(folder, shards, weight_map)
    n = len(shards)
    for i in range(1, n + 1):  # the names Hugging Face gives shards: model-0000i-of-0000n
        os.replace(folder / f"part-{i}.safetensors", folder / f"model-{i:05d}-of-{n:05d}.safetensors")
    weight_map = {k: f"model-{int(v.split('-')[1].split('.')[0]):05d}-of-{n:05d}.safetensors"
                  for k, v in weight_map.items()}
    config.save_pretrained(folder)
    nbytes = sum(f.stat().st_size for f in folder.glob("model-*.safetensors"))
    done.write_text(json.dumps({"metadata": {"total_size": nbytes, "total_parameters": total},
                                "weight_map": weight_map}, indent=1))
    return {"parameters": total, "bytes": nbytes, "seconds": time.perf_counter() - t0}


def _flush(folder: Path, shards: list, weight_map: dict) -> None:
    """Write the last shard as part-K and free its tensors (the writer holds one shard at a time)."""
    from safetensors.torch import save_file

    k = len(shards)
    save_file(shards[-1], folder / f"part-{k}.safetensors", metadata={"format": "pt"})
    weight_map.update({name: f"part-{k}.safetensors" for name in shards[-1]})
    shards[-1] = None


def measured(cmd: list[str]) -> dict:
    """Run `cmd` under /usr/bin/time; its wall time, peak resident memory (the kernel's count for that process
    alone: a child forked from this process would count the pages it shares with it before its exec, which
    after writing a model are gigabytes), exit status and last line of error output."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB %M", *cmd], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    lines = proc.stderr.strip().splitlines()
    peak = next(int(line.split()[1]) for line in reversed(lines) if line.startswith("PEAK_KB"))
    err = [line for line in lines if not line.startswith(("PEAK_KB", "Command exited"))]
    return {"seconds": time.perf_counter() - t0, "peak_rss_bytes": peak * 1024, "exit": proc.returncode,
            "last_line": err[-1][:300] if err else ""}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1b", help=f"comma-separated, of {', '.join(SHAPES)} (default 1b)")
    ap.add_argument("--work", default="/tmp/shrink-scale", help="where the models and outputs go (default /tmp/shrink-scale)")
    ap.add_argument("--out", default="benchmarks/results/scale.json")
    args = ap.parse_args(argv)
    console = Console(width=150)
    shrink_cli = str(Path(sys.executable).with_name("shrink"))
    rows = {}
    for shape in args.shapes.split(","):
        folder = Path(args.work) / shape
        console.print(f"{shape}: writing random bf16 weights to {folder} (once) ...")
        made = write_model(shape, folder)
        out = Path(args.work) / f"{shape}-int4-g64"
        job = measured([shrink_cli, "quantize", str(folder), "--format", "int4-g64", "--out", str(out), "--force"])
        rows[shape] = {"model": made, "rtn_int4_g64": job}
    t = Table(title="shrink on random-weight models of real shapes (bf16 shards); peak resident memory by the kernel")
    for c in ("shape", "parameters", "bf16 GB", "job", "exit", "wall s", "peak RSS GB", "note"):
        t.add_column(c, justify="left" if c in ("shape", "job", "note") else "right")
    for shape, r in rows.items():
        j = r["rtn_int4_g64"]
        t.add_row(shape, f"{r['model']['parameters'] / 1e9:.2f}B", f"{r['model']['bytes'] / 1e9:.1f}", "rtn int4-g64",
                  str(j["exit"]), f"{j['seconds']:.0f}", f"{j['peak_rss_bytes'] / 1e9:.2f}",
                  j["last_line"][:70] if j["exit"] else "")
    console.print(t)
    from shrink.core.atomic import write_json

    write_json(Path(args.out), {"machine": machine(), "rows": rows})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
