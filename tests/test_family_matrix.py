"""The family matrix (issue 14, growing): tiny models built from configs, each through round-to-nearest int8,
GPTQ, AWQ and target_bits; the forward check measured, every AWQ fold checked, save -> load bit-identical.
A small CNN is in test_conv.py."""

import pytest
import torch
import transformers as T
from helpers import tiny_llama, widen
from test_experts import tiny_moe
from test_families import bart, gemma, gpt2, t5

import shrink
from shrink.quant import MixedPrecision

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
    "opt": lambda: widen(T.OPTForCausalLM(T.OPTConfig(vocab_size=96, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                                      num_attention_heads=4, max_position_embeddings=64,
                                                      word_embed_proj_dim=64))),
    "falcon": lambda: widen(T.FalconForCausalLM(T.FalconConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2,
                                                               num_attention_heads=4))),
    "gpt-neox": lambda: widen(T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**D))),
    "qwen3": lambda: widen(T.Qwen3ForCausalLM(T.Qwen3Config(num_key_value_heads=2, head_dim=16, **D))),
    "gemma2": lambda: widen(T.Gemma2ForCausalLM(T.Gemma2Config(num_key_value_heads=2, head_dim=16, **D))),
    "gemma3": lambda: widen(T.Gemma3ForCausalLM(T.Gemma3TextConfig(num_key_value_heads=2, head_dim=16, **D))),
    "roberta": lambda: widen(T.RobertaModel(T.RobertaConfig(**{**D, "max_position_embeddings": 80}))),
    "whisper": lambda: widen(T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=96, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
        max_source_positions=32, max_target_positions=32, decoder_start_token_id=1, pad_token_id=0))),
    # mixtures of experts: one Linear per expert (quant/experts.py), each calibrated on the tokens routed to it
    "mixtral": lambda: tiny_moe("mixtral"),
    "qwen2-moe": lambda: tiny_moe("qwen2_moe"),
    "olmoe": lambda: tiny_moe("olmoe"),
    # transformers' ResNet: no input embeddings; its 147- and 144-input convolutions take no group of 32
    "resnet": lambda: T.ResNetForImageClassification(T.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3, layer_type="basic")).eval(),
}
# the norm that really feeds each group (traced, not guessed by name): AWQ's scales fold there exactly
FOLDS = {"opt": {"self_attn.q_proj": "self_attn_layer_norm", "fc1": "final_layer_norm"},
         "gemma2": {"self_attn.q_proj": "input_layernorm", "mlp.gate_proj": "pre_feedforward_layernorm"},
         "gemma3": {"self_attn.q_proj": "input_layernorm", "mlp.gate_proj": "pre_feedforward_layernorm"},
         "falcon": {"self_attention.query_key_value": "input_layernorm"},
         "gpt-neox": {"attention.query_key_value": "input_layernorm", "mlp.dense_h_to_4h": "post_attention_layernorm"}}
MELS = [torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(i)) for i in range(6)]
IDS = [torch.randint(0, 96, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(6)]
PIXELS = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(6)]
RECIPES = [("int8", "rtn", None), ("int4-g32", "gptq", None), ("int4-g32", "awq", None), (MixedPrecision(5.0), "rtn", None)]


def _inputs(family):
    if family in ("vit", "resnet"):
        return {"pixel_values": PIXELS[0]}
    if family == "whisper":
        return {"input_features": MELS[0], "decoder_input_ids": IDS[0][:, :5]}
    if family in ("bart", "t5"):
        return {"input_ids": IDS[0][:, :12], "decoder_input_ids": IDS[0][:, :5]}
    return {"input_ids": IDS[0][:, :12]}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("fmt,method,target_bits", RECIPES, ids=["int8", "gptq", "awq", "target_bits"])
def test_family(tmp_path, family, fmt, method, target_bits):
    calib = PIXELS if family in ("vit", "resnet") else MELS if family == "whisper" else IDS
    kw = {"calibration": calib} if method != "rtn" or isinstance(fmt, MixedPrecision) else {}
    if family == "resnet" and isinstance(fmt, MixedPrecision):
        fmt = MixedPrecision(5.0, ladder=("int2-g32", "int4", "int8"))  # per-channel rungs for the convolutions
    model = shrink.quantize(FAMILIES[family](), fmt, method=method, target_bits=target_bits, progress=False, **kw)
    check = shrink.info(model).check
    assert check.skipped is None and 0 < check.relative_error < (0.2 if fmt == "int8" else 2.0), check
    if family == "resnet":  # every convolution, in groups where they divide and per channel where not
        convs = [n for n, m in FAMILIES[family]().named_modules() if isinstance(m, torch.nn.Conv2d)]
        formats = shrink.info(model).formats
        assert all(formats[n] for n in convs) and len(convs) == 6, formats
        if fmt == "int4-g32":
            assert formats["resnet.embedder.embedder.convolution"] == "int4"
            assert "147 inputs" in shrink.info(model).fallbacks["resnet.embedder.embedder.convolution"]
            assert "groups of 32 do not divide" in shrink.info(model).layers["resnet.embedder.embedder.convolution"].notes[0]
    else:
        n_quant = sum(isinstance(m, shrink.QuantLinear) for m in model.modules())
        assert n_quant >= 8  # every block's projections, whatever the family calls them
    record = shrink.info(model).calibration or {}
    for name, d in record.get("layers", {}).items():
        fold = d.get("awq_fold")
        if fold and fold.startswith("into"):
            assert float(fold.rsplit("moved ", 1)[1].rstrip(")")) <= 1e-5, (name, fold)
    if method == "awq" and family not in ("bert", "bert-classifier", "roberta", "resnet"):  # post-norm, convolutions
        assert any(str(d.get("awq_fold", "")).startswith("into") for d in record["layers"].values())
    if method == "awq":
        for layer, norm in FOLDS.get(family, {}).items():
            for name, d in record["layers"].items():
                if name.endswith("." + layer):
                    assert d["awq_fold"].startswith(f"into {name.rsplit(layer, 1)[0]}{norm}"), (name, d["awq_fold"])
    shrink.save(model, tmp_path / "q")
    back = shrink.load(tmp_path / "q")
    assert shrink.info(back).fallbacks == shrink.info(model).fallbacks  # shrink.json keeps them
    with torch.no_grad():
        a, b = model(**_inputs(family)), back(**_inputs(family))
    key = "logits" if hasattr(a, "logits") else "last_hidden_state"
    assert torch.equal(getattr(a, key), getattr(b, key))


def test_compare_names_the_input_a_model_needs_when_a_task_cannot_give_it(tmp_path):
    from helpers import tiny_tokenizer

    task = tmp_path / "t.jsonl"
    task.write_text('{"input": "one two", "target": "x"}\n')
    whisper = FAMILIES["whisper"]()
    with pytest.raises(shrink.ShrinkError, match="WhisperForConditionalGeneration reads 'input_features'"):
        shrink.compare(whisper, whisper, str(task), tokenizer=tiny_tokenizer())
