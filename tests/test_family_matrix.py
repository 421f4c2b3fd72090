"""The family matrix (issue 14, growing): tiny models built from configs, each through round-to-nearest int8,
GPTQ, AWQ and target_bits; the forward check measured, every AWQ fold checked, save -> load bit-identical.
A small CNN is in test_conv.py."""

import pytest
import torch
import transformers as T

import shrink
from helpers import tiny_llama, widen
from shrink.quant import MixedPrecision
from test_families import bart, gemma, gpt2, t5

D = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
         max_position_embeddings=64)


FAMILIES = {
    "llama": tiny_llama,
    "qwen2": lambda: widen(T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, **D))),
    "mistral": lambda: widen(T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=2, **D))),
    "phi3": lambda: widen(T.Phi3ForCausalLM(T.Phi3Config(num_key_value_heads=4, pad_token_id=0, eos_token_id=1,
                                                            bos_token_id=1, **D))),
    "gemma": gemma,
    "gpt2": gpt2,
    "bert": lambda: widen(T.BertModel(T.BertConfig(**D))),
    "bert-classifier": lambda: widen(T.BertForSequenceClassification(T.BertConfig(num_labels=3, **D))),
    "bart": bart,
    "t5": t5,
    "vit": lambda: widen(T.ViTForImageClassification(T.ViTConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, num_labels=5))),
}
IDS = [torch.randint(0, 96, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(6)]
PIXELS = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(6)]
RECIPES = [("int8", "rtn", None), ("int4-g32", "gptq", None), ("int4-g32", "awq", None), (MixedPrecision(5.0), "rtn", None)]


def _inputs(family):
    if family == "vit":
        return {"pixel_values": PIXELS[0]}
    if family in ("bart", "t5"):
        return {"input_ids": IDS[0][:, :12], "decoder_input_ids": IDS[0][:, :5]}
    return {"input_ids": IDS[0][:, :12]}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("fmt,method,target_bits", RECIPES, ids=["int8", "gptq", "awq", "target_bits"])
def test_family(tmp_path, family, fmt, method, target_bits):
    calib = PIXELS if family == "vit" else IDS
    kw = {"calibration": calib} if method != "rtn" or isinstance(fmt, MixedPrecision) else {}
    model = shrink.quantize(FAMILIES[family](), fmt, method=method, target_bits=target_bits, progress=False, **kw)
    check = shrink.info(model).check
    assert check.skipped is None and 0 < check.relative_error < (0.2 if fmt == "int8" else 2.0), check
    n_quant = sum(isinstance(m, shrink.QuantLinear) for m in model.modules())
    assert n_quant >= 8  # every block's projections, whatever the family calls them
    record = shrink.info(model).calibration or {}
    for name, d in record.get("layers", {}).items():
        fold = d.get("awq_fold")
        if fold and fold.startswith("into"):
            assert float(fold.rsplit("moved ", 1)[1].rstrip(")")) <= 1e-5, (name, fold)
    if method == "awq" and family not in ("bert", "bert-classifier"):  # post-norm: no fold is exact there
        assert any(str(d.get("awq_fold", "")).startswith("into") for d in record["layers"].values())
    shrink.save(model, tmp_path / "q")
    back = shrink.load(tmp_path / "q")
    with torch.no_grad():
        a, b = model(**_inputs(family)), back(**_inputs(family))
    key = "logits" if hasattr(a, "logits") else "last_hidden_state"
    assert torch.equal(getattr(a, key), getattr(b, key))
