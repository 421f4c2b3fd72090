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

from .format import grid_levels, levels_of, nearest_level
from .layerwise import first_output
from .linear import QuantLinear
from .packing import pack, unpack
from .replace import set_submodule
from .spec import SUPERBLOCK


@dataclass
class TuneResult:
    """Block output error (mean squared, over the calibration inputs) before and after tuning."""

    before: float
    after: float
    steps: int


class _Tunable(nn.Module):
    """A QuantLinear's codes as a fixed float matrix, its scales as a relative parameter; with `codes`, the
    levels the codes stand for as a float parameter too, rounded back to the grid in every forward with a
    straight-through gradient (round-STE), so that training can move a weight to a neighbouring code. Levels
    are held in units of the grid's mean step (1 for integer formats), so one learning rate suits every
    format. In a K-quant format the integer group scales (and minimums) stay and each super-block's fp16 d
    (and dmin) moves: `scales()` then are the superscales. With `lazy` (codes fixed), nothing of the weight's
    size is held: the levels are unpacked from the layer's codes in every forward (a float32 matrix only
    while the layer computes), which is what lets a model train a block at a time."""

    def __init__(self, q: QuantLinear, codes: bool = False, lazy: bool = False):
        super().__init__()
        if codes and lazy:
            raise ValueError("trained codes are held as float levels: they cannot be unpacked lazily")
        self.kquant = q.superscales is not None
        self.__dict__["source"] = q  # (not a submodule: the layer stays where it is in the model)
        self.lazy = lazy
        s = (q.superscales if self.kquant else q.scales).to(torch.float32)
        grid = grid_levels(q.spec)
        self.unit = 1.0 if grid is None else float(grid[-1] - grid[0]) / (len(grid) - 1)
        self.grid = None if grid is None else grid / self.unit
        self.g = SUPERBLOCK if self.kquant else q.in_features // q.scales.shape[1]
        self.register_buffer("s0", s)
        self.d = nn.Parameter(torch.zeros_like(s))
        self.bias = q.bias
        if lazy:
            return
        levels, sc, mins, zero = self._expanded()
        self.register_buffer("sc", sc)
        self.register_buffer("mins", mins)
        self.zero = zero
        self.lo, self.hi = -zero, float((1 << q.spec.bits) - 1) - zero  # integer levels' range (per group: -asym)
        if codes:
            self.latent = nn.Parameter(levels)
        else:
            self.register_buffer("levels", levels)

    def _expanded(self):
        """From the layer's codes, one value per weight: the levels the scales multiply (in grid units), and
        for a K-quant the integer group scales and minimums (None otherwise); and the zero point (a number,
        or per weight for asymmetric groups)."""
        q = self.__dict__["source"]
        g = q.in_features // q.scales.shape[1]
        stored = unpack(q.qweight, q.spec.bits, q.in_features).to(torch.float32)
        sc = mins = None
        if self.kquant:  # the levels are the codes (minus 32 for q6k); the integer scales and minimums are fixed
            zero = float(q.zero_const)
            sc = q.scales.to(torch.float32).repeat_interleave(g, 1)
            mins = None if q.zeros is None else q.zeros.to(torch.float32).repeat_interleave(g, 1)
        else:
            zero = q.zeros.to(torch.float32).repeat_interleave(g, 1) if q.zeros is not None else float(q.zero_const)
        return levels_of(stored, zero, grid_levels(q.spec)) / self.unit, sc, mins, zero

    def scales(self) -> torch.Tensor:
        return self.s0 * (1 + self.d)

    def snapped(self) -> torch.Tensor:
        """The levels as the codes will store them: the latent levels rounded to the grid (straight-through)."""
        if "latent" not in self._parameters:
            return self.levels
        v = self.latent
        if self.grid is not None:
            near = self.grid[nearest_level(v.detach(), self.grid)]
        elif isinstance(self.lo, float):
            near = v.detach().round().clamp(self.lo, self.hi)
        else:
            near = torch.minimum(torch.maximum(v.detach().round(), self.lo), self.hi)
        return v + (near - v).detach()

    def codes(self) -> torch.Tensor:
        """The uint8 codes of the levels as they are now."""
        v = self.snapped().detach()
        return (nearest_level(v, self.grid) if self.grid is not None else v + self.zero).to(torch.uint8)

    def forward(self, x):
        s = self.scales()
        if self.lazy:
            levels, sc, mins, _ = self._expanded()
        else:
            levels, sc, mins = self.snapped(), self.sc, self.mins
        if self.kquant:  # d * sc * level - dmin * m, as format.dequantize computes it
            w = levels * (sc * s[..., 0].repeat_interleave(self.g, 1))
            if mins is not None:
                w = w - mins * s[..., 1].repeat_interleave(self.g, 1)
        else:
            w = levels * (s * self.unit).repeat_interleave(self.g, 1)
        return F.linear(x, w, self.bias)

    def stored(self, q: QuantLinear) -> torch.Tensor:
        """The buffer of `q` that `scales()` trains: its fp16 scales, or a K-quant layer's superscales."""
        return q.superscales if self.kquant else q.scales


def _norms(block: nn.Module) -> list[nn.Module]:
    """The block's normalisation layers with a per-channel weight (RMSNorm, LayerNorm)."""
    return [m for m in block.modules()
            if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), nn.Parameter)]


class Trainable:
    """While in its `with`: `module`'s QuantLinear layers compute from their codes and relative scales
    (`_Tunable`), its norms' weights from relative changes, all of them `params` (scales, norm weights) to
    train; `weights()` sets the norms' weights before each forward. After it, the layers are back; `keep()`
    writes the trained scales (fp16) and norm weights into them and returns what `undo(saved)` restores.
    lazy: each layer's levels are unpacked from its codes in every forward (`_Tunable`), not held."""

    def __init__(self, module: nn.Module, codes: bool = False, lazy: bool = False):
        self.module = module
        # a tied output layer's codes and scales are also its table's: it stays as it is (training them for the
        # products alone would change every lookup of the table untrained)
        self.quant = {n: m for n, m in module.named_modules()
                      if isinstance(m, QuantLinear) and not m.__dict__.get("shares_buffers")}
        self.tunables = {n: _Tunable(m, codes, lazy) for n, m in self.quant.items()}
        self.codes = codes
        self.norms = _norms(module)
        self.norm0 = [m.weight for m in self.norms]  # the Parameters themselves, put back at the end
        self.norm_d = [nn.Parameter(torch.zeros_like(w)) for w in self.norm0]

    def params(self, lr: float, norm_lr: float, codes_lr: float = 0.0) -> list[dict]:
        """Optimizer parameter groups: the scales' relative changes at `lr`, the norms' at `norm_lr`, and with
        codes trained, the latent levels at `codes_lr`."""
        groups = [{"params": [t.d for t in self.tunables.values()], "lr": lr}, {"params": self.norm_d, "lr": norm_lr}]
        if self.codes:
            groups.append({"params": [t.latent for t in self.tunables.values()], "lr": codes_lr})
        return groups

    def _swap(self, to: dict) -> None:
        for n, m in to.items():
            set_submodule(self.module, n, m)  # (an online rotation of the layer's input goes with it)

    def __enter__(self) -> "Trainable":
        # what does not train takes no gradient (an embedding's would cost its size and a product per step)
        self.frozen = [p for p in self.module.parameters() if p.requires_grad]
        for p in self.frozen:
            p.requires_grad_(False)
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
        for p in self.frozen:
            p.requires_grad_(True)
        return False

    def keep(self):
        """Write the trained scales (and codes) and norm weights into the layers; returns what `undo` needs."""
        with torch.no_grad():
            saved = ({n: (self.tunables[n].stored(q).clone(), q.qweight if self.codes else None)
                      for n, q in self.quant.items()}, [w.data for w in self.norm0])
            for n, t in self.tunables.items():
                t.stored(self.quant[n]).copy_(t.scales().to(torch.float16))
                if saved[0][n][1] is not None:  # a new packed tensor (tiled copies of the old codes see it is not theirs)
                    q = self.quant[n]
                    q.fill_packed(pack(t.codes(), q.spec.bits), q.scales.clone(), q.zeros)
            for w, d in zip(self.norm0, self.norm_d):
                w.data = w.data * (1 + d)  # a new tensor: the old one is what undo puts back
        return saved

    def undo(self, saved) -> None:
        """Put back the scales and norm weights `keep` replaced."""
        scales, norms = saved
        with torch.no_grad():
            for n, (s, packed) in scales.items():
                q = self.quant[n]
                self.tunables[n].stored(q).copy_(s)
                if packed is not None:
                    q.fill_packed(packed, q.scales.clone(), q.zeros)
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
