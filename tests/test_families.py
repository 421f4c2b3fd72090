"""Model families beyond Llama (issue 14, growing): each through the formats and methods, saved and loaded
bit-identically, the forward check measured, and folders transformers cannot read exactly failing loudly."""

import json

import pytest
import torch
from helpers import widen
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import shrink
from shrink.quant import QuantLinear


def gpt2(seed: int = 0):
    """A 2-layer GPT-2 (hidden 64, 4 heads): its projections are transformers' Conv1D, weights [in, out]."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=96, n_positions=64, bos_token_id=0, eos_token_id=1)
    return widen(GPT2LMHeadModel(cfg))


CALIBRATION = [torch.randint(0, 96, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(8)]


@pytest.mark.parametrize("fmt,method", [("int8", "rtn"), ("int4-g32", "rtn"), ("int4-g32", "gptq"),
                                        ("int4-g32", "awq"), ("int3-g32", "awq+gptq")])
def test_gpt2_conv1d_layers_are_quantized(tmp_path, fmt, method):
    ref = gpt2()
    model = shrink.quantize(gpt2(), fmt, method=method, calibration=CALIBRATION if method != "rtn" else None,
                            backend="torch", progress=False)
    projections = [n for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    for i in range(2):
        for p in projections:
            layer = model.get_submodule(f"transformer.h.{i}.{p}")
            assert isinstance(layer, QuantLinear) and layer.spec.name == fmt
    conv = ref.transformer.h[0].mlp.c_fc  # [in, out] in GPT-2's layout; [out, in] in shrink's
    q = model.transformer.h[0].mlp.c_fc
    assert (q.in_features, q.out_features) == tuple(conv.weight.shape)
    if method == "rtn":
        from shrink.quant.rtn import quantize_weight

        want = quantize_weight(conv.weight.detach().t(), q.spec, "c_fc")
        assert torch.equal(q.qweight, shrink.quant.packing.pack(want.codes, q.spec.bits))
    assert 0 < shrink.info(model).check.relative_error < (0.02 if fmt == "int8" else 0.5)
    ids = torch.randint(0, 96, (2, 10))
    shrink.save(model, tmp_path / "q")
    back = shrink.load(tmp_path / "q", backend="torch")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    # compressed-tensors would leave GPT-2's Conv1D layers random in transformers: shrink's own layout,
    # which transformers refuses loudly
    assert json.loads((tmp_path / "q" / "shrink.json").read_text())["layout"] == "shrink"
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_gpt2_conv1d_layers_kept_in_full_precision_stay_conv1d(tmp_path):
    model = shrink.quantize(gpt2(), {"*.mlp.*": None, "*": "int8"}, progress=False)
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    assert isinstance(model.transformer.h[0].attn.c_attn, QuantLinear)
    shrink.save(model, tmp_path / "q")
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        assert torch.equal(shrink.load(tmp_path / "q")(ids).logits, model(ids).logits)


def test_gpt2_is_compared_as_the_causal_language_model_it_is(tmp_path):
    from helpers import tiny_tokenizer

    from shrink.evaluate.adapters import CausalLMAdapter, adapter_for

    tok = tiny_tokenizer()
    assert isinstance(adapter_for(gpt2(), tok), CausalLMAdapter)  # not an encoder: GPT2LMHeadModel is in
    # transformers' registry of causal LMs, though its name does not end in ForCausalLM
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"id": str(i), "input": t, "choices": ["bank", "oil", "tax"], "answer": i % 3})
                            + "\n" for i, t in enumerate(["the price of", "the chief analyst said", "growth in the"])))
    c = shrink.compare(gpt2(), shrink.quantize(gpt2(), "int8", progress=False), task, tokenizer=tok,
                       chat_template=False, progress=False)
    assert c.compressed["kind"] == "causal language" and c.divergence["kl"]["mean"] < 0.01


def gemma(seed: int = 0):
    """A 2-layer Gemma: its RMSNorm computes x * (1 + w), so AWQ's scales fold into (1 + w)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    return widen(GemmaForCausalLM(GemmaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 head_dim=16, max_position_embeddings=64)))


def test_awq_folds_are_checked_numerically_and_gemmas_norm_folds_into_one_plus_w():
    from helpers import tiny_llama

    for make, norm_form in ((tiny_llama, "into model.layers.0.input_layernorm, checked"),
                            (gemma, "into model.layers.0.input_layernorm as x * (1 + w), checked")):
        model = shrink.quantize(make(), "int4-g32", method="awq", calibration=CALIBRATION, progress=False)
        layers = shrink.info(model).calibration["layers"]
        assert layers["model.layers.0.self_attn.q_proj"]["awq_fold"].startswith(norm_form)
        assert layers["model.layers.0.mlp.down_proj"]["awq_fold"].startswith("into model.layers.0.mlp.up_proj, checked")
        assert not shrink.info(model).calibration["warnings"]
        moved = [float(d["awq_fold"].rsplit("moved ", 1)[1].rstrip(")")) for d in layers.values() if "awq_fold" in d]
        assert max(moved) < 1e-5


def test_a_fold_that_would_change_the_model_is_not_applied_and_is_reported():
    """A norm of another form (here x * w^2): neither fold is exact; the check catches it and undoes it."""
    from helpers import tiny_llama

    model = tiny_llama()
    norm = model.model.layers[1].post_attention_layernorm
    norm.forward = lambda x: (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)) * norm.weight ** 2
    before = norm.weight.detach().clone()
    with torch.no_grad():
        norm.weight.add_(torch.rand(64) * 0.5)  # away from 1, where w and w^2 would fold alike
        before = norm.weight.detach().clone()
    q = shrink.quantize(model, "int4-g32", method="awq", calibration=CALIBRATION, progress=False)
    rec = shrink.info(q).calibration["layers"]["model.layers.1.mlp.up_proj"]["awq_fold"]
    assert rec.startswith("not applied: folding the scales into model.layers.1.post_attention_layernorm moved")
    assert any("model.layers.1.mlp.gate_proj: not applied" in w for w in shrink.info(q).calibration["warnings"])
    assert torch.equal(norm.weight, before)  # restored exactly
    assert shrink.info(q).calibration["layers"]["model.layers.1.self_attn.q_proj"]["awq_fold"].startswith("into")


def bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=96, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64)).eval()


def test_both_stacks_of_an_encoder_decoder_are_calibrated(tmp_path):
    from shrink.core.architecture import find_stacks

    assert [n for n, _ in find_stacks(bart())] == ["model.encoder.layers", "model.decoder.layers"]
    model = shrink.quantize(bart(), "int4-g32", method="gptq", calibration=CALIBRATION, backend="torch",
                            progress=False)
    layers = shrink.info(model).calibration["layers"]
    for stack in ("encoder", "decoder"):
        rec = layers[f"model.{stack}.layers.1.fc1"]
        assert "damp" in rec and "note" not in rec  # GPTQ, not round-to-nearest as "outside the blocks"
    assert not any("outside the repeated blocks" in str(d.get("note")) for d in layers.values())
    assert shrink.info(model).check.relative_error < 0.05
    shrink.save(model, tmp_path / "q")
    ids = torch.randint(3, 96, (1, 9))
    with torch.no_grad():
        a = shrink.load(tmp_path / "q", backend="torch")(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        assert torch.equal(a, model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits)


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=96, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                               num_heads=4, decoder_start_token_id=0)).eval()


def test_t5_which_reads_its_layers_weight_runs_quantized(tmp_path):
    """T5's feed-forward reads wo.weight.dtype in every forward: a QuantLinear's weight is its dequantized
    weight (right, not fast), so T5 runs, calibrates and saves."""
    model = shrink.quantize(t5(), "int8", method="gptq", calibration=CALIBRATION, backend="torch", progress=False)
    assert shrink.info(model).check.relative_error < 0.05
    assert "damp" in shrink.info(model).calibration["layers"]["encoder.block.1.layer.1.DenseReluDense.wo"]
    q = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert torch.equal(q.weight, q.dequantized_weight())
    shrink.save(model, tmp_path / "q")
    ids = torch.randint(3, 96, (1, 9))
    with torch.no_grad():
        a = shrink.load(tmp_path / "q", backend="torch")(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        assert torch.equal(a, model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits)


@pytest.mark.parametrize("make", [bart, t5], ids=["bart", "t5"])
def test_encoder_decoders_are_compared_on_generation_and_choice_tasks(tmp_path, make):
    from helpers import tiny_tokenizer

    from shrink.evaluate.adapters import Seq2SeqAdapter, adapter_for

    tok = tiny_tokenizer()
    assert isinstance(adapter_for(make(), tok), Seq2SeqAdapter)
    gen, choice = tmp_path / "gen.jsonl", tmp_path / "choice.jsonl"
    gen.write_text("".join(json.dumps({"id": str(i), "input": t, "target": "bank", "max_new_tokens": 6}) + "\n"
                           for i, t in enumerate(["the price of", "the chief analyst said", "growth in the"])))
    choice.write_text("".join(json.dumps({"id": str(i), "input": t, "choices": ["bank", "oil", "tax"], "answer": i % 3})
                              + "\n" for i, t in enumerate(["the price of", "the chief analyst said"])))
    same = shrink.compare(make(), make(), gen, tokenizer=tok, progress=False)
    assert same.compressed["kind"] == "encoder-decoder language"
    assert same.divergence["kl"]["mean"] < 1e-6 and same.divergence["top1_agreement"] == 1.0  # identical models
    q = shrink.quantize(make(), "int8", progress=False)
    c = shrink.compare(make(), q, choice, tokenizer=tok, progress=False)
    assert 0 < c.divergence["kl"]["mean"] < 0.05 and len(c.examples) == 2


def test_awq_says_which_layers_got_scales_and_which_only_clipping(tmp_path):
    model = shrink.quantize(gpt2(), "int4-g32", method="awq", calibration=CALIBRATION, progress=False)
    shrink.save(model, tmp_path / "q")
    done = {n: m["done"] for n, m in json.loads((tmp_path / "q" / "shrink.json").read_text())["modules"].items()}
    # the inputs of c_attn and c_fc come from LayerNorms (folded, checked); those of the projections back into
    # the residual stream come from no layer the scales fold into exactly
    assert done["transformer.h.0.attn.c_attn"]["method"] == "awq"
    assert "into transformer.h.0.ln_1, checked" in done["transformer.h.0.attn.c_attn"]["notes"][0]
    assert done["transformer.h.1.mlp.c_proj"]["method"] == "awq (clipping only)"
    assert "no scales applied" in done["transformer.h.1.mlp.c_proj"]["notes"][0]


def test_fused_experts_of_a_layout_shrink_does_not_unfold_are_said_to_stay_in_full_precision():
    # shrink makes one Linear per expert of transformers' usual fused layout (tests/test_experts.py); a layout
    # it does not know (here: marked transposed, as some models store them) keeps them 3-D, in full
    # precision, and most of the weights: a quantize that left them silently would misreport what was done
    from transformers import MixtralConfig, MixtralForCausalLM

    from shrink.quant import size_rows

    cfg = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64)
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).eval()
    for layer in model.model.layers:
        layer.mlp.experts.is_transposed = True
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    share = experts / sum(p.numel() for p in model.parameters())
    with pytest.warns(UserWarning, match=rf"4 fused expert tensors \(model\.layers\.0\.mlp\.experts\.gate_up_proj and "
                                         rf"others: {share:.0%} of the model's weights\) kept in full precision"):
        shrink.quantize(model, "int4-g32", progress=False)
    rows = {r.kind: r for r in size_rows(model)}
    assert rows["fused experts (kept: 3-D tensors are not quantized yet)"].parameters == experts
    assert shrink.info(model).formats["model.layers.0.self_attn.q_proj"] == "int4-g32"
