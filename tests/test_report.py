import json
import os
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from helpers import tiny_llama, tiny_tokenizer, word_text
from test_evaluate import _tensor_task, _write

import shrink
from shrink.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(path):
    """Load a page headless: (rendered DOM, console messages)."""
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                        "--dump-dom", path.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, [line for line in r.stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture
def tensor_report(tmp_path):
    p, orig, comp = _tensor_task(tmp_path)
    c = shrink.compare(orig, comp, p, tolerance=30, out=tmp_path / "rep")
    return c, tmp_path / "rep"


def test_report_files(tensor_report):
    c, out = tensor_report
    res = json.loads((out / "results.json").read_text(), parse_constant=lambda x: pytest.fail(f"non-JSON {x}"))
    assert res["verdict"] == c.verdict and res["overall"]["right_to_wrong"] == 10
    assert len(res["examples"]) == 30 and res["tolerance"] == 30 and res["relative"] is False
    md = (out / "report.md").read_text()
    assert md.count("right→wrong") >= 10 and c.verdict in md and "absolute (points)" in md
    html = (out / "report.html").read_text()
    assert html.count("<svg") == 3 and "PAST THE SWEET SPOT" in html
    assert "<script src" not in html and "<link" not in html  # self-contained


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("SHRINK_REQUIRE_CHROMIUM"),
                    reason="chromium not installed (scripts/setup.sh --test installs it)")
@pytest.mark.slow  # a subprocess or a browser
def test_html_report_renders_in_headless_chromium(tensor_report, tmp_path):
    assert CHROMIUM, "SHRINK_REQUIRE_CHROMIUM is set but chromium is not installed"
    # The check itself must be able to fail: a page with a script error is caught.
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>notDefined()</script></body></html>")
    assert any("notDefined" in m for m in _chromium(bad)[1])

    c, out = tensor_report
    dom, console = _chromium(out / "report.html")
    assert console == []
    assert len(re.findall(r"<svg[^>]*>", dom)) == 3
    assert dom.count("<path") > 20  # the plots drew their bars and axes
    assert "tag:hard" in dom and c.verdict.split(":")[0] in dom


@pytest.fixture
def lm_folders(tmp_path):
    tok = tiny_tokenizer()
    orig = tmp_path / "orig"
    m = tiny_llama()
    m.save_pretrained(orig)
    tok.save_pretrained(orig)
    q = tmp_path / "q"
    shrink.save(shrink.quantize(m, "int4-g32"), q, tokenizer=tok)
    task = _write(tmp_path, [{"id": f"e{i}", "input": word_text(5, seed=i), "target": word_text(1, seed=50 + i),
                              "match": "contains", "tags": ["hard"] if i % 2 else ["easy"]} for i in range(6)])
    return orig, q, task


def test_cli_compare_writes_report(lm_folders, tmp_path):
    orig, q, task = lm_folders
    out = tmp_path / "cmp"
    r = CliRunner().invoke(main, ["compare", str(orig), str(q), "--task", str(task), "--out", str(out),
                                  "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert "WITHIN TOLERANCE" in r.output or "PAST THE SWEET SPOT" in r.output
    assert "KL divergence" in r.output and "tag:hard" in r.output
    res = json.loads((out / "results.json").read_text())
    assert res["task"]["examples"] == 6 and res["divergence"]["kl"]["positions"] > 0
    assert res["compressed"]["bytes"] < res["original"]["bytes"]
    assert (out / "report.html").is_file() and (out / "report.md").is_file()


def test_cli_compare_strict_and_bad_task(lm_folders, tmp_path):
    orig, q, task = lm_folders
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "target": "b"}\n{"input": "a", "target": "b", "match": "fuzzy"}\n')
    r = CliRunner().invoke(main, ["compare", str(orig), str(q), "--task", str(bad)])
    assert r.exit_code == 1 and f"Error: {bad}:2: unknown match 'fuzzy'" in r.output
    r = CliRunner().invoke(main, ["compare", str(orig), str(tmp_path / "missing"), "--task", str(task)])
    assert r.exit_code == 1 and "missing: no such file or folder" in r.output
    # the same model is always within tolerance; strict mode exits 0
    r = CliRunner().invoke(main, ["compare", str(orig), str(orig), "--task", str(task), "--strict", "--max-new-tokens", "2"])
    assert r.exit_code == 0 and "WITHIN TOLERANCE" in r.output
