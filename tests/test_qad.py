"""Quantization-aware distillation (quant/qad.py): a quantized model's scales and norms trained end to end
against the original's outputs, the codes fixed, kept only where the held-out KL went down."""

import copy
import json

import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer, word_text

import shrink
from shrink.quant import GPTQ, QAD, QuantLinear
from shrink.quant.qad import distill_quantized, parse_seconds, teacher_targets

WINDOWS = list(torch.randint(3, 96, (16, 32), generator=torch.Generator().manual_seed(0)))


def _codes_and_scales(model):
    return {n: (m.qweight.clone(), m.scales.clone()) for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_training_the_scales_lowers_the_held_out_kl_and_keeps_the_codes():
    model = tiny_llama(tie=False)
    targets = teacher_targets(model, WINDOWS, top_k=32)
    assert targets[0][0].shape == (31, 32) and targets[0][1].shape == (31, 32)  # next-token log-probs, top 32
    shrink.quantize(model, "int4-g32", backend="torch", progress=False)
    before = _codes_and_scales(model)
    norm = model.model.layers[0].input_layernorm.weight.detach().clone()
    said = []
    r = distill_quantized(model, WINDOWS, targets, steps=60, progress=False, say=said.append)
    assert r.kept and r.kl_after < r.kl_before and r.steps == 60
    assert (r.train_windows, r.held_out_windows, r.top_k) == (14, 2, 32)
    assert said[0].startswith("estimated peak memory") and "quantization-aware distillation (whole)" in said[0]
    assert "held-out KL" in said[1]
    after = _codes_and_scales(model)
    assert all(torch.equal(after[n][0], before[n][0]) for n in before)  # the codes: untouched
    assert any(not torch.equal(after[n][1], before[n][1]) for n in before)  # the scales: trained
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm)
    assert all(m.scales.dtype == torch.float16 for m in model.modules() if isinstance(m, QuantLinear))


def test_a_change_that_does_not_lower_the_held_out_kl_is_not_kept():
    model = tiny_llama(tie=False)
    targets = teacher_targets(model, WINDOWS)
    shrink.quantize(model, "int4-g32", backend="torch", progress=False)
    before = _codes_and_scales(model)
    said = []
    r = distill_quantized(model, WINDOWS, targets, steps=3, lr=0.9, norm_lr=0.9, progress=False, say=said.append)
    assert not r.kept and r.kl_after == r.kl_before and "the scales are kept as they were" in said[-1]
    after = _codes_and_scales(model)
    assert all(torch.equal(after[n][1], before[n][1]) for n in before)


def test_bad_budgets_and_data_are_refused_before_any_training():
    model = tiny_llama(tie=False)
    targets = teacher_targets(model, WINDOWS[:2])
    with pytest.raises(shrink.ShrinkError, match="trains quantized layers' scales: the model has none"):
        distill_quantized(model, WINDOWS[:2], targets, steps=1, progress=False)
    shrink.quantize(model, "int4-g32", backend="torch", progress=False)
    with pytest.raises(shrink.ShrinkError, match="needs at least 2 windows of data"):
        distill_quantized(model, WINDOWS[:1], targets[:1], steps=1, progress=False)
    with pytest.raises(shrink.ShrinkError, match="needs a budget"):
        distill_quantized(model, WINDOWS[:2], targets, progress=False)
    with pytest.raises(shrink.ShrinkError, match="a time budget of 1e-09 s is below one training step"):
        distill_quantized(model, WINDOWS[:2], targets, seconds=1e-9, progress=False)
    for bad, needle in [(dict(), "needs a budget"), (dict(steps=-1), "steps must be an integer >= 0"),
                        (dict(steps=5, lr=2.0), "lr must be in"), (dict(seconds=float("inf")), "a positive number")]:
        with pytest.raises(shrink.ShrinkError, match=needle):
            QAD(**bad)


def test_qad_after_gptq_is_recorded_saved_and_loaded(tmp_path):
    model = tiny_llama(tie=False)
    shrink.quantize(model, "int4-g32", method=[GPTQ(), QAD(steps=20)], calibration=WINDOWS[:8],
                    qad_data=WINDOWS, backend="torch", progress=False)
    qad = shrink.info(model).calibration["qad"]
    assert qad["steps"] == 20 and qad["budget_steps"] == 20 and qad["data"]["samples"] == 16
    shrink.save(model, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "shrink.json").read_text())["calibration"]["qad"]["steps"] == 20
    ids = torch.randint(3, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(shrink.load(tmp_path / "q", backend="torch")(ids).logits, model(ids).logits)


def test_qad_needs_data():
    with pytest.raises(shrink.ShrinkError, match="QAD needs data"):
        shrink.quantize(tiny_llama(), "int4-g32", method=[QAD(steps=5)], progress=False)


def test_durations():
    assert [parse_seconds(t) for t in ("90", "90s", "20m", "1.5h")] == [90, 90, 1200, 5400]
    for bad in ("0s", "-3m", "soon", "5d"):
        with pytest.raises(ValueError, match="duration"):
            parse_seconds(bad)


def test_the_cli_distills_after_quantizing_and_checks_its_options(tmp_path):
    from click.testing import CliRunner

    from shrink.cli import main

    tiny_llama(tie=False).save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    (tmp_path / "text.txt").write_text(word_text(2000))
    r = CliRunner().invoke(main, ["quantize", str(tmp_path / "hf"), "-f", "int4-g32", "--qad", str(tmp_path / "text.txt"),
                                  "--qad-steps", "4", "--samples", "8", "--seq-len", "32", "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    # a folder with --out: quantized block by block, the original's outputs too, and the folder written trained
    assert "held-out KL" in r.output and "block by block" in r.output
    qad = json.loads((tmp_path / "q" / "shrink.json").read_text())["calibration"]["qad"]
    assert qad["budget_steps"] == 4 and qad["train_windows"] == 7 and qad["held_out_windows"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "q", "text.txt"]  # (its staging folder: gone)
    r = CliRunner().invoke(main, ["quantize", str(tmp_path / "hf"), "-f", "int4-g32", "--qad", str(tmp_path / "text.txt"),
                                  "--qad-steps", "4", "--samples", "8", "--seq-len", "32", "--no-stream",
                                  "--out", str(tmp_path / "whole")])
    assert r.exit_code == 0 and "block by block" not in r.output, r.output
    whole = json.loads((tmp_path / "whole" / "shrink.json").read_text())["calibration"]["qad"]
    assert (whole["kl_before"], whole["kl_after"]) == (qad["kl_before"], qad["kl_after"])
    assert qad["blockwise"] and not whole["blockwise"]  # (streamed: a block at a time; the same steps)
    a, b = shrink.load(tmp_path / "q").state_dict(), shrink.load(tmp_path / "whole").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith(".scales"))
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "q")], terminal_width=200)
    assert f"quantization-aware distillation: 4 steps, held-out KL {qad['kl_before']:.4f}" in r.output
    for args, needle in [(["--qad-steps", "4"], "--qad-steps, --qad-time and --qad-codes-lr set --qad FILE's training"),
                         (["--qad", str(tmp_path / "text.txt"), "--qad-time", "soon"], "--qad-time 'soon' is not a duration"),
                         (["--qad", str(tmp_path / "none.txt")], "QAD text file not found")]:
        r = CliRunner().invoke(main, ["quantize", str(tmp_path / "hf"), *args])
        assert r.exit_code != 0 and needle in r.output, r.output


def _quantized_with_targets():
    model = tiny_llama(tie=False)
    targets = teacher_targets(model, WINDOWS, top_k=32)
    shrink.quantize(model, "int4-g32", backend="torch", progress=False)
    return model, targets


def test_an_interrupted_run_resumes_to_exactly_the_uninterrupted_result(tmp_path, monkeypatch):
    """Ctrl-C at step 5 writes the training state (trained changes, Adam's moments, step, seconds); resuming
    from it runs the other 7 steps and gives the same scales, bit for bit, as 12 steps in one go."""
    straight, targets = _quantized_with_targets()
    r = distill_quantized(straight, WINDOWS, targets, steps=12, progress=False, say=lambda s: None)

    model, _ = _quantized_with_targets()
    calls = {"n": 0}
    real = torch.optim.Adam.step

    def step(self, *a, **k):  # the sixth step is interrupted, as by Ctrl-C
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    said = []
    with pytest.raises(KeyboardInterrupt):
        distill_quantized(model, WINDOWS, targets, steps=12, progress=False, say=said.append,
                          checkpoint=tmp_path / "ck")
    assert "interrupted at step 5" in said[-1] and (tmp_path / "ck" / "state.pt").is_file()
    monkeypatch.setattr(torch.optim.Adam, "step", real)
    resumed, _ = _quantized_with_targets()  # a new process: the model quantized again, as before
    r2 = distill_quantized(resumed, WINDOWS, targets, steps=12, progress=False, say=said.append,
                           checkpoint=tmp_path / "ck", resume=True)
    assert "resumed from" in said[-2] and r2.resumed_from == 5 and r2.steps == 12
    assert r2.kl_before == r.kl_before and r2.kl_after == r.kl_after
    a, b = _codes_and_scales(straight), _codes_and_scales(resumed)
    assert all(torch.equal(a[n][1], b[n][1]) for n in a)


def test_a_checkpoint_of_another_model_or_a_damaged_one_is_refused(tmp_path):
    model, targets = _quantized_with_targets()
    distill_quantized(model, WINDOWS, targets, steps=2, progress=False, say=lambda s: None,
                      checkpoint=tmp_path / "ck", every=0)  # a checkpoint after every step
    other, _ = _quantized_with_targets()
    with pytest.raises(shrink.ShrinkError, match="made for another quantized model, data or learning rate"):
        distill_quantized(other, WINDOWS, targets, steps=4, lr=2e-3, progress=False, checkpoint=tmp_path / "ck",
                          resume=True)
    (tmp_path / "ck" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(shrink.ShrinkError, match="state.pt: not a readable QAD checkpoint"):
        distill_quantized(other, WINDOWS, targets, steps=4, progress=False, checkpoint=tmp_path / "ck", resume=True)
    with pytest.raises(shrink.ShrinkError, match="nothing to resume"):
        distill_quantized(other, WINDOWS, targets, steps=4, progress=False, checkpoint=tmp_path / "none", resume=True)


def test_the_cli_resumes_qad_from_its_checkpoint_and_removes_it_when_done(tmp_path):
    from click.testing import CliRunner

    from shrink.cli import main

    tiny_llama(tie=False).save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    (tmp_path / "text.txt").write_text(word_text(2000))
    args = ["quantize", str(tmp_path / "hf"), "-f", "int4-g32", "--qad", str(tmp_path / "text.txt"), "--qad-steps", "4",
            "--samples", "8", "--seq-len", "32", "--out", str(tmp_path / "q")]
    r = CliRunner().invoke(main, [*args, "--resume"])
    assert r.exit_code != 0 and "q.qad-checkpoint does not exist; nothing to resume" in r.output
    r = CliRunner().invoke(main, [*args[:4], "--resume"])
    assert r.exit_code != 0 and "--resume continues an interrupted QAD" in r.output
    # a checkpoint as an interrupted run leaves it: 2 of the 4 steps done
    model = tiny_llama(tie=False)
    from shrink.quant.calibration import from_file

    data = from_file(tmp_path / "text.txt", tiny_tokenizer(), model, 8, 32)
    targets = teacher_targets(model, data.samples)
    shrink.quantize(model, "int4-g32", progress=False)
    distill_quantized(model, data.samples, targets, steps=2, progress=False, say=lambda s: None,
                      checkpoint=tmp_path / "q.qad-checkpoint", every=0)
    r = CliRunner().invoke(main, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.output and not (tmp_path / "q.qad-checkpoint").exists()
    qad = json.loads((tmp_path / "q" / "shrink.json").read_text())["calibration"]["qad"]
    assert qad["steps"] == 4 and qad["resumed_from"] == 2


@pytest.mark.parametrize("fmt", ["int4-g32", "int3-g32-asym", "iq4nl-g32"])
def test_codes_train_through_a_straight_through_estimator_and_stay_on_the_grid(fmt):
    """Trainable(codes=True): the codes move (some change), each still a code of the format; what `keep`
    writes is what was trained (the same held-out KL in and out of training, the layer's weight exactly scale
    x its level); `undo` puts the codes back, byte for byte."""
    from shrink.quant.format import grid_levels
    from shrink.quant.qad import _kl
    from shrink.quant.tune import Trainable

    model = tiny_llama(tie=False)
    targets = teacher_targets(model, WINDOWS, top_k=32)
    shrink.quantize(model, fmt, backend="torch", progress=False)
    before = _codes_and_scales(model)

    def held_out():
        with torch.no_grad():
            return sum(float(_kl(model, w, t)) for w, t in zip(WINDOWS[-2:], targets[-2:]))

    trainable = Trainable(model, codes=True)
    opt = torch.optim.Adam(trainable.params(1e-3, 1e-4, 0.05))
    with trainable, torch.enable_grad():
        for i in range(30):
            trainable.weights()
            loss = _kl(model, WINDOWS[i % 14], targets[i % 14])
            opt.zero_grad()
            loss.backward()
            opt.step()
        trainable.weights()
        trained = held_out()
    saved = trainable.keep()
    assert held_out() == pytest.approx(trained, rel=1e-3)  # (the scales rounded to fp16 as they are stored)
    after = _codes_and_scales(model)
    assert any(not torch.equal(after[n][0], before[n][0]) for n in before)
    q = model.model.layers[0].mlp.down_proj
    codes = shrink.quant.packing.unpack(q.qweight, q.spec.bits, q.in_features)
    assert int(codes.max()) < (1 << q.spec.bits)
    levels = grid_levels(q.spec)
    lv = levels[codes.long()] if levels is not None else codes.float() - (
        q.zeros.float().repeat_interleave(32, 1) if q.zeros is not None else q.zero_const)
    assert torch.equal(q.dequantized_weight(), lv * q.scales.float().repeat_interleave(32, 1))
    trainable.undo(saved)
    assert all(torch.equal(_codes_and_scales(model)[n][0], before[n][0]) for n in before)


def test_qad_with_codes_is_recorded(tmp_path):
    model = tiny_llama(tie=False)
    shrink.quantize(model, "int4-g32", method=[GPTQ(), QAD(steps=4, codes_lr=0.01)], calibration=WINDOWS,
                    backend="torch", progress=False)
    qad = shrink.info(model).calibration["qad"]
    assert qad["codes_lr"] == 0.01 and qad["steps"] == 4


def test_the_recipe_and_the_cli_check_the_codes_learning_rate():
    with pytest.raises(shrink.ShrinkError, match=r"QAD\(codes_lr=1.5\): must be in \[0, 1\)"):
        QAD(steps=4, codes_lr=1.5)
    assert QAD(steps=4, codes_lr=5e-3).codes_lr == 5e-3


def test_a_tied_quantized_output_layer_is_not_trained_with_its_table():
    """An output layer sharing its quantized table's codes and scales stays as it is: training its scales for
    the products alone would change every lookup of the table."""
    model = tiny_llama(tie=True)
    targets = teacher_targets(model, WINDOWS, top_k=32)
    shrink.quantize(model, {"model.embed_tokens": "int8-g32", "*": "int4-g32"}, backend="torch", progress=False)
    table = model.model.embed_tokens.scales.clone()
    r = distill_quantized(model, WINDOWS, targets, steps=20, progress=False, say=lambda s: None)
    assert r.kept and torch.equal(model.model.embed_tokens.scales, table)
    assert model.lm_head.scales.data_ptr() == model.model.embed_tokens.scales.data_ptr()  # still one table


@pytest.mark.parametrize("fmt", ["int4-g32", "int4-g32-asym", "iq4nl-g32"])
def test_training_a_block_at_a_time_computes_the_same_steps_as_the_whole_graph(fmt):
    """blockwise=True: the levels unpacked from the codes in each forward and every block run again in the
    backward pass (its forward counted: twice a step), yet the same trained scales and norms, bit for bit."""
    model = tiny_llama(tie=False)
    targets = teacher_targets(model, WINDOWS, top_k=32)
    shrink.quantize(model, fmt, backend="torch", progress=False)
    whole, blocks = copy.deepcopy(model), copy.deepcopy(model)
    a = distill_quantized(whole, WINDOWS, targets, steps=6, progress=False, say=lambda s: None, blockwise=False)
    runs = []
    blocks.model.layers[1].mlp.register_forward_pre_hook(lambda m, a: runs.append(torch.is_grad_enabled()))
    b = distill_quantized(blocks, WINDOWS, targets, steps=6, progress=False, say=lambda s: None, blockwise=True)
    assert a.kept and b.kept and (a.blockwise, b.blockwise) == (False, True)
    assert (a.kl_before, a.kl_after) == (b.kl_before, b.kl_after)
    assert runs.count(True) == 2 * 6  # each step: the forward, and again in the backward
    sa, sb = whole.state_dict(), blocks.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert any(not torch.equal(sa[k], v) for k, v in model.state_dict().items() if k.endswith(".scales"))


def test_the_memory_decides_whole_or_a_block_at_a_time_and_refuses_what_fits_neither(monkeypatch):
    from shrink.core import memory
    from shrink.quant.qad import qad_memory

    model, targets = _quantized_with_targets()
    whole = qad_memory(model, 32, blockwise=False)
    blocks = qad_memory(model, 32, blockwise=True)
    assert blocks.total < whole.total and "whole" in whole.what and "a block at a time" in blocks.what
    # the two estimates differ by what a block at a time does not hold: every quantized weight as float levels
    levels = 4 * sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    assert whole.phases["a training step"]["the quantized weights as float32 levels"] == levels
    room = (blocks.total + whole.total) // 2 - blocks.baseline
    monkeypatch.setattr(memory, "available_memory", lambda: room)
    said = []
    r = distill_quantized(model, WINDOWS, targets, steps=2, progress=False, say=said.append)
    assert r.blockwise and "trains a block at a time: whole, it would need about" in said[0]
    assert "(quantization-aware distillation (a block at a time); at its largest, a training step" in said[1]
    monkeypatch.setattr(memory, "available_memory", lambda: 1000)
    with pytest.raises(shrink.ShrinkError, match=r"quantization-aware distillation \(a block at a time\): estimated "
                                                 r"peak memory .* more than the .* available; shorter windows"):
        distill_quantized(model, WINDOWS, targets, steps=2, progress=False, say=said.append)
    with pytest.raises(shrink.ShrinkError, match="available; without --qad-codes-lr it trains a block at a time"):
        distill_quantized(model, WINDOWS, targets, steps=2, progress=False, codes_lr=0.01)
    monkeypatch.undo()
    with pytest.raises(shrink.ShrinkError, match="holds them as float levels: it cannot train a block at a time"):
        distill_quantized(model, WINDOWS, targets, steps=2, progress=False, codes_lr=0.01, blockwise=True)


def test_the_original_outputs_streamed_from_disk_are_the_whole_models(tmp_path, monkeypatch):
    """teacher_streamed: the blocks read from the shards one at a time give the targets the model in memory
    gives (bf16 weights, computed in float32 either way)."""
    from shrink.entrypoints.streamed import quantize_streamed, teacher_streamed

    tiny_llama(tie=True).to(torch.bfloat16).save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    streamed = teacher_streamed(tmp_path / "hf", WINDOWS[:3], top_k=16)
    whole = teacher_targets(shrink.io.read_model(tmp_path / "hf").model, WINDOWS[:3], top_k=16)
    for (v, i), (w, j) in zip(streamed, whole):
        assert torch.equal(i, j) and torch.equal(v, w)
    with pytest.raises(shrink.ShrinkError, match="trains the folder it writes: give an output folder"):
        quantize_streamed(tmp_path / "hf", None, "int4-g32", method=[QAD(steps=2)], qad_data=WINDOWS, progress=False)
    with pytest.raises(shrink.ShrinkError, match="needs at least 2 windows of data"):
        quantize_streamed(tmp_path / "hf", tmp_path / "q", "int4-g32", method=[QAD(steps=2)], qad_data=WINDOWS[:1],
                          progress=False)
    assert not (tmp_path / "q").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's")
    calls = []
    monkeypatch.setattr("shrink.entrypoints.streamed.teacher_streamed", lambda *a, **k: calls.append(1))
    with pytest.raises(shrink.ShrinkError, match="mine"):  # a folder shrink did not write: refused before any work
        quantize_streamed(tmp_path / "hf", tmp_path / "mine", "int4-g32", method=[QAD(steps=2)], qad_data=WINDOWS,
                          progress=False, force=True)
    assert not calls and (tmp_path / "mine" / "notes.txt").read_text() == "a user's"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_k_quant_model_trains_a_block_at_a_time_as_it_does_whole():
    """q4k (integer group scales and minimums, super-block d and dmin trained): the lazy levels and group
    scales give the same trained superscales as the whole graph."""
    from test_kquant import llama256

    model = llama256()
    windows = list(torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(3)))
    targets = teacher_targets(model, windows, top_k=16)
    shrink.quantize(model, "q4k", backend="torch", progress=False)
    whole, blocks = copy.deepcopy(model), copy.deepcopy(model)
    a = distill_quantized(whole, windows, targets, steps=3, lr=1e-4, progress=False, say=lambda s: None, blockwise=False)
    b = distill_quantized(blocks, windows, targets, steps=3, lr=1e-4, progress=False, say=lambda s: None, blockwise=True)
    assert (a.kl_before, a.kl_after, a.kept) == (b.kl_before, b.kl_after, b.kept)
    sa, sb = whole.state_dict(), blocks.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.kept and any(not torch.equal(sa[k], v) for k, v in model.state_dict().items() if k.endswith(".superscales"))
