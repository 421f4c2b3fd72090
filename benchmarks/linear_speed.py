"""Speed, weight memory and error of quantized Linear layers against fp32, side by side in one run.

8 x nn.Linear(2048, 2048), batches of 1, 2, 8, 32, 128 and 512 rows: fp32, torch's dynamic int8 (fbgemm),
and shrink's int8, int4-g64 and int4-g32 (and, with --peers, the peers that are installed). shrink's
layers run the tiled kernel (int8 activations per block of 32, weights in tiles of 8 outputs) at every
batch size. Candidates are interleaved round by round; the table shows medians, the ratio to
fp32 measured in the same rounds, and the CPU load other processes put on the machine meanwhile.

    .venv/bin/python benchmarks/linear_speed.py [--peers] [--rounds 7] [--batches 1,2,8,32,128,512]
        [--out benchmarks/results/linear_speed.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import CpuLoad, interleaved_times, machine, median_spread  # noqa: E402

import shrink  # noqa: E402
from shrink.core.atomic import write_json  # noqa: E402
from shrink.quant import QuantLinear  # noqa: E402
from shrink.quant.kernels import native  # noqa: E402

LAYERS, DIM = 8, 2048
FORMATS = ("int8", "int4-g64", "int4-g32")


def build_fp32(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(DIM, DIM, bias=False) for _ in range(LAYERS)]).eval()


def weight_bytes(model) -> int:
    """Bytes of the Linear weights (and scales) as stored."""
    if any(type(m).__module__.split(".")[0] in ("optimum", "torchao", "hqq") or
           any(type(p).__name__ != "Parameter" for p in m.parameters(recurse=False)) for m in model.modules()):
        # Peers keep weights in tensor subclasses; the serialized state is the honest measure.
        import io

        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        return buf.getbuffer().nbytes
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.weight_bytes()
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif type(m).__name__ == "Linear" and hasattr(m, "_packed_params"):  # torch dynamic int8, per-tensor scale
            total += m.weight().numel() + 8
    return total


def torch_dynamic(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def peers(model) -> dict:
    """Peer quantizers that are installed, as name -> (model or reason it was skipped)."""
    out = {}
    try:
        from optimum.quanto import freeze, qint4, qint8
        from optimum.quanto import quantize as qquant

        for name, w in (("quanto int8", qint8), ("quanto int4", qint4)):
            m = copy.deepcopy(model)
            qquant(m, weights=w)
            freeze(m)
            out[name] = m
    except Exception as e:  # noqa: BLE001 - any failure just means the peer is not comparable here
        out["quanto"] = f"skipped ({type(e).__name__}: {e})"
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        m = copy.deepcopy(model)
        quantize_(m, Int8WeightOnlyConfig())
        out["torchao int8 weight-only"] = m
    except Exception as e:  # noqa: BLE001
        out["torchao"] = f"skipped ({type(e).__name__}: {e})"
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        m = copy.deepcopy(model)
        cfg = BaseQuantizeConfig(nbits=4, group_size=64)
        for i, lin in enumerate(list(m)):
            m[i] = HQQLinear(lin, cfg, compute_dtype=torch.float32, device="cpu")
        out["hqq int4-g64"] = m
    except Exception as e:  # noqa: BLE001
        out["hqq"] = f"skipped ({type(e).__name__}: {e})"
    try:
        import bitsandbytes  # noqa: F401

        out["bitsandbytes"] = "skipped (its CPU path needs a build with CPU support; not measured)"
    except Exception as e:  # noqa: BLE001
        out["bitsandbytes"] = f"skipped ({type(e).__name__}: {e})"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", action="store_true", help="also measure installed peers (quanto, torchao, hqq, bitsandbytes)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds per batch size (default 7)")
    ap.add_argument("--batches", default="1,2,8,32,128,512", help="comma-separated batch sizes (default 1,2,8,32,128,512)")
    ap.add_argument("--out", default="benchmarks/results/linear_speed.json", help="JSON output path")
    args = ap.parse_args(argv)

    base = build_fp32()
    models = {"fp32": base, "torch dynamic int8": torch_dynamic(base)}
    for fmt in FORMATS:
        models[f"shrink {fmt}"] = shrink.quantize(copy.deepcopy(base), fmt, keep_output=False, progress=False)
    skipped = {}
    if args.peers:
        for k, v in peers(base).items():
            (skipped.__setitem__(k, v) if isinstance(v, str) else models.__setitem__(k, v))
    print(f"native kernel: {'yes' if native.available() else 'no (PyTorch path)'}", file=sys.stderr)

    results = {"machine": machine(), "layers": LAYERS, "dim": DIM, "native_kernel": native.available(),
               "skipped": skipped, "batches": {}}
    console = Console(width=110)
    for batch in (int(b) for b in args.batches.split(",")):
        torch.manual_seed(1)
        x = torch.randn(batch, DIM)
        with torch.no_grad():
            ref = base(x)
            errs = {k: ((m(x) - ref).norm() / ref.norm()).item() for k, m in models.items()}
            fns = {k: (lambda m=m: m(x)) for k, m in models.items()}
            load = CpuLoad().start()
            times = interleaved_times(fns, rounds=args.rounds, repeat=max(1, 32 // batch), warmup=1)
            other = load.stop()
        fp32_rounds = times["fp32"]
        table = Table(title=f"8 x Linear(2048, 2048), batch {batch}; CPU load from other processes {other:.0%}")
        for c in ("variant", "ms / forward", "spread", "speed vs fp32", "weight MB", "bits/weight", "rel. error"):
            table.add_column(c, justify="left" if c == "variant" else "right")
        rows = {}
        for k, samples in times.items():
            med, spread = median_spread(samples)
            ratio = median_spread([f / s for f, s in zip(fp32_rounds, samples)])[0]
            wb = weight_bytes(models[k])
            rows[k] = {"ms": med * 1e3, "spread": spread, "speedup_vs_fp32": ratio, "weight_bytes": wb,
                       "bits_per_weight": 8 * wb / (LAYERS * DIM * DIM), "rel_error": errs[k]}
            table.add_row(k, f"{med * 1e3:.2f}", f"±{spread:.0%}", f"{ratio:.2f}x", f"{wb / 1e6:.1f}",
                          f"{rows[k]['bits_per_weight']:.2f}", f"{errs[k]:.2e}")
        console.print(table)
        results["batches"][str(batch)] = {"rows": rows, "other_cpu_load": other}
    for k, why in skipped.items():
        console.print(f"{k}: {why}")
    write_json(args.out, results)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
