"""Methods as objects: the strings the CLI and the search use parse once into a Recipe, and quantize
takes either."""

import re

import pytest
import torch
from helpers import tiny_llama

import shrink
from shrink.quant import AWQ, GPTQ, Recipe, Tune, parse_method


def test_method_strings_parse_into_recipes_and_back():
    assert parse_method("rtn") == Recipe() and not Recipe().calibrated
    assert parse_method("awq+gptq", damp=0.05) == Recipe(awq=AWQ(), gptq=GPTQ(damp=0.05))
    assert parse_method("gptq+tune") == Recipe(gptq=GPTQ(), tune=Tune(32))
    assert parse_method("awq+tune8").name == "awq+tune8" and parse_method("awq+tune8").method == "awq"
    assert parse_method("gptq", tune_steps=4) == Recipe(gptq=GPTQ(), tune=Tune(4))
    for bad, msg in (("gtpq", "unknown method 'gtpq'"), ("rtn+tune", "tuning needs a calibrated method"),
                     ("awq+tune8", "disagree")):
        with pytest.raises(ValueError, match=msg):
            parse_method(bad, tune_steps=3 if bad == "awq+tune8" else 0)


def test_quantize_takes_a_recipe_or_its_string_alike():
    calib = [torch.randint(0, 96, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    a = shrink.quantize(tiny_llama(), "int4-g32", method="awq+gptq+tune2", calibration=calib, progress=False)
    b = shrink.quantize(tiny_llama(), "int4-g32", method=Recipe(AWQ(), GPTQ(), Tune(2)), calibration=calib,
                        progress=False)
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert shrink.info(a).method == "awq+gptq" and shrink.info(a).calibration["tune_steps"] == 2
    layer = "model.layers.0.mlp.down_proj"
    c = shrink.quantize(tiny_llama(), "int4-g32", method=Recipe(gptq=GPTQ(damp=0.1, act_order=False)),
                        calibration=calib, progress=False)
    assert shrink.info(c).calibration["damp"] == 0.1 and shrink.info(c).calibration["act_order"] is False
    assert c.get_submodule(layer).spec.name == "int4-g32"


def test_a_list_of_method_objects_is_a_recipe_in_the_order_they_run():
    assert parse_method([AWQ(), GPTQ(damp=0.05), Tune(8)]) == Recipe(AWQ(), GPTQ(damp=0.05), Tune(8))
    assert parse_method([GPTQ(true_sequential=True)]).gptq.true_sequential
    for steps, msg in (([GPTQ(), AWQ()], "AWQ must come before GPTQ"), ([GPTQ(), GPTQ()], "GPTQ given twice"),
                       ([Tune(4)], "Tune needs a calibrated method"), (["gptq"], "expected Rotate(), AWQ(), GPTQ(...), Tune(...) or QAD(...)")):
        with pytest.raises(shrink.ShrinkError, match=re.escape(msg)):
            parse_method(steps)
