import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama, tiny_tokenizer, word_text
from safetensors.torch import load_file

from shrink.core.errors import ShrinkError
from shrink.distillation import (
    DistillConfig,
    from_tensors,
    pack_text,
    parameter_count,
    soft_target_loss,
    student_from_spec,
    student_from_teacher,
    topk_soft_target_loss,
    train_student,
)
from shrink.distillation.losses import distillation_loss, hidden_state_loss

WORKER = str(Path(__file__).parent / "distill_worker.py")
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}


def test_soft_target_loss_matches_torch_kl_div():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 11, generator=g), torch.randn(7, 11, generator=g) * 3
    for T in (1.0, 2.0, 5.0):
        ref = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean") * T * T
        assert soft_target_loss(s, t, T).item() == pytest.approx(ref.item(), rel=1e-5)
    # top-k with k = all classes is the full loss; with fewer, the teacher is renormalised over its top k
    vals, idx = t.topk(11, -1)
    assert topk_soft_target_loss(s, vals, idx, 2.0).item() == pytest.approx(soft_target_loss(s, t, 2.0).item(), rel=1e-5)
    vals, idx = t.topk(3, -1)
    masked = torch.full_like(t, -1e9).scatter(-1, idx, vals)
    p = F.softmax(masked / 2, -1)
    ref = (p * (torch.log(p.clamp_min(1e-30)) - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    assert topk_soft_target_loss(s, vals, idx, 2.0).item() == pytest.approx(ref.item(), rel=1e-4)


def test_distillation_loss_mixes_soft_and_hard():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 9, generator=g), torch.randn(2, 5, 9, generator=g)
    y = torch.randint(0, 9, (2, 5), generator=g)
    y[0, 0] = -100  # ignored position: neither loss sees it
    loss, parts = distillation_loss(s, t, y, temperature=2.0, alpha=0.3)
    keep = y != -100
    soft = soft_target_loss(s[keep], t[keep], 2.0)
    hard = F.cross_entropy(s[keep], y[keep])
    assert loss.item() == pytest.approx(0.3 * soft.item() + 0.7 * hard.item(), rel=1e-5)
    assert parts == pytest.approx({"soft": soft.item(), "hard": hard.item()}, rel=1e-5)
    with pytest.raises(ValueError, match="needs hard labels"):
        distillation_loss(s, t, None, alpha=0.5)
    h = torch.randn(2, 5, 8)
    assert hidden_state_loss(h, h, "cosine").item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        hidden_state_loss(h, torch.randn(2, 5, 4))


def test_student_from_teacher():
    t = tiny_llama()
    ids = torch.randint(3, 90, (1, 12))
    same, idx = student_from_teacher(t, [0, 1])
    assert idx == [0, 1]
    with torch.no_grad():
        assert torch.allclose(same(ids).logits, t(ids).logits, atol=1e-5)
    half, idx = student_from_teacher(t, "every-other", intermediate_size=48)
    assert idx == [0] and half.config.num_hidden_layers == 1
    assert half.model.layers[0].mlp.up_proj.weight.shape == (48, 64)
    assert parameter_count(half) < parameter_count(t)
    # the kept layer's attention is the teacher's layer 0, unchanged
    assert torch.equal(half.model.layers[0].self_attn.q_proj.weight, t.model.layers[0].self_attn.q_proj.weight)
    assert half.lm_head.weight is half.model.embed_tokens.weight  # still tied
    with pytest.raises(ShrinkError, match="the teacher has 2 layers"):
        student_from_teacher(t, 5)
    with pytest.raises(ShrinkError, match="needs a Hugging Face transformer"):
        student_from_teacher(torch.nn.Linear(2, 2))


def test_student_specs():
    assert student_from_spec("mlp:784-128-10")(torch.zeros(3, 784)).shape == (3, 10)
    assert student_from_spec("cnn:1x28x28-8-16-10")(torch.zeros(2, 784)).shape == (2, 10)
    for bad in ("mlp:784", "mlp:784-0-10", "rnn:1-2", "cnn:28x28-8-10"):
        with pytest.raises(ShrinkError, match="student spec"):
            student_from_spec(bad)


def test_distilled_student_learns_from_teacher_on_a_language_model(tmp_path):
    tok = tiny_tokenizer()
    teacher = tiny_llama(seed=1)
    data = pack_text([word_text(600, seed=3)], tok, seq_len=32, eval_fraction=0.1)
    student, idx = student_from_teacher(teacher, [1])
    before = train_student(teacher, student, data, DistillConfig(steps=1, batch_size=4, lr=1e-9), progress=False).best["kl"]
    cfg = DistillConfig(steps=40, batch_size=4, eval_every=20, checkpoint_every=20, lr=3e-3, alpha=0.9,
                        hidden_weight=0.5, hidden_loss="cosine")
    res = train_student(teacher, student, data, cfg, out=tmp_path / "run", layer_map={1: 2}, progress=False)
    assert res.steps == 40 and [h["step"] for h in res.history] == [20, 40]
    assert res.best["kl"] < 0.7 * before
    assert "hidden" in res.history[-1] and "perplexity" in res.history[-1]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["steps"] == 40 and saved["best"]["step"] in (20, 40)
    assert (tmp_path / "run" / "best" / "student.safetensors").is_file()


def _final_weights(out):
    return load_file(str(Path(out) / "checkpoint" / "student.safetensors"))


def _step(out):
    try:
        return torch.load(Path(out) / "checkpoint" / "state.pt", weights_only=True)["step"]
    except Exception:
        return 0


@pytest.mark.slow  # a subprocess or a browser
def test_killed_run_resumes_to_the_same_result(tmp_path):
    steps = "600"
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, WORKER, str(ref), steps, "32"], check=True, env=ENV, timeout=600)
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, WORKER, str(run), steps, "32"], env=ENV)
    deadline = time.time() + 300
    while _step(run) < 100 and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    from shrink.core.ownership import restore_interrupted_swap

    restore_interrupted_swap(run / "checkpoint")  # as the resume does: a kill may land mid-replacement
    killed_at = _step(run)
    assert 100 <= killed_at < 600
    subprocess.run([sys.executable, WORKER, str(run), steps, "32", "--resume"], check=True, env=ENV, timeout=600)
    got, want = _final_weights(run), _final_weights(ref)
    assert json.loads((run / "results.json").read_text())["resumed_from"] == killed_at
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6), k


def test_resume_refuses_other_data_or_options(tmp_path):
    from distill_worker import setup

    teacher, student, data = setup()
    train_student(teacher, student, data, DistillConfig(steps=5, checkpoint_every=5), out=tmp_path, progress=False)
    with pytest.raises(ShrinkError, match="different options \\['lr'\\]"):
        train_student(teacher, student, data, DistillConfig(steps=5, checkpoint_every=5, lr=0.5), out=tmp_path, resume=True)
    other = from_tensors(data.train_x[:100], data.train_y[:100])
    with pytest.raises(ShrinkError, match="trained on other data"):
        train_student(teacher, student, other, DistillConfig(steps=5, checkpoint_every=5), out=tmp_path, resume=True)
    with pytest.raises(ShrinkError, match="nothing to resume"):
        train_student(teacher, student, data, DistillConfig(), out=tmp_path / "none", resume=True)


@pytest.mark.slow  # a subprocess or a browser
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # no dropout here: one process and two draw their dropout masks from different streams
    subprocess.run([sys.executable, WORKER, str(one), "60", "32", "--no-dropout"], check=True, env=ENV, timeout=600)
    import socket

    with socket.socket() as sock:  # a free local port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                    "--master_port", port,
                    WORKER, str(two), "60", "16", "--no-dropout"], check=True, env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=600)
    a, b = _final_weights(one), _final_weights(two)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    assert json.loads((two / "results.json").read_text())["world_size"] == 2


def test_cli_distill_language_model(tmp_path):
    from click.testing import CliRunner

    import shrink
    from shrink.cli import main

    teacher = tmp_path / "teacher"
    tiny_llama(seed=2, tie=False).save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    text = tmp_path / "text.txt"
    text.write_text(word_text(900, seed=4))
    out = tmp_path / "student"
    args = ["distill", "--teacher", str(teacher), "--student", "layers=1", "--data", str(text), "--out", str(out),
            "--steps", "12", "--batch-size", "4", "--seq-len", "32", "--eval-every", "6", "--checkpoint-every", "6",
            "--intermediate-size", "64", "--hidden-weight", "0.1", "--layer-fit-steps", "6", "--layer-fit-lr", "0.003"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "teacher" in r.output and "student layers=1" in r.output and "perplexity" in r.output
    student = shrink.io.read_model(out / "model")
    assert student.model.config.num_hidden_layers == 1 and student.model.config.intermediate_size == 64
    assert student.tokenizer is not None
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 12 and len(res["history"]) == 2
    assert "layer_fit" in res["history"][0] and "layer_fit" not in res["history"][1]  # fitted, then distilled
    # distill, then quantize: the student folder is a normal model
    r = CliRunner().invoke(main, ["quantize", str(out / "model"), "--format", "int4-g32", "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    # resuming a finished run does nothing more and keeps the result
    r = CliRunner().invoke(main, args + ["--resume"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "results.json").read_text())["resumed_from"] == 12


def test_a_distilled_student_says_where_it_came_from_when_saved(tmp_path):
    import shrink

    teacher = tiny_llama(seed=2, tie=False)
    text = tmp_path / "text.txt"
    text.write_text(word_text(600, seed=4))
    student, result = shrink.distill(teacher, "layers=1", text, tokenizer=tiny_tokenizer(), steps=2, batch_size=4,
                                     eval_every=2, seq_len=32, progress=False)
    assert result.steps == 2
    source = shrink.info(student).source
    assert source["kind"] == "distilled" and source["teacher"] == "LlamaForCausalLM"
    assert source["student"]["teacher_layers"] == [0]
    shrink.quantize(student, "int8", progress=False)
    shrink.save(student, tmp_path / "q", tokenizer=tiny_tokenizer())
    assert json.loads((tmp_path / "q" / "shrink.json").read_text())["source"] == source


def test_cli_distill_classifier_and_errors(tmp_path):
    import numpy as np
    from click.testing import CliRunner

    import shrink
    from shrink.cli import main

    g = np.random.default_rng(0)
    x = g.normal(size=(300, 12)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    base = ["--data", str(tmp_path / "d.npz"), "--steps", "20", "--batch-size", "16", "--eval-every", "10"]
    np.savez(tmp_path / "task.npz", x=x[:40], y=(x[:40, 0] > 0).astype(np.int64))
    r = CliRunner().invoke(main, ["distill", "--teacher", "none", "--student", "mlp:12-32-2", "--out", str(tmp_path / "t")] + base)
    assert r.exit_code == 0, r.output
    teacher = shrink.io.read_model(tmp_path / "t" / "model")
    assert teacher.source["spec"] == "mlp:12-32-2"
    r = CliRunner().invoke(main, ["distill", "--teacher", str(tmp_path / "t" / "model"), "--student", "mlp:12-4-2",
                                  "--out", str(tmp_path / "s"), "--cache-topk", "2", "--task", str(tmp_path / "task.npz")] + base)
    assert r.exit_code == 0, r.output
    hist = json.loads((tmp_path / "s" / "results.json").read_text())["history"]
    assert [h["task"]["teacher"] for h in hist] == [hist[0]["task"]["teacher"]] * 2  # the teacher does not change
    assert "on the task at the last evaluation" in r.output
    assert "teacher_accuracy" in r.output
    r = CliRunner().invoke(main, ["distill", "--teacher", str(tmp_path / "t" / "model"), "--student", "every-other",
                                  "--out", str(tmp_path / "x")] + base)
    assert r.exit_code == 1 and "needs a Hugging Face transformer" in r.output
    r = CliRunner().invoke(main, ["distill", "--teacher", "none", "--student", "mlp:12-x-2", "--out", str(tmp_path / "y")] + base)
    assert r.exit_code == 1 and "student spec 'mlp:12-x-2'" in r.output


def test_teacher_topk_cache(tmp_path):
    from distill_worker import setup

    from shrink.distillation import teacher_topk

    teacher, student, data = setup(0.0)
    v, i = teacher_topk(teacher, data, k=6, cache_dir=tmp_path)
    with torch.no_grad():
        ref = teacher(data.train_x).topk(6, -1)
    assert torch.allclose(v.float(), ref.values, atol=1e-2) and torch.equal(i.long(), ref.indices)
    files = list(tmp_path.glob("teacher-*/topk.safetensors"))
    assert len(files) == 1
    # reused when teacher, data and k match: a changed file on disk is what comes back
    t = load_file(str(files[0]))
    t["values"] = t["values"] * 0
    from safetensors.torch import save_file
    save_file(t, str(files[0]))
    assert float(teacher_topk(teacher, data, k=6, cache_dir=tmp_path)[0].abs().sum()) == 0
    with torch.no_grad():
        teacher[1].weight.add_(0.01)  # another teacher: another cache file
    teacher_topk(teacher, data, k=6, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("teacher-*/topk.safetensors"))) == 2
    # training from the cache with all classes kept equals training with the live teacher
    torch.manual_seed(0)
    s1, s2 = student_from_spec("mlp:32-16-6"), None
    s2 = student_from_spec("mlp:32-16-6")
    s2.load_state_dict(s1.state_dict())
    cfg = DistillConfig(steps=15, batch_size=32, eval_every=100)
    full = teacher_topk(teacher, data, k=6)
    train_student(teacher, s1, data, cfg, progress=False)
    train_student(teacher, s2, data, cfg, progress=False, teacher_cache=(full[0].float(), full[1]))
    for a, b in zip(s1.parameters(), s2.parameters()):
        assert torch.allclose(a, b, atol=2e-3)


def test_augment_is_applied_to_every_training_batch():
    from distill_worker import setup

    teacher, student, data = setup(0.0)
    seen = []

    def zero(x):
        seen.append(x.shape[0])
        return torch.zeros_like(x)

    w0 = student[1].weight.detach().clone()
    train_student(teacher, student, data, DistillConfig(steps=6, batch_size=16, grad_accum=2, eval_every=6, weight_decay=0.0),
            augment=zero, progress=False)
    assert seen == [16] * 12
    # the first layer saw only zeros, so it got no gradient at all
    assert torch.equal(student[1].weight, w0)
    with pytest.raises(ShrinkError, match="cannot be used with augmentation"):
        train_student(teacher, student, data, DistillConfig(steps=1), augment=zero, teacher_cache=(torch.zeros(1), torch.zeros(1)))


def test_bad_input_is_refused_before_training(tmp_path):
    from distill_worker import setup

    teacher, student, data = setup(0.0)
    with pytest.raises(ShrinkError, match=r"temperature must be > 0 \(got 0\)"):
        train_student(teacher, student, data, DistillConfig(temperature=0))
    with pytest.raises(ShrinkError, match="alpha must be between 0 and 1"):
        train_student(teacher, student, data, DistillConfig(alpha=1.5))
    with pytest.raises(ShrinkError, match=r"outputs \(1, 3\) do not match the teacher's \(1, 6\) \(different classes: 3 vs 6\)"):
        train_student(teacher, student_from_spec("mlp:32-8-3"), data, DistillConfig())
    small = from_tensors(data.train_x[:20], data.train_y[:20])
    with pytest.raises(ShrinkError, match="fewer than one global batch"):
        train_student(teacher, student, small, DistillConfig(batch_size=64))
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ShrinkError, match="state.pt: not a readable shrink checkpoint"):
        train_student(teacher, student, data, DistillConfig(), out=tmp_path, resume=True)
    torch.save({"step": 3}, tmp_path / "checkpoint" / "state.pt")
    with pytest.raises(ShrinkError, match="not a shrink distillation checkpoint"):
        train_student(teacher, student, data, DistillConfig(), out=tmp_path, resume=True)
    assert all(p.grad is None for p in student.parameters())  # nothing trained


def test_hidden_layer_map_matches_the_end_of_each_span():
    from shrink.distillation import hidden_layer_map

    assert hidden_layer_map(list(range(0, 30, 2)), 30) == {j + 1: 2 * j + 2 for j in range(15)}
    assert hidden_layer_map([0, 3, 6], 8) == {1: 3, 2: 6, 3: 8}


def test_teacher_states_are_the_residual_stream_between_layers():
    from shrink.distillation.layerfit import teacher_states

    teacher = tiny_llama(seed=4)
    x = torch.randint(3, 90, (2, 16))
    states, args, kwargs = teacher_states(teacher, x, 2)
    with torch.no_grad():
        hf = teacher(x, output_hidden_states=True).hidden_states
    assert len(states) == 3
    for i in range(2):
        assert torch.allclose(states[i], hf[i], atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(teacher.model.norm(states[2]), hf[2], atol=1e-5)  # the last is before the final norm
    first, _, _ = teacher_states(teacher, x, 1)  # stops after layer 0
    assert len(first) == 2 and torch.allclose(first[1], hf[1], atol=1e-6)


def test_layer_fit_loss_is_zero_for_the_teacher_itself_and_spans():
    from shrink.distillation.layerfit import layer_fit_loss, spans

    teacher = tiny_llama(seed=4)
    same, idx = student_from_teacher(teacher, [0, 1])
    x = torch.randint(3, 90, (2, 16))
    assert float(layer_fit_loss(teacher, same, x, [(0, 1), (1, 2)]).detach()) < 1e-10
    half, _ = student_from_teacher(teacher, [0])
    assert float(layer_fit_loss(teacher, half, x, [(0, 2)]).detach()) > 0.05
    assert spans({1: 2, 2: 4, 3: 5}) == [(0, 2), (2, 4), (4, 5)]
    with pytest.raises(ShrinkError, match="at least one teacher layer"):
        spans({1: 2, 2: 2})
    with pytest.raises(ShrinkError, match="every student layer"):
        spans({2: 4})


def test_layer_fitting_before_distillation(tmp_path):
    # 3 teacher layers into 1: layer fitting moves only the student's layer, lowers its span error,
    # and leaves the student closer to the teacher than it started.
    from transformers import LlamaConfig, LlamaForCausalLM

    from shrink.distillation.layerfit import layer_fit_loss

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    teacher = LlamaForCausalLM(cfg).eval()
    tok = tiny_tokenizer()
    data = pack_text([word_text(600, seed=3)], tok, seq_len=32, eval_fraction=0.1)
    student, idx = student_from_teacher(teacher, [0])
    x = data.eval_x[:4]
    fit_before = float(layer_fit_loss(teacher, student, x, [(0, 3)]).detach())
    kl_before = train_student(teacher, student, data, DistillConfig(steps=1, batch_size=4, lr=1e-9), progress=False).best["kl"]
    emb = student.model.embed_tokens.weight.detach().clone()
    run = DistillConfig(steps=30, layer_fit_steps=30, batch_size=4, lr=3e-3, eval_every=30, checkpoint_every=30)
    res = train_student(teacher, student, data, run, out=tmp_path / "fit", layer_map={1: 3}, progress=False)
    assert "layer_fit" in res.history[-1]
    assert torch.equal(student.model.embed_tokens.weight, emb)  # only the layer learns in this stage
    assert float(layer_fit_loss(teacher, student, x, [(0, 3)]).detach()) < 0.7 * fit_before
    assert res.best["kl"] < kl_before
    with pytest.raises(ShrinkError, match="layer fitting needs a teacher"):
        train_student(teacher, student, data, DistillConfig(steps=2, layer_fit_steps=1), progress=False)
    with pytest.raises(ShrinkError, match=r"layer_fit_steps must be between 0 and steps \(2\), got 3"):
        train_student(teacher, student, data, DistillConfig(steps=2, layer_fit_steps=3), layer_map={1: 3}, progress=False)


def test_layer_fitting_has_its_own_learning_rate_schedule():
    from shrink.distillation.train import _schedule

    f = _schedule(DistillConfig(steps=100, layer_fit_steps=20, lr=1e-3, layer_fit_lr=4e-3, warmup=0.1))
    # fit stage: 2 warmup steps to 4x the main rate, cosine to ~0 at step 19; main stage: 8 warmup steps to 1x
    assert [f(0), f(1)] == [2.0, 4.0] and f(19) < 0.05
    assert f(20) == pytest.approx(1 / 8) and f(27) == pytest.approx(1.0) and f(99) < 1e-3
    plain = _schedule(DistillConfig(steps=100, lr=1e-3, warmup=0.1))
    assert plain(0) == pytest.approx(0.1) and plain(9) == pytest.approx(1.0)


def _four_blocks_two_idle(seed: int = 0):
    """A 4-layer Llama whose blocks 1 and 2 write nothing to the residual stream (attention and MLP outputs 0)."""
    from helpers import widen
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = widen(LlamaForCausalLM(cfg))
    with torch.no_grad():
        for i in (1, 2):
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    return model


def test_block_importance_is_one_minus_the_cosine_of_each_blocks_output_with_its_input():
    from shrink.distillation import block_importance, most_important

    model = _four_blocks_two_idle()
    rows = torch.randint(3, 96, (3, 16), generator=torch.Generator().manual_seed(1))
    got = block_importance(model, rows)
    # reference: transformers' hidden states, the input of block i at i (the last entry is after the final norm)
    want = [0.0] * 3
    with torch.no_grad():
        for r in rows:
            hs = model(r.reshape(1, -1), output_hidden_states=True).hidden_states
            for i in range(3):
                want[i] += float((1 - F.cosine_similarity(hs[i][0], hs[i + 1][0], dim=-1)).sum()) / (3 * 16)
    assert got[:3] == pytest.approx(want, abs=1e-5)
    assert got[1] < 1e-6 and got[2] < 1e-6 and got[0] > 0.01 and got[3] > 0.01  # the idle blocks change nothing
    assert most_important(got, 2) == [0, 3]
    with pytest.raises(ShrinkError, match="student layers 5: the teacher has 4 layers"):
        most_important(got, 5)


def test_a_student_of_the_blocks_that_matter_most_is_chosen_on_the_data_and_recorded(tmp_path):
    from click.testing import CliRunner

    from shrink.cli import main
    from shrink.entrypoints.distill import build_student

    teacher = tmp_path / "teacher"
    _four_blocks_two_idle().save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    text = tmp_path / "text.txt"
    text.write_text(word_text(900, seed=4))
    out = tmp_path / "student"
    r = CliRunner().invoke(main, ["distill", "--teacher", str(teacher), "--student", "layers=2:importance", "--data",
                                  str(text), "--out", str(out), "--steps", "2", "--batch-size", "4", "--seq-len", "32",
                                  "--eval-every", "2"])
    assert r.exit_code == 0, r.output
    assert "block importance (1 - cosine of each block's output with its input): 0: " in r.output
    assert "kept [0, 3]" in r.output
    record = json.loads((out / "results.json").read_text())["student"]
    assert record["teacher_layers"] == [0, 3] and len(record["importance"]) == 4
    for spec, needle in [("layers=two:importance", "choosing blocks by importance takes a count"),
                         ("layers=9:importance", "student layers 9: the teacher has 4 layers")]:
        r = CliRunner().invoke(main, ["distill", "--teacher", str(teacher), "--student", spec, "--data", str(text),
                                      "--out", str(tmp_path / "other"), "--steps", "2", "--seq-len", "32"])
        assert r.exit_code != 0 and needle in r.output, r.output
    with pytest.raises(ShrinkError, match="needs a language model's text data"):
        build_student("layers=2:importance", _four_blocks_two_idle())


def test_mlp_channels_kept_by_their_activations_on_the_data():
    """Channels whose up projection is zero never reach the down projection, however large their other
    weights: kept by activation (layers=N:importance with an intermediate size), the narrower student computes
    exactly what the teacher does; kept by weight norms, it keeps the large dead channels and does not."""
    from helpers import tiny_llama

    from shrink.distillation import channel_importance
    from shrink.entrypoints.distill import build_student

    teacher = tiny_llama(tie=False)
    dead = torch.arange(0, 128, 4)  # 32 of the 128 channels
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.mlp.up_proj.weight[dead] = 0
            layer.mlp.gate_proj.weight[dead] *= 10
            layer.mlp.down_proj.weight[:, dead] *= 10
    rows = torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    scores = channel_importance(teacher, rows)
    assert sorted(scores) == [0, 1] and all(float(v[dead].abs().max()) == 0 for v in scores.values())
    assert all(bool((v[[i for i in range(128) if i % 4]] > 0).all()) for v in scores.values())
    data = from_tensors(rows, torch.zeros(4, dtype=torch.long), eval_fraction=0.25)
    data.kind = "text"
    measured, record = build_student("layers=2:importance", teacher, intermediate_size=96, data=data)
    by_norm, _ = build_student("layers=2", teacher, intermediate_size=96)
    assert record["channels"] == "activation magnitude" and measured.config.intermediate_size == 96
    with torch.no_grad():
        want = teacher(rows).logits
        torch.testing.assert_close(measured(rows).logits, want, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(by_norm(rows).logits, want, atol=1e-2)


def test_divergences_against_their_definitions():
    """forward KL(p || q), reverse KL(q || p) and the generalized JSD, from torch's kl_div and the mixture
    written out; zero where the distributions agree; JSD at beta 0.5 symmetric and at most log 2."""
    from shrink.distillation.losses import divergence, soft_target_loss, topk_soft_target_loss

    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(5, 7, 11, generator=g) * 3, torch.randn(5, 7, 11, generator=g) * 3
    lp, lq = F.log_softmax(t, -1), F.log_softmax(s, -1)
    torch.testing.assert_close(divergence(lp, lq, "forward"), F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1))
    torch.testing.assert_close(divergence(lp, lq, "reverse"), F.kl_div(lp, lq, log_target=True, reduction="none").sum(-1))
    p, q = lp.exp(), lq.exp()
    for beta in (0.5, 0.1):
        m = beta * p + (1 - beta) * q
        want = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
        torch.testing.assert_close(divergence(lp, lq, "jsd", beta), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(divergence(lp, lq, "jsd"), divergence(lq, lp, "jsd"))
    assert float(divergence(lp, lq, "jsd").max()) <= math.log(2) + 1e-6
    for kind in ("forward", "reverse", "jsd"):
        assert float(divergence(lp, lp, kind).abs().max()) < 1e-6
        # the loss: T^2 times the mean over positions of the softened distributions' divergence
        want = divergence(F.log_softmax(t / 2, -1), F.log_softmax(s / 2, -1), kind).mean() * 4
        torch.testing.assert_close(soft_target_loss(s, t, 2.0, kind=kind), want)
    # a cached top-k teacher: reverse KL over its k tokens, the student renormalised there
    values, ids = t.topk(4, -1)
    got = topk_soft_target_loss(s, values, ids, temperature=1.0, kind="reverse")
    want = divergence(F.log_softmax(values, -1), F.log_softmax(s.gather(-1, ids), -1), "reverse").mean()
    torch.testing.assert_close(got, want)
    with pytest.raises(ShrinkError, match="divergence 'kl2': expected one of forward, reverse, jsd"):
        divergence(lp, lq, "kl2")


@pytest.mark.parametrize("kind", ["reverse", "jsd"])
def test_a_student_distills_under_the_other_divergences(kind, tmp_path):
    teacher = tiny_llama(seed=2, tie=False)
    data = pack_text([word_text(900, seed=4)], tiny_tokenizer(), seq_len=32)
    student, _ = student_from_teacher(teacher, "every-other")
    before = train_student(teacher, student, data, DistillConfig(steps=1, lr=1e-9, eval_every=1, divergence=kind),
                           progress=False).history[-1]["kl"]
    r = train_student(teacher, student, data, DistillConfig(steps=30, alpha=1.0, lr=3e-3, eval_every=30,
                                                            divergence=kind, batch_size=4), progress=False)
    assert r.history[-1]["kl"] < before  # the held-out KL to the teacher goes down
    with pytest.raises(ShrinkError, match="divergence must be one of forward, reverse, jsd"):
        train_student(teacher, student, data, DistillConfig(steps=1, divergence="kl2"), progress=False)
