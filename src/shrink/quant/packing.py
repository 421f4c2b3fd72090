"""Pack unsigned integer codes into bytes, in blocks of 32 along the input dimension.

The layout within a block is the one the AVX2 kernel unpacks with a few shifts and masks:
  8 bits: one code per byte
  4 bits: 16 bytes; byte j holds code j in its low nibble and code j+16 in its high nibble
  2 bits: 8 bytes; byte j holds codes j, j+8, j+16, j+24 at bits 0, 2, 4, 6
  3 bits: the low two bits as for 2 bits (8 bytes), then 4 bytes whose bit i is bit 2 of code i
  5 bits: the low four bits as for 4 bits (16 bytes), then 4 bytes whose bit i is bit 4 of code i
          (GGUF Q5_0/Q5_1's qs and qh, in the other order)
  6 bits: the low four bits as for 4 bits (16 bytes), then the high two as for 2 bits (8 bytes)
A row whose length is not a multiple of 32 is padded with zero codes; `unpack` drops the padding.
"""

from __future__ import annotations

import torch

BLOCK = 32


def packed_width(in_features: int, bits: int) -> int:
    """Bytes per output row for `in_features` codes of `bits` bits."""
    nb = -(-in_features // BLOCK)
    return nb * BLOCK * bits // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a [rows, K] tensor of codes in [0, 2**bits) into [rows, packed_width(K, bits)] uint8."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D, got shape {tuple(codes.shape)}")
    rows, k = codes.shape
    c = codes.to(torch.uint8)
    pad = (-k) % BLOCK
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    if bits == 8:
        return c.contiguous()
    if bits == 4:
        return _pack4(c.contiguous(), rows)
    b = c.reshape(rows, -1, BLOCK)  # [rows, blocks, 32]
    if bits == 2:
        out = _pack2(b)
    elif bits == 3:
        out = torch.cat([_pack2(b & 0x3), _bit_plane(b, 2)], dim=-1)
    elif bits == 5:
        out = torch.cat([_pack4((b & 0xF).reshape(rows, -1).contiguous(), rows).reshape(rows, -1, 16),
                         _bit_plane(b, 4)], dim=-1)
    elif bits == 6:
        out = torch.cat([_pack4((b & 0xF).reshape(rows, -1).contiguous(), rows).reshape(rows, -1, 16),
                         _pack2(b >> 4)], dim=-1)
    else:
        raise ValueError(f"cannot pack {bits}-bit codes")
    return out.reshape(rows, -1).contiguous()


def _bit_plane(b: torch.Tensor, bit: int) -> torch.Tensor:
    """[rows, blocks, 4] uint8: bit i of a block's 4 bytes (little endian) is bit `bit` of code i."""
    hi = ((b >> bit) & 1).reshape(*b.shape[:-1], 4, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (hi * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def _unbit_plane(hb: torch.Tensor) -> torch.Tensor:
    """Inverse of `_bit_plane`: [rows, blocks, 4] -> [rows, blocks, 32] bits (0 or 1)."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((hb.unsqueeze(-1) >> shifts) & 1).reshape(*hb.shape[:-1], BLOCK)


def _pack4(c: torch.Tensor, rows: int) -> torch.Tensor:
    """4-bit codes [rows, blocks * 32] uint8 (contiguous) packed eight bytes at a time: each block's two
    halves read as two int64 words, the second shifted a nibble up (every byte holds a code below 16, so no
    bit crosses into the next byte) and or-ed onto the first: an eighth of the elements of a byte-wise pass."""
    if c.storage_offset() % 8:
        c = c.clone()
    w = c.view(torch.int64).reshape(rows, -1, 2, 2)  # [rows, blocks, half, word]
    out = torch.bitwise_left_shift(w[:, :, 1], 4).bitwise_or_(w[:, :, 0])
    return out.view(torch.uint8).reshape(rows, -1)


def _pack2(b: torch.Tensor) -> torch.Tensor:
    q = b.reshape(*b.shape[:-1], 4, 8)  # q[..., i, j] is code 8*i + j
    return q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack`: [rows, packed bytes] uint8 -> [rows, in_features] uint8 codes."""
    rows = packed.shape[0]
    if bits == 8:
        return packed[:, :in_features]
    bb = BLOCK * bits // 8
    b = packed.reshape(rows, -1, bb)
    if bits == 4:
        out = torch.cat([b & 0x0F, b >> 4], dim=-1)
    elif bits == 2:
        out = _unpack2(b)
    elif bits == 3:
        out = _unpack2(b[..., :8]) | (_unbit_plane(b[..., 8:12]) << 2)
    elif bits == 5:
        q = b[..., :16]
        out = torch.cat([q & 0x0F, q >> 4], dim=-1) | (_unbit_plane(b[..., 16:20]) << 4)
    elif bits == 6:
        q = b[..., :16]
        out = torch.cat([q & 0x0F, q >> 4], dim=-1) | (_unpack2(b[..., 16:24]) << 4)
    else:
        raise ValueError(f"cannot unpack {bits}-bit codes")
    return out.reshape(rows, -1)[:, :in_features]


def _unpack2(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([(b >> s) & 0x3 for s in (0, 2, 4, 6)], dim=-1)
