"""What was really done to each quantized layer, which is not always what was asked: a convolution or an
embedding under a calibrated method is rounded to nearest, an AWQ scale whose fold was not exact is not
applied (AWQ is then clipping alone). Saved per module in shrink.json and summed up by the CLI."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import torch.nn as nn

from .conv import QuantConv2d
from .embedding import QuantEmbedding
from .linear import CastLinear, QuantLinear


@dataclass
class LayerDone:
    """How one layer's stored weights were produced: `method` is one of "cast", "rtn", "gptq", "awq",
    "awq+gptq", "awq (clipping only)" or "imported" (read from another tool's checkpoint); `notes` say why
    it differs from what was asked, and what the calibrated methods chose."""

    method: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _calibrated(asked: str, info: dict) -> LayerDone:
    if "note" in info:  # left out of the blockwise pass (calibrated.py says why)
        return LayerDone("rtn", [info["note"]])
    notes = []
    fold = info.get("awq_fold")
    folded = isinstance(fold, str) and not fold.startswith("not applied")
    if asked in ("awq", "awq+gptq"):
        if fold is None:
            notes.append("no layer feeding it takes AWQ's scales exactly (a norm or a Linear): no scales applied")
        else:
            notes.append(f"AWQ scales {fold}")
    if asked == "awq":
        method = "awq" if folded else "awq (clipping only)"
        if "clip_mean" in info:
            notes.append(f"clipping: mean ratio {info['clip_mean']:g}")
    elif asked == "awq+gptq":
        method = "awq+gptq" if folded else "gptq"
    else:
        method = asked
    if info.get("damp_retries"):
        notes.append(f"Hessian singular: dampening raised to {info['damp']:g}")
    return LayerDone(method, notes)


def layers_done(model: nn.Module, method: str | None, calibration: dict | None) -> dict[str, LayerDone]:
    """LayerDone per quantized layer of `model`, from the method asked and the calibration record."""
    details = (calibration or {}).get("layers") or {}
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, CastLinear):
            out[name] = LayerDone("cast")
        elif isinstance(m, (QuantLinear, QuantEmbedding, QuantConv2d)):
            if method is None:
                out[name] = LayerDone("imported")
            elif method == "rtn" or name not in details:
                note = [] if method == "rtn" else [f"not in the calibrated pass ({type(m).__name__}): round to nearest"]
                out[name] = LayerDone("rtn", note)
            else:
                out[name] = _calibrated(method, details[name])
    return out


def summary_line(done: dict[str, LayerDone], asked: str | None) -> str | None:
    """One line counting layers per method applied, when any differs from `asked` (None otherwise)."""
    counts = Counter(d.method for d in done.values() if d.method != "cast")
    if not counts or set(counts) <= {asked}:
        return None
    return "applied: " + ", ".join(f"{m} to {n} layer{'s' * (n != 1)}" for m, n in counts.most_common()) + \
        f" (asked: {asked}; shrink.json says why, per layer)"
