"""shrink under hostile and careless input, through the command line in subprocesses: no user file is
touched, no code from a model folder runs, nothing wrong loads, bad options and fields are refused in one
line before any work, two writers on one folder are safe, and a killed save is cleaned up.

Each case asserts the exit code, a last line that names the file or option and field, no traceback, and
that no output folder appeared (or that the one there is unchanged)."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import tiny_llama, tiny_tokenizer, word_text

import shrink
from shrink.cli import main

pytestmark = pytest.mark.slow  # subprocesses, real models or builds: run by CI, not the fast loop


def run(*args, stdin="y\ny\ny\n", cwd=None):
    """The CLI in a subprocess, answering 'y' to any question it would (wrongly) ask on stdin."""
    return subprocess.run([sys.executable, "-m", "shrink.cli", *map(str, args)], input=stdin, capture_output=True,
                          text=True, cwd=cwd, timeout=300)


class _InProcess:
    """A CliRunner result read like a CompletedProcess; an exception other than SystemExit is a traceback."""

    def __init__(self, r):
        self.returncode, self.stdout, self.stderr = r.exit_code, r.output, r.output
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            import traceback

            self.stderr += "Traceback\n" + "".join(traceback.format_exception(r.exception))


def cli(*args):
    """The CLI in this process (for cases that fail in option parsing or before any model loads)."""
    return _InProcess(CliRunner().invoke(main, [str(a) for a in args]))


def refused(r, *needles, code=1):
    """Exit `code`, no traceback, and the last line of stderr holds every needle."""
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in last, f"{n!r} not in {last!r}"
    return last


def tree(path):
    """{relative path: bytes} of every file under `path` (what must stay untouched)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def q(tmp_path_factory, hf):
    """A shrink folder of the tiny model (int4-g32), written by the CLI."""
    path = tmp_path_factory.mktemp("q") / "q"
    r = run("quantize", hf, "-f", "int4-g32", "-o", path)
    assert r.returncode == 0, r.stderr
    return path


def copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---- 1. no user file is ever deleted or overwritten ----------------------------------------------

def test_quantize_never_replaces_a_folder_it_did_not_write(tmp_path, hf):
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / "shrink.json").write_text("{}")
    (proj / "thesis.tex").write_text("x")
    before = tree(proj)
    for extra in ([], ["--force"]):
        refused(run("quantize", hf, "-f", "int8", "--out", proj, *extra), str(proj), "not empty", "choose another --out")
        assert tree(proj) == before and (proj / "data").is_dir()


def test_a_user_file_in_a_shrink_folder_makes_it_the_users(tmp_path, hf, q):
    mine = copy(q, tmp_path / "mine")
    (mine / "NOTES.md").write_text("my notes")
    before = tree(mine)
    refused(run("quantize", hf, "-f", "int8", "--out", mine, "--force"), "is not a folder shrink wrote exactly as it is")
    assert tree(mine) == before
    # shrink's own folder: refused without --force, replaced with it
    own = copy(q, tmp_path / "own")
    refused(run("quantize", hf, "-f", "int8", "--out", own), "holds a model shrink saved earlier", "--force")
    r = run("quantize", hf, "-f", "int8", "--out", own, "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads((own / "results.json").read_text())["format"] == "int8"
    assert shrink.io.is_own_folder(own)  # results.json is listed in shrink.json with the rest


def test_distill_compare_search_refuse_other_folders_before_any_work(tmp_path, hf, q):
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text('{"mine": true}')
    (other / "model").mkdir()
    (other / "model" / "keep.txt").write_text("keep")
    before = tree(other)
    text = tmp_path / "text.txt"
    text.write_text(word_text(400))
    refused(run("distill", "--teacher", hf, "--student", "layers=1", "--data", text, "--steps", "2", "--out", other),
            str(other), "was not written by shrink distill")
    refused(run("compare", hf, q, "--out", other), str(other), "was not written by shrink compare")
    refused(run("search", hf, "--out", other), str(other), "was not written by shrink search")
    refused(run("search", hf, "--out", other, "--resume"), str(other), "was not written by shrink search")
    assert tree(other) == before
    # compare into a quantized folder would overwrite its results.json
    qq = copy(q, tmp_path / "qq")
    before = tree(qq)
    refused(run("compare", hf, qq, "--out", qq), "was not written by shrink compare")
    assert tree(qq) == before


def test_an_unusable_out_is_refused_before_the_model_loads(tmp_path):
    # /proc cannot hold folders, even for root; the model does not exist: the folder is checked first
    for cmd in (["quantize", tmp_path / "no-model"], ["compare", tmp_path / "a", tmp_path / "b"],
                ["search", tmp_path / "no-model"]):
        refused(run(*cmd, "--out", "/proc/shrink-out/x"), "/proc", "cannot")


def _distilled(tmp_path, hf):
    """A finished two-step distillation in tmp_path/d, and the command line that made it."""
    text = tmp_path / "text.txt"
    text.write_text(word_text(400))
    out = tmp_path / "d"
    args = ["distill", "--teacher", hf, "--student", "layers=1", "--data", text, "--steps", "2", "--seq-len", "16",
            "--batch-size", "2", "--eval-every", "1", "--out", out]
    assert run(*args).returncode == 0
    return out, args


def test_force_restarts_shrinks_own_search_and_distill_folders(tmp_path, hf):
    out, args = _distilled(tmp_path, hf)
    assert sorted(p.name for p in out.iterdir()) == [".shrink-out.json", "best", "checkpoint", "model", "results.json"]
    refused(run(*args), "holds the output of an earlier shrink distill", "--resume", "--force")
    refused(run(*args, "--resume", "--force"), "give one of them")
    r = run(*args, "--force")
    assert r.returncode == 0, r.stderr
    refused(run("compare", hf, hf, "--out", out), "holds the output of shrink distill, not of shrink compare")


def test_a_user_file_at_any_depth_keeps_the_folder(tmp_path, hf):
    out, args = _distilled(tmp_path, hf)
    (out / "model" / "my-notes.txt").write_text("mine")
    (out / "checkpoint" / "empty-dir-of-mine").mkdir()
    before = tree(out)
    for extra in (["--force"], ["--resume"]):
        refused(run(*args, *extra), str(out / "checkpoint" / "empty-dir-of-mine"), "did not write")
        assert tree(out) == before and (out / "checkpoint" / "empty-dir-of-mine").is_dir()
    (out / "checkpoint" / "empty-dir-of-mine").rmdir()
    refused(run(*args, "--force"), str(out / "model" / "my-notes.txt"), "did not write")
    assert (out / "model" / "my-notes.txt").read_text() == "mine"
    (out / "model" / "my-notes.txt").unlink()
    assert run(*args, "--force").returncode == 0  # shrink's own, as it wrote it: replaced


def test_search_never_replaces_a_best_folder_holding_a_user_file(tmp_path):
    # best/ and students/ as the search writes them (atomic_dir seals what it puts in place)
    from shrink.core.atomic import atomic_dir
    from shrink.core.errors import ShrinkError
    from shrink.core.outdir import claim
    from shrink.entrypoints.search.run import OUT_NAMES

    out = tmp_path / "s"
    with claim(out, "search", OUT_NAMES):
        with atomic_dir(out / "best") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 10)
            (tmp / "sub").mkdir()
        with claim(out / "students" / "layers=1", "distill", ("model", "results.json")):
            (out / "students" / "layers=1" / "results.json").write_text("{}")
    for where in (out / "best" / "mine.txt", out / "best" / "sub" / "mine.txt", out / "students" / "mine.txt",
                  out / "students" / "layers=1" / "mine.txt"):
        where.write_text("mine")
        for force, resume in ((True, None), (False, True)):
            with pytest.raises(ShrinkError, match=str(where)):
                with claim(out, "search", OUT_NAMES, force=force, resume=resume):
                    pass
        # and the promotion of a new best during a run (a resume) refuses to move it aside
        if where.parent == out / "best":
            with pytest.raises(ShrinkError, match="never replaced"):
                with atomic_dir(out / "best") as tmp:
                    (tmp / "model.safetensors").write_bytes(b"y")
        assert where.read_text() == "mine"
        where.unlink()
    (out / "best" / "model.safetensors").write_bytes(b"changed by hand")
    with pytest.raises(ShrinkError, match="model.safetensors"):
        with claim(out, "search", OUT_NAMES, force=True):
            pass
    (out / "best" / "model.safetensors").write_bytes(b"x" * 10)
    with claim(out, "search", OUT_NAMES, force=True):
        assert sorted(p.name for p in out.iterdir()) == [".shrink-out.json"]


def test_a_failed_resume_of_a_user_folder_leaves_no_marker(tmp_path, hf):
    # a folder of the user's that holds only names a search writes (results.jsonl, report.md)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.jsonl").write_text("my own log\n")
    (out / "report.md").write_text("my report")
    before = tree(out)
    r = run("search", hf, "--out", out, "--resume")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert tree(out) == before and not (out / ".shrink-out.json").exists()
    refused(run("search", hf, "--out", out, "--force"), "was not written by shrink search")
    assert tree(out) == before


def test_the_lock_never_follows_a_link_nor_overwrites_a_file(tmp_path, hf):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (tmp_path / ".q.lock").symlink_to(precious)
    refused(run("quantize", hf, "-f", "int8", "--out", tmp_path / "q"), ".q.lock", "symbolic link")
    assert precious.read_text() == "keep me" and not (tmp_path / "q").exists()
    (tmp_path / ".q.lock").unlink()
    (tmp_path / ".q.lock").write_text("a file of mine")
    refused(run("quantize", hf, "-f", "int8", "--out", tmp_path / "q"), ".q.lock", "not a lock file")
    assert (tmp_path / ".q.lock").read_text() == "a file of mine"


def test_only_temporaries_shrink_made_are_removed(tmp_path, hf, q):
    # named like shrink's temporaries (a process that is gone), but not made by shrink: never removed,
    # neither when the command then refuses nor when it succeeds
    dead = 2 ** 22 + 12345
    look_alike = [tmp_path / f".q.{dead}.abcd1234.tmp", tmp_path / f".q.{dead}.efgh5678.old"]
    look_alike[0].write_text("a file of mine")
    look_alike[1].mkdir()
    (look_alike[1] / "x").mkdir()
    (look_alike[1] / "x" / "data.bin").write_text("mine")
    before = tree(tmp_path)
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "thesis.tex").write_text("x")
    refused(run("quantize", hf, "-f", "int8", "--out", tmp_path / "q"), "not empty")
    (tmp_path / "q" / "thesis.tex").unlink()
    (tmp_path / "q").rmdir()
    assert run("quantize", hf, "-f", "int8", "--out", tmp_path / "q").returncode == 0
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("q/")} == before


def test_quantize_force_keeps_an_empty_folder_of_the_users(tmp_path, hf, q):
    own = copy(q, tmp_path / "own")
    (own / "drafts").mkdir()
    refused(run("quantize", hf, "-f", "int8", "--out", own, "--force"), "is not a folder shrink wrote exactly as it is")
    assert (own / "drafts").is_dir()


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, hf, monkeypatch, stream):
    # the weights' writer meeting a full disk (what a 40 kB tmpfs gives, imitated here), streamed or not
    import errno
    import os

    from shrink.io.shards import ShardWriter

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.folder / ".part-00000.safetensors"))

    monkeypatch.setattr(ShardWriter, "flush", full)
    r = cli("quantize", hf, "-f", "int8", "-o", tmp_path / "q", stream)
    refused(r, "no space left on the device while writing the output", "nothing half-written was kept")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- 2. no code from a model folder ever runs ----------------------------------------------------

PLANTED = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


def plant(folder, marker, where):
    """Add custom code that writes `marker` when run, asked for by `where` (config or tokenizer config)."""
    (folder / "evil.py").write_text(PLANTED.format(marker=str(marker)))
    name = "config.json" if where == "config" else "tokenizer_config.json"
    path = folder / name
    data = json.loads(path.read_text()) if path.is_file() else {}
    key = "AutoConfig" if where == "config" else "AutoTokenizer"
    data["auto_map"] = {key: ["evil.Evil", None] if where == "tokenizer" else "evil.Evil"}
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("where", ["config", "tokenizer"])
def test_planted_code_never_runs(tmp_path, hf, q, where):
    marker = tmp_path / "MARKER"
    folders = {"hf": copy(hf, tmp_path / "hf"), "shrink": copy(q, tmp_path / "q")}
    if where == "tokenizer":  # a folder holding only a GGUF file and a tokenizer config
        g = tmp_path / "gguf"
        g.mkdir()
        (g / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
        (g / "tokenizer_config.json").write_text("{}")
        folders["gguf"] = g
    # every loader once (Hugging Face folder, shrink folder, GGUF file), through different commands
    commands = {"hf": [["quantize", "{t}", "-f", "int8", "-o", "{o}"]],
                "shrink": [["inspect", "{t}"], ["quantize", "{t}", "-f", "int8", "-o", "{o}"]],
                "gguf": [["compare", str(hf), "{t}", "-o", "{o}"]]}
    for kind, folder in folders.items():
        plant(folder, marker, where)
        target = folder / "m.gguf" if kind == "gguf" else folder
        for cmd in commands[kind]:
            cmd = [c.format(t=target, o=tmp_path / f"out-{kind}") for c in cmd]
            refused(run(*cmd), "asks to run its own Python code", "shrink never runs code from a model folder")
            assert not marker.exists(), f"code ran for {cmd}"
        assert not (tmp_path / f"out-{kind}").exists()


def test_scorer_file_runs_only_where_a_scorer_is_used(tmp_path, hf):
    marker = tmp_path / "MARKER"
    (tmp_path / "sc.py").write_text(PLANTED.format(marker=str(marker)) + "def f(output, example):\n    return 1\n")
    task = tmp_path / "choice.jsonl"
    task.write_text(json.dumps({"input": "the bank", "choices": ["rate", "oil"], "answer": 0}) + "\n")
    refused(run("compare", hf, hf, "--task", task, "--scorer", f"{tmp_path / 'sc.py'}:f"),
            "--scorer scores generated outputs", "choice task")
    assert not marker.exists()
    r = run("compare", "--help")
    assert "RUNS that file's code" in " ".join(r.stdout.split())


# ---- 3. nothing wrong loads silently -------------------------------------------------------------

def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, hf):
    from safetensors.torch import load_file, save_file

    cut = copy(hf, tmp_path / "cut")
    st = load_file(cut / "model.safetensors")
    st.pop("model.layers.1.mlp.up_proj.weight")
    save_file(st, cut / "model.safetensors", metadata={"format": "pt"})
    refused(run("quantize", cut, "-f", "int8", "-o", tmp_path / "o"), str(cut), "missing model.layers.1.mlp.up_proj.weight")
    for layers, what in ((3, "missing model.layers.2."), (1, "not used by the model model.layers.1.")):
        f = copy(hf, tmp_path / f"layers{layers}")
        cfg = json.loads((f / "config.json").read_text())
        cfg["num_hidden_layers"] = layers
        (f / "config.json").write_text(json.dumps(cfg))
        refused(run("quantize", f, "-f", "int8", "-o", tmp_path / "o"), "the weights do not match config.json", what)
    big = copy(hf, tmp_path / "big")
    cfg = json.loads((big / "config.json").read_text())
    cfg["vocab_size"] = 10 ** 12
    (big / "config.json").write_text(json.dumps(cfg))
    refused(run("quantize", big, "-f", "int8", "-o", tmp_path / "o"), "config.json: the model it describes needs",
            "more than the")
    assert not (tmp_path / "o").exists()


def test_a_shrink_folder_that_lost_its_manifest_or_was_damaged(tmp_path, hf, q):
    asym = tmp_path / "asym"
    assert run("quantize", hf, "-f", "int4-g32-asym", "-o", asym).returncode == 0
    (asym / "shrink.json").unlink()  # shrink's own layout: nothing can load it without the manifest
    refused(run("quantize", asym, "-f", "int8", "-o", tmp_path / "o"),
            "holds shrink's own weights (model.shrink.safetensors) but no shrink.json")
    flipped = copy(q, tmp_path / "flipped")
    w = flipped / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF  # one byte of a tensor, same size
    w.write_bytes(bytes(data))
    for cmd in (["quantize", flipped, "-f", "int8", "-o", tmp_path / "o"], ["inspect", flipped]):
        refused(run(*cmd), "model.safetensors: checksum does not match the one in shrink.json")
    cfg = copy(q, tmp_path / "cfg")
    c = json.loads((cfg / "config.json").read_text())
    c["architectures"] = "LlamaForCausalLM"  # a string, not a list
    (cfg / "config.json").write_text(json.dumps(c))
    refused(run("inspect", cfg), "cfg/config.json: ", "bytes, but shrink.json records", "since shrink wrote it")
    assert not (tmp_path / "o").exists()


def test_requantizing_a_quantized_model_is_refused(tmp_path, q):
    refused(run("quantize", q, "-f", "int8", "-o", tmp_path / "o"), "quantized already", "start from the full-precision model")
    assert not (tmp_path / "o").exists()


# ---- 4. options and task fields, validated up front ----------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["--method", "gptq", "--samples", "0"], "'--samples': '0' is out of range"),
    (["--method", "gptq", "--samples", "-3"], "'--samples'"),
    (["--method", "gptq", "--seq-len", "-5"], "'--seq-len'"),
    (["--method", "gptq", "--seq-len", "0"], "'--seq-len'"),
    (["--method", "gptq", "--damp", "-1"], "'--damp': '-1' is out of range: it must be a finite number more than 0"),
    (["--target-bits", "nan"], "'--target-bits': 'nan' is out of range"),
    (["--target-bits", "1e400"], "'--target-bits'"),
    (["--method", "gptq", "--tune-steps", "1e20"], "'--tune-steps': '1e20' is not an integer"),
    (["--method", "gptq", "--tune-steps", "100001"], "'--tune-steps': '100001' is out of range: it must be a finite number at least 0 and at most 100000"),
])
def test_out_of_range_options_are_usage_errors(tmp_path, hf, args, needle):
    calib = tmp_path / "c.txt"
    calib.write_text(word_text(300))
    r = cli("quantize", hf, "--calibration", calib, *args, "-o", tmp_path / "o")
    refused(r, needle, code=2)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("seed", ["99999999999999999999999", "-1", "4294967296"])
def test_a_seed_out_of_range_is_a_usage_error(tmp_path, hf, seed):
    text = tmp_path / "t.txt"
    text.write_text(word_text(300))
    r = cli("distill", "--teacher", hf, "--student", "layers=1", "--data", text, "--seed", seed, "--out", tmp_path / "d")
    refused(r, "'--seed'", "at most 4294967295", code=2)
    assert not (tmp_path / "d").exists()


def test_api_counts_out_of_range_are_refused(hf):
    from shrink.distillation.train import DistillConfig, _check_config

    with pytest.raises(shrink.ShrinkError, match="seed must be an integer from 0 to 4294967295"):
        _check_config(DistillConfig(seed=10 ** 23))
    with pytest.raises(shrink.ShrinkError, match="tune_steps=100000000000000000000: must be an integer from 0 to 100,000"):
        shrink.quantize(tiny_llama(), "int4-g32", method="gptq", calibration=[torch.randint(0, 96, (1, 16))],
                        tune_steps=10 ** 20, progress=False)


def test_a_glob_that_matches_nothing_is_an_error(tmp_path, hf):
    refused(run("quantize", hf, "--layer", "model.layer.*=int8", "-o", tmp_path / "o"),
            "layer pattern 'model.layer.*' matches no Linear or Embedding layer", "named like")


@pytest.mark.parametrize("args,needle", [
    (["--max-size", "1e400"], "--max-size '1e400': too large a size"),
    (["--max-latency", "1e400ms"], "--max-latency '1e400ms': too long a time"),
    (["--time", "nan"], "--time 'nan'"),
    (["--max-drop", "nan"], "'--max-drop': 'nan' is out of range"),
])
def test_search_limits_refuse_overflow(tmp_path, hf, args, needle):
    r = cli("search", hf, "--out", tmp_path / "s", *args)
    refused(r, needle, code=2 if "'--max-drop'" in needle else 1)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("line,needle", [
    ({"input": "a", "target": "1", "match": "numeric", "tolerance": "abc"}, ":1: 'tolerance' must be a number of 0 or more"),
    ({"input": "a", "target": "1", "match": "numeric", "tolerance": -1}, ":1: 'tolerance'"),
    ({"input": "a", "target": "b", "tolerance": 0.1}, ':1: \'tolerance\' must be a number of 0 or more, for "match": "numeric"'),
    ({"input": "a", "target": "b", "max_new_tokens": 100000000}, ":1: 'max_new_tokens' 100000000 is more than the model's context of 64"),
    ({"input": "x" * 1_000_001, "target": "b"}, ":1: a line of 1,000,0"),
    ("[" * 100_000 + "]" * 100_000, ":1: a value nested too deep, or a number too long, to read"),
    ('{"input": "a", "target": ' + "9" * 5000 + "}", ":1: a value nested too deep, or a number too long, to read"),
])
def test_bad_task_fields_are_refused_before_the_models_run(tmp_path, hf, line, needle):
    task = tmp_path / "t.jsonl"
    task.write_text((line if isinstance(line, str) else json.dumps(line)) + "\n")
    refused(cli("compare", hf, hf, "--task", task, "--out", tmp_path / "c"), str(task), needle)
    assert not (tmp_path / "c").exists()


def test_a_student_that_does_not_fit_the_data_is_refused_before_training(tmp_path):
    x = np.random.default_rng(0).normal(size=(60, 12)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    refused(run("distill", "--teacher", "none", "--student", "mlp:10-8-2", "--data", tmp_path / "d.npz", "--out", tmp_path / "o"),
            "the student does not fit the data", "(12,)")
    refused(run("distill", "--teacher", "none", "--student", "mlp:12-8-1", "--data", tmp_path / "d.npz", "--out", tmp_path / "o"),
            "the student predicts 1 classes", "label or token 1")
    assert not (tmp_path / "o").exists()


def test_sizes_a_spec_or_config_implies_are_checked_before_allocation(tmp_path, hf):
    x = np.random.default_rng(0).normal(size=(60, 12)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    for spec in ("mlp:12-4000000-4000000-2", "cnn:1x28x28-300000-300000-2"):
        refused(run("distill", "--teacher", "none", "--student", spec, "--data", tmp_path / "d.npz", "--out", tmp_path / "o"),
                f"student spec {spec!r}", "parameters, trained) needs", "more than the")
    deep = copy(hf, tmp_path / "deep")
    cfg = json.loads((deep / "config.json").read_text())
    cfg["num_hidden_layers"] = 1000000
    (deep / "config.json").write_text(json.dumps(cfg))
    refused(run("quantize", deep, "-f", "int8", "-o", tmp_path / "o"), "config.json", "'num_hidden_layers' is 1000000",
            "from 0 to 10,000 layers")
    assert not (tmp_path / "o").exists()


# ---- 5. scores are numbers in [0, 1]; NaN is never within tolerance ------------------------------

def test_scores_outside_0_1_fail_their_example_and_nan_is_never_within(tmp_path):
    import copy as cp

    import torch

    from shrink.evaluate import compare_models

    tok = tiny_tokenizer()
    task = tmp_path / "g.jsonl"
    task.write_text("".join(json.dumps({"id": f"e{i}", "input": word_text(5, seed=i), "target": "bank",
                                        "max_new_tokens": 2}) + "\n" for i in range(6)))
    (tmp_path / "bad.py").write_text("def f(output, example):\n"
                                     "    return {'e0': float('nan'), 'e1': 5.0, 'e2': 'yes'}.get(example.id, 1.0)\n")
    m = tiny_llama()
    c = compare_models(m, m, task, tokenizer=tok, scorer=f"{tmp_path / 'bad.py'}:f")
    errs = {e.id: e.error for e in c.examples if e.error}
    assert sorted(errs) == ["e0", "e1", "e2"] and c.overall.n == 3
    assert "--scorer returned nan; a score must be a number from 0 to 1" in errs["e0"]
    assert "returned 5.0" in errs["e1"] and "returned 'yes'" in errs["e2"]
    # a compressed model whose outputs are NaN: perplexity is NaN, and that is past the sweet spot
    ppl = tmp_path / "p.jsonl"
    ppl.write_text("".join(json.dumps({"text": word_text(12, seed=i)}) + "\n" for i in range(6)))
    broken = cp.deepcopy(m)
    with torch.no_grad():
        broken.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    c = compare_models(m, broken, ppl, tokenizer=tok, tolerance=100)
    assert not c.within and c.verdict.startswith("PAST THE SWEET SPOT (100% of perplexity): the scores hold NaN")
    # the same model on a generation task: both get every answer wrong (the scores agree), but its outputs are
    # NaN: never within, and --strict fails on it
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"id": f"g{i}", "input": word_text(5, seed=i), "target": "zzz",
                                       "max_new_tokens": 2}) + "\n" for i in range(400)))
    c = compare_models(m, broken, gen, tokenizer=tok, tolerance=100, batch_size=64)
    assert c.overall.change == 0 and not c.within and c.status == "CANNOT TELL", c.verdict
    assert "a model produced NaN or infinite outputs" in c.verdict
    saved = tmp_path / "broken"
    broken.save_pretrained(saved)
    tok.save_pretrained(saved)
    orig = tmp_path / "orig"
    m.save_pretrained(orig)
    tok.save_pretrained(orig)
    r = cli("compare", orig, saved, "--task", gen, "--tolerance", "100", "--strict")
    assert r.returncode == 3 and "CANNOT TELL" in r.stdout, r.stdout[-1500:]


def test_nan_weights_are_never_saved(tmp_path, hf):
    import torch

    m = tiny_llama()
    q = shrink.quantize(m, "int8", progress=False)
    with torch.no_grad():
        q.model.embed_tokens.weight[3, 1] = float("nan")  # kept in full precision by int8
    with pytest.raises(shrink.ShrinkError, match=r"model.embed_tokens.weight: 1 of its .* values are NaN or infinite"):
        shrink.save(q, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # through the command line, from a checkpoint that holds an infinity
    from safetensors.torch import load_file, save_file

    bad = copy(hf, tmp_path / "bad")
    st = load_file(bad / "model.safetensors")
    st["model.norm.weight"][0] = float("inf")
    save_file(st, bad / "model.safetensors", metadata={"format": "pt"})
    refused(run("quantize", bad, "-f", "int8", "-o", tmp_path / "o"), "model.norm.weight", "NaN or infinite")
    assert not (tmp_path / "o").exists()


# ---- 6. corrupt manifests: every field wrong in type, missing, or out of range ------------------

MODULE = "model.layers.0.mlp.up_proj"
CORRUPT = [
    ("format_version", "missing", "'format_version' must be an integer from 1 to 2"),
    ("format_version", "1", "'format_version'"),
    ("format_version", -1, "'format_version'"),
    ("format_version", 1.5, "'format_version'"),
    ("format_version", True, "'format_version'"),
    ("kind", "missing", "'kind' must be 'transformers' or 'torch'"),
    ("kind", "jax", "'kind'"),
    ("architecture", 5, "'architecture' must be a string"),
    ("shrink_version", [1], "'shrink_version' must be a string"),
    ("method", "magic", "'method' must be null or one of rtn"),
    ("source", "x", "'source' must be an object"),
    ("calibration", [], "'calibration' must be an object"),
    ("modules", "missing", "'modules' must be an object"),
    ("modules", [], "'modules'"),
    ("modules", {MODULE: "int8"}, f"'modules.{MODULE}' must be an object"),
    ("modules." + MODULE + ".format", 5, f"'modules.{MODULE}.format'"),
    ("modules." + MODULE + ".format", "int7", f"'modules.{MODULE}.format': unknown format 'int7'"),
    ("modules." + MODULE + ".in_features", -5, f"'modules.{MODULE}.in_features' must be an integer from 1 to"),
    ("modules." + MODULE + ".in_features", 10 ** 12, f"'modules.{MODULE}.in_features'"),
    ("modules." + MODULE + ".in_features", "64", f"'modules.{MODULE}.in_features'"),
    ("modules." + MODULE + ".in_features", 80, f"'modules.{MODULE}': group size 32 of int4-g32 does not divide"),
    ("modules." + MODULE + ".out_features", 0, f"'modules.{MODULE}.out_features'"),
    ("modules." + MODULE + ".out_features", 256, f"module '{MODULE}' (int4-g32, 64 -> 256) needs"),
    ("modules." + MODULE + ".bias", "yes", f"'modules.{MODULE}.bias' must be true or false"),
    ("modules." + MODULE + ".bias", True, f"needs tensor '{MODULE}.bias'"),
    ("modules." + MODULE + ".embedding", True, f"module '{MODULE}': shrink.json says it is an embedding (64 -> 128), "
                                               "but the model's"),
    ("modules." + MODULE + ".conv2d", {"in_channels": 64, "kernel_size": [1, 1], "stride": [1, 1], "padding": [0, 0],
                                       "dilation": [1, 1], "groups": 1}, "shrink.json says it is a convolution"),
    ("modules." + MODULE, "missing-module", f"holds quantized tensors of '{MODULE}', a module shrink.json does not list"),
    ("kept_full_precision", "lm_head", "'kept_full_precision' must be a list of module names"),
    ("fallbacks", ["x"], "'fallbacks' must be an object of module name -> reason"),
    ("fallbacks", {MODULE: 5}, "'fallbacks'"),
    ("kept_full_precision", [1], "'kept_full_precision'"),
    ("files", "x", "'files' must be an object"),
    ("files", {"config.json": 5}, "'files.config.json' must be an object with bytes"),
    ("files", {"../x": {"bytes": 1, "sha256": "0" * 64}}, "'files.../x' must be a path inside the folder"),
    ("files", {"config.json": {"bytes": 1, "sha256": "0" * 64}}, "but shrink.json records 1"),
    ("text", '{"format_version": 1, oops', "shrink.json: invalid JSON at line 1"),
    ("text", '{"format_version": ' + "9" * 5000 + "}", "shrink.json: unreadable JSON"),
    ("text", "[]", "shrink.json: expected a JSON object"),
]


def _corrupt(manifest_path, field, value):
    if field == "text":
        manifest_path.write_text(value)
        return
    data = json.loads(manifest_path.read_text())
    parts = field.split(".", 1) if field.startswith("modules.") else [field]
    if field.startswith("modules."):
        name, _, sub = parts[1].rpartition(".") if parts[1] != MODULE else (MODULE, "", "")
        if value == "missing-module":
            del data["modules"][MODULE]
        else:
            data["modules"][name][sub] = value
    elif value == "missing":
        del data[field]
    else:
        data[field] = value
    manifest_path.write_text(json.dumps(data))


@pytest.mark.parametrize("field,value,needle", CORRUPT, ids=[f"{f}={str(v)[:12]}" for f, v, _ in CORRUPT])
def test_corrupt_manifest_is_refused_by_inspect_and_load_alike(tmp_path, q, field, value, needle):
    bad = copy(q, tmp_path / "bad")
    _corrupt(bad / "shrink.json", field, value)
    before = tree(bad)
    for cmd in (["inspect", str(bad)], ["quantize", str(bad), "-f", "int8", "-o", str(tmp_path / "o")]):
        r = CliRunner().invoke(main, cmd)
        assert r.exit_code == 1 and not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), \
            (cmd, r.output, r.exception)
        last = r.output.strip().splitlines()[-1]
        assert last.startswith("Error: ") and needle in last, (cmd, last)
        assert ("shrink.json" in last or "model.safetensors" in last or "config.json" in last), last
    assert tree(bad) == before and not (tmp_path / "o").exists()


# ---- 7. search and distillation files -----------------------------------------------------------

def test_damaged_search_and_checkpoint_files_name_the_file(tmp_path):
    import torch

    from shrink.core.errors import ShrinkError
    from shrink.distillation.train import _read_state
    from shrink.entrypoints.search import Candidate, CandidateResult, Constraints, judge
    from shrink.entrypoints.search.run import _read_results

    done = CandidateResult(Candidate("rtn:int8", format="int8"), "done", score=0.5, original_score=0.5, change=0.0,
                           ci_low=-0.5, ci_high=0.5, within=True, size_bytes=10, memory_bytes=10)
    good = json.dumps(judge(done, Constraints(max_drop=1), 1.0).to_json())
    res = tmp_path / "results.jsonl"
    res.write_text(good + '\n{"other": 1}\n')
    with pytest.raises(ShrinkError, match=r"results.jsonl:2: not a search result"):
        _read_results(res)
    res.write_text((good + "\n") * 2)
    assert len(_read_results(res)) == 1  # a candidate measured twice by an older run counts once
    state = {"step": 1, "epoch": 0, "offset": 0, "rng": torch.get_rng_state(), "optimizer": {}, "scheduler": {},
             "best": "null", "history": "[oops", "config": "{}", "data": "x"}
    torch.save(state, tmp_path / "state.pt")
    with pytest.raises(ShrinkError, match=r"state.pt: field 'history' is not valid JSON"):
        _read_state(tmp_path / "state.pt")
    torch.save({**state, "history": "[]", "step": "1"}, tmp_path / "state.pt")
    with pytest.raises(ShrinkError, match=r"state.pt: field 'step' must be a non-negative integer, got str"):
        _read_state(tmp_path / "state.pt")


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, hf):
    """A four-step distillation with checkpoints, and the command line that resumes it."""
    tmp = tmp_path_factory.mktemp("distilled")
    text = tmp / "text.txt"
    text.write_text(word_text(400))
    args = ["distill", "--teacher", hf, "--student", "layers=1", "--data", text, "--steps", "4", "--seq-len", "16",
            "--batch-size", "2", "--eval-every", "2", "--checkpoint-every", "2"]
    assert run(*args, "--out", tmp / "d").returncode == 0
    return tmp / "d", args


@pytest.mark.parametrize("field,value,needle", [
    ("optimizer", {"state": {}, "param_groups": "x"}, "field 'optimizer' cannot be restored"),
    ("scheduler", {"x": 1}, "field 'scheduler' cannot be restored"),
    ("rng", "zeros", "field 'rng' cannot be restored"),
    ("step", 10 ** 12, "step 1000000000000 (offset"),
    ("best", '{"loss": "x"}', "field 'best' or 'history' does not hold evaluations"),
    ("history", '[{"a": 1}]', "field 'best' or 'history' does not hold evaluations"),
])
def test_an_edited_checkpoint_is_one_line_on_resume(tmp_path, distilled, field, value, needle):
    # a checkpoint edited by hand (its seal refreshed, as if shrink had written it): each field is checked as
    # it is restored, and the resume stops in one line naming the file and field
    import torch

    from shrink.core.ownership import seal

    out, args = distilled
    d = copy(out, tmp_path / "d")
    state = torch.load(d / "checkpoint" / "state.pt", weights_only=True)
    state[field] = torch.zeros(3) if value == "zeros" else value
    torch.save(state, d / "checkpoint" / "state.pt")
    seal(d / "checkpoint")
    refused(cli(*args, "--out", d, "--resume"), "checkpoint/state.pt", needle)


def test_invalid_search_file_on_resume_names_it(tmp_path, hf):
    s = tmp_path / "s"
    s.mkdir()
    (s / ".shrink-out.json").write_text(json.dumps({"command": "search", "names": []}))
    (s / "search.json").write_text("{not json")
    (s / "results.jsonl").write_text("")
    refused(run("search", hf, "--out", s, "--resume", "--max-trials", "1"), "search.json: invalid JSON at line 1")


# ---- 8. two writers at once, and a save killed midway --------------------------------------------

def test_two_writers_on_one_out(tmp_path, hf):
    out = tmp_path / "q"
    procs = [subprocess.Popen([sys.executable, "-m", "shrink.cli", "quantize", str(hf), "-f", f, "-o", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for f in ("int8", "int4-g32")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 1], results
    loser = next(err for c, err in results if c == 1).strip().splitlines()[-1]
    assert ("another shrink (shrink quantize, process" in loser or "holds a model shrink saved earlier" in loser), loser
    winner = ["int8", "int4-g32"][next(i for i, (c, _) in enumerate(results) if c == 0)]
    # the folder is whole and is the winner's, as its results say
    assert json.loads((out / "results.json").read_text())["format"] == winner
    assert set(shrink.info(shrink.load(out)).formats.values()) - {None} == {winner}
    assert not list(tmp_path.glob(".q.*")), list(tmp_path.iterdir())  # no lock or temporary left


def test_a_held_folder_is_refused_with_the_holders_process_id(tmp_path, hf):
    out, s = tmp_path / "q", tmp_path / "s"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom shrink.core.outdir import claim\n"
                               f"with claim({str(out)!r}, 'quantize', owned=lambda p: False), "
                               f"claim({str(s)!r}, 'search', ['search.json']):\n"
                               "    print('held', flush=True)\n    time.sleep(120)\n"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused(run("quantize", hf, "-f", "int8", "-o", out), str(out),
                f"another shrink (shrink quantize, process {holder.pid}) is writing it")
        # a search resumed beside a running one would measure its candidates twice
        refused(run("search", hf, "-o", s, "--resume"), str(s), f"another shrink (shrink search, process {holder.pid})")
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock is stale and the next run takes it
    r = run("quantize", hf, "-f", "int8", "-o", out)
    assert r.returncode == 0, r.stderr


def test_a_save_killed_midway_is_cleaned_up_by_the_next_run(tmp_path, hf):
    out = tmp_path / "q"
    child = subprocess.Popen([sys.executable, "-c", "import time\nfrom shrink.core.atomic import atomic_dir\n"
                              f"with atomic_dir({str(out)!r}) as tmp:\n"
                              "    (tmp / 'model.safetensors').write_bytes(b'x' * 100000)\n"
                              "    print(tmp, flush=True)\n    time.sleep(120)\n"],
                             stdout=subprocess.PIPE, text=True)
    tmp = os.path.dirname(child.stdout.readline().strip())  # the temporary folder that records its owner
    assert os.path.isdir(tmp) and os.path.basename(tmp).startswith(f".q.{child.pid}.")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert os.path.isdir(tmp) and not out.exists()  # what a SIGKILL leaves
    r = run("quantize", hf, "-f", "int8", "-o", out)
    assert r.returncode == 0, r.stderr
    assert f"removed {tmp}, left by a shrink run that was killed (process {child.pid})" in " ".join(r.stderr.split())
    assert not os.path.exists(tmp) and shrink.io.is_own_folder(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_a_folder_killed_while_being_replaced_is_restored(tmp_path):
    # killed between swap_in's two renames: the old folder is aside, the new one not yet in place; the
    # next run (a resume, or any writer) puts the old one back instead of losing it
    from shrink.core.ownership import remove_stale_temporaries

    out = tmp_path / "checkpoint"
    out.mkdir()
    (out / "state.pt").write_text("step 100")
    child = subprocess.Popen([sys.executable, "-c", "import os, time\nfrom shrink.core import atomic\n"
                              "real = os.replace\n"
                              "def stop_after_the_first(src, dst):\n"
                              "    real(src, dst)\n    print('aside', flush=True)\n    time.sleep(120)\n"
                              "atomic.os.replace = stop_after_the_first\n"
                              f"with atomic.atomic_dir({str(out)!r}, replaceable=lambda p: True) as tmp:\n"
                              "    (tmp / 'state.pt').write_text('step 110')\n"],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "aside"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not out.exists()  # what a SIGKILL there leaves
    remove_stale_temporaries(out)
    assert (out / "state.pt").read_text() == "step 100"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
