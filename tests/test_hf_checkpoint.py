"""A folder shrink writes either loads with the right weights in plain transformers (compressed-tensors'
pack-quantized layout), or makes transformers fail loudly; never random weights."""

import json
import os

import pytest
import torch
from helpers import tiny_llama
from transformers import AutoModelForCausalLM

import shrink
from shrink.quant import QuantLinear

MIXED = {"model.layers.0.*": "int2-g32", "*.mlp.*": "int8-g64", "*": "int4-g16"}
CAST = {"model.layers.0.*": "bf16", "model.layers.1.mlp.*": None, "*": "int4"}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("spec,tie,keep_output", [
    ("int4-g32", True, True), ("int4-g64", True, True), ("int4", True, True), ("int8", True, True),
    ("int8-g32", False, False), ("int3-g32", True, True), (MIXED, True, True), (CAST, False, False),
    ("int4-g32", True, False),  # a tied output layer quantized on its own: saved untied
    ("int5-g32", True, True), ("int6-g64", False, False),
])
def test_symmetric_folders_load_exactly_in_transformers(tmp_path, spec, tie, keep_output):
    model = shrink.quantize(tiny_llama(tie=tie), spec, keep_output=keep_output, backend="torch", progress=False)
    ids = torch.randint(3, 96, (2, 12))
    shrink.save(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert json.loads((tmp_path / "q" / "shrink.json").read_text())["layout"] == "pack-quantized"
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    mine = shrink.load(tmp_path / "q", backend="torch")
    assert isinstance(mine.model.layers[1].self_attn.q_proj, QuantLinear)  # shrink still runs its own kernels
    # the PyTorch path of shrink dequantizes exactly as compressed-tensors does: identical logits
    assert torch.equal(_logits(hf, ids), _logits(mine, ids))
    assert torch.equal(_logits(mine, ids), _logits(model, ids))


@pytest.mark.parametrize("spec", ["int4-g32-asym", {"model.layers.0.*": "int8-asym", "*": "int4-g32"}, "iq4nl-g32"])
def test_folders_transformers_cannot_read_make_it_fail_loudly(tmp_path, spec):
    model = shrink.quantize(tiny_llama(), spec, progress=False)
    shrink.save(model, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "shrink.json").read_text())["layout"] == "shrink"
    assert not (tmp_path / "q" / "model.safetensors").exists()
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    ids = torch.randint(3, 96, (1, 9))
    assert torch.equal(_logits(shrink.load(tmp_path / "q"), ids), _logits(model, ids))


def test_format_1_folders_still_load(tmp_path):
    """Folders written before format 2: shrink's layout in model.safetensors, no layout or files fields."""
    model = shrink.quantize(tiny_llama(), "int4-g32-asym", progress=False)
    shrink.save(model, tmp_path / "q")
    q = tmp_path / "q"
    os.replace(q / "model.shrink.safetensors", q / "model.safetensors")
    data = json.loads((q / "shrink.json").read_text())
    for k in ("layout", "files"):
        del data[k]
    data["format_version"] = 1
    (q / "shrink.json").write_text(json.dumps(data))
    ids = torch.randint(3, 96, (1, 9))
    assert torch.equal(_logits(shrink.load(q), ids), _logits(model, ids))


# ---- other tools' checkpoints: compressed-tensors pack-quantized, written by the real library ----------

def _ct_checkpoint(path, **weights):
    """A tiny Llama quantized and saved by compressed-tensors itself (scales from its own calculate_qparams)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model = tiny_llama(tie=True)
    args = QuantizationArgs(**{"num_bits": 4, "group_size": 32, "strategy": "group", "symmetric": True, **weights})
    qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                            ignore=["lm_head"])
    apply_quantization_config(model, qc)
    for _, m in model.named_modules():
        if hasattr(m, "weight_scale"):
            g = m.weight.detach().reshape(m.weight.shape[0], -1, args.group_size or m.weight.shape[1])
            scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
            m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.data.copy_(zp.reshape(m.weight_zero_point.shape))
    comp = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    comp.compress_model(model)
    model.save_pretrained(path)
    comp.update_config(path)
    return path


@pytest.mark.parametrize("weights", [{}, {"group_size": 64}, {"strategy": "channel", "group_size": None}, {"num_bits": 8}])
def test_compressed_tensors_checkpoints_load_into_quantlinear(tmp_path, weights, capfd):
    from safetensors.torch import load_file

    path = _ct_checkpoint(tmp_path / "ct", **weights)
    loaded = shrink.io.read_model(path)
    layer = loaded.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, QuantLinear) and loaded.source["kind"] == "compressed-tensors"
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    state = load_file(path / "model.safetensors")
    bits = layer.spec.bits
    theirs = unpack_from_int32(state["model.layers.0.mlp.up_proj.weight_packed"], bits, torch.Size([128, 64]))
    ours = shrink.quant.packing.unpack(layer.qweight, bits, 64).to(torch.int16) - (1 << (bits - 1))
    assert torch.equal(ours, theirs.to(torch.int16))  # the codes, exactly
    assert torch.equal(layer.scales, state["model.layers.0.mlp.up_proj.weight_scale"].half())
    assert "scales rounded to float16" in capfd.readouterr().err  # they were float32: said so
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(3, 96, (2, 12))
    for m in loaded.model.modules():
        if isinstance(m, QuantLinear):
            m.backend = "torch"
    a, b = _logits(loaded.model, ids), _logits(hf, ids)
    assert (a - b).abs().max() < 2e-3 * a.abs().max()  # codes exact; only the scales' float16 rounding differs


@pytest.mark.parametrize("weights,needle", [
    ({"symmetric": False}, "config_groups.group_0: asymmetric"),
    ({"group_size": 16, "num_bits": 7}, "config_groups.group_0: 7 bits"),
    ({"edit": {"actorder": "dynamic"}}, "config_groups.group_0: activation order 'dynamic'"),
    ({"edit": {"strategy": "tensor"}}, "config_groups.group_0: strategy 'tensor'"),
])
def test_compressed_tensors_schemes_shrink_cannot_hold_are_refused(tmp_path, weights, needle):
    edit = weights.pop("edit", None)
    path = _ct_checkpoint(tmp_path / "ct", **weights)
    if edit:  # schemes this version of compressed-tensors no longer writes, as older checkpoints have them
        cfg = json.loads((path / "config.json").read_text())
        cfg["quantization_config"]["config_groups"]["group_0"]["weights"].update(edit)
        (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(shrink.ShrinkError, match=needle.replace(".", r"\.")):
        shrink.io.read_model(path)


def test_reading_compressed_tensors_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    path = _ct_checkpoint(tmp_path / "ct")
    for name in [m for m in sys.modules if m.startswith("compressed_tensors")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    with pytest.raises(shrink.ShrinkError, match="need the compressed-tensors package.*pip install"):
        shrink.io.read_model(path)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("width", [64, 40])
def test_pack_quantized_words_read_as_compressed_tensors_writes_them(bits, width):
    """shrink reads pack-quantized words (its own byte path for 2, 4 and 8 bits) to exactly the codes
    compressed-tensors packed, rows whose width is not a multiple of 32 included."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from shrink.io.packformat import _codes

    g = torch.Generator().manual_seed(bits)
    signed = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, width), generator=g, dtype=torch.int8)
    got = _codes(pack_to_int32(signed, bits), bits, [6, width])
    assert got.dtype == torch.uint8 and torch.equal(got.to(torch.int16) - (1 << (bits - 1)), signed.to(torch.int16))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("width", [64, 40, 8])
def test_pack_quantized_words_written_are_compressed_tensors_own(bits, width):
    """shrink writes pack-quantized words (its own byte path for 2, 4 and 8 bits where rows fill whole
    words) identical to compressed-tensors' pack_to_int32."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from shrink.io.packformat import _words

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (6, width), generator=g, dtype=torch.uint8)
    signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    got = _words(codes, bits, 1 << (bits - 1))
    assert got.dtype == torch.int32 and torch.equal(got, pack_to_int32(signed, bits))


def test_a_bf16_checkpoint_is_counted_as_it_is_loaded_in_float32(tmp_path, monkeypatch):
    # the up-front check once counted a bf16 folder's bytes while the load makes float32 weights: a model that
    # fits as stored but not as loaded went ahead and was killed for memory
    import shrink.core.memory as memory

    tiny_llama().to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    weights = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").parameters())
    file_bytes = (tmp_path / "bf16" / "model.safetensors").stat().st_size
    monkeypatch.setattr(memory, "available_memory", lambda: 3 * weights)  # past bf16's 2 bytes, short of float32's 4
    with pytest.raises(shrink.ShrinkError, match=r"config\.json: the model it describes needs .* GB \(.* GB of weights "
                                                 r"in float32, as shrink loads them, and .* GB of the weights file"):
        shrink.io.read_model(tmp_path / "bf16")
    monkeypatch.setattr(memory, "available_memory", lambda: 4 * weights + file_bytes + 2**20)
    assert next(shrink.io.read_model(tmp_path / "bf16").model.parameters()).dtype == torch.float32


def _sharded(tmp_path):
    """A tiny Llama saved in bf16 shards of at most 50 kB (model-0000k-of-0000n.safetensors + index)."""
    model = tiny_llama().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) >= 3
    return model, tmp_path / "sharded"


def test_a_sharded_folder_is_read_whole_and_a_tensor_at_a_time_as_stored(tmp_path):
    from shrink.io.shards import Checkpoint

    model, folder = _sharded(tmp_path)
    ck = Checkpoint(folder)
    state = model.state_dict()
    assert set(ck.tensors) == {k for k in state if k != "lm_head.weight" or not model.config.tie_word_embeddings}
    name = "model.layers.1.mlp.down_proj.weight"
    got = ck.tensor(name)
    assert got.dtype == torch.bfloat16 and torch.equal(got, state[name]) and ck.tensors[name].dtype == "BF16"
    loaded = shrink.io.read_model(folder).model
    assert torch.equal(loaded.state_dict()[name], state[name].float())
    # read ahead in the background: the same tensors; the rest read as asked; an error met there named here
    block = [k for k in ck.tensors if k.startswith("model.layers.1.")]
    ck.read_ahead(block)
    got = ck.read(block + ["model.norm.weight"])
    assert list(got) == block + ["model.norm.weight"] and all(torch.equal(got[k], state[k]) for k in got)
    # mapped instead of copied: the same values, alive after the checkpoint is gone, and a private mapping:
    # writing to a tensor changes neither the file nor what is read next
    mapped = Checkpoint(folder)
    mapped.mapped = True
    mapped.read_ahead(block)
    got = mapped.read(block)
    del mapped
    assert all(torch.equal(got[k], state[k]) for k in block)
    got[name].mul_(2)
    assert torch.equal(ck.tensor(name), state[name]) and not torch.equal(got[name], state[name])
    del got  # (a mapping of a file cut short under it would fault on its lost pages)
    file = ck.tensors[name].file
    file.write_bytes(file.read_bytes()[:-100])  # the shard cut short after its headers were read
    ck.read_ahead([name])
    with pytest.raises(shrink.ShrinkError, match=rf"{file.name}: cut short inside tensor '{name}'|{file.name}: tensor"):
        ck.read([name])


@pytest.mark.parametrize("damage, message", [
    ("missing shard", r"model\.safetensors\.index\.json: places '.*' in model-00002-of-0000\d\.safetensors, which is not "
                      r"in the folder"),
    ("two shards", r"tensor 'model\.norm\.weight' is in two shards, model-0000\d-of-0000\d\.safetensors and "
                   r"model-0000\d-of-0000\d\.safetensors"),
    ("wrong shard", r"index\.json: places 'model\.norm\.weight' in model-0000\d-of-0000\d\.safetensors, but it is in"),
    ("unlisted", r"model-0000\d-of-0000\d\.safetensors: holds tensor 'model\.norm\.weight', which "
                 r"model\.safetensors\.index\.json does not list"),
    ("not json", r"model\.safetensors\.index\.json: not readable JSON"),
    ("no map", r"'weight_map' must map each tensor's name to the file holding it"),
    ("outside", r"tensor 'model\.norm\.weight' is placed in '\.\./x\.safetensors', which is not a \.safetensors file "
                r"beside the index"),
])
def test_a_damaged_shard_set_is_refused_naming_the_file_and_tensor(tmp_path, damage, message):
    from safetensors.torch import load_file, save_file

    _, folder = _sharded(tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    home = index["weight_map"]["model.norm.weight"]
    if damage == "missing shard":
        next(folder.glob("model-00002-of-*")).unlink()
    elif damage == "two shards":
        other = next(f for f in folder.glob("model-*.safetensors") if f.name != home)
        st = load_file(other)
        st["model.norm.weight"] = load_file(folder / home)["model.norm.weight"]
        save_file(st, other, metadata={"format": "pt"})
    elif damage == "wrong shard":
        index["weight_map"]["model.norm.weight"] = next(f.name for f in sorted(folder.glob("model-*.safetensors"))
                                                        if f.name != home)
        index_path.write_text(json.dumps(index))
    elif damage == "unlisted":
        del index["weight_map"]["model.norm.weight"]
        index_path.write_text(json.dumps(index))
    elif damage == "not json":
        index_path.write_text("{oops")
    elif damage == "no map":
        index_path.write_text(json.dumps({"metadata": {}}))
    elif damage == "outside":
        index["weight_map"]["model.norm.weight"] = "../x.safetensors"
        index_path.write_text(json.dumps(index))
    with pytest.raises(shrink.ShrinkError, match=message):
        shrink.io.read_model(folder)
