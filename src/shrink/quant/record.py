"""What was really done to each quantized layer, which is not always what was asked: a convolution or an
embedding under a calibrated method is rounded to nearest, an AWQ scale whose fold was not exact is not
applied (AWQ is then clipping alone). Saved per module in shrink.json and summed up by the CLI."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import torch.nn as nn

from .check import ForwardCheck
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
    if "tokens" in info:
        notes.append(f"an expert: calibrated on {info['tokens']:,} tokens")
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


@dataclass
class ModelRecord:
    """What was done to a model, in one place: the method asked, the format of every layer planned (None:
    kept in full precision), the calibration record, the forward check, where the model came from, and
    per quantized layer what really produced its weights. The same content as shrink.json's fields of
    those names; `shrink.info(model)` returns it. A module carries it as `model.shrink_record`
    (written by quantize and the loaders through `update_record`; read through `record_of`)."""

    method: str | None = None
    formats: dict[str, str | None] = field(default_factory=dict)
    calibration: dict | None = None
    check: ForwardCheck | None = None
    source: dict = field(default_factory=dict)
    layers: dict[str, LayerDone] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)  # layer -> why it got another format than asked
    rotation: dict | None = None  # the rotation folded into the weights before quantizing (rotate.py), if any

    @property
    def kept_full_precision(self) -> list[str]:
        return sorted(n for n, f in self.formats.items() if f is None)

    def to_dict(self) -> dict:
        return {"method": self.method, "formats": dict(self.formats), "kept_full_precision": self.kept_full_precision,
                "calibration": self.calibration, "check": self.check.to_dict() if self.check else None,
                "source": dict(self.source), "layers": {n: d.to_dict() for n, d in self.layers.items()},
                "fallbacks": dict(self.fallbacks), "rotation": self.rotation}


ATTRIBUTE = "shrink_record"  # the one attribute shrink sets on a module it quantized or loaded


def update_record(model: nn.Module, **changes) -> ModelRecord:
    """Set fields of the ModelRecord `model` carries (a new one when it has none) and return it."""
    stored = model.__dict__.get(ATTRIBUTE) or ModelRecord()
    bad = set(changes) - {"method", "formats", "calibration", "check", "source", "fallbacks", "rotation"}
    if bad:
        raise TypeError(f"update_record: no field {', '.join(sorted(bad))} (layers are read from the model)")
    record = replace(stored, **changes)
    object.__setattr__(model, ATTRIBUTE, record)  # a plain attribute: not a submodule, parameter or buffer
    return record


def record_of(model: nn.Module) -> ModelRecord:
    """The ModelRecord of a module as quantize (or a loader) left it, with what produced each quantized
    layer's weights read from the layers the model holds now (an empty record for a module shrink never
    touched)."""
    stored = model.__dict__.get(ATTRIBUTE) or ModelRecord()
    layers = layers_done(model, stored.method, stored.calibration)
    for name, why in (stored.fallbacks or {}).items():
        if name in layers:
            layers[name].notes.insert(0, why)
    return replace(stored, formats=dict(stored.formats), source=dict(stored.source or {}), layers=layers,
                   fallbacks=dict(stored.fallbacks or {}))
