"""Format strings: what a quantization is called and what it means.

`int4-g64` is 4-bit integers with one fp16 scale per group of 64 inputs; `int8` is 8 bits with one
scale per output channel; `-asym` adds a uint8 zero point per group. `iq4nl-g32` is 4-bit codes on
llama.cpp's IQ4_NL grid: sixteen fixed levels, denser near zero, times an fp16 scale per group. `q4k`,
`q5k`, `q6k`, `q3k` and `q2k` are llama.cpp's K-quant grids (Q4_K, Q5_K, Q6_K, Q3_K, Q2_K): groups of 32 (16
for q6k, q3k, q2k) whose scales (and minimums) are themselves integers of 6 (8 for q6k, 4 for q2k) bits times
one fp16 scale per super-block of 256 inputs.
`bf16` and `fp16` are plain casts, kept as baselines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..core.errors import ShrinkError

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (16, 32, 64, 128)
CASTS = ("bf16", "fp16")

_PATTERN = re.compile(r"^int(?P<bits>\d+)(?:-g(?P<group>\d+))?(?P<asym>-asym)?$")
# non-uniform grids: name -> the integer levels codes 0..2^bits-1 stand for (times the group's scale)
GRIDS = {"iq4nl": (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)}  # llama.cpp's IQ4_NL
_GRID_PATTERN = re.compile(r"^(?P<grid>iq4nl)(?:-g(?P<group>\d+))?$")
SUPERBLOCK = 256  # inputs per K-quant super-block


@dataclass(frozen=True)
class KQuant:
    """A K-quant grid: codes of `bits` bits in groups of `group` inputs; each group's scale is an integer of
    `scale_bits` bits (signed where there is no minimum) times the super-block's fp16 scale d; with `minimum`,
    each group also has an unsigned `scale_bits` integer minimum times a second fp16 scale dmin, and a weight is
    d*sc*q - dmin*m (Q2_K, Q4_K, Q5_K); without, d*sc*(q - 2^(bits-1)) (Q3_K, Q6_K). `fallback`: the format llama.cpp
    gives a layer whose inputs are not a multiple of 256."""

    bits: int
    group: int
    scale_bits: int
    minimum: bool
    gguf: str
    fallback: str


KQUANTS = {
    "q2k": KQuant(2, 16, 4, True, "Q2_K", "int4-g32"),
    "q3k": KQuant(3, 16, 6, False, "Q3_K", "int4-g32"),
    "q4k": KQuant(4, 32, 6, True, "Q4_K", "int5-g32"),
    "q5k": KQuant(5, 32, 6, True, "Q5_K", "int5-g32-asym"),
    "q6k": KQuant(6, 16, 8, False, "Q6_K", "int8-g32"),
}


@dataclass(frozen=True)
class QuantSpec:
    """One quantization format.

    bits: 2, 3, 4, 5, 6 or 8 for integer formats, 16 for casts.
    group_size: inputs sharing one scale; None means one scale per output channel.
    symmetric: False adds a zero point per group.
    cast: "bf16" or "fp16" for the cast baselines, else None.
    grid: a name in GRIDS for codes standing for fixed non-uniform levels (symmetric, no zero point), else
    None (the integer grid).
    kquant: a name in KQUANTS for llama.cpp's K-quant grids (bits, group and symmetry then are its), else None.
    """

    bits: int
    group_size: int | None = None
    symmetric: bool = True
    cast: str | None = None
    grid: str | None = None
    kquant: str | None = None

    @property
    def name(self) -> str:
        if self.cast:
            return self.cast
        if self.kquant:
            return self.kquant
        name = self.grid or f"int{self.bits}"
        if self.group_size is not None:
            name += f"-g{self.group_size}"
        return name if self.symmetric else name + "-asym"

    def __str__(self) -> str:
        return self.name

    def group_for(self, in_features: int) -> int:
        """The group size used for a layer with `in_features` inputs (per-channel: all of them)."""
        return in_features if self.group_size is None else self.group_size

    def bits_per_weight(self, in_features: int) -> float:
        """Storage bits per weight including scales (fp16) and zero points (uint8)."""
        if self.cast:
            return 16.0
        if self.kquant:  # a group's scale (and minimum) of scale_bits, and d (and dmin) per super-block
            k = KQUANTS[self.kquant]
            per_group = k.scale_bits * (2 if k.minimum else 1)
            return self.bits + per_group / k.group + 16 * (2 if k.minimum else 1) / SUPERBLOCK
        g = self.group_for(in_features)
        return self.bits + 16 / g + (0 if self.symmetric else 8 / g)


def parse_format(text: str | QuantSpec) -> QuantSpec:
    """Parse a format string such as `int8`, `int4-g64`, `int3-g32-asym`, `bf16`.

    Raises ValueError naming the string and the accepted forms.
    """
    if isinstance(text, QuantSpec):
        return text
    if not isinstance(text, str):
        raise TypeError(f"a format must be a string such as 'int4-g64', not {type(text).__name__}")
    t = text.strip().lower()
    if t in CASTS:
        return QuantSpec(bits=16, cast=t)
    if t in KQUANTS:
        k = KQUANTS[t]
        return QuantSpec(bits=k.bits, group_size=k.group, symmetric=not k.minimum, kquant=t)
    m = _GRID_PATTERN.match(t)
    if m:
        group = int(m["group"]) if m["group"] else None
        if group is not None and group not in GROUP_SIZES:
            raise ShrinkError(f"unknown format {text!r}: group size {group} is not supported; groups "
                              f"{'/'.join(map(str, GROUP_SIZES))} or none for per-channel")
        return QuantSpec(bits=(len(GRIDS[m["grid"]]) - 1).bit_length(), group_size=group, grid=m["grid"])
    m = _PATTERN.match(t)
    hint = (
        f"formats are int8, int4-g64, int3-g32-asym, ... (bits {'/'.join(map(str, BITS))}, "
        f"groups {'/'.join(map(str, GROUP_SIZES))} or none for per-channel, optional -asym), iq4nl-g32 (llama.cpp's "
        "IQ4_NL levels), q2k/q3k/q4k/q5k/q6k (llama.cpp's K-quants) or bf16/fp16"
    )
    if not m:
        raise ShrinkError(f"unknown format {text!r}: {hint}")
    bits = int(m["bits"])
    if bits not in BITS:
        raise ShrinkError(f"unknown format {text!r}: {bits} bits is not supported; {hint}")
    group = int(m["group"]) if m["group"] else None
    if group is not None and group not in GROUP_SIZES:
        raise ShrinkError(f"unknown format {text!r}: group size {group} is not supported; {hint}")
    return QuantSpec(bits=bits, group_size=group, symmetric=not m["asym"])
