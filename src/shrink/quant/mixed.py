"""Mixed precision to a budget: per-layer formats whose average bits per weight meet a target.

A layer's sensitivity to a format is how far the model's output moves when that layer alone is
rounded to it (measured in shrink.quant.calibrated). Starting from the narrowest format everywhere, the
allocator repeatedly widens the layer that buys the largest error reduction per extra bit, while the
budget allows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..core.errors import ShrinkError
from .spec import parse_format

DEFAULT_LADDER = ("int2-g32", "int3-g32", "int4-g64", "int4-g32", "int8")


@dataclass(frozen=True)
class MixedPrecision:
    """A spec for `quantize`: a format per layer, chosen from `ladder` (narrowest first) by sensitivity,
    so that the quantized layers average at most `target_bits` bits per weight. `base`: a mapping of
    module-name globs to formats or None, as a plain spec: the layers it quantizes are chosen for, those
    it keeps (None, or matched by no glob) stay in full precision (default: every layer but the output
    layer is chosen for). Needs calibration data."""

    target_bits: float
    ladder: tuple[str, ...] = DEFAULT_LADDER
    base: Mapping | None = field(default=None, hash=False)

    def __post_init__(self):
        if not self.ladder:
            raise ShrinkError("MixedPrecision: the ladder of formats is empty")
        for f in self.ladder:
            parse_format(f)  # a bad format in the ladder is refused here, naming it


def allocate(errors: dict[str, dict[str, float]], sizes: dict[str, tuple[int, int]], target_bits: float,
             ladder: tuple[str, ...] = DEFAULT_LADDER) -> dict[str, str]:
    """Choose a format per layer so that the weight-averaged bits per weight is at most `target_bits`.

    errors: layer -> format -> sensitivity. sizes: layer -> (out_features, in_features).
    Raises ValueError when even the narrowest format everywhere exceeds the budget.
    """
    specs = [parse_format(f) for f in ladder]
    bits = {name: [s.bits_per_weight(sizes[name][1]) for s in specs] for name in errors}
    numel = {name: sizes[name][0] * sizes[name][1] for name in errors}
    total = sum(numel.values())
    budget = target_bits * total
    level = {}
    for name in errors:  # the narrowest format whose groups divide the layer's inputs (inf: does not fit)
        fits = [i for i, f in enumerate(ladder) if errors[name][f] != float("inf")]
        if not fits:
            raise ShrinkError(f"layer {name!r}: no format of the ladder ({', '.join(ladder)}) has groups that divide its "
                              f"{sizes[name][1]} inputs; add a per-channel format (such as int8) to the ladder")
        level[name] = fits[0]
    used = sum(bits[n][level[n]] * numel[n] for n in errors)
    if used > budget + 1e-6:
        narrowest = ", ".join(sorted({ladder[i] for i in level.values()}))
        raise ShrinkError(f"target of {target_bits} bits per weight is below the narrowest formats that fit "
                         f"({narrowest}: {used / total:.3f} bits per weight)")
    while True:
        best, best_gain = None, 0.0
        for n in errors:
            i = level[n]
            for j in range(i + 1, len(specs)):  # any wider format, not only the next one
                extra = (bits[n][j] - bits[n][i]) * numel[n]
                if extra <= 0 or used + extra > budget + 1e-6 or errors[n][ladder[j]] == float("inf"):
                    continue
                gain = (errors[n][ladder[i]] - errors[n][ladder[j]]) / extra
                if gain > best_gain:
                    best, best_gain = (n, j), gain
        if best is None:
            break
        n, j = best
        used += (bits[n][j] - bits[n][level[n]]) * numel[n]
        level[n] = j
    return {n: ladder[level[n]] for n in errors}
