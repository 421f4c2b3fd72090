"""A folder shrink writes either loads with the right weights in plain transformers (compressed-tensors'
pack-quantized layout), or makes transformers fail loudly; never random weights."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import shrink
from conftest import tiny_llama
from shrink.quant import QuantLinear

MIXED = {"model.layers.0.*": "int2-g32", "*.mlp.*": "int8-g64", "*": "int4-g16"}
CAST = {"model.layers.0.*": "bf16", "model.layers.1.mlp.*": None, "*": "int4"}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("spec,tie,keep_output", [
    ("int4-g32", True, True), ("int4-g64", True, True), ("int4", True, True), ("int8", True, True),
    ("int8-g32", False, False), ("int3-g32", True, True), (MIXED, True, True), (CAST, False, False),
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


@pytest.mark.parametrize("spec", ["int4-g32-asym", {"model.layers.0.*": "int8-asym", "*": "int4-g32"}])
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
