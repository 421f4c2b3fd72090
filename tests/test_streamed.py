"""Quantizing a Hugging Face folder block by block from its shards: the same packed tensors as the whole
model in memory, written in shards, read back exactly; and what it refuses."""

import json

import pytest
import torch
from helpers import tiny_llama

import shrink
from shrink.core.errors import ShrinkError
from shrink.entrypoints.streamed import quantize_streamed, why_not_streamed
from shrink.io.shards import Checkpoint


def _folder(tmp_path, dtype=torch.bfloat16, tie=True, shard="40KB"):
    model = tiny_llama(tie=tie).to(dtype)
    folder = tmp_path / f"hf-{str(dtype)[6:]}-{tie}"
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


def _in_memory(folder, fmt, **kw):
    loaded = shrink.io.read_model(folder)
    return shrink.quantize(loaded.model, fmt, progress=False, tokenizer=loaded.tokenizer, **kw)


def _packed(state):
    return {k: v for k, v in state.items() if k.endswith((".qweight", ".scales", ".zeros", "weight_packed", "weight_scale"))}


@pytest.mark.parametrize("fmt, method", [("int4-g32", "rtn"), ("int4-g32-asym", "rtn"), ("int8", "gptq"),
                                         ("int4-g32", "awq"), ("int4-g32", "awq+gptq")])
def test_streamed_quantization_packs_exactly_what_the_whole_model_in_memory_packs(tmp_path, fmt, method):
    folder = _folder(tmp_path)
    kw = {}
    if method != "rtn":
        ids = torch.randint(3, 96, (4, 32), generator=torch.Generator().manual_seed(1))
        kw = dict(method=method, calibration=list(ids))
    reference = _in_memory(folder, fmt, **kw)
    out = tmp_path / "q"
    done = quantize_streamed(folder, out, fmt, progress=False, shard_bytes=30_000, **kw)
    assert shrink.info(done.model).formats == {k: v for k, v in shrink.info(reference).formats.items()}
    back = shrink.load(out)
    ref_state, got_state = _packed(reference.state_dict()), _packed(back.state_dict())
    assert ref_state and set(ref_state) == set(got_state)
    for k in ref_state:
        assert torch.equal(ref_state[k], got_state[k]), k
    # the rest as stored (bf16, computed in float32 once loaded): the loaded model computes what the
    # in-memory one does
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(back(ids).logits, reference(ids).logits, rtol=0, atol=0)
    ck = Checkpoint(out, "model.safetensors" if "asym" not in fmt else "model.shrink.safetensors")
    assert len(ck.files) > 1 and ck.tensors["model.norm.weight"].dtype == "BF16"
    manifest = json.loads((out / "shrink.json").read_text())
    assert {f.name for f in ck.files} <= set(manifest["files"])
    # the check: the sample input's last-block output, quantized against original, as measured in memory
    sample = shrink.quant.check.sample_input(reference)[0]["input_ids"]
    outs = []
    for m in (shrink.io.read_model(folder).model, reference):
        h = m.model.layers[-1].register_forward_hook(lambda _m, _a, out: outs.append(out[0] if isinstance(out, tuple) else out))
        with torch.no_grad():
            m(sample)
        h.remove()
    want = float((outs[1] - outs[0]).norm() / outs[0].norm())
    check = shrink.info(back).check
    assert check.skipped is None and "last block" in check.input
    assert check.relative_error == pytest.approx(want, rel=1e-4)


def test_a_quantized_output_layer_tied_to_the_embedding_streams_too(tmp_path):
    folder = _folder(tmp_path, dtype=torch.float32)
    reference = _in_memory(folder, "int8", keep_output=False)
    quantize_streamed(folder, tmp_path / "q", "int8", keep_output=False, progress=False)
    back = shrink.load(tmp_path / "q")
    assert torch.equal(back.lm_head.qweight, reference.lm_head.qweight)
    assert not json.loads((tmp_path / "q" / "config.json").read_text())["tie_word_embeddings"]
    ids = torch.randint(0, 96, (1, 10))
    torch.testing.assert_close(back(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_what_cannot_stream_says_why(tmp_path):
    folder = _folder(tmp_path)
    assert why_not_streamed(folder) is None
    assert "not a Hugging Face folder" in why_not_streamed(tmp_path)
    # mixed precision streams the blocks' layers; a budget that would choose for the output layer does not
    assert why_not_streamed(folder, shrink.quant.MixedPrecision(4.5)) is None
    assert "mixed precision would choose a format for the output layer 'lm_head'" in \
        why_not_streamed(folder, shrink.quant.MixedPrecision(4.5), keep_output=False)
    with pytest.raises(ShrinkError, match=r"cannot stream .*: layer 'model.embed_tokens' outside the decoder blocks"):
        quantize_streamed(folder, None, {"*": "int8", "model.embed_tokens": "int8"})
    # a tensor the model does not name as such (a checkpoint transformers would have to rename)
    from safetensors.torch import load_file, save_file

    single = _folder(tmp_path, tie=False, shard="10MB")
    state = load_file(str(single / "model.safetensors"))
    state["model.final_norm.weight"] = state.pop("model.norm.weight")
    save_file(state, str(single / "model.safetensors"), metadata={"format": "pt"})
    assert "the weights name tensors LlamaForCausalLM does not have as such ('model.final_norm.weight'" in \
        why_not_streamed(single)


def test_a_damaged_weight_stops_the_stream_and_nothing_is_written(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _folder(tmp_path, shard="10MB")
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ShrinkError, match=r"model.layers.1.mlp.up_proj.*NaN"):
        quantize_streamed(folder, tmp_path / "q", "int8", progress=False)
    assert not (tmp_path / "q").exists()
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:, :-1].contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ShrinkError, match=r"the weights do not match config.json \(of the wrong shape "
                                          r"model.layers.1.mlp.up_proj.weight\)"):
        quantize_streamed(folder, tmp_path / "q", "int8", progress=False)
    assert not (tmp_path / "q").exists()


ESTIMATE_SCRIPT = """
import json, sys, torch
from shrink.entrypoints.streamed import quantize_streamed
method = sys.argv[3]
kw = {} if method == "rtn" else dict(method=method, calibration=list(torch.randint(0, 8000, (8, 128))))
done = quantize_streamed(sys.argv[1], sys.argv[2], "int4-g64", progress=False, say=lambda line: None, **kw)
print(json.dumps(done.estimate.to_dict()))
"""


LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
if os.waitstatus_to_exitcode(status) == 0:
    print("PEAK", usage.ru_maxrss * 1024, flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_the_memory_estimate_is_within_a_quarter_of_the_measured_peak(tmp_path, method):
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=4096, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    # the job's peak resident memory by the kernel, as /usr/bin/time measures it: a child forked from this
    # (large) test process would start its count at this process's size, so a small launcher forks it
    (tmp_path / "job.py").write_text(ESTIMATE_SCRIPT)
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, str(tmp_path / "job.py"), str(tmp_path / "hf"),
                        str(tmp_path / "q"), method], stdout=out, stderr=err, check=False)
    lines = (tmp_path / "out").read_text().strip().splitlines()
    assert lines and lines[-1].startswith("PEAK "), (tmp_path / "err").read_text()[-2000:]
    estimate = json.loads(lines[-2])
    peak = int(lines[-1].split()[1])
    assert abs(estimate["total_bytes"] - peak) <= 0.25 * peak, (estimate, peak)


def test_a_block_held_as_stored_computes_in_float32_one_layer_at_a_time():
    import copy

    from shrink.quant.layerwise import float32_weights

    mlp = tiny_llama(tie=False).model.layers[0].mlp
    for p in mlp.parameters():
        p.data = p.data.bfloat16()  # held as stored
    ref = copy.deepcopy(mlp).float()  # float32 weights of the same values
    exact = {n: p.clone() for n, p in mlp.named_parameters()}
    x = torch.randn(2, 5, mlp.gate_proj.in_features)
    workspace = torch.empty(max(p.numel() for p in mlp.parameters()))
    with float32_weights(mlp, workspace):
        got = mlp(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref(x), rtol=1e-5, atol=1e-5)  # (the order of the sums differs)
    assert all(torch.equal(p, exact[n]) and p.dtype == torch.bfloat16 for n, p in mlp.named_parameters())
    assert not any("forward" in m.__dict__ for m in mlp.modules())  # each layer's own forward again
    with pytest.raises(ValueError, match="too small"):
        with float32_weights(mlp, torch.empty(10)):
            pass
    assert not any("forward" in m.__dict__ for m in mlp.modules())


@pytest.mark.parametrize("method, tie", [("rtn", False), ("gptq", False), ("rtn", True)])
def test_mixed_precision_streams_and_chooses_and_packs_what_it_does_in_memory(tmp_path, method, tie):
    from shrink.quant.mixed import MixedPrecision

    folder = _folder(tmp_path, tie=tie)
    ids = list(torch.randint(3, 96, (4, 32), generator=torch.Generator().manual_seed(1)))
    reference = _in_memory(folder, MixedPrecision(3.5), method=method, calibration=ids)
    lines = []
    done = quantize_streamed(folder, tmp_path / "q", MixedPrecision(3.5), method=method, calibration=ids,
                             progress=False, say=lines.append)
    want = shrink.info(reference)
    assert shrink.info(done.model).formats == want.formats and len(set(want.formats.values()) - {None}) > 1
    assert "measuring sensitivity" in lines[0] or "quantizing a block" in lines[0]
    back = shrink.load(tmp_path / "q")
    assert shrink.info(back).calibration["target_bits"] == 3.5
    ref_state, got_state = _packed(reference.state_dict()), _packed(back.state_dict())
    assert ref_state and set(ref_state) == set(got_state)
    for k in ref_state:
        assert torch.equal(ref_state[k], got_state[k]), k
    assert done.estimate.phases["measuring sensitivity"]["trials' hidden states"] > 0
    # the output layer the sensitivity pass ran leaves the skeleton as it was: a tied one stays tied
    assert (done.model.lm_head.weight is done.model.model.embed_tokens.weight) == tie
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tie
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(back(ids).logits, reference(ids).logits, rtol=0, atol=0)
