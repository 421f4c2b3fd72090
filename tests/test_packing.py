import pytest
import torch

from shrink.quant.packing import pack, packed_width, unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("k", [32, 64, 96, 40, 7])
def test_round_trip_and_size(bits, k):
    g = torch.Generator().manual_seed(bits * 100 + k)
    codes = torch.randint(0, 2 ** bits, (5, k), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, packed_width(k, bits))
    assert packed.shape[1] == -(-k // 32) * 32 * bits // 8  # exactly `bits` bits per (padded) code
    assert torch.equal(unpack(packed, bits, k), codes)


def test_int4_layout_is_low_nibble_then_high():
    codes = torch.arange(32, dtype=torch.uint8).remainder(16).reshape(1, 32)
    packed = pack(codes, 4)
    # byte j holds code j (low) and code j+16 (high)
    assert packed[0, 0].item() == (0 | (0 << 4))
    assert packed[0, 3].item() == (3 | (3 << 4))
    codes2 = torch.zeros(1, 32, dtype=torch.uint8)
    codes2[0, 16] = 9
    assert pack(codes2, 4)[0, 0].item() == 9 << 4


def test_int3_layout_high_bit_plane():
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 9] = 4  # only bit 2 set, for code 9
    p = pack(codes, 3)
    assert p.shape == (1, 12)
    assert p[0, :8].sum().item() == 0
    assert p[0, 8 + 1].item() == 1 << 1  # bit 9 lives in byte 1, bit 1


def test_int5_layout_is_int4_then_a_fifth_bit_plane():
    """GGUF Q5_0's qs (low nibbles as 4 bits) and qh (bit i: the fifth bit of code i), in that order."""
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 17] = 16 + 3  # fifth bit and low nibble 3, for code 17
    p = pack(codes, 5)
    assert p.shape == (1, 20)
    assert p[0, 1].item() == 3 << 4  # code 17: high nibble of byte 1
    assert int.from_bytes(bytes(p[0, 16:20].tolist()), "little") == 1 << 17


def test_int6_layout_is_int4_then_the_high_bits_as_int2():
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 9] = (2 << 4) | 5
    p = pack(codes, 6)
    assert p.shape == (1, 24)
    assert p[0, 9].item() == 5 and p[0, :16].sum().item() == 5
    assert torch.equal(p[0, 16:], pack(torch.nn.functional.one_hot(torch.tensor([9]), 32).to(torch.uint8) * 2, 2)[0])
