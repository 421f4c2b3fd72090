"""Rotations folded into the weights (quant/rotate.py): exact to float rounding, refused where they cannot be
folded, and what they are for: an outlier channel no longer dominates the rounding."""

import json
import re

import pytest
import torch
import transformers as T
from helpers import tiny_llama, widen
from test_experts import tiny_moe

import shrink
from shrink.quant import rotate
from shrink.quant.experts import unfuse_experts
from shrink.quant.recipe import Rotate, parse_method

D = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
         max_position_embeddings=64)
IDS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def _norms_not_one(model):
    """Norm weights as a trained model has them (the default init is all ones, which hides a missed fold)."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.rpartition(".")[2].endswith("norm") and isinstance(getattr(m, "weight", None), torch.Tensor):
                m.weight.normal_(1, 0.3, generator=torch.Generator().manual_seed(len(name)))
    return model


FOLDABLE = {
    "llama": lambda: tiny_llama(tie=False),
    "llama-tied": lambda: tiny_llama(tie=True),
    "qwen2": lambda: widen(T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, **D))),  # q, k, v biases
    "qwen3": lambda: widen(T.Qwen3ForCausalLM(T.Qwen3Config(num_key_value_heads=2, head_dim=16, **D))),
    "mistral": lambda: widen(T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=2, **D))),
    "phi3": lambda: widen(T.Phi3ForCausalLM(T.Phi3Config(num_key_value_heads=4, pad_token_id=0, eos_token_id=1,
                                                         **D))),  # fused qkv and gate_up projections
    "mixtral": lambda: tiny_moe("mixtral"),  # fused 3-D experts and a router reading the stream
    "qwen2_moe": lambda: tiny_moe("qwen2_moe"),  # a shared expert and its gate too
    "olmoe-one-linear-per-expert": lambda: _unfused(tiny_moe("olmoe")),
}


def _unfused(model):
    unfuse_experts(model)  # (as quantize holds a mixture while it works)
    return model


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("n", [2, 4, 12, 20, 28, 36, 64, 72, 76, 148, 576, 768, 1536])  # (28 ... 148: Paley II)
def test_hadamard_matrices_of_the_orders_models_have(n):
    h = rotate.hadamard(n)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    q, what = rotate.orthogonal(n, seed=3)
    assert what.startswith("hadamard") and torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_an_order_without_a_hadamard_matrix_here_gets_a_random_orthogonal_one_and_says_so():
    assert rotate.hadamard(172) is None and rotate.hadamard(6) is None  # (QuaRot stores one of order 172)
    q, what = rotate.orthogonal(172, seed=0)
    assert what.startswith("random orthogonal 172")
    assert torch.allclose(q @ q.T, torch.eye(172, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("family", list(FOLDABLE))
def test_a_rotated_model_computes_what_the_original_computes(family):
    model = _norms_not_one(FOLDABLE[family]().eval())
    before = _logits(model)
    table = model.model.embed_tokens.weight.detach().clone()
    record = rotate.rotate_model(model, seed=5)
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=1e-5 * before.abs().max().item())
    assert record["fold_change"] < 1e-5 and record["residual"] == "hadamard 64 with random signs"
    assert record["norms_folded"] == 5
    for name, m in model.named_modules():
        if name.endswith("layernorm") or name == "model.norm":
            assert torch.equal(m.weight, torch.ones_like(m.weight)), name
    assert not torch.allclose(model.model.embed_tokens.weight, table)  # rotated, not left alone
    if family == "llama-tied":  # the final norm is not all ones: the output layer is a matrix of its own now
        assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
        assert "untied, 6,144 more parameters" in record["untied"]
    else:
        assert "untied" not in record


def test_a_tied_model_whose_final_norm_is_ones_stays_tied():
    model = tiny_llama(tie=True)  # (its norms as initialised: ones)
    before = _logits(model)
    record = rotate.rotate_model(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight and "untied" not in record
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=1e-5 * before.abs().max().item())


@pytest.mark.parametrize("make,needle", [
    (lambda: widen(T.GemmaForCausalLM(T.GemmaConfig(num_key_value_heads=2, head_dim=16, **D))),
     "model.layers.0.input_layernorm (GemmaRMSNorm) does not compute x / rms(x) * weight"),
    (lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**{**D, "eos_token_id": 1, "pad_token_id": 0})),  # norms after layers
     "model.layers.0.post_feedforward_layernorm.weight is a parameter the rotation does not fold"),
    (lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)),
     "cannot rotate GPT2LMHeadModel: it has no 'model.embed_tokens'"),
    (lambda: tiny_llama().to(torch.bfloat16), "the weights are not float32"),
])
def test_what_cannot_be_folded_exactly_is_refused_naming_it_and_left_as_it_was(make, needle):
    model = _norms_not_one(make().eval())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(shrink.ShrinkError, match=re.escape(needle)):
        rotate.rotate_model(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_fold_that_does_not_check_out_puts_the_model_back(monkeypatch):
    model = _norms_not_one(tiny_llama(tie=True))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(rotate, "FOLD_TOLERANCE", 0.0)  # float rounding itself now counts as a failed fold
    with pytest.raises(shrink.ShrinkError, match="the rotated model's output differs from the original's"):
        rotate.rotate_model(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _outlier_model():
    """A tiny Llama whose residual stream carries one channel 30x the others (what trained LLMs have)."""
    model = _norms_not_one(tiny_llama(tie=False))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 7] *= 30
        for block in model.model.layers:
            for lin in (block.self_attn.q_proj, block.self_attn.k_proj, block.mlp.up_proj):
                lin.weight[:, 7] *= 20  # the layers reading the stream weigh it too
    return model


def test_rotation_spreads_an_outlier_channel_so_rounding_loses_less():
    ids = torch.randint(3, 96, (4, 32), generator=torch.Generator().manual_seed(2))
    kl = {}
    for method in ("rtn", "rotate"):  # per-channel scales: where one large input channel costs the most
        model = _outlier_model()
        before = torch.log_softmax(_logits(model, ids), -1)
        shrink.quantize(model, "int4", method=method, backend="torch", progress=False)
        after = torch.log_softmax(_logits(model, ids), -1)
        kl[method] = float((before.exp() * (before - after)).sum(-1).mean())
    assert kl["rotate"] < 0.6 * kl["rtn"], kl  # measured: 0.096 against 0.198


@pytest.mark.parametrize("method", ["rotate", "rotate+gptq", "rotate+awq+gptq"])
def test_a_rotated_quantized_model_saves_loads_and_loads_in_transformers_exactly(tmp_path, method):
    from transformers import AutoModelForCausalLM

    model = _norms_not_one(tiny_llama(tie=True))
    kw = {} if method == "rotate" else dict(calibration=list(torch.randint(3, 96, (8, 32))))
    shrink.quantize(model, "int4-g32", method=method, backend="torch", progress=False, **kw)
    info = shrink.info(model)
    assert info.method == parse_method(method).method and info.rotation["residual"].startswith("hadamard 64")
    shrink.save(model, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "shrink.json").read_text())
    assert manifest["layout"] == "pack-quantized" and manifest["rotation"]["seed"] == 0
    assert "untied" in manifest["rotation"]
    logits = _logits(model)
    back = shrink.load(tmp_path / "q", backend="torch")
    assert torch.equal(_logits(back), logits) and shrink.info(back).rotation == info.rotation
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert torch.equal(_logits(hf), logits)


def test_method_strings_and_steps_with_a_rotation():
    assert parse_method("rotate").name == "rotate" and parse_method("rotate").method == "rtn"
    r = parse_method("rotate+awq+gptq+tune8")
    assert (r.name, r.method, r.rotate, r.tune.steps) == ("rotate+awq+gptq+tune8", "awq+gptq", Rotate(), 8)
    assert parse_method([Rotate(seed=2), shrink.quant.GPTQ()]).rotate == Rotate(seed=2)
    for bad in ("rotate+", "rotategptq", "gptq+rotate", "rotate+rotate"):
        with pytest.raises(shrink.ShrinkError, match="unknown method"):
            parse_method(bad)
    with pytest.raises(shrink.ShrinkError, match="tuning needs a calibrated method"):
        parse_method("rotate+tune")
    with pytest.raises(shrink.ShrinkError, match="Rotate must come before"):
        parse_method([shrink.quant.GPTQ(), Rotate()])


def test_the_cli_rotates_in_memory_and_says_why_it_does_not_stream(tmp_path):
    from click.testing import CliRunner

    from shrink.cli import main

    model = _norms_not_one(tiny_llama(tie=False))
    model.save_pretrained(tmp_path / "hf")
    r = CliRunner().invoke(main, ["quantize", str(tmp_path / "hf"), "-f", "int4-g32", "--method", "rotate",
                                  "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    assert "block by block" not in r.output  # a rotation needs the whole model: loaded whole, not streamed
    assert json.loads((tmp_path / "q" / "shrink.json").read_text())["rotation"]["heads"].startswith("hadamard 16")
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "q")], terminal_width=200)
    assert "rotated before quantizing: residual stream hadamard 64 with random signs" in r.output
    assert "output layer untied from the embedding" not in r.output  # (its output layer was its own)
    r = CliRunner().invoke(main, ["quantize", str(tmp_path / "hf"), "--method", "rotate", "--stream"])
    assert r.exit_code != 0 and "a rotation (--method rotate+...) needs the whole model in memory" in r.output


def test_a_rotated_mixture_quantizes_saves_and_loads(tmp_path):
    model = _norms_not_one(tiny_moe("mixtral"))
    before = _logits(model)
    shrink.quantize(model, "int8", method="rotate", backend="torch", progress=False)
    assert shrink.info(model).formats["model.layers.1.mlp.experts.down.3"] == "int8"
    logits = _logits(model)
    # (a tiny random mixture: a routing choice near a tie flips under int8; rounding without the rotation: 0.069)
    assert float((logits - before).abs().max() / before.abs().max()) < 0.06
    shrink.save(model, tmp_path / "q")
    assert torch.equal(_logits(shrink.load(tmp_path / "q", backend="torch")), logits)


def test_a_rotated_model_exports_to_gguf_exactly_and_transformers_reads_it_back(tmp_path):
    from test_export import _from_gguf, _with_tok, bpe_tokenizer

    tok = bpe_tokenizer()
    model = _norms_not_one(tiny_llama(tie=True))
    model.resize_token_embeddings(300)
    shrink.quantize(model, "int8-g32", method="rotate", backend="torch", progress=False)
    assert "untied" in shrink.info(model).rotation  # an output layer of its own, written as GGUF's output.weight
    r = shrink.export_gguf(_with_tok(model, tok), tmp_path / "m.gguf", float_type="f32")
    assert all(e == 0 for e in r.max_error.values()), r.max_error  # Q8_0 blocks: shrink's codes and scales
    ids = torch.tensor([tok("the bank said profit rose").input_ids])
    torch.testing.assert_close(_logits(_from_gguf(r.path), ids), _logits(model, ids), rtol=1e-4, atol=1e-4)
