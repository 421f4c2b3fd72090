import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

import shrink
from shrink.core.errors import ShrinkError
from shrink.entrypoints.search import (
    Candidate,
    CandidateResult,
    Constraints,
    judge,
    order,
    pareto,
    parse_latency,
    parse_size,
    quantization_candidates,
    recommend,
)
from shrink.entrypoints.search import run as search_run

S = 2.0 ** -7  # an fp16-exact step: int8 per-channel scales come out exactly S


def _model_and_task(tmp_path):
    """A classifier whose fate under quantization is known by construction.

    Layer 1 (quantized) has two rows of integers times S with 127 in every group of 32, so int8 per
    channel stores it exactly. Example "hard up" j is the one-hot input e_j where row 0 has 3 and row 1
    has 4 (label 1); every 4-bit or narrower format rounds both to 0, the logits tie, argmax picks
    class 0, and the example flips. "hard down" examples (4 vs 3, label 0) stay right on a tie; "easy"
    examples (+-e_0: 127 vs -127) stay right at any width. Layer 2 (the output layer, kept in full
    precision) passes the two values through.
    """
    a, b = torch.full((64,), 3.0), torch.full((64,), 4.0)
    a[0], b[0], a[32], b[32] = 127, -127, 127, -127
    down = [5, 6, 7, 8, 40, 41, 42, 43, 44, 45]
    a[down], b[down] = 4.0, 3.0
    model = torch.nn.Sequential(torch.nn.Linear(64, 2, bias=False), torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.stack([a, b]) * S)
        model[1].weight.copy_(torch.eye(2))
    eye = np.eye(64, dtype=np.float32)
    up = [j for j in range(1, 64) if j not in down and j != 32][:20]
    x = [eye[0]] * 10 + [-eye[0]] * 10 + [eye[j] for j in up] + [eye[j] for j in down]
    y = [0] * 10 + [1] * 10 + [1] * len(up) + [0] * len(down)
    tags = ["easy"] * 20 + ["hard"] * (len(up) + len(down))
    p = tmp_path / "task.npz"
    np.savez(p, x=np.stack(x), y=np.array(y), tags=np.array(tags))
    return model, p, len(up)


LADDER = [Candidate(f"rtn:{f}", "rtn", f) for f in ("int8", "int4-g32", "int4-g64", "int3-g32", "int2-g32")]


def test_frontier_and_recommendation_known_by_construction(tmp_path):
    model, task, n_up = _model_and_task(tmp_path)
    found = shrink.search(model, task, out=tmp_path / "s", candidates=LADDER, progress=False)
    done = {r["candidate"]["name"]: r for r in found.results}
    assert list(done) == ["rtn:int8", "rtn:int4-g32"]  # int4-g32 fails: the narrower rtn formats are skipped
    assert [s["candidate"] for s in found.skipped] == ["rtn:int4-g64", "rtn:int3-g32", "rtn:int2-g32"]
    assert all("rtn:int4-g32 is already past the sweet spot" in s["reason"] for s in found.skipped)
    i8, i4 = done["rtn:int8"], done["rtn:int4-g32"]
    assert (i8["change"], i8["ci_low"], i8["ci_high"], i8["broke"]) == (0, 0, 0, [])  # stored exactly
    assert i8["qualifies"] and i8["within"]
    n = 20 + n_up + 10
    assert i4["change"] == pytest.approx(-100 * n_up / n) and len(i4["broke"]) == n_up and not i4["fixed"]
    assert not i4["qualifies"] and i4["verdict"].startswith("PAST THE SWEET SPOT (1 point, absolute): overall") and "quality" in i4["miss"]
    assert i4["slices"]["tag:hard"] == pytest.approx(-100 * n_up / (n_up + 10), abs=1e-3) and i4["slices"]["tag:easy"] == 0
    assert i4["size_bytes"] < i8["size_bytes"] < found.original["size_bytes"]
    assert [r["candidate"]["name"] for r in found.frontier("size_bytes")] == ["rtn:int4-g32", "rtn:int8"]
    assert found.recommendation is i8 and found.line.startswith("RECOMMENDED: rtn:int8")
    # the recommended model was saved, loads back, and gives the same outputs
    best = shrink.load(tmp_path / "s" / "best", model=type(model)(torch.nn.Linear(64, 2, bias=False),
                                                                   torch.nn.Linear(2, 2, bias=False)))
    x = torch.from_numpy(np.load(task)["x"])
    assert torch.equal(best(x).argmax(1), model(x).argmax(1))
    assert json.loads((tmp_path / "s" / "best" / "candidate.json").read_text())["candidate"]["name"] == "rtn:int8"
    # the report: every candidate, the frontier, the examples that broke first
    md = (tmp_path / "s" / "report.md").read_text()
    assert "RECOMMENDED: rtn:int8" in md and "| rtn:int4-g32 |" in md and "first broke in" in md
    html = (tmp_path / "s" / "report.html").read_text()
    assert html.count("<svg") == 2 and "Pareto frontier" in html
    saved = json.loads((tmp_path / "s" / "results.json").read_text())
    assert saved["frontier_size"] == ["rtn:int4-g32", "rtn:int8"] and saved["recommendation"]["candidate"]["name"] == "rtn:int8"


def test_nothing_meets_the_constraints_names_the_closest(tmp_path):
    model, task, _ = _model_and_task(tmp_path)
    first = shrink.search(model, task, out=tmp_path / "a", candidates=LADDER[:2], progress=False)
    int8_size = first.results[0]["size_bytes"]
    found = shrink.search(model, task, out=tmp_path / "b", candidates=LADDER[:2], progress=False,
                          constraints=Constraints(max_size=int8_size - 10))
    assert found.recommendation["candidate"]["name"] == "rtn:int8"  # keeps quality, misses size by the least
    assert not found.recommendation["qualifies"]
    assert found.line.startswith("NOTHING MEETS quality within 1 points, at most")
    pct = round(100 * 10 / (int8_size - 10))
    assert "closest is rtn:int8" in found.line and f"misses size by {pct}% ({int8_size} B > {int8_size - 10} B)" in found.line
    assert (tmp_path / "b" / "best").is_dir()


def test_interrupted_search_resumes_without_redoing_finished_candidates(tmp_path, monkeypatch):
    model, task, _ = _model_and_task(tmp_path)
    cands = [Candidate(f"rtn:{f}", "rtn", f) for f in ("int8", "int8-g32", "int8-g64", "int4-g32")]
    calls = []
    real = search_run.compare_models

    def counting(orig, cand, *a, **k):
        calls.append(k["names"][1])
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while measuring the third candidate
        return real(orig, cand, *a, **k)

    monkeypatch.setattr(search_run, "compare_models", counting)
    with pytest.raises(KeyboardInterrupt):
        shrink.search(model, task, out=tmp_path / "s", candidates=cands, progress=False)
    lines = (tmp_path / "s" / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["candidate"]["name"] for x in lines] == ["rtn:int8-g32", "rtn:int8-g64"]  # widest first
    # a crash in the middle of writing a line leaves a partial last line: it is measured again
    with open(tmp_path / "s" / "results.jsonl", "a") as f:
        f.write('{"candidate": {"name": "rtn:int8", "meth')
    with pytest.raises(ShrinkError, match="--resume"):
        shrink.search(model, task, out=tmp_path / "s", candidates=cands, progress=False)
    calls.clear()

    def recording(orig, cand, *a, **k):
        calls.append(k["names"][1])
        return real(orig, cand, *a, **k)

    monkeypatch.setattr(search_run, "compare_models", recording)
    found = shrink.search(model, task, out=tmp_path / "s", candidates=cands, progress=False, resume=True)
    assert calls == ["rtn:int8", "rtn:int4-g32"]
    assert [r["candidate"]["name"] for r in found.results] == ["rtn:int8-g32", "rtn:int8-g64", "rtn:int8", "rtn:int4-g32"]
    assert found.recommendation["candidate"]["name"] == "rtn:int8"
    lines = (tmp_path / "s" / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["candidate"]["name"] for x in lines] == [r["candidate"]["name"] for r in found.results]
    # resumed with a size limit: the results are judged again; a best/ that went missing is built again
    size = {r["candidate"]["name"]: r["size_bytes"] for r in found.results}
    shutil.rmtree(tmp_path / "s" / "best")
    found = shrink.search(model, task, out=tmp_path / "s", candidates=cands, progress=False, resume=True,
                          max_size=size["rtn:int8"] - 1)
    assert calls == ["rtn:int8", "rtn:int4-g32"]  # nothing measured again
    assert found.recommendation["candidate"]["name"] == "rtn:int8" and found.recommendation["miss"].keys() == {"size"}
    assert found.line.startswith("NOTHING MEETS")
    assert json.loads((tmp_path / "s" / "best" / "candidate.json").read_text())["candidate"]["name"] == "rtn:int8"
    with pytest.raises(ShrinkError, match="with a tolerance of 1.0 \\(absolute\\); resume it with the same"):
        shrink.search(model, task, out=tmp_path / "s", candidates=cands, progress=False, resume=True, max_drop=5)
    # a resume of another task is refused
    other = tmp_path / "other.npz"
    d = dict(np.load(task))
    d["y"] = 1 - d["y"]
    np.savez(other, **d)
    with pytest.raises(ShrinkError, match="that search was of another task \\(its examples differ\\)"):
        shrink.search(model, other, out=tmp_path / "s", candidates=cands, progress=False, resume=True)
    # an edited search.json is one line naming the file and field
    saved = json.loads((tmp_path / "s" / "search.json").read_text())
    (tmp_path / "s" / "search.json").write_text(json.dumps({**saved, "constraints": "x"}))
    with pytest.raises(ShrinkError, match="search.json: 'constraints' must be an object, got str"):
        shrink.search(model, task, out=tmp_path / "s", candidates=cands, progress=False, resume=True)


def test_budget_stops_the_search_and_says_what_was_left(tmp_path):
    model, task, _ = _model_and_task(tmp_path)
    found = shrink.search(model, task, out=tmp_path / "s", candidates=LADDER, progress=False,
                          constraints=Constraints(max_trials=1))
    assert [r["candidate"]["name"] for r in found.results] == ["rtn:int8"]
    assert found.untried == ["rtn:int4-g32", "rtn:int4-g64", "rtn:int3-g32", "rtn:int2-g32"]
    assert "Not tried (budget spent)" in (tmp_path / "s" / "report.md").read_text()


def test_bad_searches_fail_before_measuring(tmp_path):
    model, task, _ = _model_and_task(tmp_path)
    with pytest.raises(ShrinkError, match="nothing can meet --max-size 10 B by quantization: even at 2 bits"):
        shrink.search(model, task, out=tmp_path / "a", candidates=LADDER, constraints=Constraints(max_size=10))
    jsonl = tmp_path / "gen.jsonl"
    jsonl.write_text('{"input": "2+2?", "target": "4"}\n')
    with pytest.raises(ShrinkError, match="is a generation task, which a tensor classifier model cannot run"):
        shrink.search(model, jsonl, out=tmp_path / "b", candidates=LADDER)
    with pytest.raises(ShrinkError, match="need --calibration"):
        shrink.search(model, task, out=tmp_path / "c", candidates=[Candidate("gptq:int4-g32", "gptq", "int4-g32")])
    with pytest.raises(ShrinkError, match="per token needs a language model"):
        shrink.search(model, task, out=tmp_path / "d", constraints=Constraints(max_latency=0.01, latency_per="token"))
    with pytest.raises(ShrinkError, match="objective must be 'size' or 'latency'"):
        Constraints(objective="speed")


@pytest.mark.parametrize("text, expected", [("60MB", 60_000_000), ("60 MB", 60_000_000), ("60mb", 60_000_000),
                                            ("6e7", 60_000_000), ("1.5GiB", int(1.5 * 2 ** 30)), (2048, 2048),
                                            ("512 kB", 512_000)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["sixty", "60 parsecs", "-5MB", "0", "MB"])
def test_parse_size_rejects_with_an_example(text):
    with pytest.raises(ShrinkError, match="write it like 60MB|more than 0"):
        parse_size(text)


def test_parse_latency():
    assert parse_latency("50ms") == (0.05, "example")
    assert parse_latency("2s") == (2.0, "example")
    assert parse_latency("20ms/token") == (0.02, "token")
    assert parse_latency("20 ms per token") == (0.02, "token")
    assert parse_latency("0.3") == (0.3, "example")
    with pytest.raises(ShrinkError, match="20ms/token"):
        parse_latency("fast")


def _rec(name, size, change, ci_low, lat=0.01, within=True):
    return CandidateResult(Candidate(name), "done", size_bytes=size, change=change, ci_low=ci_low, within=within,
                           latency_example=lat, latency_token=None)


def test_judge_rank_and_pareto_on_constructed_results():
    c = Constraints(max_drop=2, max_size=100, max_latency=0.02)
    rs = [judge(r, c, 2.0) for r in [
        _rec("big-good", 200, 0.0, 0.0),            # misses size by 100%
        _rec("mid-good", 120, -0.5, -1.5),          # misses size by 20%: closest when nothing qualifies
        _rec("small-bad", 50, -5.0, -9.0),          # misses quality by 7 points
        _rec("small-slice", 60, 0.0, -1.0, within=False),  # a slice past the sweet spot
    ]]
    assert [r["qualifies"] for r in rs] == [False] * 4
    assert rs[1]["miss"] == {"size": pytest.approx(0.2)} and rs[2]["miss"]["quality"] == pytest.approx(7.0)
    assert recommend(rs)["candidate"]["name"] == "mid-good"
    ok = judge(_rec("ok", 90, -1.0, -2.0), c, 2.0)  # interval end exactly at the tolerance: qualifies
    slow = judge(_rec("ok-slow", 80, -1.0, -1.5, lat=0.05), c, 2.0)
    assert ok["qualifies"] and not slow["qualifies"] and slow["miss"] == {"latency": pytest.approx(1.5)}
    assert recommend(rs + [ok, slow])["candidate"]["name"] == "ok"
    fast = judge(_rec("ok-fast-big", 95, -0.5, -1.0, lat=0.005), c, 2.0)
    assert recommend(rs + [ok, fast])["candidate"]["name"] == "ok"  # smallest
    assert recommend(rs + [ok, fast], objective="latency")["candidate"]["name"] == "ok-fast-big"  # fastest
    front = [r["candidate"]["name"] for r in pareto(rs + [ok, slow], "size_bytes")]
    assert front == ["small-bad", "small-slice"]  # 60 bytes at no loss dominates everything larger


def test_candidate_order_puts_cheap_first():
    names = [c.name for c in order(quantization_candidates(calibration=True))]
    assert names[:5] == ["rtn:int8", "rtn:int4-g32", "rtn:int4-g64", "rtn:int3-g32", "rtn:int2-g32"]
    assert names[5:9] == ["awq+gptq:int4-g32", "awq+gptq:int4-g64", "awq+gptq:int3-g32", "awq+gptq:int2-g32"]
    assert names[9:] == ["awq:mixed-6", "awq:mixed-4.5", "awq:mixed-3.5"]


def test_judged_in_llama_cpp_the_candidates_are_gguf_types_widest_first():
    """The llama.cpp ladder: Q8_0, Q6_K, llama.cpp's mixes, IQ4_NL, Q4_0, narrower ones after (a mix ordered by
    its base type's bits and what its layers of more bits add), every one a format the GGUF export copies
    exactly; no mixed precision. A mix builds as `shrink quantize -f q4k-m` does."""
    from test_kquant import llama256

    from shrink.entrypoints.search.candidates import build
    from shrink.io.export import exact_type
    from shrink.quant import QuantLinear

    cands = order(quantization_candidates(calibration=True, llama_cpp=True))
    names = [c.name for c in cands]
    assert names[:8] == ["rtn:int8-g32", "rtn:q6k", "rtn:q5k-m", "rtn:q4k-m", "rtn:iq4nl-g32", "rtn:int4-g32",
                         "rtn:q3k-m", "rtn:q2k-m"]
    assert names[8:] == ["awq+gptq:q5k-m", "awq+gptq:q4k-m", "awq+gptq:iq4nl-g32", "awq+gptq:q3k-m", "awq+gptq:q2k-m"]
    assert all(c.target_bits is None for c in cands)
    bits = {c.format: c.bits for c in cands}
    assert bits["q4k-m"] == pytest.approx(4.9) and bits["q3k-m"] == pytest.approx(3.4375 + 0.4)
    original = llama256(hidden=320)  # (down projections of 512 inputs take K-quants, the 320-wide llama.cpp's fallbacks)
    for c in cands[:8]:  # each builds, every quantized layer a GGUF type's exact copy
        model = build(c, original, students={})
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
        assert layers and all(exact_type(m) is not None for _, m in layers), c.name
    formats = shrink.info(model).formats  # (the last: q2k-m, llama.cpp's Q2_K)
    assert formats["model.layers.0.mlp.down_proj"] == "q3k" and formats["model.layers.0.mlp.up_proj"] == "int4-g32"


# ---- the command line and the report in a browser ----------------------------------------------

def test_cli_search_on_a_tiny_language_model(tmp_path):
    from click.testing import CliRunner
    from helpers import tiny_llama, tiny_tokenizer, word_text

    from shrink.cli import main

    tok, m = tiny_tokenizer(), tiny_llama()
    m.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"id": f"e{i}", "input": word_text(5, seed=i), "target": word_text(1, seed=50 + i),
                                        "match": "contains", "max_new_tokens": 3}) + "\n" for i in range(5)))
    out = tmp_path / "s"
    args = ["search", str(tmp_path / "m"), "--task", str(task), "--out", str(out), "--max-drop", "100",
            "--max-trials", "2", "--max-size", "1 MB", "--max-latency", "10s"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "rtn:int8" in r.output and "report: open" in r.output and "on the size-quality frontier" in r.output
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [x["candidate"]["name"] for x in rows] == ["rtn:int8", "rtn:int4-g32"]
    assert all(x["latency_token"] > 0 and x["kl_mean"] is not None for x in rows)
    # again into the same folder: refused; with --resume: nothing measured again
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "--resume" in r.output
    r = CliRunner().invoke(main, args + ["--resume"])
    assert r.exit_code == 0 and "resuming: 2 candidate(s) already measured" in r.output
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    r = CliRunner().invoke(main, ["search", str(tmp_path / "m"), "--task", str(task), "--out", str(tmp_path / "x"),
                                  "--max-size", "sixty"])
    assert r.exit_code == 1 and "--max-size 'sixty': not a size; write it like 60MB" in r.output


@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("SHRINK_REQUIRE_CHROMIUM"),
                    reason="chromium not installed (scripts/setup.sh --test installs it)")
@pytest.mark.slow  # a subprocess or a browser
def test_search_report_renders_in_headless_chromium(tmp_path):
    from test_report import _chromium

    model, task, _ = _model_and_task(tmp_path)
    shrink.search(model, task, out=tmp_path / "s", candidates=LADDER, progress=False)
    dom, console = _chromium(tmp_path / "s" / "report.html")
    assert console == []
    assert len(re.findall(r"<svg[^>]*>", dom)) == 2 and dom.count("<path") > 10
    assert "RECOMMENDED: rtn:int8" in dom and "first broke in" in dom
    # both plots show the original as a labelled point; broken examples show both answers; latency columns
    # say how they were measured; every candidate's verdict is in the table
    assert dom.count("Sequential (original)") >= 2 and dom.count(">original<") >= 2
    assert "original's answer" in dom and "compressed answer" in dom and "expected" in dom
    assert "ms/example: each example's share of its batch's time" in dom
    assert "PAST THE SWEET SPOT" in dom and "WITHIN TOLERANCE" in dom


def test_constraints_as_keywords(tmp_path):
    c = Constraints.of(max_drop=2, max_size="60 MB", max_latency="20ms/token", time="1.5h", objective="latency")
    assert (c.max_size, c.max_latency, c.latency_per, c.time, c.objective) == (60_000_000, 0.02, "token", 5400.0, "latency")
    assert "at most 60.0 MB on disk, at most 20.0 ms per token" in c.describe()
    model, task, _ = _model_and_task(tmp_path)
    found = shrink.search(model, task, out=tmp_path / "s", candidates=LADDER[:1], progress=False, max_size="1kB")
    assert found.constraints["max_size"] == 1000 and found.recommendation["qualifies"]
    with pytest.raises(ShrinkError, match="not both"):
        shrink.search(model, task, out=tmp_path / "t", constraints=Constraints(), max_drop=3)


def test_search_with_distilled_students(tmp_path):
    """--distill: a student is trained once (resumable under DIR/students/), measured as trained and
    quantized; a resumed search loads the trained student instead of training it again."""
    from helpers import tiny_llama, tiny_tokenizer, word_text

    tok, m = tiny_tokenizer(), tiny_llama()
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"id": f"e{i}", "input": word_text(5, seed=i), "target": word_text(1, seed=50 + i),
                                        "match": "contains", "max_new_tokens": 3}) + "\n" for i in range(4)))
    data = tmp_path / "train.txt"
    data.write_text(word_text(3000, seed=7))
    cands = [Candidate("student:layers=1", None, None, None, "layers=1"),
             Candidate("student:layers=1+rtn:int8", "rtn", "int8", None, "layers=1")]
    opts = dict(steps=4, batch_size=2, eval_every=2, checkpoint_every=2)
    found = shrink.search(m, task, out=tmp_path / "s", candidates=cands, tokenizer=tok, distill_data=data,
                          distill_seconds=60, distill_options=opts, progress=False, max_drop=100)
    names = [r["candidate"]["name"] for r in found.results]
    assert names == ["student:layers=1", "student:layers=1+rtn:int8"]
    student, quantized = found.results
    assert student["size_bytes"] < found.original["size_bytes"] and quantized["size_bytes"] < student["size_bytes"]
    assert json.loads((tmp_path / "s" / "students" / "layers=1" / "results.json").read_text())["steps"] == 4
    assert (tmp_path / "s" / "students" / "layers=1" / "model" / "config.json").is_file()
    assert found.recommendation["candidate"]["name"] == "student:layers=1+rtn:int8"
    # resumed with the best removed: the student is loaded from its folder, not trained again
    shutil.rmtree(tmp_path / "s" / "best")
    trained = (tmp_path / "s" / "students" / "layers=1" / "results.json").stat().st_mtime_ns
    again = shrink.search(m, task, out=tmp_path / "s", candidates=cands, tokenizer=tok, distill_data=data,
                          distill_seconds=60, distill_options=opts, progress=False, max_drop=100, resume=True)
    assert again.recommendation["candidate"]["name"] == "student:layers=1+rtn:int8"
    assert (tmp_path / "s" / "students" / "layers=1" / "results.json").stat().st_mtime_ns == trained
    best = shrink.load(tmp_path / "s" / "best")
    assert best.config.num_hidden_layers == 1


def test_parse_duration():
    from shrink.entrypoints.search import parse_duration

    assert (parse_duration("10m"), parse_duration("90s"), parse_duration("1.5h")) == (600.0, 90.0, 5400.0)
    for bad in ("sixty", "20ms/token"):
        with pytest.raises(ShrinkError, match="a time budget is a duration, like 10m"):
            parse_duration(bad)


def test_tuned_methods_build_with_block_tuning():
    from helpers import tiny_llama

    from shrink.entrypoints.search.candidates import METHODS_CALIBRATED, TUNE_STEPS, build

    assert "awq+gptq+tune" in METHODS_CALIBRATED
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(3, 96, (1, 24), generator=g) for _ in range(6)]
    base = tiny_llama(seed=2)
    tuned = build(Candidate("awq+gptq+tune:int4-g32", "awq+gptq+tune", "int4-g32"), base, students={},
                  calibration=calib)
    rec = shrink.info(tuned).calibration
    assert rec["method"] == "awq+gptq" and rec["tune_steps"] == TUNE_STEPS
    assert "tune_error_after" in rec["layers"]["model.layers.0"]
    plain = build(Candidate("awq+gptq:int4-g32", "awq+gptq", "int4-g32"), base, students={}, calibration=calib)
    assert "tune_steps" not in shrink.info(plain).calibration


def test_result_records_keep_the_results_file_byte_for_byte():
    # a line as results.jsonl held it before the records were typed: read and written back unchanged
    line = ('{"candidate": {"name": "awq+gptq:int4-g32", "method": "awq+gptq", "format": "int4-g32", "target_bits": null, '
            '"student": null}, "status": "done", "score": 62.5, "original_score": 65.0, "change": -2.5, "ci_low": -6.1, '
            '"ci_high": 0.4, "within": true, "verdict": "within", "slices_past": [], "slices": {"hard": -5.0}, '
            '"size_bytes": 101, "memory_bytes": 202, "latency_example": 0.25, "latency_token": 0.02, "broke": ["q3"], '
            '"fixed": [], "kl_mean": 0.01, "errors": 0, "build_seconds": 3.5, "seconds": 9.25, '
            '"original_latency_example": 0.3, "allowed": 1.0, "quality_ok": false, "miss": {"quality": 5.1}, '
            '"qualifies": false}')
    r = CandidateResult.from_json(json.loads(line))
    assert r.name == "awq+gptq:int4-g32" and r.candidate.method == "awq+gptq" and r.miss == {"quality": 5.1}
    assert not r.quality_ok and r.judgement.allowed == 1.0 and r["slices"] == {"hard": -5.0}
    assert json.dumps(r.to_json()) == line
    error = '{"candidate": {"name": "rtn:int8", "method": "rtn", "format": "int8", "target_bits": null, "student": null}, ' \
            '"status": "error", "error": "RuntimeError: boom"}'
    assert json.dumps(CandidateResult.from_json(json.loads(error)).to_json()) == error
    # judged again under other constraints: a new record; the one judged before is unchanged
    again = judge(r, Constraints(max_drop=10), 10.0)
    assert again.qualifies and again.miss == {} and not r.qualifies


def test_the_recommendation_says_when_its_speed_is_from_batch_times():
    """A speed ratio from examples run in batches (no latency limit or objective) is said to be from batch
    times, not latencies; with a latency asked for, examples ran alone and the ratio stands as it is."""
    from shrink.entrypoints.search.frontier import explain
    from shrink.entrypoints.search.records import Original

    r = CandidateResult(Candidate("rtn:int8", format="int8"), "done", score=0.6, original_score=0.6, change=0.0,
                        ci_low=0.0, ci_high=0.0, within=True, size_bytes=100, latency_example=0.05)
    original = Original("m", 400, 400, latency_example=0.1)
    for c, batched in ((Constraints(max_drop=1), True), (Constraints.of(max_drop=1, max_latency="80ms"), False)):
        line = explain(judge(r, c, 1.0), c, original)
        assert line.startswith("RECOMMENDED: rtn:int8") and "2.00x the original's speed per example" in line
        assert ("(from batch times, not latencies)" in line) == batched


def test_a_time_budget_that_cannot_hold_one_candidate_is_refused_before_the_work(tmp_path):
    model, task, _ = _model_and_task(tmp_path)
    with pytest.raises(ShrinkError, match=r"--time 1e-07s cannot hold one candidate: running the task's 50 examples "
                                          r"takes about .*s per model here, once for the original and again for each "
                                          r"candidate, before the candidate is built; give at least --time 1s"):
        shrink.search(model, task, out=tmp_path / "s", candidates=LADDER, progress=False, time=1e-7)
    assert not (tmp_path / "s" / "results.jsonl").exists()  # nothing measured


def test_the_latency_note_says_how_the_search_measured(tmp_path):
    # the report reads the batch size the search compared in, not a second copy of its rule
    from shrink.report.search import latency_note

    model, task, _ = _model_and_task(tmp_path)
    batched = shrink.search(model, task, out=tmp_path / "b", candidates=LADDER[:1], progress=False, max_drop=10)
    alone = shrink.search(model, task, out=tmp_path / "a", candidates=LADDER[:1], progress=False, max_drop=10,
                          max_latency="10s")
    assert (batched.batch_size, alone.batch_size) == (16, 1)
    assert "batches of 16 examples" in latency_note(batched) and "each example run alone" in latency_note(alone)
    assert json.loads((tmp_path / "a" / "results.json").read_text())["batch_size"] == 1


@pytest.mark.parametrize("field,value,needle", [
    ("change", None, "'within' is true, but its numbers are not within"),
    ("change", "0.1", "'change' must be a finite number or null"),
    ("ci_high", -0.7, "'change' -0.5 lies outside its own interval"),
    ("ci_low", -3.0, "'within' is true, but its numbers are not within"),
    ("within", "no", "'within' must be true or false, got 'no'"),
    ("within", 1, "'within' must be true or false"),
    ("allowed", 1e9, "'allowed' is 1000000000.0, but the search's tolerance gives 1"),
    ("allowed", -1, "'allowed' must be a number of 0 or more"),
    ("size_bytes", 1.5, "'size_bytes' must be a whole number of bytes"),
    ("size_bytes", True, "'size_bytes' must be a whole number of bytes"),
    ("latency_example", -1, "'latency_example' must be a number of 0 or more"),
    ("slices_past", "tag:hard", "'slices_past' must be a list of names"),
    ("slices", {"tag:hard": "x"}, "'slices' must map slice names to finite numbers"),
    ("errors", -2, "'errors' must be a count"),
])
def test_a_resumed_search_believes_no_stored_record_without_checking_it(tmp_path, field, value, needle):
    r = CandidateResult(Candidate("rtn:int8", format="int8"), "done", score=0.595, original_score=0.6, change=-0.5,
                        ci_low=-0.9, ci_high=0.0, within=True, size_bytes=100, memory_bytes=100, latency_example=0.05)
    con = Constraints(max_drop=1)
    good = judge(r, con, 1.0).to_json()
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(good) + "\n")
    assert search_run._read_results(path, con)[0].within
    bad = {**good, field: value}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) .replace('"rtn:int8"', '"rtn:int4"') + "\n")
    with pytest.raises(ShrinkError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(needle)):
        search_run._read_results(path, con)


def test_one_model_at_a_time_finds_what_holding_both_finds(tmp_path, monkeypatch):
    # the original runs once, alone, its outcomes kept on disk; each candidate is quantized block by block
    # from the folder and loaded from there: the same comparisons as with the original in memory
    from helpers import tiny_llama, tiny_tokenizer, word_text

    tok, m = tiny_tokenizer(), tiny_llama(tie=False)
    m.to(torch.bfloat16).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"id": f"e{i}", "input": word_text(5, seed=i), "target": word_text(1, seed=50 + i),
                                        "match": "contains", "max_new_tokens": 3}) + "\n" for i in range(6)))
    cands = [Candidate("rtn:int8", "rtn", "int8"), Candidate("rtn:int4-g32", "rtn", "int4-g32")]
    kw = dict(candidates=cands, keep_order=True, max_drop=100, progress=False)
    together = shrink.search(str(tmp_path / "m"), str(task), out=tmp_path / "a", one_at_a_time=False, **kw)
    alone = shrink.search(str(tmp_path / "m"), str(task), out=tmp_path / "b", one_at_a_time=True, **kw)
    assert (tmp_path / "b" / "original-outcomes").is_dir() and not (tmp_path / "a" / "original-outcomes").exists()
    assert [r.name for r in alone.results] == [r.name for r in together.results] == ["rtn:int8", "rtn:int4-g32"]
    for a, b in zip(together.results, alone.results):
        assert (a.change, a.kl_mean, a.qualifies) == (b.change, b.kl_mean, b.qualifies)
        # sizes as written: block by block, the kept tensors stay bf16 as stored (in memory they were loaded
        # as float32, and are saved so)
        assert b.size_bytes < a.size_bytes
    assert alone.recommendation.name == together.recommendation.name
    from shrink.entrypoints.search.measure import weights_bytes

    assert weights_bytes(tmp_path / "b" / "best") == alone.recommendation.size_bytes
    best = shrink.load(tmp_path / "b" / "best")
    assert torch.equal(best.model.layers[0].mlp.down_proj.qweight, shrink.load(tmp_path / "a" / "best").model.layers[0].mlp.down_proj.qweight)
    # resumed with another candidate: the stored outcomes serve, the original is not run over the task again
    more = cands + [Candidate("rtn:int4-g64", "rtn", "int4-g64")]
    monkeypatch.setattr(shrink.evaluate, "store_original", lambda *a, **k: pytest.fail("the original ran again"))
    again = shrink.search(str(tmp_path / "m"), str(task), out=tmp_path / "b", one_at_a_time=True, resume=True,
                          **{**kw, "candidates": more})
    assert [r.name for r in again.results][-1] == "rtn:int4-g64"
    with pytest.raises(ShrinkError, match="one model at a time: students are distilled from the original in memory"):
        shrink.search(str(tmp_path / "m"), str(task), out=tmp_path / "c", one_at_a_time=True,
                      candidates=[Candidate("student", "rtn", "int8", student="every-other")], distill_data=str(task))
