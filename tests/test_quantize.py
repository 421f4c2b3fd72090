import pytest
import torch
from helpers import tiny_llama

import shrink
from shrink.quant import CastLinear, QuantLinear, output_layer_name, plan, size_rows


def test_quantize_llama_keeps_embeddings_and_lm_head(llama):
    ids = torch.randint(3, 96, (2, 12))
    with torch.no_grad():
        ref = llama(ids).logits
    shrink.quantize(llama, "int4-g32", progress=False)
    assert isinstance(llama.model.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(llama.model.layers[1].mlp.down_proj, QuantLinear)
    assert isinstance(llama.lm_head, torch.nn.Linear) and not isinstance(llama.lm_head, QuantLinear)
    assert isinstance(llama.model.embed_tokens, torch.nn.Embedding)
    assert shrink.info(llama).formats["lm_head"] is None
    assert shrink.info(llama).formats["model.layers.0.mlp.up_proj"] == "int4-g32"
    with torch.no_grad():
        out = llama(ids).logits
    assert out.shape == ref.shape
    rel4 = ((out - ref).norm() / ref.norm()).item()
    int8 = shrink.quantize(tiny_llama(), "int8", progress=False)
    with torch.no_grad():
        rel8 = ((int8(ids).logits - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel8 < 0.05  # int8 is close to the original
    assert rel8 < rel4 < 1.0  # 4 bits costs more, but the function is still recognisable


def test_generate_works_after_quantization(llama):
    shrink.quantize(llama, "int8", progress=False)
    ids = torch.tensor([[1, 5, 9, 13]])
    out = llama.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def test_mapping_globs_first_match_and_none(llama):
    spec = {"model.layers.0.*": "int8", "*.mlp.*": None, "*": "int4-g16"}
    assigned = plan(llama, spec)
    assert assigned["model.layers.0.mlp.up_proj"].name == "int8"  # first match wins
    assert assigned["model.layers.1.mlp.up_proj"] is None
    assert assigned["model.layers.1.self_attn.q_proj"].name == "int4-g16"
    assert assigned["lm_head"] is None  # output layer kept by default
    assert plan(llama, {"lm_head": "int8"})["lm_head"].name == "int8"  # named exactly: quantized
    assert plan(llama, "int8", keep_output=False)["lm_head"].name == "int8"


def test_plain_module_last_linear_is_output(mlp):
    assert output_layer_name(mlp) == "head"
    shrink.quantize(mlp, "int8-g32-asym", progress=False)
    assert isinstance(mlp.fc1, QuantLinear) and isinstance(mlp.fc2, QuantLinear)
    assert type(mlp.head) is torch.nn.Linear
    x = torch.randn(4, 64)
    assert mlp(x).shape == (4, 10)


def test_no_grad_and_eval(mlp):
    shrink.quantize(mlp, "int4-g32", progress=False)
    mlp.eval()
    with torch.no_grad():
        y = mlp(torch.randn(2, 64))
    assert not y.requires_grad


def test_cast_baselines(mlp):
    x = torch.randn(3, 64)
    ref = mlp(x)
    shrink.quantize(mlp, "bf16", progress=False)
    assert isinstance(mlp.fc1, CastLinear) and mlp.fc1.weight.dtype == torch.bfloat16
    assert torch.allclose(mlp(x), ref, rtol=0.05, atol=0.05)


def test_size_rows_report_bits(llama):
    shrink.quantize(llama, "int4-g32", progress=False)
    rows = {r.kind: r for r in size_rows(llama, "lm_head")}
    q = rows["Linear int4-g32"]
    assert q.bits_per_weight == pytest.approx(4 + 16 / 32)
    assert rows["total"].bytes_now < rows["total"].bytes_fp32
    assert "Embedding (kept, tied to lm_head)" in rows


def test_errors(llama, mlp):
    with pytest.raises(ValueError, match="unknown format 'int7'"):
        shrink.quantize(llama, "int7")
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.q_proj'.*group size 128.*input size 64"):
        shrink.quantize(llama, {"model.layers.0.self_attn.q_proj": "int4-g128"}, progress=False)
    with pytest.raises(ValueError, match="unknown method 'foo'"):
        shrink.quantize(llama, "int4-g32", method="foo")
    with pytest.raises(ValueError, match="method 'gptq' needs calibration data"):
        shrink.quantize(llama, "int4-g32", method="gptq")
    with pytest.raises(ValueError, match="target_bits needs calibration data"):
        shrink.quantize(llama, target_bits=4.5)
    with torch.no_grad():
        mlp.fc2.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="layer 'fc2'.*NaN or infinite"):
        shrink.quantize(mlp, "int8", progress=False)
    assert type(mlp.fc1) is torch.nn.Linear  # checked before anything changed: the model is whole


def test_quantized_model_deepcopies(mlp):
    import copy

    shrink.quantize(mlp, "int4-g32", progress=False)
    x = torch.randn(2, 64)
    y = mlp(x)  # the backend decision is cached on first use; the copy must still work
    assert torch.equal(copy.deepcopy(mlp)(x), y)
