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
        self.register_buffer("levels", codes - zero)  # the integer levels the scales multiply
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


def tune_block(block: nn.Module, inputs: list[tuple[tuple, dict]], targets: list[torch.Tensor], *,
               steps: int = 32, lr: float = 1e-3, norm_lr: float = 1e-4) -> TuneResult:
    """Tune the QuantLinear scales and norm weights of `block` in place so that its outputs on
    `inputs` come closer to `targets` (the full-precision block's outputs on the same inputs).

    steps: Adam steps, one input each, cycling through the inputs (default 32).
    lr: learning rate of the scales' relative change (default 1e-3).
    norm_lr: learning rate of the norm weights' relative change (default 1e-4).
    The result is kept only if the error over the inputs went down; otherwise the block is restored.
    """
    quant = {n: m for n, m in block.named_modules() if isinstance(m, QuantLinear)}
    if not quant:
        return TuneResult(0.0, 0.0, 0)
    tunables = {n: _Tunable(m) for n, m in quant.items()}
    norms = _norms(block)
    norm0 = [m.weight for m in norms]  # the Parameters themselves, put back at the end
    norm_d = [nn.Parameter(torch.zeros_like(w)) for w in norm0]

    def swap(to):
        for n, m in to.items():
            parent, _, leaf = n.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, leaf, m)

    def error() -> float:
        with torch.no_grad():
            return sum(float(F.mse_loss(first_output(block(*a, **k)), t)) for (a, k), t in zip(inputs, targets)) / len(inputs)

    before = error()
    opt = torch.optim.Adam([{"params": [t.d for t in tunables.values()], "lr": lr},
                            {"params": norm_d, "lr": norm_lr}])
    swap(tunables)
    try:
        for m in norms:
            del m.weight  # replaced by w0 * (1 + d) at each step, below
        with torch.enable_grad():
            for step in range(steps):
                (args, kwargs), target = inputs[step % len(inputs)], targets[step % len(inputs)]
                for m, w0, d in zip(norms, norm0, norm_d):
                    m.weight = w0.detach() * (1 + d)
                loss = F.mse_loss(first_output(block(*args, **kwargs)), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        with torch.no_grad():
            for m, w0 in zip(norms, norm0):
                m.__dict__.pop("weight", None)  # the plain tensor of the last step, if any
                m.weight = w0
        swap(quant)
    with torch.no_grad():
        old_scales = {n: quant[n].scales.clone() for n in quant}
        old_norms = [w.data for w in norm0]  # replaced below, not changed in place
        for n, t in tunables.items():
            quant[n].scales.copy_(t.scales().to(torch.float16))
        for w, d in zip(norm0, norm_d):
            w.data = w.data * (1 + d)
    after = error()
    if not after < before:  # keep what was there
        with torch.no_grad():
            for n in quant:
                quant[n].scales.copy_(old_scales[n])
            for w, w_old in zip(norm0, old_norms):
                w.data = w_old
        after = before
    return TuneResult(before, after, steps)
