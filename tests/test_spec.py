import pytest

from shrink.quant.spec import QuantSpec, parse_format


@pytest.mark.parametrize("text,bits,group,sym", [
    ("int8", 8, None, True), ("int4-g64", 4, 64, True), ("int3-g32-asym", 3, 32, False),
    ("int2-g16", 2, 16, True), ("INT8-G128", 8, 128, True), ("int4", 4, None, True), ("int5-g32", 5, 32, True),
    ("int6-g64-asym", 6, 64, False),
])
def test_parse(text, bits, group, sym):
    s = parse_format(text)
    assert (s.bits, s.group_size, s.symmetric, s.cast) == (bits, group, sym, None)
    assert parse_format(s.name) == s


def test_casts():
    assert parse_format("bf16") == QuantSpec(bits=16, cast="bf16")
    assert parse_format("fp16").name == "fp16"


@pytest.mark.parametrize("bad,needle", [
    ("int7-g64", "7 bits"), ("int4-g48", "group size 48"), ("int4g64", "unknown format"), ("fp8", "unknown format"), ("", "unknown"),
])
def test_bad_formats_name_the_string(bad, needle):
    with pytest.raises(ValueError, match=needle) as e:
        parse_format(bad)
    assert repr(bad) in str(e.value)


def test_grid_formats_name_their_levels():
    from shrink.quant.format import dequantize, grid_levels

    s = parse_format("iq4nl-g32")
    assert (s.bits, s.group_size, s.symmetric, s.grid, s.name) == (4, 32, True, "iq4nl", "iq4nl-g32")
    assert parse_format("iq4nl").group_size is None and parse_format(s.name) == s
    assert s.bits_per_weight(2048) == pytest.approx(4.5)
    levels = grid_levels(s)
    assert levels.tolist()[:3] == [-127, -104, -83] and levels.tolist()[-1] == 113 and len(levels) == 16
    import torch
    codes = torch.tensor([[0, 15] * 16], dtype=torch.uint8)
    w = dequantize(codes, torch.tensor([[0.5]], dtype=torch.float16), None, 8, levels)
    assert w[0, :2].tolist() == [-63.5, 56.5]
    with pytest.raises(ValueError, match="group size 48"):
        parse_format("iq4nl-g48")


def test_bits_per_weight():
    assert parse_format("int4-g64").bits_per_weight(2048) == pytest.approx(4.25)
    assert parse_format("int4-g64-asym").bits_per_weight(2048) == pytest.approx(4.375)
    assert parse_format("int8").bits_per_weight(2048) == pytest.approx(8 + 16 / 2048)
