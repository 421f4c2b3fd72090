import json
import pickle

import pytest
import torch
import transformers
from helpers import MLP, tiny_llama

import shrink
from shrink.core.errors import ShrinkError
from shrink.quant import QuantLinear


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("spec", ["int4-g32", "int8", "int3-g16-asym", {"model.layers.0.*": "int2-g32", "*": "int8-g64-asym"}])
def test_hf_round_trip_bit_identical(tmp_path, spec):
    model = shrink.quantize(tiny_llama(), spec, progress=False)
    ids = torch.randint(3, 96, (2, 10))
    before = _logits(model, ids)
    shrink.save(model, tmp_path / "q")
    asym = "asym" in str(spec)  # no exact pack-quantized form: shrink's own layout, under its own name
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == [
        "config.json", "generation_config.json", "model.shrink.safetensors" if asym else "model.safetensors", "shrink.json"]
    loaded = shrink.load(tmp_path / "q")
    assert isinstance(loaded.model.layers[0].mlp.up_proj, QuantLinear)
    assert torch.equal(_logits(loaded, ids), before)
    assert shrink.info(loaded).formats == shrink.info(model).formats
    # tied embeddings stay tied after loading
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_untied_hf_round_trip(tmp_path):
    model = shrink.quantize(tiny_llama(tie=False), "int4-g64", keep_output=False, progress=False)
    ids = torch.randint(3, 96, (1, 7))
    before = _logits(model, ids)
    shrink.save(model, tmp_path / "q")
    assert torch.equal(_logits(shrink.load(tmp_path / "q"), ids), before)


def test_plain_module_needs_skeleton(tmp_path):
    torch.manual_seed(0)
    model = shrink.quantize(MLP(), "int4-g32-asym", progress=False)
    x = torch.randn(5, 64)
    before = model(x)
    shrink.save(model, tmp_path / "m")
    with pytest.raises(ShrinkError, match="pass an instance of its architecture"):
        shrink.load(tmp_path / "m")
    loaded = shrink.load(tmp_path / "m", model=MLP())
    assert torch.equal(loaded(x), before)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    shrink.save(shrink.quantize(tiny_llama(), "int8", progress=False), tmp_path / "q")

    def refuse(*a, **k):
        raise AssertionError("pickle used while loading")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    shrink.load(tmp_path / "q")


def test_bad_folders(tmp_path):
    with pytest.raises(ShrinkError, match="no such folder"):
        shrink.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShrinkError, match="is not a shrink folder"):
        shrink.load(tmp_path / "empty")
    model = shrink.quantize(tiny_llama(), "int8", progress=False)
    shrink.save(model, tmp_path / "q")
    manifest = tmp_path / "q" / "shrink.json"
    data = json.loads(manifest.read_text())

    data["format_version"] = 99
    manifest.write_text(json.dumps(data))
    with pytest.raises(ShrinkError, match="format version 99, newer than this shrink reads"):
        shrink.load(tmp_path / "q")

    manifest.write_text('{\n  "format_version": 1,\n  oops\n}')
    with pytest.raises(ShrinkError, match=r"shrink.json: invalid JSON at line 3"):
        shrink.load(tmp_path / "q")

    data["format_version"] = shrink.io.FORMAT_VERSION
    manifest.write_text(json.dumps(data))
    weights = tmp_path / "q" / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ShrinkError, match=r"model.safetensors: 20 bytes, but shrink.json records \d+"):
        shrink.load(tmp_path / "q")
    del data["files"]  # as in folders written before shrink.json listed its files
    manifest.write_text(json.dumps(data))
    with pytest.raises(ShrinkError, match=r"model.safetensors: cannot read"):
        shrink.load(tmp_path / "q")
    weights.unlink()
    with pytest.raises(ShrinkError, match=r"model.safetensors: missing weights file"):
        shrink.load(tmp_path / "q")


def test_manifest_and_weights_must_agree(tmp_path):
    shrink.save(shrink.quantize(tiny_llama(), "int8", progress=False), tmp_path / "q")
    manifest = tmp_path / "q" / "shrink.json"
    data = json.loads(manifest.read_text())
    data["modules"]["model.layers.0.mlp.up_proj"]["format"] = "int4-g32"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ShrinkError, match=r"shrink.json: module 'model.layers.0.mlp.up_proj' \(int4-g32, 64 -> 128\) "
                                          r"needs 'model.layers.0.mlp.up_proj.weight_packed' of shape \(128, 8\) I32; "
                                          r"model.safetensors holds \(128, 16\) I32"):
        shrink.load(tmp_path / "q")
    shrink.save(shrink.quantize(tiny_llama(), "int8-asym", progress=False), tmp_path / "a")  # shrink's layout
    manifest = tmp_path / "a" / "shrink.json"
    data = json.loads(manifest.read_text())
    data["modules"]["model.layers.0.mlp.up_proj"]["format"] = "int4-g32-asym"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ShrinkError, match=r"needs 'model.layers.0.mlp.up_proj.qweight' of shape \(128, 32\) U8; "
                                          r"model.shrink.safetensors holds \(128, 64\) U8"):
        shrink.load(tmp_path / "a")


def test_save_is_atomic(tmp_path, monkeypatch):
    model = shrink.quantize(tiny_llama(), "int8", progress=False)
    import shrink.io.saved as saved

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(saved.ShardWriter, "flush", boom)  # the weights' writer
    with pytest.raises(RuntimeError, match="disk full"):
        shrink.save(model, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []  # no half-written folder, no temporary left behind


@pytest.mark.parametrize("fmt", ["int4-g32", "int4-g32-asym"])  # pack-quantized, and shrink's own layout
def test_a_model_saved_in_shards_loads_back_exactly(tmp_path, fmt):
    model = shrink.quantize(tiny_llama(), fmt, progress=False)
    shrink.save(model, tmp_path / "q", shard_bytes=20_000)
    base = "model.safetensors" if "asym" not in fmt else "model.shrink.safetensors"
    stem = base.removesuffix(".safetensors")
    shards = sorted(p.name for p in (tmp_path / "q").glob(f"{stem}-*-of-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "q" / base).exists()
    assert shards[0] == f"{stem}-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "q" / f"{base}.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    manifest = json.loads((tmp_path / "q" / "shrink.json").read_text())
    assert set(shards) <= set(manifest["files"])  # every shard's size and checksum recorded
    back = shrink.load(tmp_path / "q")
    ids = torch.randint(0, 100, (1, 12))
    torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
    if "asym" not in fmt:  # a sharded pack-quantized folder is a Hugging Face checkpoint as it is
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
        assert torch.isfinite(hf(ids).logits).all()
    # a shard changed after saving, then one gone: named, nothing loaded
    shard = tmp_path / "q" / shards[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ShrinkError, match=rf"{shards[1]}: checksum does not match"):
        shrink.load(tmp_path / "q")
    shard.unlink()
    with pytest.raises(ShrinkError, match=rf"{shards[1]}: missing"):
        shrink.load(tmp_path / "q")


def test_save_refuses_to_clobber_other_folders(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    model = shrink.quantize(tiny_llama(), "int8", progress=False)
    for force in (False, True):
        with pytest.raises(ShrinkError, match="not empty, and is not a folder shrink wrote exactly as it is"):
            shrink.save(model, tmp_path / "data", force=force)
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep me"
    shrink.save(model, tmp_path / "q")
    with pytest.raises(ShrinkError, match="holds a model shrink saved earlier; pass --force"):
        shrink.save(model, tmp_path / "q")
    shrink.save(model, tmp_path / "q", force=True)  # replacing shrink's own folder, when asked
    (tmp_path / "q" / "NOTES.md").write_text("mine")  # a user's file in it: no longer shrink's to replace
    with pytest.raises(ShrinkError, match="not empty, and is not a folder shrink wrote exactly as it is"):
        shrink.save(model, tmp_path / "q", force=True)
    assert (tmp_path / "q" / "NOTES.md").read_text() == "mine"
    (tmp_path / "q" / "NOTES.md").unlink()
    assert shrink.load(tmp_path / "q") is not None


def test_load_reads_what_load_model_reads(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "hf")  # a plain Hugging Face folder: no shrink.json
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        assert torch.equal(shrink.load(tmp_path / "hf")(ids).logits, shrink.io.read_model(tmp_path / "hf").model(ids).logits)
    with pytest.raises(ShrinkError, match="is not a shrink folder"):  # a folder of nothing is still refused
        (tmp_path / "empty").mkdir()
        shrink.load(tmp_path / "empty")


def test_info_says_what_was_done_to_a_model_and_to_a_folder(tmp_path):
    model = shrink.quantize(tiny_llama(), {"model.layers.0.*": None, "*": "int8"}, progress=False)
    rec = shrink.info(model)
    assert rec.method == "rtn" and rec.formats["model.layers.1.mlp.up_proj"] == "int8"
    assert "model.layers.0.mlp.up_proj" in rec.kept_full_precision
    assert rec.layers["model.layers.1.mlp.up_proj"].method == "rtn" and 0 < rec.check.relative_error < 0.1
    shrink.save(model, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "shrink.json").read_text())
    from_folder = shrink.info(tmp_path / "q")
    assert from_folder.to_dict() == shrink.info(shrink.load(tmp_path / "q")).to_dict() == {
        "method": manifest["method"], "formats": {**{n: m["format"] for n, m in manifest["modules"].items()},
                                                  **{n: None for n in manifest["kept_full_precision"]}},
        "kept_full_precision": manifest["kept_full_precision"], "calibration": manifest["calibration"],
        "check": manifest["check"], "source": manifest["source"],
        "layers": {n: m["done"] for n, m in manifest["modules"].items()}, "fallbacks": manifest.get("fallbacks", {}),
        "rotation": manifest.get("rotation")}
    assert from_folder.check == rec.check  # kept through save and load


def test_save_takes_a_loaded_model_with_its_tokenizer(tmp_path):
    from helpers import tiny_tokenizer

    tiny_llama().save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    loaded = shrink.io.read_model(tmp_path / "hf")
    shrink.quantize(loaded.model, "int8", progress=False)
    shrink.save(loaded, tmp_path / "q")
    back = shrink.io.read_model(tmp_path / "q")
    assert back.tokenizer is not None and back.tokenizer("the bank").input_ids == loaded.tokenizer("the bank").input_ids
    assert shrink.info(tmp_path / "q").source == loaded.source


@pytest.mark.parametrize("case", ["room", "header-too-large", "small-shard"])
def test_shards_are_written_in_place_and_read_by_safetensors_itself(tmp_path, monkeypatch, case):
    """ShardWriter writes a large shard's tensors once, after room kept for its header (padded with
    spaces); a header larger than the room, or a small shard, is written compactly instead. safetensors'
    own reader gets every tensor back exactly either way."""
    from safetensors.torch import load_file

    from shrink.io import shards

    monkeypatch.setattr(shards, "HEADER_ROOM", 1024)
    g = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(40_000, generator=g) if case != "small-shard" else torch.randn(8, generator=g)}
    many = 200 if case == "header-too-large" else 3
    tensors |= {f"layer.{i}.a_rather_long_tensor_name.weight": torch.randn(4, 3, generator=g) for i in range(many)}
    tensors["codes"] = torch.randint(0, 255, (5, 7), generator=g, dtype=torch.uint8)
    writer = shards.ShardWriter(tmp_path)
    writer.add(tensors)
    assert writer.close() == ["model.safetensors"]
    raw = (tmp_path / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert (n == 1024) == (case == "room") and n % 8 == 0
    assert not list(tmp_path.glob(".part-*"))
    back = load_file(tmp_path / "model.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], t) for k, t in tensors.items())
