"""Models of the sizes people compress, with random weights: peak resident memory and wall time of shrink's jobs.

Writes bf16 sharded Hugging Face folders shaped like real models (nothing is downloaded; the weights are
random, written a shard at a time so the writer holds one shard): `1b` (Llama-3.2-1B: 1.24B parameters,
2.5 GB), `8b` (Llama-3.1-8B: 8.0B, 16 GB), `8b-2` (the 8B shape with 2 of its 32 blocks: a streamed job's
peak and time per block are the 8B model's), `moe` (Mixtral-shaped, 8 experts, about 1.6B). Then runs, each
in a fresh process measured by the kernel (its peak resident set, by /usr/bin/time; the jobs one after the
other, a peer right after shrink's job on the same weights):
- `rtn`: `shrink quantize DIR --format int4-g64` (streamed block by block from the shards);
- `llama-quantize`: llama.cpp's `llama-quantize` to Q4_0 with its defaults, on the same weights written as a
  bf16 GGUF file (where `../shared/tools/build-llama-cpp.sh` built it; Llama shapes);
- `gptq`: `--method gptq` on 16 windows of 256 tokens (time per block; the Hessians' and forward passes'
  share grows with the tokens, the solve does not);
- `qad`: round to nearest and 2 steps of quantization-aware distillation on 8 windows of 256 tokens (one held
  out), streamed (`--stream`: the original's outputs computed from the shards a block at a time, the packed
  output read back and trained) and then loaded whole (`--no-stream`), for the peak of each;
- `load`: `shrink.load` of the RTN output and one forward step of 4 tokens;
- `export`: `shrink export` of the RTN output to a GGUF file (Q4_0, read a module at a time).
A job shrink refuses up front (it would not fit in memory) is reported as refused with its one line.

    .venv/bin/python benchmarks/scale.py [--shapes 1b,8b] [--jobs rtn,llama-quantize,gptq,qad,load]
        [--work /tmp/shrink-scale] [--out benchmarks/results/scale.json]
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
    # the 8B shape's widths and vocabulary with 2 of its 32 blocks: a streamed job's peak memory and time per
    # block are the full model's (they hold one block), for a fraction of the disk and time
    "8b-2": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                           tie_word_embeddings=False, rope_theta=500000.0)),
    # Mixtral's widths, with the built-in tokenizer's 49,152 tokens (Mixtral's 32,000 are fewer: its GGUF
    # export would refuse the tokenizer these random weights are given)
    "moe": ("mixtral", dict(vocab_size=49152, hidden_size=1024, intermediate_size=3584, num_hidden_layers=12,
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


def write_gguf_bf16(folder: Path, path: Path) -> dict:
    """The same weights as a bf16 GGUF file for llama.cpp's `llama-quantize` (what its converter would give;
    written a tensor at a time; no tokenizer: llama-quantize does not read one), unless it is there."""
    import gguf
    import numpy as np
    from transformers import AutoConfig

    from shrink.io.gguf_meta import add_architecture
    from shrink.io.shards import Checkpoint

    if path.is_file():
        return {"seconds": 0.0, "bytes": path.stat().st_size}
    t0 = time.perf_counter()
    config = AutoConfig.from_pretrained(folder)
    ck = Checkpoint(folder)
    arch = gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path) + ".part", gguf.MODEL_ARCH_NAMES[arch])
    add_architecture(writer, config)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    order = []
    for name, st in ck.tensors.items():
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        # norms as float32, as llama.cpp's converter writes 1-D tensors
        kind = gguf.GGMLQuantizationType.F32 if len(st.shape) == 1 else gguf.GGMLQuantizationType.BF16
        nbytes = (4 if len(st.shape) == 1 else 2) * int(torch.tensor(st.shape).prod())
        writer.add_tensor_info(gname, st.shape, np.float32 if len(st.shape) == 1 else np.int16, nbytes,
                               raw_dtype=kind)
        order.append(name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name in order:
        t = ck.tensor(name)
        data = t.float().numpy() if t.dim() == 1 else t.view(torch.int16).numpy()
        writer.write_tensor_data(data)
    writer.close()
    os.replace(str(path) + ".part", path)
    return {"seconds": time.perf_counter() - t0, "bytes": path.stat().st_size}


def llama_quantize() -> Path | None:
    """llama.cpp's llama-quantize, as ../shared/tools/build-llama-cpp.sh installs it (None when absent)."""
    tool = Path.home() / ".cache" / "llama.cpp-0.3.36" / "bin" / "llama-quantize"
    return tool if tool.is_file() else None


def measured(cmd: list[str]) -> dict:
    """Run `cmd` under /usr/bin/time; its wall time, peak resident memory (the kernel's count for that process
    alone: a child forked from this process would count the pages it shares with it before its exec, which
    after writing a model are gigabytes), exit status and last line of output."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB %M", *cmd], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    lines = [line for line in proc.stdout.strip().splitlines() if "it/s]" not in line]
    peak = next(int(line.split()[1]) for line in reversed(lines) if line.startswith("PEAK_KB"))
    err = [line for line in lines if not line.startswith(("PEAK_KB", "Command exited"))]
    return {"seconds": time.perf_counter() - t0, "peak_rss_bytes": peak * 1024, "exit": proc.returncode,
            "last_line": err[-1][:300] if err else ""}


def calibration_text(path: Path, words: int = 200_000) -> Path:
    """Plain English-like text for GPTQ's calibration (the weights are random: any text calibrates them)."""
    import random

    if not path.is_file():
        vocab = ("the a of to and in is was for on that with as by at from it be has are said year new market bank "
                 "shares growth sales profit rise fall price company firm deal money tax oil rate economy").split()
        rng = random.Random(0)
        path.write_text(" ".join(rng.choice(vocab) for _ in range(words)))
    return path


def give_tokenizer(folder: Path) -> None:
    """The built-in SmolLM2 tokenizer in `folder` (random-weight folders have none; its 49,152 tokens fit
    any of the vocabularies here), so text calibration can run."""
    if not (folder / "tokenizer.json").is_file():
        from shrink.io.models import default_gguf_path, gguf_tokenizer

        gguf_tokenizer(default_gguf_path()).save_pretrained(folder)


LOAD_AND_STEP = """
import sys, time, torch, shrink
t0 = time.perf_counter()
model = shrink.load(sys.argv[1])
t1 = time.perf_counter()
with torch.no_grad():
    model(torch.tensor([[1, 2, 3, 4]]))
print(f"load {t1 - t0:.1f} s, one step {time.perf_counter() - t1:.2f} s")
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1b", help=f"comma-separated, of {', '.join(SHAPES)} (default 1b)")
    ap.add_argument("--jobs", default="rtn,llama-quantize,load",
                    help="comma-separated, of rtn, llama-quantize, gptq, qad, load, export (default rtn,llama-quantize,load)")
    ap.add_argument("--work", default="/tmp/shrink-scale", help="where the models and outputs go (default /tmp/shrink-scale)")
    ap.add_argument("--out", default="benchmarks/results/scale.json")
    args = ap.parse_args(argv)
    console = Console(width=150)
    shrink_cli = str(Path(sys.executable).with_name("shrink"))
    jobs = args.jobs.split(",")
    rows = {}
    for shape in args.shapes.split(","):
        folder = Path(args.work) / shape
        console.print(f"{shape}: writing random bf16 weights to {folder} (once) ...")
        made = write_model(shape, folder)
        blocks = SHAPES[shape][1]["num_hidden_layers"]
        r = rows[shape] = {"model": made, "blocks": blocks}
        out = Path(args.work) / f"{shape}-int4-g64"
        give_tokenizer(folder)  # random weights come with no tokenizer: the output and its GGUF file need one
        if "rtn" in jobs:
            r["shrink rtn int4-g64"] = measured([shrink_cli, "quantize", str(folder), "--format", "int4-g64",
                                                 "--out", str(out), "--force"])
        tool = llama_quantize()
        if "llama-quantize" in jobs and tool is not None and SHAPES[shape][0] == "llama":
            gguf_path = Path(args.work) / f"{shape}-bf16.gguf"
            write_gguf_bf16(folder, gguf_path)
            r["llama-quantize Q4_0"] = measured([str(tool), str(gguf_path), str(Path(args.work) / f"{shape}-q4_0.gguf"),
                                                 "Q4_0"])
        if "gptq" in jobs:
            text = calibration_text(Path(args.work) / "calibration.txt")
            job = measured([shrink_cli, "quantize", str(folder), "--format", "int4-g64", "--method", "gptq",
                            "--calibration", str(text), "--samples", "16", "--seq-len", "256",
                            "--out", str(Path(args.work) / f"{shape}-gptq"), "--force"])
            job["seconds_per_block"] = job["seconds"] / blocks
            r["shrink gptq int4-g64 16x256"] = job
        if "qad" in jobs:  # streamed (the original's outputs from the shards, the packed output trained), then whole
            text = calibration_text(Path(args.work) / "calibration.txt")
            for how in ("--stream", "--no-stream"):
                r[f"shrink rtn int4-g64 + QAD 2 steps 8x256 {how}"] = measured(
                    [shrink_cli, "quantize", str(folder), "--format", "int4-g64", "--qad", str(text), "--qad-steps", "2",
                     "--samples", "8", "--seq-len", "256", how, "--out", str(Path(args.work) / f"{shape}-qad"), "--force"])
        if "load" in jobs and (out / "shrink.json").is_file():
            r["shrink load + one step"] = measured([sys.executable, "-c", LOAD_AND_STEP, str(out)])
        if "export" in jobs and (out / "shrink.json").is_file():
            r["shrink export --gguf (streamed)"] = measured([shrink_cli, "export", str(out), "--gguf",
                                                            str(Path(args.work) / f"{shape}-int4-g64.gguf"), "--force"])
    t = Table(title="shrink on random-weight models of real shapes (bf16 shards): wall time and peak resident memory "
                    "(the kernel's count for the job's process); 2 threads")
    for c in ("shape", "parameters", "bf16 GB", "job", "exit", "wall s", "s/block", "peak RSS GB", "note"):
        t.add_column(c, justify="left" if c in ("shape", "job", "note") else "right")
    for shape, r in rows.items():
        for name, j in r.items():
            if not isinstance(j, dict) or "exit" not in j:
                continue
            t.add_row(shape, f"{r['model']['parameters'] / 1e9:.2f}B", f"{r['model']['bytes'] / 1e9:.1f}", name,
                      str(j["exit"]), f"{j['seconds']:.0f}", f"{j['seconds'] / r['blocks']:.1f}",
                      f"{j['peak_rss_bytes'] / 1e9:.2f}", j["last_line"][:60] if j["exit"] or "load" in name else "")
    console.print(t)
    from shrink.core.atomic import write_json

    write_json(Path(args.out), {"machine": machine(), "rows": rows})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
