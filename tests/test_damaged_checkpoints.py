"""Other tools' checkpoints, damaged: every field of a compressed-tensors and a GPTQ folder given the wrong type,
shape or range, through `shrink inspect` and `shrink compare`. Each must end in exit code 1 and one line that
names the file and the field, never a traceback, and never load as wrong weights."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_gptq_folder import write_gptq
from test_hf_checkpoint import _ct_checkpoint

from shrink.cli import main

LAYER = "model.layers.0.mlp.up_proj"  # 64 -> 128


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    out = r.output
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        out += "Traceback\n" + "".join(traceback.format_exception(r.exception))
    return r.exit_code, out


def one_line_error(code, out, *needles):
    assert "Traceback" not in out, out[-3000:]
    last = out.strip().splitlines()[-1] if out.strip() else ""
    assert code == 1, (code, out[-2000:])
    for n in needles:
        assert n in last, f"{n!r} not in {last!r}"


def _retype(t, how):
    if how == "float":
        return t.float()
    if how == "uint8":
        return t.to(torch.uint8)
    if how == "int32":
        return t.to(torch.int32)
    if how == "int8":
        return t.to(torch.int8)
    if how == "longer":
        return torch.cat([t, t[:1]])
    raise AssertionError(how)


def _damage_tensor(folder, key, value):
    state = load_file(folder / "model.safetensors")
    if value is None:
        del state[key]
    else:
        state[key] = value(state[key]) if callable(value) else value
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _damage_config(folder, path, value):
    cfg = json.loads((folder / "config.json").read_text())
    at = cfg
    for k in path[:-1]:
        at = at[k]
    if value is KeyError:
        del at[path[-1]]
    else:
        at[path[-1]] = value
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return _ct_checkpoint(tmp_path_factory.mktemp("ct") / "ct")


@pytest.fixture(scope="module")
def gptq(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gptq") / "g"
    write_gptq(folder)
    return folder


CT_TENSORS = [("weight_packed", "float"), ("weight_packed", "uint8"), ("weight_packed", "int8"),
              ("weight_packed", "longer"), ("weight_packed", None), ("weight_scale", "int32"),
              ("weight_scale", "longer"), ("weight_scale", None), ("weight_shape", "float"),
              ("weight_shape", torch.tensor([2 ** 40, 64])), ("weight_shape", torch.tensor([-128, 64])),
              ("weight_shape", torch.tensor([128, 64, 1])), ("weight_shape", None)]
CT_CONFIG = [(("num_bits",), 4.0), (("num_bits",), "4"), (("num_bits",), True), (("num_bits",), 7),
             (("num_bits",), None), (("group_size",), 32.0), (("group_size",), 7), (("group_size",), "32"),
             (("strategy",), 5), (("strategy",), "tensor"), (("type",), "float"), (("symmetric",), False),
             (("actorder",), "group")]


@pytest.mark.parametrize("field,how", CT_TENSORS, ids=[f"{f}-{h if isinstance(h, str) or h is None else 'value'}"
                                                      for f, h in CT_TENSORS])
def test_damaged_compressed_tensors_weights_are_one_line(tmp_path, ct, field, how):
    import shutil

    folder = shutil.copytree(ct, tmp_path / "ct")
    key = f"{LAYER}.{field}"
    _damage_tensor(folder, key, how if how is None or not isinstance(how, str) else (lambda t: _retype(t, how)))
    for args in (["inspect", folder], ["compare", folder, folder]):
        one_line_error(*cli(*args), "model.safetensors", field)


@pytest.mark.parametrize("field,value", CT_CONFIG, ids=[f"{f[-1]}-{v!r}" for f, v in CT_CONFIG])
def test_damaged_compressed_tensors_config_is_one_line(tmp_path, ct, field, value):
    import shutil

    folder = shutil.copytree(ct, tmp_path / "ct")
    _damage_config(folder, ("quantization_config", "config_groups", "group_0", "weights", *field), value)
    for args in (["inspect", folder], ["compare", folder, folder]):
        one_line_error(*cli(*args), "config.json", "config_groups.group_0")


GPTQ_TENSORS = [("qweight", "float"), ("qweight", "uint8"), ("qweight", "longer"), ("qweight", None),
                ("qzeros", "float"), ("qzeros", "int8"), ("qzeros", None), ("scales", "int32"), ("scales", "longer"),
                ("scales", None), ("g_idx", "float"), ("g_idx", "longer"), ("g_idx", torch.full((64,), 99)),
                ("g_idx", torch.full((64,), -1))]
GPTQ_CONFIG = [(("bits",), 4.0), (("bits",), "4"), (("bits",), True), (("bits",), 3), (("bits",), None),
               (("group_size",), 32.0), (("group_size",), 48), (("group_size",), "32"), (("checkpoint_format",), 5),
               (("checkpoint_format",), "marlin")]


@pytest.mark.parametrize("field,how", GPTQ_TENSORS, ids=[f"{f}-{h if isinstance(h, str) or h is None else 'value'}"
                                                        for f, h in GPTQ_TENSORS])
def test_damaged_gptq_weights_are_one_line(tmp_path, gptq, field, how):
    import shutil

    folder = shutil.copytree(gptq, tmp_path / "g")
    _damage_tensor(folder, f"{LAYER}.{field}", how if how is None or not isinstance(how, str) else (lambda t: _retype(t, how)))
    needle = LAYER if how is None else field  # a missing qweight: the layer is then no GPTQ layer, named as such
    for args in (["inspect", folder], ["compare", folder, folder]):
        one_line_error(*cli(*args), LAYER, needle)


@pytest.mark.parametrize("field,value", GPTQ_CONFIG, ids=[f"{f[-1]}-{v!r}" for f, v in GPTQ_CONFIG])
def test_damaged_gptq_config_is_one_line(tmp_path, gptq, field, value):
    import shutil

    folder = shutil.copytree(gptq, tmp_path / "g")
    _damage_config(folder, ("quantization_config", *field), value)
    for args in (["inspect", folder], ["compare", folder, folder]):
        one_line_error(*cli(*args), "config.json", "GPTQ")
