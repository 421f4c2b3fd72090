"""K-quant formats (q4k, q5k, q6k): llama.cpp's Q4_K/Q5_K/Q6_K grids, whose group scales are integers times one
fp16 scale per super-block of 256 inputs, produced by every method and exported to GGUF as block copies."""

import gguf
import numpy as np
import pytest
import torch
from test_export import _from_gguf, _logits, _with_tok, bpe_llama, bpe_tokenizer

import shrink
from shrink.io.export import _kquant_blocks, export_gguf
from shrink.quant import QuantLinear
from shrink.quant.format import dequantize, kquant_scales, plain_spec
from shrink.quant.gptq import gptq_quantize
from shrink.quant.rtn import quantize_weight
from shrink.quant.spec import parse_format

GGUF_TYPE = {"q2k": "Q2_K", "q3k": "Q3_K", "q4k": "Q4_K", "q5k": "Q5_K", "q6k": "Q6_K"}
CALIB = [torch.randint(3, 300, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def llama256(seed: int = 0, hidden: int = 256):
    """A 2-layer Llama whose matrices have inputs in multiples of 256 (hidden 256, MLP 512) over 300 tokens."""
    return bpe_llama(seed, hidden=hidden, intermediate=512)


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


def _weight(n=16, k=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 2


def test_formats_parse_with_llama_cpps_bits_per_weight():
    assert {f: parse_format(f).bits_per_weight(4096) for f in GGUF_TYPE} == {
        "q2k": 2.625, "q3k": 3.4375, "q4k": 4.5, "q5k": 5.5, "q6k": 6.5625}  # llama.cpp's block sizes x 8 / 256
    assert {f: gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][1] * 8 / 256 for f, t in GGUF_TYPE.items()} == {
        f: parse_format(f).bits_per_weight(4096) for f in GGUF_TYPE}
    assert [str(parse_format(f)) for f in GGUF_TYPE] == list(GGUF_TYPE)
    with pytest.raises(shrink.ShrinkError, match="q2k/q3k/q4k/q5k/q6k"):
        parse_format("q8k")


@pytest.mark.parametrize("fmt", list(GGUF_TYPE))
def test_two_level_scales_are_integers_times_a_super_block_scale(fmt):
    """Round to nearest: each group's scale is an integer of 6 bits (q6k: signed 8, q3k: signed 6, q2k: 4) times
    the super-block's fp16 d, the largest on the largest integer; codes are the nearest on that grid, so no weight is further than half
    a step from its value (bar a clipped extreme)."""
    spec = parse_format(fmt)
    w = _weight()
    q = quantize_weight(w, spec)
    sc, sup = q.scales.float(), q.superscales.float()
    assert torch.equal(sc, sc.round())
    per = 256 // spec.group_size
    top = sc.reshape(16, 2, per).abs().amax(-1)
    assert torch.equal(top, torch.full_like(top, {"q6k": 128.0, "q3k": 32.0, "q2k": 15.0}.get(fmt, 63.0)))
    assert sup.shape == (16, 2, 1 if spec.symmetric else 2) and torch.equal(sup, sup.half().float())
    back = dequantize(q.codes, q.scales, q.zeros, q.zero_const, superscales=q.superscales)
    rel = float((back - w).pow(2).mean() / w.pow(2).mean())
    p = quantize_weight(w, plain_spec(spec))  # the same codes and groups with fp16 scales: quantizing them costs little
    plain = float((dequantize(p.codes, p.scales, p.zeros, p.zero_const) - w).pow(2).mean() / w.pow(2).mean())
    assert rel < 1.25 * plain
    assert rel < {"q2k": 0.15, "q3k": 0.03, "q4k": 0.01, "q5k": 0.003, "q6k": 0.001}[fmt]


def test_scale_and_offset_are_searched_as_llama_cpp_searches_them():
    """scale_offset_search: on heavy-tailed groups, a weighted error below the min/max range's (the range is one
    of its candidates, so never above; the codes rounded to nearest for the result), offsets >= 0."""
    from shrink.quant.format import scale_offset_search

    g = torch.Generator().manual_seed(3)
    wg = torch.distributions.StudentT(3).sample((64, 8, 32)) * 0.1
    weights = torch.rand(8, 32, generator=g) + 0.1

    def err(s, o):
        q = torch.round((wg + o.unsqueeze(-1)) / s.unsqueeze(-1)).clamp(0, 15)
        return (weights * (wg - (s.unsqueeze(-1) * q - o.unsqueeze(-1))) ** 2).sum(-1), q

    s, o = scale_offset_search(wg, 4, weights)
    lo = wg.amin(-1).clamp(max=0)
    e_range, _ = err((wg.amax(-1) - lo) / 15, -lo)
    e, _ = err(s, o)
    assert (o >= 0).all() and (s > 0).all()
    assert (e <= e_range * (1 + 1e-5)).all() and e.sum() < 0.8 * e_range.sum()


def test_kquant_scales_follow_llama_cpps_rule():
    """d = the largest scale / 63 in fp16, each group's integer the nearest; dmin likewise for the offsets."""
    scale = torch.tensor([[0.5, 1.0, 0.25, 2.0, 0.0, 1.5, 0.75, 1.25]])
    offset = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]])
    ks = kquant_scales(scale, offset, parse_format("q4k"))
    d = torch.tensor(2.0 / 63).half().float()
    assert torch.equal(ks.d, d.reshape(1, 1)) and torch.equal(ks.sc, torch.round(scale / d))
    dmin = torch.tensor(0.8 / 63).half().float()
    assert torch.equal(ks.dmin, dmin.reshape(1, 1)) and torch.equal(ks.m, torch.round(offset / dmin))
    s, o = ks.effective()
    assert torch.equal(s, d * ks.sc) and torch.equal(o, dmin * ks.m)


@pytest.mark.parametrize("fmt", list(GGUF_TYPE))
def test_blocks_are_ggmls_layout(fmt):
    """The layer's bytes are GGUF blocks gguf-py (ggml's layout) dequantizes to exactly the layer's weight."""
    lin = torch.nn.Linear(512, 8, bias=False)
    lin.weight.data = _weight(8, 512)
    layer = QuantLinear.from_linear(lin, fmt, backend="torch")
    data = _kquant_blocks(layer, GGUF_TYPE[fmt], "fc")
    assert data.shape == (8, 2 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[GGUF_TYPE[fmt]]][1])
    back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[GGUF_TYPE[fmt]]).reshape(8, 512)
    assert np.array_equal(back, layer.dequantized_weight().numpy())


@pytest.mark.parametrize("fmt", ["q2k", "q3k", "q4k", "q6k"])
def test_gptq_on_the_k_grid_beats_rounding_and_its_refit_solves_d(fmt):
    """GPTQ rounds on the two-level grid (its output error below round-to-nearest's); the refit then solves each
    super-block's d (and dmin) by least squares, never making the error larger; the integers stay."""
    spec = parse_format(fmt)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 512, generator=g) * torch.rand(512, generator=g) * 3
    h = 2 * x.T @ x / x.shape[0]
    w = _weight(32, 512)

    def err(q):
        e = dequantize(q.codes, q.scales, q.zeros, q.zero_const, superscales=q.superscales) - w
        return float(((e @ h) * e).sum())

    plain = gptq_quantize(w, h, spec, refit=False)
    fitted = gptq_quantize(w, h, spec, refit=True)
    assert err(plain.weight) < 0.9 * err(quantize_weight(w, spec))
    assert torch.equal(plain.weight.codes, fitted.weight.codes) and torch.equal(plain.weight.scales, fitted.weight.scales)
    assert err(fitted.weight) <= err(plain.weight) and fitted.refit_ratio <= 1
    assert not torch.equal(plain.weight.superscales, fitted.weight.superscales)
    ordered = gptq_quantize(w, h, spec, act_order=True)
    assert err(ordered.weight) < err(quantize_weight(w, spec))


@pytest.mark.parametrize("fmt,method", [("q4k", "rtn"), ("q4k", "awq+gptq"), ("q5k", "gptq"), ("q6k", "gptq"),
                                        ("q3k", "gptq"), ("q2k", "gptq")])
def test_exported_gguf_gives_the_models_logits_and_saves_in_shrinks_layout(tmp_path, tok, fmt, method):
    """Every layer (embedding table and tied output included) exports as its K type by block copies: transformers'
    GGUF loader gives shrink's logits bit for bit; the folder (shrink's layout) loads back to the same logits."""
    model = shrink.quantize(llama256(), {"model.embed_tokens": fmt, "*": fmt}, method=method,
                            calibration=None if method == "rtn" else CALIB, backend="torch", progress=False)
    r = export_gguf(_with_tok(model, tok), tmp_path / "m.gguf", float_type="f32")
    assert r.tensors[GGUF_TYPE[fmt]] == 15 and r.max_error[GGUF_TYPE[fmt]] == 0 and not r.requantized
    ids = torch.tensor([[3, 50, 100, 150, 200, 250]])
    assert torch.equal(_logits(_from_gguf(r.path), ids), _logits(model, ids))
    shrink.save(model, tmp_path / "saved")
    assert '"layout": "shrink"' in (tmp_path / "saved" / "shrink.json").read_text()
    assert torch.equal(_logits(shrink.load(tmp_path / "saved"), ids), _logits(model, ids))


def test_layers_whose_inputs_are_not_super_blocks_get_llama_cpps_fallback(tmp_path, tok):
    """A pattern giving q4k to layers of 320 inputs gives them int5-g32 (Q5_0), as llama-quantize does, said
    in a warning and recorded; the export then holds Q4_K and Q5_0 blocks, both exact."""
    with pytest.warns(UserWarning, match=r"given int5-g32 \(as llama.cpp gives them\), not the K-quant asked: "
                                         r"model\.layers\.0\.self_attn\.q_proj \(320 inputs\)"):
        model = shrink.quantize(llama256(hidden=320), "q4k", backend="torch", progress=False)
    q = model.model.layers[0]
    assert q.self_attn.q_proj.spec.name == "int5-g32" and q.mlp.down_proj.spec.name == "q4k"
    assert "as llama.cpp does" in shrink.info(model).fallbacks["model.layers.0.self_attn.q_proj"]
    r = export_gguf(_with_tok(model, tok), tmp_path / "m.gguf", float_type="f32")
    assert (r.tensors["Q4_K"], r.tensors["Q5_0"]) == (2, 12) and r.max_error["Q4_K"] == 0


def test_a_layer_named_for_a_k_quant_it_cannot_hold_is_refused_naming_it():
    with pytest.raises(shrink.ShrinkError, match=r"model\.layers\.0\.self_attn\.q_proj.*super-blocks of 256 inputs, "
                                                 r"which do not divide its input size 320.*int5-g32"):
        shrink.quantize(llama256(hidden=320), {"model.layers.0.self_attn.q_proj": "q4k"}, progress=False)
    layer = QuantLinear(512, 4, "q4k", backend="native")
    with pytest.raises(RuntimeError, match="fp16 group scales"):
        layer(torch.randn(1, 512))


def test_edited_integer_scales_are_refused_by_the_export():
    lin = torch.nn.Linear(256, 4, bias=False)
    layer = QuantLinear.from_linear(lin, "q4k", backend="torch")
    layer.scales[0, 0] = 64.0
    with pytest.raises(shrink.ShrinkError, match=r"layer 'fc' \(q4k\): its group scales are not integers of 6 bits"):
        _kquant_blocks(layer, "Q4_K", "fc")


@pytest.mark.parametrize("fmt", ["q2k", "q4k", "q6k"])
def test_training_moves_the_super_block_scales_and_keeps_the_integers(fmt):
    """Trainable on a K-quant model: at the start it computes what the layers compute; `keep` writes the trained
    d (and dmin) as fp16 superscales, the integer scales and the codes untouched (or, with codes, still on the
    grid); `undo` puts everything back byte for byte."""
    from shrink.quant.packing import unpack
    from shrink.quant.tune import Trainable

    model = shrink.quantize(llama256(), fmt, backend="torch", progress=False)
    ids = torch.tensor([[3, 50, 100, 150, 200, 250]])
    before = _logits(model, ids)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    kept = {n: (m.qweight.clone(), m.scales.clone(), m.superscales.clone()) for n, m in layers.items()}
    for codes in (False, True):
        trainable = Trainable(model, codes=codes)
        opt = torch.optim.Adam(trainable.params(1e-2, 1e-3, 0.05))
        with trainable, torch.enable_grad():
            trainable.weights()
            assert torch.allclose(model(ids).logits, before, rtol=1e-4, atol=1e-4)
            for _ in range(3):
                trainable.weights()
                loss = model(ids).logits.pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        saved = trainable.keep()
        for n, m in layers.items():
            assert torch.equal(m.scales, kept[n][1]) and m.superscales.dtype == torch.float16
            if not codes:
                assert torch.equal(m.qweight, kept[n][0])
            assert int(unpack(m.qweight, m.spec.bits, m.in_features).max()) < (1 << m.spec.bits)
        assert any(not torch.equal(m.superscales, kept[n][2]) for n, m in layers.items())
        assert not torch.equal(_logits(model, ids), before)
        trainable.undo(saved)
        assert all(torch.equal(m.qweight, kept[n][0]) and torch.equal(m.superscales, kept[n][2])
                   for n, m in layers.items())
        assert torch.equal(_logits(model, ids), before)


def _llama(layers: int, hidden: int = 256, tie: bool = True):
    return bpe_llama(tie=tie, hidden=hidden, intermediate=512, layers=layers)


def test_q4k_m_is_llama_cpps_mix_layer_by_layer():
    """q4k-m over 16 layers: Q6_K (q6k) for the values and down projections of layers 0, 1, 4, 7, 10, 13, 14, 15
    (llama.cpp's use_more_bits), q4k elsewhere; the output layer q6k, an untied table q4k; q4k-s: q5k for the first
    4 values and first 2 down projections."""
    from shrink.quant.kmix import more_bits

    assert [i for i in range(16) if more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    assert [i for i in range(30) if more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    model = shrink.quantize(_llama(16, tie=False), "q4k-m", progress=False)
    fmt = shrink.info(model).formats
    assert [i for i in range(16) if fmt[f"model.layers.{i}.self_attn.v_proj"] == "q6k"] == [0, 1, 4, 7, 10, 13, 14, 15]
    assert [i for i in range(16) if fmt[f"model.layers.{i}.mlp.down_proj"] == "q6k"] == [0, 1, 4, 7, 10, 13, 14, 15]
    assert {fmt[f"model.layers.{i}.self_attn.q_proj"] for i in range(16)} == {"q4k"}
    assert (fmt["lm_head"], fmt["model.embed_tokens"]) == ("q6k", "q4k")
    s = shrink.info(shrink.quantize(_llama(16, tie=False), "q4k-s", progress=False)).formats
    assert [i for i in range(16) if s[f"model.layers.{i}.self_attn.v_proj"] == "q5k"] == [0, 1, 2, 3]
    assert [i for i in range(16) if s[f"model.layers.{i}.mlp.down_proj"] == "q5k"] == [0, 1]
    m3 = shrink.info(shrink.quantize(_llama(16, tie=False), "q3k-m", progress=False)).formats
    assert [m3[f"model.layers.{i}.self_attn.v_proj"] for i in range(4)] == ["q5k", "q5k", "q4k", "q4k"]
    assert [m3[f"model.layers.{i}.mlp.down_proj"] for i in range(3)] == ["q5k", "q4k", "q4k"]
    assert (m3["model.layers.3.self_attn.o_proj"], m3["model.layers.3.self_attn.q_proj"]) == ("q4k", "q3k")
    m2 = shrink.info(shrink.quantize(_llama(2, tie=False), "q2k-m", progress=False)).formats  # 2 query heads a kv head
    assert [m2[f"model.layers.1.{r}"] for r in ("self_attn.v_proj", "mlp.down_proj", "self_attn.o_proj", "mlp.up_proj")] \
        == ["q3k", "q3k", "q3k", "q2k"]


def test_a_mix_on_a_tied_model_with_narrow_layers_exports_as_llama_cpp_would(tmp_path, tok):
    """Tied: the table takes the output's q6k; 320-wide layers fall back as llama-quantize does (q4k -> int5-g32,
    q6k -> int8-g32); over 2 layers only the second is one of use_more_bits'; the GGUF holds Q4_K/Q6_K down
    projections and Q5_0/Q8_0 elsewhere, all exact."""
    with pytest.warns(UserWarning, match="as llama.cpp gives them"):
        model = shrink.quantize(_llama(2, hidden=320), "q4k-m", backend="torch", progress=False)
    fmt = shrink.info(model).formats
    assert fmt["model.embed_tokens"] == "int8-g32" and fmt["model.layers.1.self_attn.v_proj"] == "int8-g32"
    assert fmt["model.layers.0.self_attn.v_proj"] == "int5-g32" and fmt["model.layers.0.self_attn.q_proj"] == "int5-g32"
    assert (fmt["model.layers.0.mlp.down_proj"], fmt["model.layers.1.mlp.down_proj"]) == ("q4k", "q6k")
    r = export_gguf(_with_tok(model, tok), tmp_path / "m.gguf", float_type="f32")
    assert (r.tensors["Q4_K"], r.tensors["Q6_K"], r.tensors["Q8_0"], r.tensors["Q5_0"]) == (1, 1, 2, 11)
    assert r.max_error["Q6_K"] == r.max_error["Q4_K"] == 0
