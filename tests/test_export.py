"""GGUF export: exact block copies that transformers' GGUF loader (and llama.cpp, see test_llamacpp.py) reads
back as the very weights shrink measured; refusals that name the layers; nothing half-written."""

import os
from pathlib import Path
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from helpers import WORDS, widen, word_text
from transformers import AutoModelForCausalLM, AutoTokenizer

import shrink
from shrink.core.peers import llama_cpp_missing
from shrink.io.export import export_gguf
from shrink.quant.record import update_record


def bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer (GPT-2 style, as SmolLM2 and Llama 3 use) trained on the test words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([word_text(400, seed=s) for s in range(5)] + [" ".join(WORDS)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def bpe_llama(seed: int = 0, tie: bool = True, vocab: int = 300, hidden: int = 64, intermediate: int = 128,
              layers: int = 2):
    """A 2-layer Llama (hidden 64, 4 heads of 16, 2 kv heads) over the BPE tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1, rms_norm_eps=1e-5)
    return widen(LlamaForCausalLM(cfg))


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _from_gguf(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("spec,tie,keep_output,kinds", [
    ("int4-g32", True, True, {"Q4_0"}),
    ("int4-g64", False, True, {"Q4_0"}),
    ("int4", True, True, {"Q4_0"}),  # one scale per row: repeated per block of 32
    ("int8", True, True, {"Q8_0"}),
    ("int8-g32", False, False, {"Q8_0"}),  # the untied output layer quantized too
    ("int5-g32", True, True, {"Q5_0"}),
    ("int5-g64", False, False, {"Q5_0"}),
    ({"model.layers.0.*": "bf16", "*.down_proj": "int4-g128", "*.mlp.*": "int8", "*": "int4-g64"}, True, True,
     {"BF16", "Q8_0", "Q4_0"}),
    ({"model.layers.1.mlp.*": None, "*": "fp16"}, True, True, {"F16"}),
    # a quantized table with its output layer tied to it: the folder's table written once, as token_embd
    ({"model.embed_tokens": "int8-g32", "*": "int4-g32"}, True, True, {"Q8_0", "Q4_0"}),
])
def test_exported_file_loads_in_transformers_with_the_same_logits(tmp_path, tok, spec, tie, keep_output, kinds):
    model = shrink.quantize(bpe_llama(tie=tie), spec, keep_output=keep_output, backend="torch", progress=False)
    shrink.save(model, tmp_path / "q", tokenizer=tok)
    r = export_gguf(tmp_path / "q", tmp_path / "m.gguf", float_type="f32")
    assert {k for k in r.tensors if k != "F32"} == kinds
    assert all(e == 0 for e in r.max_error.values()), r.max_error  # read back exactly
    ids = torch.tensor([tok("the bank said profit rose").input_ids + [5, 77, 200]])
    mine = shrink.load(tmp_path / "q", backend="torch")
    assert torch.equal(_logits(_from_gguf(r.path), ids), _logits(mine, ids))
    names = [t.name for t in gguf.GGUFReader(str(r.path)).tensors]
    assert names.count("token_embd.weight") == 1
    assert ("output.weight" in names) == (not tie or not keep_output)  # a tied output layer is written once
    back = AutoTokenizer.from_pretrained(r.path.parent, gguf_file=r.path.name)
    text = "the market price of oil rose"
    assert back(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids


def test_codes_are_copied_not_requantized(tmp_path, tok):
    """Q4_0 blocks hold shrink's bytes as they are; the permuted q rows are shrink's rows reordered."""
    model = shrink.quantize(bpe_llama(), "int4-g32", backend="torch", progress=False)
    r = export_gguf(_with_tok(model, tok), tmp_path / "m.gguf")
    t = {t.name: t for t in gguf.GGUFReader(str(r.path)).tensors}
    down = model.model.layers[1].mlp.down_proj
    blocks = np.asarray(t["blk.1.ffn_down.weight"].data).reshape(down.out_features, -1, 18)
    assert np.array_equal(blocks[:, :, 2:], down.qweight.numpy().reshape(down.out_features, -1, 16))
    assert np.array_equal(blocks[:, :, :2].copy().view(np.float16)[..., 0], down.scales.numpy())
    q = model.model.layers[0].self_attn.q_proj
    back = gguf.quants.dequantize(t["blk.0.attn_q.weight"].data, gguf.GGMLQuantizationType.Q4_0)
    w = q.dequantized_weight().numpy()
    rows = np.arange(64).reshape(4, 2, 8).transpose(0, 2, 1).reshape(-1)  # llama.cpp's rope pairing
    assert np.array_equal(back, w[rows]) and not np.array_equal(back, w)


def _with_tok(model, tok):
    from shrink.io import LoadedModel

    return LoadedModel(model, tok, {})


def test_asymmetric_int4_becomes_q4_1_with_offsets_rounded(tmp_path, tok):
    model = shrink.quantize(bpe_llama(), "int4-g32-asym", backend="torch", progress=False)
    r = export_gguf(_with_tok(model, tok), tmp_path / "m.gguf", float_type="f32")
    assert set(r.tensors) == {"Q4_1", "F32"}
    assert 0 < r.max_error["Q4_1"] < 1e-2  # m = -d*z rounded to fp16, said in the report
    ids = torch.tensor([[3, 50, 100, 150, 200, 250]])
    a, b = _logits(_from_gguf(r.path), ids), _logits(model, ids)
    assert (a - b).abs().max() < 1e-2 * b.abs().max()


def test_int5_codes_are_llama_cpps_own_q5_0_and_asymmetric_ones_q5_1(tmp_path, tok):
    """Round-to-nearest int5-g32 rounds as llama.cpp's Q5_0 does (d = the signed extreme / -16): the exported
    blocks are gguf-py's Q5_0 of the original weights, the same scales and the same codes but where a weight
    lies half-way between two (shrink rounds half to even, ggml half up). int5-g32-asym becomes Q5_1."""
    base = bpe_llama()
    w = base.model.layers[1].mlp.down_proj.weight.detach().clone()
    model = shrink.quantize(base, "int5-g32", backend="torch", progress=False)
    r = export_gguf(_with_tok(model, tok), tmp_path / "m.gguf")
    t = {t.name: t for t in gguf.GGUFReader(str(r.path)).tensors}
    ours = np.asarray(t["blk.1.ffn_down.weight"].data)
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q5_0)
    assert ours.shape == theirs.shape
    assert np.array_equal(ours.reshape(64, -1, 22)[..., :2], theirs.reshape(64, -1, 22)[..., :2])  # scales
    a, b = (gguf.quants.dequantize(x, gguf.GGMLQuantizationType.Q5_0) for x in (ours, theirs))
    d = np.abs(np.repeat(ours.reshape(64, -1, 22)[..., :2].copy().view(np.float16)[..., 0].astype(np.float32), 32, 1))
    differ = a != b
    assert differ.mean() < 0.01 and np.allclose(np.abs(a - b)[differ], d[differ])  # one step apart, at most
    assert np.allclose(np.abs(w.numpy() - a)[differ], d[differ] / 2, rtol=5e-3)  # ... at a tie (ggml: x * (1/d))
    model = shrink.quantize(bpe_llama(), "int5-g32-asym", backend="torch", progress=False)
    r = export_gguf(_with_tok(model, tok), tmp_path / "a.gguf", float_type="f32")
    assert set(r.tensors) == {"Q5_1", "F32"} and 0 < r.max_error["Q5_1"] < 1e-2  # offsets rounded to fp16
    ids = torch.tensor([[3, 50, 100, 150, 200, 250]])
    a, b = _logits(_from_gguf(r.path), ids), _logits(model, ids)
    assert (a - b).abs().max() < 1e-2 * b.abs().max()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_iq4nl_codes_are_llama_cpps_iq4_nl_blocks(tmp_path, tok, method):
    """iq4nl-g32 (llama.cpp's IQ4_NL levels, one fp16 scale per 32) exports as IQ4_NL blocks copied exactly:
    transformers' GGUF loader gives the model's own logits; the levels are IQ4_NL's (gguf-py dequantizes
    them to the weights shrink computes with)."""
    calib = [torch.randint(3, 300, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    model = shrink.quantize(bpe_llama(), "iq4nl-g32", method=method, calibration=None if method == "rtn" else calib,
                            backend="torch", progress=False)
    r = export_gguf(_with_tok(model, tok), tmp_path / "m.gguf", float_type="f32")
    assert set(r.tensors) == {"IQ4_NL", "F32"} and r.max_error["IQ4_NL"] == 0
    ids = torch.tensor([[3, 50, 100, 150, 200, 250]])
    assert torch.equal(_logits(_from_gguf(r.path), ids), _logits(model, ids))


def test_formats_without_a_gguf_type_are_refused_naming_layers_unless_requantized(tmp_path, tok):
    model = shrink.quantize(bpe_llama(), {"model.layers.0.mlp.*": "int3-g32", "*": "int4-g16"}, backend="torch",
                            progress=False)
    with pytest.raises(shrink.ShrinkError, match=r"int4-g16: model\.layers\.0\.self_attn\.q_proj.*\(11 layers\); "
                       r"int3-g32: model\.layers\.0\.mlp\.gate_proj, .*--requantize Q4_0"):
        export_gguf(_with_tok(model, tok), tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written
    r = export_gguf(_with_tok(model, tok), tmp_path / "m.gguf", requantize="Q4_0")
    assert set(r.requantized) == {n for n, m in model.named_modules() if isinstance(m, shrink.QuantLinear)}
    # int4-g16 loses its finer scales; int3 codes land on Q4_0's grid (d = max/8 halves the int3 scale)
    assert all(0.2 < share < 1 for n, share in r.requantized.items() if "layers.0.mlp" not in n), r.requantized
    assert all(share == 0 for n, share in r.requantized.items() if "layers.0.mlp" in n), r.requantized
    assert r.tensors["Q4_0"] == 14
    _from_gguf(r.path)  # loads
    with pytest.raises(shrink.ShrinkError, match="not a GGUF type"):
        export_gguf(_with_tok(model, tok), tmp_path / "n.gguf", requantize="Q9_9")


def test_existing_files_are_kept(tmp_path, tok):
    model = _with_tok(shrink.quantize(bpe_llama(), "int8", progress=False), tok)
    mine = tmp_path / "notes.gguf"
    mine.write_text("my notes")
    with pytest.raises(shrink.ShrinkError, match="not a GGUF file shrink exported; it is never replaced"):
        export_gguf(model, mine, force=True)
    assert mine.read_text() == "my notes"
    # a file that merely starts like a GGUF, and a whole GGUF file that shrink did not write
    stub = tmp_path / "stub.gguf"
    stub.write_bytes(b"GGUF\x03\x00\x00\x00")
    other = tmp_path / "other.gguf"
    export_gguf(model, other)
    _strip_mark(other)
    for f in (stub, other):
        before = f.read_bytes()
        with pytest.raises(shrink.ShrinkError, match="not a GGUF file shrink exported"):
            export_gguf(model, f, force=True)
        assert f.read_bytes() == before
    # a pipe is refused at once (opening it to look would block), and so is a link
    os.mkfifo(tmp_path / "pipe.gguf")
    with pytest.raises(shrink.ShrinkError, match="not a regular file"):
        export_gguf(model, tmp_path / "pipe.gguf", force=True)
    (tmp_path / "link.gguf").symlink_to(tmp_path / "notes.gguf")
    with pytest.raises(shrink.ShrinkError, match="symbolic link"):
        export_gguf(model, tmp_path / "link.gguf", force=True)
    for f in ("stub.gguf", "other.gguf", "pipe.gguf", "link.gguf"):
        (tmp_path / f).unlink()
    export_gguf(model, tmp_path / "m.gguf")
    with pytest.raises(shrink.ShrinkError, match="exists; pass --force"):
        export_gguf(model, tmp_path / "m.gguf")
    export_gguf(model, tmp_path / "m.gguf", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "notes.gguf"]  # no temporaries left


def _strip_mark(path):
    """Rewrite `path` without shrink's export mark (as another tool would have written it)."""
    import gguf

    from shrink.io.export import EXPORTED_BY

    reader = gguf.GGUFReader(str(path))
    writer = gguf.GGUFWriter(str(path) + ".new", reader.get_field("general.architecture").contents())
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name in (EXPORTED_BY, "general.architecture"):
            continue
        writer.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(path) + ".new", path)
    assert gguf.GGUFReader(str(path)).get_field(EXPORTED_BY) is None


def test_two_exports_to_one_file_never_both_write(tmp_path, tok):
    from shrink.core.outdir import lock_beside

    model = _with_tok(shrink.quantize(bpe_llama(), "int8", progress=False), tok)
    with lock_beside(tmp_path / "m.gguf", "export"):  # another shrink exporting there
        with pytest.raises(shrink.ShrinkError, match="another shrink .* is writing it"):
            export_gguf(model, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    export_gguf(model, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # the lock is gone


def test_models_gguf_cannot_name_are_refused(tmp_path, mlp):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(shrink.ShrinkError, match="model_type None"):
        export_gguf(shrink.quantize(mlp, "int8", progress=False), tmp_path / "m.gguf")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(shrink.ShrinkError, match="model_type 'gpt2'.*exports llama, mistral, mixtral, qwen2, qwen2_moe models"):
        export_gguf(gpt2, tmp_path / "m.gguf")
    with pytest.raises(shrink.ShrinkError, match="no tokenizer"):
        export_gguf(shrink.quantize(bpe_llama(), "int8", progress=False), tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_tokenizer_copied_from_the_source_gguf(tmp_path, tok):
    first = export_gguf(_with_tok(shrink.quantize(bpe_llama(), "int8", progress=False), tok), tmp_path / "a.gguf")
    src = gguf.GGUFReader(str(first.path))
    model = shrink.quantize(bpe_llama(seed=1), "int4-g64", progress=False)
    update_record(model, source={"kind": "gguf", "path": str(first.path)})  # as loading a .gguf file records it
    r = export_gguf(model, tmp_path / "b.gguf")
    assert r.metadata_from.startswith("tokenizer and names copied from")
    out = gguf.GGUFReader(str(r.path))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.model", "tokenizer.ggml.eos_token_id"):
        assert out.fields[key].contents() == src.fields[key].contents(), key
    small = shrink.quantize(bpe_llama(vocab=320), "int8", progress=False)
    update_record(small, source={"kind": "gguf", "path": str(first.path)})
    r = export_gguf(_with_tok(small, tok), tmp_path / "c.gguf")
    assert any("300 tokens, the model 320" in n for n in r.notes)  # built instead, and said so


@pytest.mark.slow  # a subprocess or a browser
def test_cli_export(tmp_path, tok):
    model = shrink.quantize(bpe_llama(), "int4-g32", progress=False)
    shrink.save(model, tmp_path / "q", tokenizer=tok)
    run = [sys.executable, "-m", "shrink.cli", "export"]
    p = subprocess.run(run + [str(tmp_path / "q"), "--gguf", str(tmp_path / "q.gguf")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "Q4_0" in p.stdout and "0 (exact)" in p.stdout and "written as F16" in p.stdout
    p = subprocess.run(run + [str(tmp_path), "--gguf", str(tmp_path / "x.gguf")], capture_output=True, text=True)
    assert p.returncode == 1 and "not a folder saved by shrink" in p.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_a_pre_tokenizer_no_one_can_name_is_written_as_default_and_said(tmp_path, tok):
    from shrink.io.gguf_meta import pre_tokenizer_hash

    model = _with_tok(shrink.quantize(bpe_llama(), "int8", progress=False), tok)
    with pytest.warns(UserWarning, match=r"pre-tokenizer is not one shrink or a llama.cpp converter here can name "
                                         rf"\(hash {pre_tokenizer_hash(tok)[:12]}\.\.\.\): written as 'default'"):
        r = export_gguf(model, tmp_path / "m.gguf")
    import gguf

    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).get_field("tokenizer.ggml.pre").contents() == "default"
    assert any("pre-tokenizer not identified" in n for n in r.notes)


def test_a_llama_cpp_converter_on_the_machine_names_more_pre_tokenizers(tmp_path, tok, monkeypatch):
    # its table is read as data (never run): a hash it lists gives its name
    from shrink.io.gguf_meta import pre_tokenizer_hash, pre_tokenizer_name

    conv = tmp_path / "llama.cpp" / "conversion"
    conv.mkdir(parents=True)
    (conv / "base.py").write_text(f'        if chkhsh == "{"0" * 64}":\n            res = "other"\n'
                                  f'        if chkhsh == "{pre_tokenizer_hash(tok)}":\n'
                                  '            # ref: somewhere\n            res = "tiny-bpe"\n')
    monkeypatch.setenv("SHRINK_LLAMA_CPP_DIR", str(tmp_path / "llama.cpp"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert pre_tokenizer_name(tok) == ("tiny-bpe", pre_tokenizer_hash(tok))


@pytest.mark.parametrize("spec,tie,shard", [("int4-g32", True, None), ("int4-g64-asym", False, 30_000),
                                            ({"*.mlp.*": "int8", "*": "int4-g32"}, False, 20_000)])
def test_a_folder_is_exported_a_module_at_a_time_as_the_loaded_model_is(tmp_path, tok, monkeypatch, spec, tie, shard):
    """Exporting a shrink folder (sharded or not) reads one module at a time, lets it go once its tensors are
    written, and writes the very file exporting the loaded model writes: the same tensors, byte for byte,
    and the same metadata."""
    import shrink.io.saved as saved

    model = shrink.quantize(bpe_llama(tie=tie), spec, backend="torch", progress=False)
    shrink.save(model, tmp_path / "q", tokenizer=tok, **({"shard_bytes": shard} if shard else {}))
    whole = export_gguf(shrink.io.read_model(tmp_path / "q"), tmp_path / "whole.gguf", float_type="f16")

    filled, real = [], saved.fill_module

    def one_at_a_time(m, name, manifest, checkpoint):
        held = {k for k, t in [*m.named_parameters(), *m.named_buffers()] if not t.is_meta}
        assert held <= {k for k, _ in m.named_buffers() if k.endswith("inv_freq")}, held  # all else let go
        filled.append(name)
        real(m, name, manifest, checkpoint)

    monkeypatch.setattr(saved, "fill_module", one_at_a_time)
    monkeypatch.setattr(saved, "load", lambda *a, **k: pytest.fail("the folder was loaded whole"))
    streamed = export_gguf(tmp_path / "q", tmp_path / "streamed.gguf", float_type="f16")
    assert len(filled) > 10 and streamed.tensors == whole.tensors
    a, b = gguf.GGUFReader(str(tmp_path / "whole.gguf")), gguf.GGUFReader(str(tmp_path / "streamed.gguf"))
    assert [(t.name, t.tensor_type, list(t.shape)) for t in a.tensors] == \
        [(t.name, t.tensor_type, list(t.shape)) for t in b.tensors]
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a.tensors, b.tensors))
    assert {k: str(f.parts[-1].tolist()) for k, f in a.fields.items()} == \
        {k: str(f.parts[-1].tolist()) for k, f in b.fields.items()}


def _wide_llama(tok):
    """bpe_llama with 256 intermediate features: down_proj's inputs fit K-quants' blocks of 256, the rest 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    return widen(LlamaForCausalLM(cfg))


needs_ggml = pytest.mark.skipif(llama_cpp_missing() is not None, reason=f"ggml's quantizers: {llama_cpp_missing()}")


@needs_ggml
def test_requantize_takes_the_first_type_that_fits_each_layer_and_weighs_by_the_imatrix(tmp_path, tok):
    """--requantize Q4_K,Q5_0: the int3 layers whose inputs are a multiple of 256 become Q4_K (ggml's own
    rounding, read back by gguf-py), the others Q5_0; an imatrix file's importance changes the rounding
    towards the inputs it weighs, lowering the error there."""
    model = shrink.quantize(_wide_llama(tok), "int3-g32", backend="torch", progress=False)
    r = export_gguf(_with_tok(model, tok), tmp_path / "m.gguf", requantize="Q4_K,Q5_0")
    assert {n: k for n, k in r.layers.items() if n.endswith("down_proj")} == {
        "model.layers.0.mlp.down_proj": "Q4_K", "model.layers.1.mlp.down_proj": "Q4_K"}
    assert r.tensors["Q5_0"] == 12 and set(r.requantized) == {n for n, k in r.layers.items() if k[0] == "Q"}
    _from_gguf(r.path)  # transformers reads it

    w = model.model.layers[0].mlp.down_proj.dequantized_weight().numpy()
    imp = np.ones((1, 256), np.float32)
    imp[0, :32] = 1000.0  # the first 32 inputs matter most
    writer = gguf.GGUFWriter(str(tmp_path / "imatrix.gguf"), "imatrix")
    writer.add_tensor("blk.0.ffn_down.weight.in_sum2", imp * 7)
    writer.add_tensor("blk.0.ffn_down.weight.counts", np.array([7.0], np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        step()
    writer.close()
    weighted = export_gguf(_with_tok(model, tok), tmp_path / "w.gguf", requantize="Q4_K,Q5_0",
                           imatrix=tmp_path / "imatrix.gguf")
    t = {x.name: x for x in gguf.GGUFReader(str(weighted.path)).tensors}
    u = {x.name: x for x in gguf.GGUFReader(str(r.path)).tensors}
    back_w, back_u = (gguf.quants.dequantize(x["blk.0.ffn_down.weight"].data, gguf.GGMLQuantizationType.Q4_K)
                      for x in (t, u))
    err = lambda b: float((((b - w) ** 2) * imp).sum())  # noqa: E731
    assert err(back_w) < err(back_u)
    assert np.array_equal(t["blk.1.ffn_down.weight"].data, u["blk.1.ffn_down.weight"].data)  # no importance there
    assert any("no importance for blk.1.ffn_down.weight" in n for n in weighted.notes)


@pytest.mark.parametrize("args,needle", [
    ({"requantize": "Q4_K"}, r"--requantize Q4_K: no type's block \(Q4_K 256\) divides the inputs of "
                             r"model\.layers\.0\.self_attn\.q_proj \(64 inputs\).*--requantize Q4_K,Q5_0"),
    ({"requantize": "Q4_K,Q9_9"}, "'Q9_9': not a GGUF type"),
    ({"requantize": "Q4_0", "imatrix": "nowhere.gguf"}, "nowhere.gguf"),
    ({"imatrix": "x.gguf"}, "give --requantize TYPE too"),
])
def test_requantize_refuses_before_the_work(tmp_path, tok, args, needle):
    model = shrink.quantize(_wide_llama(tok), "int3-g32", backend="torch", progress=False)
    if llama_cpp_missing() is not None and "imatrix" in args and "requantize" in args:
        needle = "gguf-py's quantizers take no importance"
    elif llama_cpp_missing() is not None and args.get("requantize") == "Q4_K":  # refused for the quantizer first
        needle = "gguf-py quantizes only Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0; llama.cpp's quantizers write Q4_K"
    with pytest.raises(shrink.ShrinkError, match=needle):
        export_gguf(_with_tok(model, tok), tmp_path / "m.gguf", **args)
    assert not list(tmp_path.iterdir())


def test_without_llama_cpp_only_gguf_py_types_are_requantized(tmp_path, tok, monkeypatch):
    from shrink.io import requant

    monkeypatch.setattr(requant, "_LIB", [None])
    with pytest.raises(shrink.ShrinkError, match="gguf-py quantizes only Q4_0, .*llama.cpp's quantizers write Q4_K"):
        requant.plan("Q4_K,Q5_0")
    assert requant.plan("Q5_0").quantizer == "gguf-py"


@needs_ggml
def test_types_llama_cpp_rounds_only_with_importance_need_an_imatrix():
    from shrink.io import requant

    with pytest.raises(shrink.ShrinkError, match="IQ2_XS only with an importance matrix; give --calibration"):
        requant.plan("IQ2_XS,Q4_0")
    with pytest.raises(shrink.ShrinkError, match="not a GGUF imatrix file"):
        requant.read_imatrix(Path(__file__))


@needs_ggml
def test_importance_measured_on_calibration_text_is_each_layers_mean_square_input(tmp_path, tok):
    """--calibration: shrink measures the mean square input of each layer as llama-imatrix does (checked for
    the first q projection against its input computed by hand: the normed embeddings), and the export's
    re-quantized layers are rounded with it; a folder is measured loaded whole, then exported."""
    from shrink.io.requant import measure_importance

    model = shrink.quantize(_wide_llama(tok), "int3-g32", backend="torch", progress=False)
    ids = [torch.randint(3, len(tok), (1, 40), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    imp = measure_importance(model, ids, None, 3, 40)
    with torch.no_grad():
        x = torch.cat([model.model.layers[0].input_layernorm(model.model.embed_tokens(i))[0] for i in ids])
    assert np.allclose(imp["model.layers.0.self_attn.q_proj"], x.pow(2).mean(0).numpy(), rtol=1e-5)
    assert imp["model.layers.1.mlp.down_proj"].shape == (256,)

    shrink.save(model, tmp_path / "q", tokenizer=tok)
    text = tmp_path / "calib.txt"
    text.write_text(word_text(600, seed=3))
    plain = export_gguf(tmp_path / "q", tmp_path / "plain.gguf", requantize="Q4_K,Q5_0")
    weighted = export_gguf(tmp_path / "q", tmp_path / "w.gguf", requantize="Q4_K,Q5_0", calibration=text,
                           n_samples=4, seq_len=32)
    assert not any("no importance" in n for n in weighted.notes)
    a, b = ({t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(r.path)).tensors} for r in (plain, weighted))
    assert not np.array_equal(a["blk.0.ffn_down.weight"], b["blk.0.ffn_down.weight"])
