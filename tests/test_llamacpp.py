"""llama.cpp as a runtime: an exported GGUF file run by llama.cpp computes what shrink's model computes (up to
llama.cpp's int8 rounding of activations), a crash inside llama.cpp is an error and not the end of the caller,
and `compare --runtime llama.cpp` judges the file llama.cpp runs."""

import os
import signal

import pytest
import torch
from test_export import _with_tok, bpe_llama, bpe_tokenizer

import shrink
from shrink.core.peers import llama_cpp_missing
from shrink.evaluate.llamacpp import LlamaCpp

pytestmark = [pytest.mark.slow, pytest.mark.skipif(llama_cpp_missing() is not None, reason=f"{llama_cpp_missing()}")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tok = bpe_tokenizer()
    model = shrink.quantize(bpe_llama(), "int8", backend="torch", progress=False)
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    shrink.export_gguf(_with_tok(model, tok), path, float_type="f32")
    return model, tok, path


def test_log_probabilities_and_greedy_answers_match_shrink(exported):
    model, tok, path = exported
    ids = torch.tensor(tok("the bank said profit rose in the quarter").input_ids + [7, 70, 170, 270])
    with LlamaCpp(path, n_ctx=128, threads=1) as rt:
        lp = rt.logprobs(ids)
        with torch.no_grad():
            ref = torch.log_softmax(model(ids[None]).logits[0, :-1], -1)
        assert lp.shape == ref.shape
        # llama.cpp rounds activations to 8 bits for Q8_0 dot products: close, not identical
        assert (lp.exp() - ref.exp()).abs().max() < 0.05
        assert (lp.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
        assert 1 <= len(rt.generate(ids[:5], 8)) <= 8
        with pytest.raises(shrink.ShrinkError, match="do not fit in the context of 128"):
            rt.logprobs(torch.zeros(200, dtype=torch.long))
        assert rt.logprobs(ids[:3]).shape == (2, 300)  # still serving after an error


def test_a_float32_export_computes_the_model_exactly_up_to_float_rounding(tmp_path):
    """Every tensor in F32: llama.cpp's arithmetic is float32 too (but for its F16 key/value cache), so names,
    q/k row order, norms and rope must all be right for the log-probabilities to agree this closely."""
    tok = bpe_tokenizer()
    model = bpe_llama(seed=2, tie=False)
    path = tmp_path / "f32.gguf"
    r = shrink.export_gguf(_with_tok(model, tok), path, float_type="f32")
    assert set(r.tensors) == {"F32"}
    ids = torch.tensor([0, 5, 17, 99, 120, 250, 33, 8, 64])
    with LlamaCpp(path, n_ctx=64, threads=1) as rt:
        lp = rt.logprobs(ids)
        new = rt.generate(ids[:4], 12)
    with torch.no_grad():
        ref = torch.log_softmax(model(ids[None]).logits[0, :-1], -1)
        want = model.generate(ids[None, :4], max_new_tokens=12, do_sample=False, eos_token_id=1, pad_token_id=1)
    assert (lp - ref).abs().max() < 2e-2  # llama.cpp keeps K and V in F16 (its default); a wrong name, row
    # order or rope would move them by whole units
    assert new.tolist() == want[0, 4:].tolist()


def test_a_crash_in_llama_cpp_is_an_error_not_the_end_of_the_caller(exported):
    _, _, path = exported
    rt = LlamaCpp(path, n_ctx=64, threads=1)
    os.kill(rt.proc.pid, signal.SIGSEGV)  # what a faulting kernel does
    with pytest.raises(shrink.ShrinkError, match="llama.cpp stopped \\(killed by signal 11\\)"):
        rt.logprobs(torch.tensor([3, 4, 5]))
    rt.close()


def test_files_llama_cpp_cannot_load_are_errors(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(shrink.ShrinkError, match="bad.gguf: llama.cpp could not load the file"):
        LlamaCpp(bad, n_ctx=64, threads=1)
    with pytest.raises(shrink.ShrinkError, match="no such GGUF file"):
        LlamaCpp(tmp_path / "missing.gguf")


def test_compare_judges_what_llama_cpp_computes(exported, tmp_path):
    import json

    model, tok, path = exported
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"id": str(i), "input": t, "choices": ["bank", "oil", "tax"], "answer": i % 3})
                            + "\n" for i, t in enumerate(["the price of", "the chief analyst said", "growth in the uk"])))
    c = shrink.compare(_with_tok(model, tok), path, task, runtime="llama.cpp", chat_template=False, progress=False)
    assert c.compressed["bytes"] == path.stat().st_size
    assert c.divergence["top1_agreement"] == 1.0 and c.divergence["kl"]["mean"] < 1e-3
    with pytest.raises(shrink.ShrinkError, match="runtime llama.cpp runs a .gguf file"):
        shrink.compare(_with_tok(model, tok), _with_tok(model, tok), task, runtime="llama.cpp")


def test_search_judges_candidates_in_llama_cpp(exported, tmp_path):
    import json

    from shrink.entrypoints.search import Candidate

    _, tok, _ = exported
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"id": str(i), "input": t, "choices": ["bank", "oil", "tax"], "answer": i % 3})
                            + "\n" for i, t in enumerate(["the price of", "the chief analyst said", "growth in the uk",
                                                          "the government said"])))
    cands = [Candidate("rtn:int8", "rtn", "int8"), Candidate("rtn:int3-g32", "rtn", "int3-g32")]
    found = shrink.search(_with_tok(bpe_llama(), tok), task, out=tmp_path / "s", candidates=cands, runtime="llama.cpp",
                          progress=False, max_drop=100)
    done = {r["candidate"]["name"]: r for r in found.results}
    assert done["rtn:int8"]["status"] == "done" and done["rtn:int8"]["latency_token"] > 0
    assert done["rtn:int3-g32"]["status"] == "error"
    assert "not run in llama.cpp: no GGUF type holds these layers exactly: int3-g32" in done["rtn:int3-g32"]["error"]
    best = tmp_path / "s" / "best.gguf"
    assert found.recommendation["candidate"]["name"] == "rtn:int8"
    assert best.is_file() and done["rtn:int8"]["size_bytes"] == best.stat().st_size
    assert not (tmp_path / "s" / ".candidate.gguf").exists()
    assert json.loads((tmp_path / "s" / "search.json").read_text())["runtime"] == "llama.cpp"
    assert json.loads((tmp_path / "s" / "results.json").read_text())["runtime"] == "llama.cpp"
    assert "judged in llama.cpp" in (tmp_path / "s" / "report.md").read_text()
    with pytest.raises(shrink.ShrinkError, match="judged candidates in llama.cpp; resume it with --runtime llama.cpp"):
        shrink.search(_with_tok(bpe_llama(), tok), task, out=tmp_path / "s", candidates=cands, resume=True,
                      progress=False, max_drop=100)


def test_repacked_kernels_are_fed_one_token_at_a_time(exported):
    """llama.cpp's repacked kernels (its default for decoding) crash here on batches of more than one token;
    with repack=True every token goes in a batch of its own, and the results match the plain kernels'."""
    _, _, path = exported
    ids = torch.tensor([0, 9, 19, 29, 39, 49, 59])
    with LlamaCpp(path, n_ctx=64, threads=1) as plain, LlamaCpp(path, n_ctx=64, threads=1, repack=True) as packed:
        a, b = plain.logprobs(ids), packed.logprobs(ids)
        assert (a - b).abs().max() < 0.05 and torch.equal(a.argmax(-1), b.argmax(-1))
        assert packed.bench(prompt=8, decode=4)["prompt_s"] is None
        assert plain.bench(prompt=8, decode=4)["prompt_s"] > 0
