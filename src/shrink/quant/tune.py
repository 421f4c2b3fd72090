"""Tune a quantized block against its full-precision output: the codes stay, the fp16 group scales and
the block's normalisation weights move.

GPTQ minimises each layer's own output error; the block as a whole (attention, the gated MLP, the
residual) is nonlinear in those errors, and later layers cannot undo earlier ones. A few passes of Adam
over the calibration inputs, on the squared error of the block's output against what the
full-precision block gives for the same inputs, recover part of that (in the spirit of OmniQuant and
AutoRound, with integer codes fixed so the packed format and kernels are unchanged). Parameters move
relatively (scale * (1 + d)), so one learning rate suits layers of any magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .format import grid_levels, levels_of
from .layerwise import first_output
from .linear import QuantLinear
from .packing import unpack


@dataclass
class TuneResult:
    """Block output error (mean squared, over the calibration inputs) before and after tuning."""

    before: float
    after: float
    steps: int


class _Tunable(nn.Module):
    """A QuantLinear's codes as a fixed float matrix, its scales as a relative parameter."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        s = q.scales.to(torch.float32)
        g = q.in_features // s.shape[1]
        codes = unpack(q.qweight, q.spec.bits, q.in_features).to(torch.float32)
        zero = q.zeros.to(torch.float32).repeat_interleave(g, 1) if q.zeros is not None else float(q.zero_const)
        self.register_buffer("levels", levels_of(codes, zero, grid_levels(q.spec)))  # what the scales multiply
        self.register_buffer("s0", s)
        self.d = nn.Parameter(torch.zeros_like(s))
        self.bias = q.bias
        self.g = g

    def scales(self) -> torch.Tensor:
        return self.s0 * (1 + self.d)

    def forward(self, x):
        w = self.levels * self.scales().repeat_interleave(self.g, 1)
        return F.linear(x, w, self.bias)


def _norms(block: nn.Module) -> list[nn.Module]:
    """The block's normalisation layers with a per-channel weight (RMSNorm, LayerNorm)."""
    return [m for m in block.modules()
            if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), nn.Parameter)]


class Trainable:
    """While in its `with`: `module`'s QuantLinear layers compute from their codes and relative scales
    (`_Tunable`), its norms' weights from relative changes, all of them `params` (scales, norm weights) to
    train; `weights()` sets the norms' weights before each forward. After it, the layers are back; `keep()`
    writes the trained scales (fp16) and norm weights into them and returns what `undo(saved)` restores."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.quant = {n: m for n, m in module.named_modules() if isinstance(m, QuantLinear)}
        self.tunables = {n: _Tunable(m) for n, m in self.quant.items()}
        self.norms = _norms(module)
        self.norm0 = [m.weight for m in self.norms]  # the Parameters themselves, put back at the end
        self.norm_d = [nn.Parameter(torch.zeros_like(w)) for w in self.norm0]

    def params(self, lr: float, norm_lr: float) -> list[dict]:
        """Optimizer parameter groups: the scales' relative changes at `lr`, the norms' at `norm_lr`."""
        return [{"params": [t.d for t in self.tunables.values()], "lr": lr}, {"params": self.norm_d, "lr": norm_lr}]

    def _swap(self, to: dict) -> None:
        for n, m in to.items():
            parent, _, leaf = n.rpartition(".")
            setattr(self.module.get_submodule(parent) if parent else self.module, leaf, m)

    def __enter__(self) -> "Trainable":
        self._swap(self.tunables)
        for m in self.norms:
            del m.weight  # replaced by w0 * (1 + d) at each step (`weights`)
        return self

    def weights(self) -> None:
        """The norms' weights from their relative changes, before a forward."""
        for m, w0, d in zip(self.norms, self.norm0, self.norm_d):
            m.weight = w0.detach() * (1 + d)

    def __exit__(self, *exc) -> bool:
        with torch.no_grad():
            for m, w0 in zip(self.norms, self.norm0):
                m.__dict__.pop("weight", None)  # the plain tensor of the last step, if any
                m.weight = w0
        self._swap(self.quant)
        return False

    def keep(self):
        """Write the trained scales and norm weights into the layers; returns what `undo` needs."""
        with torch.no_grad():
            saved = ({n: q.scales.clone() for n, q in self.quant.items()}, [w.data for w in self.norm0])
            for n, t in self.tunables.items():
                self.quant[n].scales.copy_(t.scales().to(torch.float16))
            for w, d in zip(self.norm0, self.norm_d):
                w.data = w.data * (1 + d)  # a new tensor: the old one is what undo puts back
        return saved

    def undo(self, saved) -> None:
        """Put back the scales and norm weights `keep` replaced."""
        scales, norms = saved
        with torch.no_grad():
            for n, s in scales.items():
                self.quant[n].scales.copy_(s)
            for w, old in zip(self.norm0, norms):
                w.data = old


def tune_block(block: nn.Module, inputs: list[tuple[tuple, dict]], targets: list[torch.Tensor], *,
               steps: int = 32, lr: float = 1e-3, norm_lr: float = 1e-4) -> TuneResult:
    """Tune the QuantLinear scales and norm weights of `block` in place so that its outputs on
    `inputs` come closer to `targets` (the full-precision block's outputs on the same inputs).

    steps: Adam steps, one input each, cycling through the inputs (default 32).
    lr: learning rate of the scales' relative change (default 1e-3).
    norm_lr: learning rate of the norm weights' relative change (default 1e-4).
    The result is kept only if the error over the inputs went down; otherwise the block is restored.
    """
    if not any(isinstance(m, QuantLinear) for m in block.modules()):
        return TuneResult(0.0, 0.0, 0)

    def error() -> float:
        with torch.no_grad():
            return sum(float(F.mse_loss(first_output(block(*a, **k)), t)) for (a, k), t in zip(inputs, targets)) / len(inputs)

    before = error()
    trainable = Trainable(block)
    opt = torch.optim.Adam(trainable.params(lr, norm_lr))
    with trainable, torch.enable_grad():
        for step in range(steps):
            (args, kwargs), target = inputs[step % len(inputs)], targets[step % len(inputs)]
            trainable.weights()
            loss = F.mse_loss(first_output(block(*args, **kwargs)), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    saved = trainable.keep()
    after = error()
    if not after < before:  # keep what was there
        trainable.undo(saved)
        after = before
    return TuneResult(before, after, steps)
