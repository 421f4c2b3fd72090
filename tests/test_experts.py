"""Mixtures of experts: fused 3-D expert weights become one Linear layer per expert, quantized, calibrated on
the tokens routed to each (or on every token), saved and loaded exactly, streamed from shards."""

import json
import re

import pytest
import torch

import shrink
from shrink.quant.experts import LinearExperts, fused_experts, unfuse_experts


def tiny_moe(family: str, experts: int = 4, seed: int = 0, vocab: int = 96, std: float | None = 0.2,
             expert_width: int = 64):
    """A 2-layer mixture of `experts` experts (top 2) of hidden 64 and experts `expert_width` wide, built from
    a config; its matrices drawn with `std` (default 0.2, a trained model's size; None: transformers' own)."""
    import transformers

    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, rms_norm_eps=1e-5, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, num_experts_per_tok=2)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=64, num_local_experts=experts, **common)
        cls = transformers.MixtralForCausalLM
    elif family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=expert_width,
                                          shared_expert_intermediate_size=4 * expert_width,
                                          num_experts=experts, decoder_sparse_step=1, mlp_only_layers=[], **common)
        cls = transformers.Qwen2MoeForCausalLM
    else:
        cfg = transformers.OlmoeConfig(intermediate_size=64, num_experts=experts, **common)
        cls = transformers.OlmoeForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # weights of a trained model's size (the default init is tiny)
        for name, p in model.named_parameters():
            if p.dim() >= 2 and std is not None:
                p.normal_(0, std)
    return model


FAMILIES = ["mixtral", "qwen2_moe", "olmoe"]
IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family", FAMILIES)
def test_one_linear_per_expert_computes_what_the_fused_experts_compute(family):
    model = tiny_moe(family)
    assert len(fused_experts(model)) == 2
    with torch.no_grad():
        grouped = model(IDS).logits  # transformers' default for fused experts: grouped matrix products
        model.config._experts_implementation = "eager"  # its loop over experts, which LinearExperts is
        before = model(IDS).logits
        unfuse_experts(model)
        after = model(IDS).logits
    assert not fused_experts(model) and isinstance(model.model.layers[0].mlp.experts, LinearExperts)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    torch.testing.assert_close(after, grouped, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_expert_is_quantized_the_router_kept_and_it_saves_and_loads_exactly(tmp_path, family):
    model = tiny_moe(family)
    original = model.model.layers[1].mlp.experts.down_proj.detach().clone()
    shrink.quantize(model, "int4-g32", progress=False)
    formats = shrink.info(model).formats
    for e in range(4):
        assert formats[f"model.layers.1.mlp.experts.gate_up.{e}"] == "int4-g32"
        assert formats[f"model.layers.1.mlp.experts.down.{e}"] == "int4-g32"
    assert not any(".gate." in n or n.endswith(".gate") for n in formats)  # routers are parameters, not Linear
    if family == "qwen2_moe":
        assert formats["model.layers.0.mlp.shared_expert_gate"] is None  # a gate: kept unless named
        assert formats["model.layers.0.mlp.shared_expert.gate_proj"] == "int4-g32"
    # each expert's codes are round-to-nearest of its own slice of the fused tensor
    lin = torch.nn.Linear(64, 64, bias=False)
    lin.weight.data = original[3]
    alone = shrink.quant.QuantLinear.from_linear(lin, "int4-g32")
    assert torch.equal(model.model.layers[1].mlp.experts.down[3].qweight, alone.qweight)
    with torch.no_grad():
        logits = model(IDS).logits
    rows = {r.kind for r in shrink.quant.size_rows(model)}
    assert not any("fused experts" in k for k in rows)
    shrink.save(model, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "shrink.json").read_text())["layout"] == "pack-quantized"
    back = shrink.load(tmp_path / "q")
    assert torch.equal(back.model.layers[1].mlp.experts.down[3].qweight, model.model.layers[1].mlp.experts.down[3].qweight)
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, logits, rtol=0, atol=0)


STORED = {"mixtral": "model.layers.1.block_sparse_moe.experts.2.{}", "qwen2_moe": "model.layers.1.mlp.experts.2.{}",
          "olmoe": "model.layers.1.mlp.experts.2.{}"}
LEAVES = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
          "olmoe": ("gate_proj", "up_proj", "down_proj")}


@pytest.mark.parametrize("family,spec", [("mixtral", "int4-g32"), ("qwen2_moe", "int8"), ("olmoe", "int4-g64"),
                                         ("mixtral", {"*self_attn*": "int8", "*": "int4-g32"})])
def test_quantized_experts_are_saved_as_the_checkpoint_stores_them_and_transformers_loads_them(tmp_path, family, spec):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = shrink.quantize(tiny_moe(family), spec, backend="torch", progress=False)
    shrink.save(model, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "shrink.json").read_text())
    assert manifest["layout"] == "pack-quantized"
    gate, up, down = LEAVES[family]
    at = STORED[family]
    assert manifest["modules"]["model.layers.1.mlp.experts.gate_up.2"]["stored_as"] == \
        [f"model.layers.1.mlp.experts.2.{gate}", f"model.layers.1.mlp.experts.2.{up}"]
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        # the original checkpoint's names (Mixtral's block_sparse_moe, its router too): what vLLM reads
        assert {at.format(f"{leaf}.{k}") for leaf in (gate, up, down)
                for k in ("weight_packed", "weight_scale", "weight_shape")} <= keys
        assert not any(".gate_up." in k or ".down." in k for k in keys)
        if family == "mixtral":
            assert "model.layers.1.block_sparse_moe.gate.weight" in keys
        # expert 2's up rows: the second half of its gate_up layer's, codes and scales as they are
        layer = model.model.layers[1].mlp.experts.gate_up[2]
        rows = layer.out_features // 2
        assert torch.equal(f.get_tensor(at.format(f"{up}.weight_scale")), layer.scales[rows:])
        assert f.get_tensor(at.format(f"{up}.weight_shape")).tolist() == [rows, layer.in_features]
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["targets"] == (["Linear"] if isinstance(spec, str) else ["re:.*experts.*"])
    with torch.no_grad():
        logits = model(IDS).logits
        assert torch.equal(shrink.load(tmp_path / "q", backend="torch")(IDS).logits, logits)
        for kw in ({}, {"quantization_config": CompressedTensorsConfig(dequantize=True)}):
            hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32,
                                                            output_loading_info=True, **kw)
            assert not any(info.values()), info
            # transformers multiplies an expert's scales and codes in float16: its weights are ours to that rounding
            want = torch.stack([g.dequantized_weight() for g in model.model.layers[1].mlp.experts.gate_up])
            torch.testing.assert_close(hf.model.layers[1].mlp.experts.gate_up_proj.float(), want, rtol=1e-3, atol=1e-6)
            torch.testing.assert_close(hf(IDS).logits, logits, rtol=0, atol=5e-3 * logits.abs().max().item())


@pytest.mark.parametrize("family,spec", [("mixtral", "int4-g32"), ("qwen2_moe", {"*self_attn*": "int8", "*": "int4-g64"})])
def test_a_compressed_tensors_mixture_without_shrink_json_is_read_expert_by_expert(tmp_path, family, spec):
    """What llm-compressor writes for a mixture (experts one tensor each, a "Linear" or an experts group),
    read as another tool's checkpoint: the same codes and scales, every expert a QuantLinear."""
    model = shrink.quantize(tiny_moe(family), spec, backend="torch", progress=False)
    shrink.save(model, tmp_path / "q", shard_bytes=20_000)
    assert len(list((tmp_path / "q").glob("model-*-of-*.safetensors"))) > 2  # shards and their index, read as one
    (tmp_path / "q" / "shrink.json").unlink()
    loaded = shrink.io.read_model(tmp_path / "q")
    assert loaded.source["kind"] == "compressed-tensors"
    def quantized(m):
        return {n: f for n, f in shrink.info(m).formats.items() if f is not None}
    assert quantized(loaded.model) == quantized(model)
    mine, theirs = model.state_dict(), loaded.model.state_dict()
    assert any(".experts.gate_up.3.qweight" in k for k in theirs)
    for k, v in mine.items():
        if k.endswith((".qweight", ".scales")):
            assert torch.equal(theirs[k], v), k
    for m in loaded.model.modules():
        if isinstance(m, shrink.quant.QuantLinear):
            m.backend = "torch"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(IDS).logits, model(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("spec", [{"*experts.down*": "int8", "*": "int4-g32"}, {"*experts.down.1": None, "*": "int4"},
                                  "int4-g32-asym"])
def test_experts_in_several_formats_keep_shrinks_layout_which_transformers_does_not_read(tmp_path, spec):
    from transformers import AutoModelForCausalLM

    model = shrink.quantize(tiny_moe("qwen2_moe"), spec, progress=False)
    shrink.save(model, tmp_path / "q")
    # transformers and vLLM take one scheme for all of a model's experts: several would be read wrong
    assert json.loads((tmp_path / "q" / "shrink.json").read_text())["layout"] == "shrink"
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(shrink.load(tmp_path / "q")(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_an_expert_no_token_reached_is_said_and_all_experts_gives_every_one_statistics():
    calibration = [torch.tensor([[7, 9]])]  # 2 tokens, top 2 of 8 experts: most experts see nothing
    model = shrink.quantize(tiny_moe("mixtral", experts=8), "int4-g32", method="gptq", calibration=calibration,
                            progress=False)
    done = shrink.info(model).layers
    experts = [n for n in done if ".experts." in n]
    unseen = [n for n in experts if done[n].method == "rtn"]
    assert len(experts) == 32 and 0 < len(unseen) < 32
    assert all("no calibration token reached it" in done[n].notes[0] for n in unseen)
    seen = [n for n in experts if n not in unseen]
    assert all(done[n].method == "gptq" and any("calibrated on" in x for x in done[n].notes) for n in seen)
    assert any("no calibration token reached it" in w for w in shrink.info(model).calibration["warnings"])
    tokens = {n: d["tokens"] for n, d in shrink.info(model).calibration["layers"].items() if ".experts." in n}
    assert set(tokens.values()) - {0} and all(tokens[n] == 0 for n in unseen)
    # every token through every expert, for statistics only: all 32 are calibrated, on both tokens
    model = shrink.quantize(tiny_moe("mixtral", experts=8), "int4-g32", method="gptq", calibration=calibration,
                            progress=False, all_experts=True)
    done = shrink.info(model).layers
    assert all(done[n].method == "gptq" for n in experts)
    tokens = {n: d["tokens"] for n, d in shrink.info(model).calibration["layers"].items() if ".experts." in n}
    assert set(tokens.values()) == {2}


def test_experts_kept_whole_stay_fused(tmp_path):
    model = tiny_moe("mixtral")
    shrink.quantize(model, {"*experts*": None, "*": "int8"}, progress=False)
    assert len(fused_experts(model)) == 2  # nothing of them changed: the model keeps its own layout
    shrink.save(model, tmp_path / "q")
    back = shrink.load(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, model(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_mixture_streamed_from_shards_packs_what_it_packs_in_memory(tmp_path, method):
    from shrink.entrypoints.streamed import quantize_streamed

    tiny_moe("mixtral").to(torch.bfloat16).save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    kw = {} if method == "rtn" else dict(method="gptq", calibration=list(torch.randint(0, 96, (4, 16))))
    loaded = shrink.io.read_model(tmp_path / "hf")
    reference = shrink.quantize(loaded.model, "int4-g32", progress=False, **kw)
    quantize_streamed(tmp_path / "hf", tmp_path / "q", "int4-g32", progress=False, say=lambda line: None, **kw)
    back = shrink.load(tmp_path / "q")
    want = {k: v for k, v in reference.state_dict().items() if k.endswith((".qweight", ".scales"))}
    got = back.state_dict()
    assert any(".experts.down." in k for k in want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    # the same files as saving the model quantized in memory: tensors, names (the checkpoint's), config
    shrink.save(reference, tmp_path / "m")
    from safetensors.torch import load_file

    streamed, whole = load_file(tmp_path / "q" / "model.safetensors"), load_file(tmp_path / "m" / "model.safetensors")
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight_packed" in streamed
    assert streamed.keys() == whole.keys() and all(torch.equal(streamed[k], whole[k].to(streamed[k].dtype))
                                                   for k in whole)
    config = [json.loads((tmp_path / d / "config.json").read_text())["quantization_config"] for d in ("q", "m")]
    assert config[0] == config[1]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_experts_export_to_gguf_stacked_as_llama_cpp_reads_them(tmp_path, family):
    import gguf
    from test_export import _with_tok, bpe_tokenizer

    tok = bpe_tokenizer()
    # Qwen2-MoE's expert widths as transformers' GGUF reader assumes them (it does not read them from the file)
    width = 1408 if family == "qwen2_moe" else 64
    model = shrink.quantize(tiny_moe(family, vocab=300, expert_width=width), "int4-g32", backend="torch", progress=False)
    r = shrink.export_gguf(_with_tok(model, tok), tmp_path / "m.gguf", float_type="f32")
    assert all(e == 0 for e in r.max_error.values()), r.max_error  # every tensor read back exactly
    t = {t.name: t for t in gguf.GGUFReader(str(r.path)).tensors}
    # its saved folder, exported a module at a time (the experts of a block together): the same tensors
    shrink.save(model, tmp_path / "q", tokenizer=tok)
    s = shrink.export_gguf(tmp_path / "q", tmp_path / "s.gguf", float_type="f32")
    assert s.tensors == r.tensors and all(e == 0 for e in s.max_error.values())
    assert all(x.name == y.name and (x.data == y.data).all()
               for x, y in zip(gguf.GGUFReader(str(r.path)).tensors, gguf.GGUFReader(str(s.path)).tensors))
    gate = t["blk.1.ffn_gate_exps.weight"]
    assert gate.tensor_type == gguf.GGMLQuantizationType.Q4_0 and list(gate.shape) == [64, width, 4]  # [in, rows, experts]
    assert t["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # the router, exact
    # expert 2's up rows are the second half of its gate_up layer's rows, codes as they are
    up = gguf.quants.dequantize(t["blk.1.ffn_up_exps.weight"].data, gguf.GGMLQuantizationType.Q4_0)
    want = model.model.layers[1].mlp.experts.gate_up[2].dequantized_weight()[width:].numpy()
    assert (up[2] == want).all()
    if family == "qwen2_moe":  # transformers reads this GGUF: the same model, computed its own way
        from test_export import _from_gguf, _logits

        ids = torch.tensor([tok("the bank said profit rose").input_ids + [5, 77, 200]])
        torch.testing.assert_close(_logits(_from_gguf(r.path), ids), _logits(model, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_llama_cpp_runs_an_exported_mixtral_as_shrink_does(tmp_path):
    from shrink.core.peers import llama_cpp_missing

    if llama_cpp_missing():
        pytest.skip(llama_cpp_missing())
    from test_export import _with_tok, bpe_tokenizer

    from shrink.evaluate.llamacpp import LlamaCpp

    tok = bpe_tokenizer()
    model = shrink.quantize(tiny_moe("mixtral", vocab=300, std=None), "int8", backend="torch", progress=False)
    path = tmp_path / "m.gguf"
    shrink.export_gguf(_with_tok(model, tok), path, float_type="f32")
    ids = torch.tensor(tok("the bank said profit rose in the quarter").input_ids + [7, 70, 170, 270])
    with LlamaCpp(path, n_ctx=128, threads=1) as rt:
        lp = rt.logprobs(ids)
    with torch.no_grad():
        ref = torch.log_softmax(model(ids[None]).logits[0, :-1], -1)
    # llama.cpp rounds activations to 8 bits for Q8_0 dot products: close, not identical; a wrong expert
    # order, gate/up split or router would move them by whole units
    assert (lp.exp() - ref.exp()).abs().max() < 0.05
    assert (lp.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_mixed_precision_on_a_mixture_streams_and_chooses_what_it_chooses_in_memory(tmp_path):
    from shrink.entrypoints.streamed import quantize_streamed
    from shrink.quant.mixed import MixedPrecision

    tiny_moe("mixtral").to(torch.bfloat16).save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    ids = list(torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(3)))
    reference = shrink.quantize(shrink.io.read_model(tmp_path / "hf").model, MixedPrecision(3.5), calibration=ids,
                                progress=False)
    done = quantize_streamed(tmp_path / "hf", tmp_path / "q", MixedPrecision(3.5), calibration=ids, progress=False,
                             say=lambda line: None)
    formats = shrink.info(reference).formats
    assert shrink.info(done.model).formats == formats and len(set(formats.values()) - {None}) > 1
    assert any(".experts." in n for n, f in formats.items() if f is not None)
    back = shrink.load(tmp_path / "q").state_dict()
    for k, v in reference.state_dict().items():
        if k.endswith((".qweight", ".scales")):
            assert torch.equal(v, back[k]), k


def test_inspect_counts_an_expert_stored_one_tensor_per_projection_as_its_layer(tmp_path):
    from click.testing import CliRunner

    from shrink.cli import main

    shrink.save(shrink.quantize(tiny_moe("mixtral"), "int4-g32", progress=False), tmp_path / "q")
    out = CliRunner().invoke(main, ["inspect", str(tmp_path / "q")], terminal_width=200)
    assert out.exit_code == 0, out.output
    # 8 attention layers and 2 x 4 experts x (gate_up, down); the norms, routers, embedding, output layer
    rows = [[c.strip() for c in line.split("│")[1:4]] for line in out.output.splitlines() if line.startswith("│")]
    assert rows[:2] == [["full precision", "9", "9"], ["Linear int4-g32", "24", "96"]]


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m["modules"]["model.layers.1.mlp.experts.down.2"].update(stored_as=["model.layers.1.mlp.experts.2.w9"]),
     "needs tensor 'model.layers.1.mlp.experts.2.w9.weight_packed'"),
    (lambda m: m["modules"]["model.layers.1.mlp.experts.down.2"].pop("stored_as"),
     "needs tensor 'model.layers.1.mlp.experts.down.2.weight_packed', which model.safetensors does not hold"),
    (lambda m: m["modules"]["model.layers.1.mlp.experts.down.2"].update(stored_as=["a", "b", "c"]),
     "'modules.model.layers.1.mlp.experts.down.2.stored_as' must be a list of 1 to 8 layer names sharing"),
])
def test_a_manifest_whose_stored_experts_disagree_with_the_weights_is_refused(tmp_path, edit, needle):
    shrink.save(shrink.quantize(tiny_moe("mixtral"), "int4-g32", progress=False), tmp_path / "q")
    path = tmp_path / "q" / "shrink.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(shrink.ShrinkError, match=re.escape(needle)):
        shrink.load(tmp_path / "q")
