"""Embeddings quantized on request: rows gathered then dequantized; a tied output layer quantized once and
kept tied (one copy of the codes in memory, on disk and in GGUF), or untied when asked."""

import json

import pytest
import torch
from helpers import tiny_llama
from transformers import AutoModelForCausalLM

import shrink
from shrink.quant import QuantEmbedding, QuantLinear
from shrink.quant.format import dequantize
from shrink.quant.rtn import quantize_weight

IDS = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_a_lookup_is_the_dequantized_rows():
    emb = torch.nn.Embedding(96, 64)
    q = QuantEmbedding.from_embedding(emb, "int4-g32")
    ref = quantize_weight(emb.weight, q.spec, "emb")
    table = dequantize(ref.codes, ref.scales, ref.zeros, ref.zero_const)
    assert torch.equal(q(IDS), table[IDS]) and torch.equal(q.dequantized_weight(), table)


def test_a_tied_embedding_and_output_layer_are_quantized_once_and_stay_tied(tmp_path):
    model = shrink.quantize(tiny_llama(), {"model.embed_tokens": "int8", "*": "int4-g32"}, backend="torch",
                            progress=False)
    table, head = model.model.embed_tokens, model.lm_head
    assert isinstance(table, QuantEmbedding) and isinstance(head, QuantLinear)
    assert head.qweight is table.qweight and head.scales is table.scales  # one copy
    assert shrink.info(model).formats["lm_head"] == "int8" and model.config.tie_word_embeddings is False
    # the int8 table costs more than a float one and less than an int4 one (the rest int4-g32 each time)
    err = {fmt: shrink.info(shrink.quantize(tiny_llama(), {"model.embed_tokens": fmt, "*": "int4-g32"} if fmt else
                                            "int4-g32", backend="torch", progress=False)).check.relative_error
           for fmt in (None, "int4-g32")}
    assert err[None] < shrink.info(model).check.relative_error < err["int4-g32"]
    shrink.save(model, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "shrink.json").read_text())
    assert manifest["modules"]["lm_head"]["tied_to"] == "model.embed_tokens" and manifest["layout"] == "shrink"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "model.shrink.safetensors"), "pt") as f:
        assert "model.embed_tokens.qweight" in f.keys() and "lm_head.qweight" not in f.keys()  # stored once
    back = shrink.load(tmp_path / "q", backend="torch")
    assert back.lm_head.qweight is back.model.embed_tokens.qweight
    assert torch.equal(_logits(back), _logits(model))
    with pytest.raises(OSError, match="no file named model.safetensors"):  # fails loudly elsewhere
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_an_output_layer_named_otherwise_is_untied(tmp_path):
    model = shrink.quantize(tiny_llama(), {"model.embed_tokens": "int4-g32", "lm_head": None, "*": "int8"},
                            backend="torch", progress=False)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and type(model.lm_head) is torch.nn.Linear
    shrink.save(model, tmp_path / "q")
    assert torch.equal(_logits(shrink.load(tmp_path / "q", backend="torch")), _logits(model))


def test_embeddings_are_quantized_only_on_request():
    model = shrink.quantize(tiny_llama(), "int8", progress=False)
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    with pytest.raises(ValueError, match="embedding 'model.embed_tokens': embeddings take integer formats"):
        shrink.quantize(tiny_llama(), {"model.embed_tokens": "bf16"}, progress=False)


def test_calibrated_methods_round_embeddings_to_nearest_and_say_so():
    calib = [torch.randint(0, 96, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    model = shrink.quantize(tiny_llama(), {"model.embed_tokens": "int8", "*": "int4-g32"}, method="gptq",
                            calibration=calib, progress=False)
    assert "one-hot" in shrink.info(model).calibration["layers"]["model.embed_tokens"]["note"]
    assert model.lm_head.qweight is model.model.embed_tokens.qweight


def test_half_keeps_the_table_packed():
    model = shrink.quantize(tiny_llama(), {"model.embed_tokens": "int8", "*": "int8"}, progress=False).half()
    assert model.model.embed_tokens.scales.dtype == torch.float16 and model.model.embed_tokens.qweight.dtype == torch.uint8


def test_a_quantized_embedding_exports_to_gguf_exactly(tmp_path):
    import gguf
    from test_export import _from_gguf, _with_tok, bpe_llama, bpe_tokenizer

    model = shrink.quantize(bpe_llama(), {"model.embed_tokens": "int8", "*": "int4-g32"}, backend="torch",
                            progress=False)
    r = shrink.export_gguf(_with_tok(model, bpe_tokenizer()), tmp_path / "m.gguf", float_type="f32")
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(r.path)).tensors}
    assert kinds["token_embd.weight"] == "Q8_0" and "output.weight" not in kinds  # tied: written once
    ids = torch.randint(0, 300, (1, 9))
    assert torch.equal(_logits(_from_gguf(r.path), ids), _logits(model, ids))
