"""Calibrated quantization end to end on tiny models: GPTQ, AWQ, mixed precision, calibration data."""

import copy
import json

import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer, word_text

import shrink
from shrink.core.errors import ShrinkError
from shrink.quant import QuantLinear
from shrink.quant.awq import fold_scale, scale_groups, search_clip, search_scale
from shrink.quant.calibration import from_file
from shrink.quant.mixed import allocate


def _samples(n=12, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (1, length), generator=g) for _ in range(n)]


def _err(model, ref, ids):
    with torch.no_grad():
        return ((model(ids).logits - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def base_and_ref():
    base = tiny_llama(seed=3)
    ids = torch.cat(_samples(4, 32, seed=99))
    with torch.no_grad():
        ref = base(ids).logits
    return base, ref, ids


def test_gptq_beats_rtn_on_held_out_inputs(base_and_ref):
    base, ref, ids = base_and_ref
    rtn = shrink.quantize(copy.deepcopy(base), "int3-g32", progress=False)
    gptq = shrink.quantize(copy.deepcopy(base), "int3-g32", method="gptq", calibration=_samples(), progress=False)
    assert all(isinstance(m, QuantLinear) for n, m in gptq.named_modules() if n.endswith("_proj"))
    assert _err(gptq, ref, ids) < _err(rtn, ref, ids)
    rec = shrink.info(gptq).calibration
    assert rec["method"] == "gptq" and rec["data"]["samples"] == 12
    assert rec["layers"]["model.layers.1.mlp.down_proj"]["damp"] == pytest.approx(0.01)


def test_awq_folding_keeps_the_function():
    model = tiny_llama(seed=4)
    block = model.model.layers[0]
    ids = torch.cat(_samples(2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    groups = dict((prev, names) for prev, names in scale_groups(block))
    assert set(groups) == {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}  # v->o skipped (GQA)
    mods = dict(block.named_modules())
    for prev, names in groups.items():
        s = torch.rand(mods[names[0]].in_features) * 3 + 0.2
        fold_scale(mods[prev], [mods[n] for n in names], s)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_awq_scale_search_protects_salient_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[:, :4] *= 30  # a few input channels with large activations
    w = torch.randn(32, 64, generator=g)
    s, alpha, ratio = search_scale([w], x, x.abs().mean(0), shrink.parse_format("int3-g32"))
    assert alpha > 0 and ratio < 0.9
    assert s[:4].mean() > s[4:].mean()


def test_clip_search_never_worse_than_no_clip():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=g)
    w = torch.randn(16, 64, generator=g)
    w[0, 3] = 8.0  # an outlier weight that makes clipping worthwhile for its group
    spec = shrink.parse_format("int3-g32")
    clip = search_clip(w, x, spec)
    assert ((clip >= 0.5) & (clip <= 1.0)).all()
    from shrink.quant.awq import fake_quant

    err = lambda c: ((x @ (fake_quant(w, spec, c) - w).T) ** 2).mean().item()  # noqa: E731
    assert err(clip) <= err(1.0) + 1e-9


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_methods_run_and_record(base_and_ref, method):
    base, ref, ids = base_and_ref
    m = shrink.quantize(copy.deepcopy(base), "int4-g32", method=method, calibration=_samples(), progress=False)
    layer = shrink.info(m).calibration["layers"]["model.layers.0.self_attn.q_proj"]
    assert 0.0 <= layer["awq_alpha"] <= 1.0
    rtn = shrink.quantize(copy.deepcopy(base), "int4-g32", progress=False)
    assert _err(m, ref, ids) < _err(rtn, ref, ids)  # closer to the original than round-to-nearest (0.42, 0.38 vs 0.44)


def test_allocation_meets_budget_and_prefers_sensitive_layers():
    sizes = {"a": (64, 64), "b": (64, 64), "c": (64, 128)}
    errors = {
        "a": {"int2-g32": 100.0, "int3-g32": 30.0, "int4-g64": 10.0, "int4-g32": 8.0, "int8": 0.1},
        "b": {"int2-g32": 1.0, "int3-g32": 0.5, "int4-g64": 0.2, "int4-g32": 0.15, "int8": 0.01},
        "c": {"int2-g32": 10.0, "int3-g32": 3.0, "int4-g64": 1.0, "int4-g32": 0.8, "int8": 0.01},
    }
    chosen = allocate(errors, sizes, 4.5)
    fmt_bits = {f: shrink.parse_format(f).bits_per_weight(64) for f in ["int2-g32", "int3-g32", "int4-g64", "int4-g32", "int8"]}
    numel = {k: a * b for k, (a, b) in sizes.items()}
    avg = sum(shrink.parse_format(chosen[k]).bits_per_weight(sizes[k][1]) * numel[k] for k in chosen) / sum(numel.values())
    assert avg <= 4.5 + 1e-9
    assert fmt_bits[chosen["a"]] > fmt_bits[chosen["b"]]  # the sensitive layer is kept wider
    with pytest.raises(ValueError, match="below the narrowest formats that fit"):
        allocate(errors, sizes, 2.0)


def test_target_bits_end_to_end_and_round_trip(tmp_path, base_and_ref):
    base, ref, ids = base_and_ref
    m = shrink.quantize(copy.deepcopy(base), target_bits=4.5, method="gptq", calibration=_samples(), progress=False)
    from shrink.quant import quantized_bits_per_weight

    assert quantized_bits_per_weight(m) <= 4.5 + 1e-9
    assert shrink.info(m).calibration["target_bits"] == 4.5
    shrink.save(m, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "shrink.json").read_text())
    assert manifest["method"] == "gptq" and manifest["calibration"]["target_bits"] == 4.5
    assert {v["format"] for v in manifest["modules"].values()} <= {"int2-g32", "int3-g32", "int4-g64", "int4-g32", "int8"}
    loaded = shrink.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, m(ids).logits)


def test_mixed_precision_is_a_spec_and_an_ignored_format_is_said(base_and_ref):
    from shrink.quant import MixedPrecision

    base, ref, ids = base_and_ref
    as_keyword = shrink.quantize(copy.deepcopy(base), target_bits=4.5, method="gptq", calibration=_samples(),
                                 progress=False)
    as_spec = shrink.quantize(copy.deepcopy(base), MixedPrecision(4.5), method="gptq", calibration=_samples(),
                              progress=False)
    assert shrink.info(as_spec).formats == shrink.info(as_keyword).formats
    with torch.no_grad():
        assert torch.equal(as_spec(ids).logits, as_keyword(ids).logits)
    with pytest.warns(UserWarning, match="the format 'int4-g32' is ignored"):
        shrink.quantize(copy.deepcopy(base), "int4-g32", target_bits=8, method="gptq", calibration=_samples(),
                        progress=False)
    with pytest.raises(shrink.ShrinkError, match="give the bit budget once"):
        shrink.quantize(copy.deepcopy(base), MixedPrecision(4.5), target_bits=4.5, calibration=_samples())
    with pytest.raises(shrink.ShrinkError, match="unknown format 'int7'"):
        MixedPrecision(4.5, ladder=("int7", "int8"))


def test_calibration_files(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama()
    txt = tmp_path / "calib.txt"
    txt.write_text(word_text(300))
    data = from_file(txt, tok, model, n_samples=4, seq_len=64)
    assert len(data.samples) == 4 and data.samples[0].shape == (1, 64)
    assert data.record["tokens_used"] == [0, 256] and len(data.record["sha256"]) == 64

    jl = tmp_path / "calib.jsonl"
    jl.write_text("\n".join(json.dumps({"text": word_text(50, seed=i)}) for i in range(5)))
    assert len(from_file(jl, tok, model, n_samples=10, seq_len=64).samples) >= 3

    cases = [
        ("empty.txt", "", "calibration file is empty"),
        ("short.txt", word_text(20), "20 tokens, shorter than one calibration sequence of 64"),
        ("bad.jsonl", '{"text": "the bank"}\n{"text": oops}\n', r"bad.jsonl:2: invalid JSON"),
        ("field.jsonl", '{"text": "the bank"}\n{"body": "x"}\n', r"field.jsonl:2: missing field \"text\""),
    ]
    for name, content, msg in cases:
        p = tmp_path / name
        p.write_text(content)
        with pytest.raises(ShrinkError, match=msg):
            from_file(p, tok, model, n_samples=4, seq_len=64)
    with pytest.raises(ShrinkError, match="calibration file not found"):
        from_file(tmp_path / "nope.txt", tok, model)


def test_tokenizer_mismatch_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    p = tmp_path / "c.txt"
    p.write_text(word_text(200))
    with pytest.raises(ShrinkError, match=r"c.txt: tokenizer has \d+ tokens but the model's vocabulary has 16"):
        shrink.quantize(small, "int4-g32", method="gptq", calibration=p, tokenizer=tiny_tokenizer(), n_samples=2, seq_len=32)
    with pytest.raises(ShrinkError, match="token id 50 is outside the model's vocabulary"):
        shrink.quantize(small, "int4-g32", method="gptq", calibration=[torch.tensor([[1, 50]])])


def test_plain_module_calibrated(mlp):
    x = torch.randn(64, 64)
    ref = mlp(x)
    rtn = shrink.quantize(copy.deepcopy(mlp), "int3-g32", progress=False)
    gptq = shrink.quantize(mlp, "int3-g32", method="gptq", calibration=[x[i:i + 8] for i in range(0, 64, 8)], progress=False)
    e = lambda m: ((m(x) - ref).norm() / ref.norm()).item()  # noqa: E731
    assert e(gptq) < e(rtn)


def test_first_stage_only_stops_after_the_first_layers():
    from shrink.quant.layerwise import capture_inputs, collect_stats

    model = tiny_llama(seed=5)
    block = model.model.layers[0]
    inputs = capture_inputs(model, block, _samples(3, 16))
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    full = collect_stats(block, inputs, names)
    first = collect_stats(block, inputs, names, first_stage_only=True)
    assert set(first) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}
    assert torch.allclose(first["self_attn.q_proj"].hessian, full["self_attn.q_proj"].hessian)
    later = collect_stats(block, inputs, ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"], first_stage_only=True)
    assert set(later) == {"mlp.gate_proj", "mlp.up_proj"}


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_true_sequential_feeds_later_layers_quantized_inputs(method):
    # q, k, v see the same inputs either way; o_proj and the MLP see what the quantized q, k, v produce.
    from shrink.quant.calibrated import quantize_calibrated
    from shrink.quant.spec import parse_format

    runs = {}
    for ts in (True, False):
        m = tiny_llama(seed=6)
        spec = parse_format("int3-g32")
        assignment = {n: spec for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"}
        quantize_calibrated(m, assignment, _samples(6, 24), method, true_sequential=ts)
        runs[ts] = dict(m.named_modules())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        assert torch.equal(runs[True][name].qweight, runs[False][name].qweight)
    changed = [n for n in ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj")
               if not torch.equal(runs[True][n].qweight, runs[False][n].qweight)]
    assert len(changed) == 3
    assert all(isinstance(runs[True][n], QuantLinear) for n in runs[True] if n.endswith("_proj"))


def _quantized_block(seed=7, fmt="int3-g32"):
    """Layer 0 of a tiny Llama with GPTQ-quantized Linear layers, its captured inputs, and the
    full-precision block's outputs on them."""
    from shrink.quant.calibrated import quantize_calibrated
    from shrink.quant.layerwise import capture_inputs, run_block
    from shrink.quant.spec import parse_format

    model = tiny_llama(seed=seed)
    block = model.model.layers[0]
    inputs = capture_inputs(model, block, _samples(16, 24))
    targets = [out[0][0] for out in run_block(block, inputs)]
    spec = parse_format(fmt)
    assignment = {n: spec for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    quantize_calibrated(model, assignment, _samples(6, 24, seed=5), "gptq")
    return model, block, inputs, targets


def _block_err(block, inputs, targets):
    with torch.no_grad():
        outs = [block(*a, **k) for a, k in inputs]
    return sum(float(torch.nn.functional.mse_loss(o[0] if isinstance(o, tuple) else o, t))
               for o, t in zip(outs, targets)) / len(inputs)


def test_tune_block_lowers_the_block_error_keeping_the_codes():
    from shrink.quant.tune import tune_block

    model, block, inputs, targets = _quantized_block()
    quant = {n: m for n, m in block.named_modules() if isinstance(m, QuantLinear)}
    codes = {n: m.qweight.clone() for n, m in quant.items()}
    scales = {n: m.scales.clone() for n, m in quant.items()}
    norm = block.input_layernorm.weight.detach().clone()
    held_before = _block_err(block, inputs[8:], targets[8:])
    res = tune_block(block, inputs[:8], targets[:8], steps=40, lr=3e-3, norm_lr=3e-3)
    assert res.after < 0.9 * res.before
    assert _block_err(block, inputs[:8], targets[:8]) == pytest.approx(res.after, rel=1e-5)  # as the block now is
    assert _block_err(block, inputs[8:], targets[8:]) < 0.97 * held_before  # on inputs it was not tuned on
    assert all(torch.equal(m.qweight, codes[n]) for n, m in quant.items())
    assert any(not torch.equal(m.scales, scales[n]) for n, m in quant.items())
    assert all(m.scales.dtype == torch.float16 for m in quant.values())
    assert isinstance(block.input_layernorm.weight, torch.nn.Parameter)
    assert not torch.equal(block.input_layernorm.weight, norm)


def test_tune_block_that_gets_worse_is_restored():
    from shrink.quant.tune import tune_block

    model, block, inputs, targets = _quantized_block(seed=8)
    scales = {n: m.scales.clone() for n, m in block.named_modules() if isinstance(m, QuantLinear)}
    norm = block.post_attention_layernorm.weight.detach().clone()
    res = tune_block(block, inputs, targets, steps=5, lr=5.0, norm_lr=5.0)  # steps far too large
    assert res.after == res.before
    assert all(torch.equal(m.scales, scales[n]) for n, m in block.named_modules() if isinstance(m, QuantLinear))
    assert torch.equal(block.post_attention_layernorm.weight, norm)


def test_tune_steps_end_to_end_and_round_trip(tmp_path, base_and_ref):
    base, ref, ids = base_and_ref
    tuned = shrink.quantize(copy.deepcopy(base), "int3-g32", method="gptq", calibration=_samples(), tune_steps=24,
                            progress=False)
    rec = shrink.info(tuned).calibration
    assert rec["tune_steps"] == 24
    block = rec["layers"]["model.layers.1"]
    assert block["tune_error_after"] < block["tune_error_before"]
    shrink.save(tuned, tmp_path / "t")
    loaded = shrink.load(tmp_path / "t")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, tuned(ids).logits)
    with pytest.raises(ValueError, match="tune_steps=8: tuning needs a calibrated method"):
        shrink.quantize(copy.deepcopy(base), "int4-g32", tune_steps=8)


@pytest.mark.parametrize("how", [dict(spec="int4-g32"), dict(spec="int4-g32", method="awq+gptq+tune4"),
                                 dict(spec="int8", target_bits=4.5, method="awq")])
def test_a_quantize_that_fails_leaves_the_model_as_it_was(monkeypatch, base_and_ref, how):
    # the failure comes at the very end (the forward check), after every layer was replaced and AWQ folded
    # its scales into norms and layers, tuning changed norms: all of it is undone
    from shrink.quant import apply

    base, ref, ids = base_and_ref
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {n: type(m) for n, m in model.named_modules()}
    tied = model.lm_head.weight is model.model.embed_tokens.weight

    def fail(*a, **k):
        raise ShrinkError("the check failed")

    monkeypatch.setattr(apply, "_check_forward", fail)
    kwargs = {k: v for k, v in how.items() if k != "spec"}
    if "method" in kwargs or "target_bits" in kwargs:
        kwargs["calibration"] = _samples()
    with pytest.raises(ShrinkError, match="the check failed"):
        shrink.quantize(model, how["spec"], progress=False, **kwargs)
    assert {n: type(m) for n, m in model.named_modules()} == modules
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), [k for k in before if not torch.equal(after[k], before[k])]
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert model.config.tie_word_embeddings == base.config.tie_word_embeddings
    assert torch.equal(model(ids).logits, ref)
    assert not shrink.info(model).formats
    monkeypatch.undo()
    shrink.quantize(model, how["spec"], progress=False, **kwargs)  # and it quantizes as any model would


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_sensitivity_walked_block_by_block_is_the_whole_model_measure_exactly(family):
    # each trial starts at its own block from the full-precision hidden states: the blocks before it would
    # compute exactly those again, so the divergences are the whole-model pass's to the last bit
    from helpers import tiny_llama
    from test_experts import tiny_moe

    from shrink.quant import calibrated
    from shrink.quant.apply import plan
    from shrink.quant.experts import unfuse_experts
    from shrink.quant.mixed import DEFAULT_LADDER
    from shrink.quant.spec import parse_format

    model = (tiny_llama(tie=False) if family == "llama" else tiny_moe("mixtral")).eval()
    unfuse_experts(model)
    assignment = plan(model, {"*": "int2-g32"}, keep_output=True)
    samples = [torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    names = [n for n, s in assignment.items() if s is not None]
    whole = calibrated._sensitivity_whole_model(model, samples, names, [parse_format(f) for f in DEFAULT_LADDER], False)
    walked = calibrated.measure_sensitivity(model, samples, assignment, DEFAULT_LADDER, False, probe_samples=2)
    assert walked == whole
    errors = walked[0]["model.layers.0.mlp.down_proj" if family == "llama" else names[-1]]
    assert errors["int2-g32"] > errors["int3-g32"] > errors["int4-g32"] > 0 == errors["int8"]  # each trial its own
