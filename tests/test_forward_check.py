"""A quantize that changed nothing, or broke the model, is never a success: one sample input runs through
the model before and after, and the relative output error is measured, recorded and shown."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import MLP, tiny_llama

import shrink


def test_the_output_error_is_measured_recorded_and_ordered_by_width(tmp_path):
    errors = {}
    for fmt in ("int8", "int4-g32", "int2-g32"):
        model = shrink.quantize(tiny_llama(), fmt, backend="torch", progress=False)
        check = shrink.info(model).check
        assert check.skipped is None and check.input == "16 random token ids"
        errors[fmt] = check.relative_error
    assert 0 < errors["int8"] < errors["int4-g32"] < errors["int2-g32"]
    # the number is the model's: the same input through a fresh copy and the quantized one
    ref, q = tiny_llama(), shrink.quantize(tiny_llama(), "int4-g32", backend="torch", progress=False)
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits, q(ids).logits
    assert shrink.info(q).check.relative_error == pytest.approx(float((b - a).norm() / a.norm()), rel=1e-5)
    shrink.save(q, tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "shrink.json").read_text())["check"]
    assert saved["relative_error"] == pytest.approx(shrink.info(q).check.relative_error) and saved["skipped"] is None


def test_plain_modules_get_a_batch_for_their_first_layer(mlp):
    model = shrink.quantize(mlp, "int8", progress=False)
    assert shrink.info(model).check.input == "4 random inputs of 64" and 0 < shrink.info(model).check.relative_error < 0.05
    assert model.training is False


def test_a_model_that_no_longer_runs_is_an_error():
    class WantsALinear(torch.nn.Module):  # code that relies on its layers' type
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(32, 32)
            self.head = torch.nn.Linear(32, 4)

        def forward(self, x):
            if not isinstance(self.fc, torch.nn.Linear):
                raise TypeError("fc must be an nn.Linear")
            return self.head(self.fc(x))

    with pytest.raises(ValueError, match=r"forward pass fails on 4 random inputs of 32 \(TypeError: fc must be"):
        shrink.quantize(WantsALinear(), "int8", progress=False)


def test_an_input_that_does_not_fit_skips_the_check_and_says_so():
    class TakesTwo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(32, 32)
            self.head = torch.nn.Linear(32, 4)

        def forward(self, x, y):
            return self.head(self.fc(x) + y)

    model = shrink.quantize(TakesTwo(), "int8", progress=False)
    assert shrink.info(model).check.relative_error is None
    assert shrink.info(model).check.line().startswith("forward check skipped: the original model does not run on 4 random")


def test_quantizing_nothing_is_an_error_that_says_what_the_model_has():
    only_head = torch.nn.Sequential(torch.nn.Conv1d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 30, 10))
    with pytest.raises(ValueError, match=r"1 Linear layer\(s\) are all kept in full precision .*\(1 Conv1d\)"):
        shrink.quantize(only_head, "int8", progress=False)
    seq = torch.nn.Sequential(torch.nn.Conv1d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv1d(8, 8, 3))
    with pytest.raises(ValueError, match=r"no Linear or Conv2d layers; its other layers \(2 Conv1d\) are not quantized"):
        shrink.quantize(seq, "int8", progress=False)
    with pytest.raises(ValueError, match="all kept in full precision"):
        shrink.quantize(MLP(), {"*": None}, progress=False)


@pytest.mark.slow  # a subprocess or a browser
def test_cli_quantize_prints_the_check(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "hf")
    p = subprocess.run([sys.executable, "-m", "shrink.cli", "quantize", str(tmp_path / "hf"), "-f", "int4-g32",
                        "--out", str(tmp_path / "q")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "forward check: relative output error" in p.stdout and "16 random token ids" in p.stdout
    assert json.loads((tmp_path / "q" / "results.json").read_text())["check"]["relative_error"] > 0


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_half_and_bfloat16_keep_a_quantized_model_working(cast):
    model = shrink.quantize(tiny_llama(), {"model.layers.0.*": "bf16", "*": "int4-g32"}, backend="torch",
                            progress=False)
    ids = torch.randint(3, 96, (1, 10))
    scales = model.model.layers[1].self_attn.q_proj.scales.clone()
    with torch.no_grad():
        want = model(ids).logits
        model = model.half() if cast == "half" else model.to(torch.bfloat16)
        got = model(ids).logits
    q = model.model.layers[1].self_attn.q_proj
    assert q.qweight.dtype == torch.uint8 and torch.equal(q.scales, scales)  # storage untouched, not rounded
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # a cast layer keeps its format
    assert got.dtype == (torch.float16 if cast == "half" else torch.bfloat16)
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()  # compute follows the input's dtype


def test_layers_shrink_cannot_quantize_are_listed_as_kept_unsupported():
    from shrink.quant import size_rows

    model = torch.nn.Sequential(torch.nn.Linear(32, 30), torch.nn.Unflatten(1, (3, 10)), torch.nn.Conv1d(3, 8, 3),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 8, 16), torch.nn.Linear(16, 10))
    shrink.quantize(model, "int8", progress=False)
    kinds = {r.kind: r for r in size_rows(model)}
    assert kinds["Conv1d (kept: unsupported)"].parameters == 8 * 3 * 3 + 8
    assert "other (norms, biases, ...)" not in kinds
