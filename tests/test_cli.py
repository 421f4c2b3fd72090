import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from helpers import tiny_llama

import shrink
from shrink.cli import main

pytestmark = pytest.mark.slow  # the command line in subprocesses: run by CI, not the fast loop


@pytest.fixture
def hf_folder(tmp_path):
    path = tmp_path / "tiny"
    tiny_llama().save_pretrained(path)
    return path


def test_quantize_writes_folder_and_results(hf_folder, tmp_path):
    out = tmp_path / "q"
    r = CliRunner().invoke(main, ["quantize", str(hf_folder), "--format", "int4-g32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "Linear int4-g32" in r.output and "4.50" in r.output
    assert "kept in full precision: lm_head" in r.output
    res = json.loads((out / "results.json").read_text())
    assert res["format"] == "int4-g32" and res["quantized_bits_per_weight"] == pytest.approx(4.5)
    assert res["kept_full_precision"] == ["lm_head"]
    total = res["sizes"][-1]
    assert total["kind"] == "total" and total["bytes_now"] < total["bytes_fp32"]
    model = shrink.load(out)
    assert shrink.info(model).formats["model.layers.0.self_attn.q_proj"] == "int4-g32"

    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    assert "Linear int4-g32" in r.output and "shrink format 2" in r.output


def test_layer_overrides(hf_folder, tmp_path):
    out = tmp_path / "q"
    r = CliRunner().invoke(main, ["quantize", str(hf_folder), "-f", "int4-g32", "--layer", "*.mlp.*=int8",
                                  "--layer", "model.layers.1.self_attn.*=none", "-o", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "shrink.json").read_text())["modules"]
    assert m["model.layers.0.mlp.up_proj"]["format"] == "int8"
    assert m["model.layers.0.self_attn.q_proj"]["format"] == "int4-g32"
    assert "model.layers.1.self_attn.q_proj" not in m


def _run(*args):
    return subprocess.run([sys.executable, "-m", "shrink.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args,needle", [
    (["quantize", "{tiny}", "--format", "int7-g64"], "unknown format 'int7-g64'"),
    # a layer named exactly keeps the format asked (a glob's layers fall back per channel, said in a warning)
    (["quantize", "{tiny}", "--layer", "model.layers.0.self_attn.q_proj=int4-g128"],
     "group size 128 of format int4-g128 does not divide its input size 64"),
    (["quantize", "{tiny}", "--layer", "*=int8", "--format", "int4-g32"],
     "--layer '*=int8' and --format int4-g32 both set the format of every layer"),
    (["quantize", "{tmp}/nope.gguf"], "nope.gguf: no such file"),
    (["quantize", "{tmp}/bad.gguf"], "bad.gguf: cannot load GGUF file"),
    (["inspect", "{tmp}"], "not a model folder"),
    (["quantize", "{tiny}", "--layer", "oops"], "expected GLOB=FORMAT"),
    # llama.cpp's mix on a model none of whose layers has inputs in super-blocks of 256
    (["quantize", "{tiny}", "--format", "q4k-m"], "works in super-blocks of 256 inputs, which do not divide its input size 64"),
    (["quantize", "{tiny}", "--format", "q4k-m", "--layer", "*.mlp.*=int8"], "--layer cannot change it"),
])
def test_bad_input_one_line_nonzero_exit(hf_folder, tmp_path, args, needle):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    args = [a.format(tiny=hf_folder, tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "out")] * (args[0] == "quantize")
    r = _run(*args)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("Error: ") and needle in err[-1], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_newer_format_version_is_refused(hf_folder, tmp_path):
    out = tmp_path / "q"
    assert CliRunner().invoke(main, ["quantize", str(hf_folder), "-f", "int8", "-o", str(out)]).exit_code == 0
    data = json.loads((out / "shrink.json").read_text())
    data["format_version"] = 3
    (out / "shrink.json").write_text(json.dumps(data))
    r = _run("inspect", str(out))
    assert r.returncode == 1 and "format version 3, newer than this shrink reads (2)" in r.stderr


def test_help_states_defaults():
    r = CliRunner().invoke(main, ["quantize", "--help"])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "[default: int4-g64]" in text and "--layer" in text and "SmolLM2" in text


@pytest.fixture
def hf_folder_with_tokenizer(hf_folder):
    from helpers import tiny_tokenizer

    tiny_tokenizer().save_pretrained(hf_folder)
    return hf_folder


def test_calibrated_quantize_cli(hf_folder_with_tokenizer, tmp_path):
    from helpers import word_text

    calib = tmp_path / "calib.txt"
    calib.write_text(word_text(600))
    out = tmp_path / "q"
    r = CliRunner().invoke(main, ["quantize", str(hf_folder_with_tokenizer), "--method", "gptq", "--target-bits", "4.5",
                                  "--calibration", str(calib), "--samples", "8", "--seq-len", "64", "--tune-steps", "4",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "calibration: 8 x 64 tokens" in text and "mixed, 4.5 bits/weight (gptq)" in text
    assert "tuning (4 steps per block): block output error" in text
    res = json.loads((out / "results.json").read_text())
    assert res["quantized_bits_per_weight"] <= 4.5 + 1e-9 and res["target_bits"] == 4.5
    assert res["calibration"]["data"]["sha256"]
    assert shrink.info(shrink.load(out)).calibration["method"] == "gptq"


@pytest.mark.parametrize("extra,needle", [
    (["--method", "gptq"], "--method gptq needs --calibration FILE"),
    (["--target-bits", "4"], "needs --calibration FILE"),
    (["--tune-steps", "8"], "--tune-steps needs a calibrated method"),
    (["--method", "awq", "--calibration", "{tmp}/missing.txt"], "missing.txt: calibration file not found"),
    (["--method", "gptq", "--calibration", "{tmp}/short.txt", "--seq-len", "64"], "short.txt: 5 tokens, shorter than one calibration sequence of 64"),
])
def test_calibration_errors_leave_no_output(hf_folder_with_tokenizer, tmp_path, extra, needle):
    (tmp_path / "short.txt").write_text("the bank said rates rise")
    out = tmp_path / "out"
    r = _run("quantize", str(hf_folder_with_tokenizer), *[e.format(tmp=tmp_path) for e in extra], "-o", str(out))
    assert r.returncode == 1 and needle in r.stderr.strip().splitlines()[-1], r.stderr
    assert not out.exists()


def test_gptq_options_reach_gptq_and_are_refused_without_it(hf_folder_with_tokenizer, tmp_path):
    from helpers import word_text

    r = CliRunner().invoke(main, ["quantize", str(hf_folder_with_tokenizer), "--true-sequential"])
    assert r.exit_code == 1 and "--true-sequential and --no-refit are GPTQ's options" in r.output
    calib = tmp_path / "calib.txt"
    calib.write_text(word_text(600))
    r = CliRunner().invoke(main, ["quantize", str(hf_folder_with_tokenizer), "--method", "gptq", "-f", "int4-g32",
                                  "--true-sequential", "--no-refit", "--calibration", str(calib), "--samples", "4",
                                  "--seq-len", "32", "-o", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    record = shrink.info(tmp_path / "q").calibration
    assert record["true_sequential"] is True and record["refit"] is False
    assert not any("refit_error_ratio" in v for v in record["layers"].values())  # no refit was run
