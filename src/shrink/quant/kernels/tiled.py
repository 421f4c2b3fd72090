"""The tiled layout of a packed weight, which the native kernel multiplies fastest at every batch size.

A packed layer's codes are saved and exported row by row (packing.py). The native kernel's fast path
(tiled_avx2.h, tiled_core.inc) reads them in tiles of 8 outputs instead. A QuantLinear that runs it holds
its weight in that layout alone once it has run (`QuantLinear.adopt_tiled`): the row form is made again from
it when something reads the layer's `qweight` or `scales` (saving, exporting, changing them), and the tiles
after the next forward. A layer that shares its buffers (an output layer tied to its embedding table) keeps
the row form beside a tiled copy, rebuilt whenever its buffers change. Layers whose output count is not a
multiple of 8 keep the row kernel.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ...core.memory import release_freed_memory
from ..packing import BLOCK, pack, unpack

TILE = 8  # outputs per tile


@dataclass(frozen=True)
class TiledWeight:
    """A packed weight in tiles of 8 outputs (see tiled_core.inc for the byte layout): as many bytes as its row
    layout, the same scales and zero points, reordered."""

    codes: torch.Tensor          # uint8 [outputs/8, blocks * (256 for 8-bit codes, else 128)]
    scales: torch.Tensor         # float16 [outputs/8, groups, 8]
    zeros: torch.Tensor | None   # uint8 [outputs/8, groups, 8] (-asym formats), or None: zero_const for all
    zero_const: int
    bits: int
    group_size: int

    def nbytes(self) -> int:
        """Memory this layout takes."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros) if t is not None)


def supports(rows: int, in_features: int, group_size: int) -> bool:
    """Whether a weight of these shapes has a tiled layout (rows a multiple of 8, blocks of 32)."""
    return rows % TILE == 0 and in_features % BLOCK == 0 and group_size % BLOCK == 0 and rows > 0


def tile(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, zero_const: int, bits: int,
         in_features: int, group_size: int) -> TiledWeight:
    """The tiled layout of a packed weight (row layout of packing.py) with the same codes, scales and zeros."""
    n, k = qweight.shape[0], in_features
    if not supports(n, k, group_size):
        raise ValueError(f"no tiled layout for {n} outputs x {k} inputs at group size {group_size}")
    t, nb, g = n // TILE, k // BLOCK, k // group_size
    if bits == 4:
        codes = _nibble_runs(qweight, n, nb)
    else:
        codes = unpack(qweight, bits, k).contiguous()  # [n, k] uint8
        if bits != 8:  # inputs 8j..8j+3 in the low nibbles, 8j+4..8j+7 in the high
            c = codes.view(n, nb, 4, 2, 4)
            codes = c[:, :, :, 0] | (c[:, :, :, 1] << 4)  # [n, block, 4 runs of 4 inputs]
    # [tile, block, run of 4 inputs, output, input]: runs of 4 bytes moved as one int32 (4x fewer elements)
    quads = codes.reshape(n, -1)
    quads = (quads if quads.storage_offset() % 4 == 0 else quads.clone()).view(torch.int32)
    packed = quads.view(t, TILE, nb, -1).permute(0, 2, 3, 1).contiguous().view(torch.uint8)
    by_tile = lambda v: v.reshape(t, TILE, g).permute(0, 2, 1).contiguous()  # noqa: E731
    return TiledWeight(packed.reshape(t, -1), by_tile(scales.to(torch.float16)),
                       None if zeros is None else by_tile(zeros), zero_const, bits, group_size)


def _nibble_runs(qweight: torch.Tensor, n: int, nb: int) -> torch.Tensor:
    """4-bit codes regrouped as the tiles hold them, [n, block, run r of 8 inputs, i]: input 8r + i in the
    low nibble, 8r + 4 + i in the high, straight from the row layout's bytes (byte j of a block: input j low,
    j + 16 high), four bytes at a time as int32 words (masks keep each byte's nibbles to itself)."""
    q = qweight.contiguous()
    q = q if q.storage_offset() % 4 == 0 else q.clone()
    p = q.view(torch.int32).reshape(n, nb, 2, 2)  # [.., h, half]: bytes 8h + 4 half + (0..3) of the block
    a, b = p[:, :, :, 0], p[:, :, :, 1]  # bytes 8h + i and 8h + 4 + i
    low = (a & _LOW) | ((b << 4) & _HIGH)   # runs 0, 1 (inputs 8h + i, 8h + 4 + i)
    high = ((a >> 4) & _LOW) | (b & _HIGH)  # runs 2, 3 (inputs 16 + 8h + i, 16 + 8h + 4 + i)
    return torch.cat([low, high], dim=2).view(torch.uint8).reshape(n, nb, 4, 4)


_LOW, _HIGH = 0x0F0F0F0F, 0xF0F0F0F0 - (1 << 32)  # each byte's low / high nibble, as int32 values


def untile(t: TiledWeight, rows: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, scales) in the row layout of packing.py (uint8 codes, float16 scales) from a tiled weight:
    the inverse of `tile`, exactly."""
    n, k, nb = rows, in_features, in_features // BLOCK
    quads = t.codes.view(torch.int32).view(n // TILE, nb, -1, TILE).permute(0, 3, 1, 2).contiguous()
    codes = quads.view(torch.uint8).reshape(n, -1)
    if t.bits != 8:  # each byte: input 8j + i in the low nibble, 8j + 4 + i in the high
        c = codes.view(n, nb, 4, 4)
        codes = torch.stack([c & 0x0F, c >> 4], dim=3).reshape(n, k)
    return pack(codes, t.bits), t.scales.permute(0, 2, 1).reshape(n, -1).contiguous()


@dataclass(frozen=True)
class _Copy:
    """A layer's tiled copy and the buffers (and their versions) it was built from."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    versions: tuple[int, int, int]
    tiled: TiledWeight | None

    def built_from(self, q, s, z) -> bool:
        return self.qweight is q and self.scales is s and self.zeros is z


def _versions(q, s, z) -> tuple[int, int, int]:
    return q._version, s._version, 0 if z is None else z._version


def for_layer(layer) -> TiledWeight | None:
    """The layer's tiled copy, built on first use and again after its buffers change (replaced, or changed
    in place); None when its shapes have no tiled layout."""
    # Called on every forward, so kept cheap: the buffers straight from the module's dict (not through
    # nn.Module.__getattr__), compared by identity and version counter.
    b = layer._buffers
    q, s, z = b.get("qweight"), b.get("scales"), b.get("zeros")
    if q is None:  # the layer holds its weight in the tiled layout alone
        return _held(layer)
    cached = layer.__dict__.get("_tiled")
    if torch.compiler.is_compiling():
        # A traced graph cannot read version counters, and building the copy there would repack in every
        # call: use the copy an eager call built, if any (a compiled graph takes its weights as fixed anyway).
        return cached.tiled if cached is not None and cached.built_from(q, s, z) else None
    if cached is not None and cached.built_from(q, s, z) and cached.versions == _versions(q, s, z):
        return cached.tiled
    with _building:  # threads running a layer's first forward together: one tiles it, the others use that
        if b.get("qweight") is None:
            return _held(layer)
        q, s, z = b["qweight"], b["scales"], b.get("zeros")
        group = layer.spec.group_for(layer.in_features)
        t = tile(q, s, z, layer.zero_const, layer.spec.bits, layer.in_features, group) if supports(
            q.shape[0], layer.in_features, group) else None
        if t is not None and getattr(layer, "adopt_tiled", None) is not None and layer.adopt_tiled(t):
            layer.__dict__.pop("_tiled", None)
            del q, s, z
            release_freed_memory()  # the row form and the tiling's temporaries, back to the system (about 0.4 ms)
            return t
        layer.__dict__["_tiled"] = _Copy(q, s, z, _versions(q, s, z), t)
        return t


_building = threading.Lock()


def _held(layer) -> TiledWeight:
    """The tiled layout a layer holds alone (its zero points, for -asym formats, also in `zeros`)."""
    b = layer._buffers
    return TiledWeight(b["tiled_codes"], b["tiled_scales"], b.get("tiled_zeros"), layer.zero_const, layer.spec.bits,
                       layer._group)

def nbytes(layer) -> int:
    """Bytes of a layer's tiled weight: the one it holds, or the copy beside its rows; 0 when it has none."""
    b = layer._buffers
    if b.get("tiled_codes") is not None:
        return sum(b[k].numel() * b[k].element_size() for k in ("tiled_codes", "tiled_scales", "tiled_zeros") if k in b)
    held = layer.__dict__.get("_tiled")
    return held.tiled.nbytes() if held is not None and held.tiled is not None else 0
