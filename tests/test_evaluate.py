import copy
import json
import math

import numpy as np
import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer, word_text
from scipy import stats as sps

import shrink
from shrink.core.errors import ShrinkError
from shrink.evaluate import compare_models, load_task
from shrink.evaluate.scorers import contains, exact, last_number, numeric, regex
from shrink.evaluate.stats import mcnemar_exact, paired_bootstrap
from shrink.runtime import decoder_for


def _write(tmp_path, lines, name="task.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return p


# ---- task files ---------------------------------------------------------------------------------

def test_task_kinds_and_defaults(tmp_path):
    t = load_task(_write(tmp_path, [{"input": "q", "target": "a", "tags": ["hard"]}, {"input": "r", "target": [1, 2], "match": "numeric"}]))
    assert t.kind == "generation" and [e.id for e in t.examples] == ["1", "2"]
    assert t.examples[0].tags == ("hard",) and t.examples[1].data["target"] == [1, 2]
    assert load_task(_write(tmp_path, [{"input": "q", "choices": ["a", "b"], "answer": 1}])).kind == "choice"
    assert load_task(_write(tmp_path, [{"input": "q", "label": "x"}, {"input": "r", "label": "y"}])).labels() == ["x", "y"]
    assert load_task(_write(tmp_path, [{"text": "some text"}])).kind == "perplexity"
    d = load_task(None)
    assert d.name == "default" and len(d.examples) >= 30
    assert {"easy", "hard"} <= {t for e in d.examples for t in e.tags}


@pytest.mark.parametrize("line,message", [
    ("{not json", r"task.jsonl:2: invalid JSON"),
    ({"input": "q"}, r"task.jsonl:2: cannot tell the kind"),
    ({"target": "a"}, r"task.jsonl:2: missing field 'input'"),
    ({"input": "q", "target": "a", "match": "fuzzy"}, r"task.jsonl:2: unknown match 'fuzzy'"),
    ({"input": "q", "target": "a", "color": 1}, r"task.jsonl:2: unknown field\(s\) \['color'\]"),
    ({"input": "q", "choices": ["a", "b"], "answer": 2}, r"task.jsonl:2: 'answer' must be the index"),
    ({"text": "some text"}, r"task.jsonl:2: a perplexity example in a task of generation examples \(perplexity "
                             r"examples are scored in percent of perplexity, not points: give them a file of their own\)"),
    ({"id": "one", "input": "q", "target": "a"}, r"task.jsonl:2: id 'one' already used on line 1"),
    ({"input": "q", "target": "a(", "match": "regex"}, r"task.jsonl:2: invalid regular expression"),
    ({"input": "q", "target": "seven", "match": "numeric"}, r"task.jsonl:2: numeric match needs numeric targets"),
])
def test_bad_task_lines_name_file_and_line(tmp_path, line, message):
    p = _write(tmp_path, [{"id": "one", "input": "q", "target": "a"}, line])
    with pytest.raises(ShrinkError, match=message):
        load_task(p)


def test_empty_and_missing_task(tmp_path):
    with pytest.raises(ShrinkError, match=r"empty.jsonl: empty task"):
        load_task(_write(tmp_path, ["", "  "], "empty.jsonl"))
    with pytest.raises(ShrinkError, match=r"nope.jsonl: no such task file"):
        load_task(tmp_path / "nope.jsonl")
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 2)))
    with pytest.raises(ShrinkError, match=r"bad.npz: missing array 'y'"):
        load_task(tmp_path / "bad.npz")


# ---- scorers and statistics --------------------------------------------------------------------

def test_scorers():
    assert exact("  Paris. ", "paris") and not exact("Paris, France", "Paris")
    assert contains("The capital is Paris.", "paris") and not contains("Parisian food", "Paris")
    assert regex("Brasília", "Bras[ií]lia")
    assert last_number("17 * 23 = 391.") == 391 and last_number("about 1,234.5 km") == 1234.5 and last_number("none") is None
    assert numeric("2 + 3 = 5", 5) and not numeric("2 + 3 = 6", 5) and numeric("0.333", 1 / 3, tolerance=1e-3)


@pytest.mark.parametrize("b,c", [(0, 0), (10, 2), (3, 3), (0, 7), (25, 11), (1, 0)])
def test_mcnemar_exact_matches_scipy_binomial_test(b, c):
    want = 1.0 if b + c == 0 else sps.binomtest(min(b, c), b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(want, rel=1e-12)


def test_paired_bootstrap_matches_scipy():
    g = np.random.default_rng(1)
    a = g.random(200)
    b = a - 0.1 + 0.2 * g.random(200)
    diff, lo, hi = paired_bootstrap(a, b, resamples=4000)
    ref = sps.bootstrap((a, b), lambda x, y: np.mean(y - x), paired=True, vectorized=False, method="percentile",
                        n_resamples=4000, random_state=0).confidence_interval
    assert diff == pytest.approx((b - a).mean())
    assert lo == pytest.approx(ref.low, abs=0.004) and hi == pytest.approx(ref.high, abs=0.004)


# ---- comparisons with known flips ---------------------------------------------------------------

def _tensor_task(tmp_path):
    """30 examples, 3 classes, built so that zeroing class 2's output flips exactly known examples."""
    e = np.eye(3, dtype=np.float32)
    x, y, tags = [], [], []
    for _ in range(10):
        x.append(e[0] + 0.1 * e[1]); y.append(0); tags.append("")          # both right
    for _ in range(10):
        x.append(e[2] + 0.5 * e[1]); y.append(2); tags.append("hard")      # right -> wrong
    for _ in range(2):
        x.append(e[2] + 0.6 * e[1]); y.append(1); tags.append("edge")      # wrong -> right
    for _ in range(8):
        x.append(e[1]); y.append(1); tags.append("easy")                   # both right
    p = tmp_path / "t.npz"
    np.savez(p, x=np.stack(x), y=np.array(y), tags=np.array(tags))
    orig = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        orig.weight.copy_(torch.eye(3))
    comp = copy.deepcopy(orig)
    with torch.no_grad():
        comp.weight[2] = 0
    return p, orig, comp


def test_tensor_classifier_flips_and_statistics(tmp_path):
    p, orig, comp = _tensor_task(tmp_path)
    c = compare_models(orig, comp, p)
    assert c.task["kind"] == "tensor" and c.errors == 0
    o = c.overall
    assert (o.n, o.right_to_wrong, o.wrong_to_right) == (30, 10, 2)
    assert o.original == pytest.approx(100 * 28 / 30) and o.compressed == pytest.approx(100 * 20 / 30)
    assert o.change == pytest.approx(-100 * 8 / 30)
    assert o.p_value == pytest.approx(sps.binomtest(2, 12, 0.5).pvalue)
    assert o.ci_low < o.change < o.ci_high < 0
    hard = next(s for s in c.slices if s.name == "tag:hard")
    assert (hard.n, hard.original, hard.compressed, hard.right_to_wrong) == (10, 100.0, 0.0, 10)
    assert hard.p_value == pytest.approx(2 / 2 ** 10)
    assert not c.within and c.status == "PAST THE SWEET SPOT" and "(1 point, absolute): overall -26.7" in c.verdict
    flipped = {e.id: e.flip for e in c.flips}
    assert flipped == {**{str(i): "right→wrong" for i in range(10, 20)}, "20": "wrong→right", "21": "wrong→right"}
    # the label distributions moved only for inputs with mass on class 2
    kl = {int(e.id): e.kl_mean for e in c.examples}
    assert all(kl[i] == pytest.approx(0, abs=1e-7) for i in [*range(10), *range(22, 30)])
    assert all(kl[i] > 0.1 for i in range(10, 22))
    assert c.divergence["kl"]["positions"] == 30


def test_verdict_names_the_slice_that_broke(tmp_path):
    # Overall within a generous tolerance, but the hard slice lost everything, significantly.
    p, orig, comp = _tensor_task(tmp_path)
    c = compare_models(orig, comp, p, tolerance=30)
    assert not c.within
    assert "overall -26.7 points" in c.verdict
    assert "the tag:hard slice lost 100.0 points (p = 0.00195)" in c.verdict
    assert "still aces simple inputs and fails hard ones" in c.verdict
    assert [s.name for s in c.slices if s.past] == ["tag:hard"]
    c = compare_models(orig, orig, p)
    assert c.within and c.overall.change == 0 and not c.flips and c.verdict.startswith("WITHIN TOLERANCE")


def test_relative_tolerance(tmp_path):
    p, orig, comp = _tensor_task(tmp_path)
    c = compare_models(orig, comp, p, tolerance=40, relative=True)  # 40% of 93.3 = 37.3 points allowed overall
    assert "40% of the original score, relative = 37.33 points overall" in c.verdict
    assert c.relative


def test_compare_takes_max_drop_as_search_calls_it(tmp_path):
    p, orig, comp = _tensor_task(tmp_path)
    as_search = shrink.compare(orig, comp, p, max_drop=40, relative=True, progress=False)
    older = shrink.compare(orig, comp, p, tolerance=40, relative=True, progress=False)
    assert as_search.tolerance == older.tolerance == 40 and as_search.verdict == older.verdict
    with pytest.raises(ShrinkError, match="max_drop or tolerance"):
        shrink.compare(orig, comp, p, max_drop=1, tolerance=1)


def test_difficulty_slices_without_tags(tmp_path):
    p, orig, comp = _tensor_task(tmp_path)
    z = dict(np.load(p))
    np.savez(p, x=z["x"], y=z["y"])
    c = compare_models(orig, comp, p)
    names = [s.name for s in c.slices]
    assert names and set(names) == {"confidence:low", "confidence:mid", "confidence:high"}
    assert sum(s.n for s in c.slices) == 30


# ---- language models ----------------------------------------------------------------------------

@pytest.fixture
def tok():
    return tiny_tokenizer()


def _gen_task(tmp_path, n=8):
    lines = [{"id": f"e{i}", "input": word_text(6, seed=i), "target": word_text(1, seed=100 + i), "match": "contains",
              "tags": ["hard"] if i % 2 else ["easy"], "max_new_tokens": 4} for i in range(n)]
    return _write(tmp_path, lines)


@pytest.fixture
def through(monkeypatch):
    """through(runtime, *models): the models, scored in shrink's runtime when `runtime` (which the comparison
    asks for a decoder, whichever way the models were made), else in transformers (SHRINK_RUNTIME=0)."""
    def scored_in(runtime: bool, *models):
        if runtime:
            assert all(decoder_for(m) is not None for m in models)
        else:
            monkeypatch.setenv("SHRINK_RUNTIME", "0")
        return models if len(models) > 1 else models[0]
    return scored_in


def test_answers_are_drafted_in_batches_only_so_one_example_alone_takes_its_own_time(tmp_path, tok, monkeypatch, through):
    """In a batch, the runtime takes the compressed model's answer from the original's where it agrees
    (decode's draft); an example run alone (batch_size=1, the latency a search measures) is decoded on its
    own. The report says batch times are not latencies."""
    from shrink.report.comparison import model_rows
    from shrink.runtime import LlamaDecoder

    seen = []
    decode = LlamaDecoder.decode

    def spy(self, *args, draft=False, **kw):
        seen.append(draft)
        return decode(self, *args, draft=draft, **kw)

    monkeypatch.setattr(LlamaDecoder, "decode", spy)
    m = tiny_llama()
    m, q = through(True, m, shrink.quantize(copy.deepcopy(m), "int8", progress=False))
    one = compare_models(m, q, _gen_task(tmp_path, n=4), tokenizer=tok, batch_size=1)
    assert seen == [False] * 8 and one.task["batch_size"] == 1 and "latency" not in model_rows(one)[-1][-1]
    seen.clear()
    many = compare_models(m, q, _gen_task(tmp_path, n=4), tokenizer=tok, batch_size=4)
    assert seen == [True, True] and "--batch-size 1 for latency" in model_rows(many)[-1][-1]
    assert [e.compressed_output for e in one.examples] == [e.compressed_output for e in many.examples]


@pytest.mark.parametrize("runtime", [False, True], ids=["transformers", "runtime"])
@pytest.mark.parametrize("kind", ["generation", "choice", "perplexity", "mixed"])
def test_batched_comparison_is_the_one_at_a_time_comparison(tmp_path, tok, kind, runtime, through):
    # prompts of many lengths (left padding in generation, right padding in scoring), generation lengths
    # that differ within a batch, and answers that stop early at the end-of-sequence token; in the runtime,
    # log-probabilities come from the decoding pass and from continuations forked from the prompt's cache
    m = tiny_llama(seed=3, tie=False)
    with torch.no_grad():
        m.lm_head.weight[2] *= 3.0  # the end-of-sequence token wins often: some answers stop at once
    generation = [{"id": f"g{i}", "input": word_text(3 + 2 * i, seed=i), "target": word_text(1, seed=100 + i),
                   "match": "contains", "max_new_tokens": 3 + i % 5} for i in range(12)]
    choice = [{"id": f"c{i}", "input": word_text(2 + 3 * i, seed=i), "answer": i % 3,
               "choices": [word_text(1 + i % 2, seed=200 + i), "oil", word_text(3, seed=300 + i)]} for i in range(9)]
    if kind == "generation":
        lines = generation
    elif kind == "choice":
        lines = choice
    elif kind == "mixed":  # interleaved in the file; batches hold one kind each
        lines = [x for pair in zip(generation, choice) for x in pair] + generation[len(choice):]
    else:
        lines = [{"id": f"p{i}", "text": word_text(4 + 5 * i, seed=i)} for i in range(7)]
    task = _write(tmp_path, lines)
    # The PyTorch backend computes in float throughout: padding and batching may change float rounding only.
    q = shrink.quantize(copy.deepcopy(m), "int4-g32", progress=False, backend="torch")
    m, q = through(runtime, m, q)
    one = compare_models(m, q, task, tokenizer=tok, batch_size=1)
    many = compare_models(m, q, task, tokenizer=tok, batch_size=5)
    assert one.errors == many.errors == 0
    assert [e.id for e in one.examples] == [e.id for e in many.examples] == [x["id"] for x in lines]
    for a, b in zip(one.examples, many.examples):
        if kind != "perplexity":  # there the output is the score, printed to 3 decimals: compared below
            assert (a.original_output, a.compressed_output, a.flip) == (b.original_output, b.compressed_output, b.flip)
        assert a.original_score == pytest.approx(b.original_score, rel=1e-5, abs=1e-6)
        assert a.compressed_score == pytest.approx(b.compressed_score, rel=1e-5, abs=1e-6)
        assert a.kl_mean == pytest.approx(b.kl_mean, rel=1e-3, abs=1e-7)
    assert one.within == many.within and one.overall.change == pytest.approx(many.overall.change, rel=1e-4, abs=1e-6)
    if kind != "perplexity":  # the verdict prints the change to 0.1 points: the same, once the scores are
        assert one.verdict == many.verdict
    if kind == "generation":
        assert any(e.original_output == "" for e in one.examples)  # stopped at once: what padding must not change
    if kind == "mixed":
        assert one.task["kind"] == "mixed" and [s.name for s in one.slices][:2] == ["kind:generation", "kind:choice"]
        assert {s.name: s.n for s in one.slices}["kind:choice"] == 9
    # The native kernel (both of its paths: batches of 5 reach its float GEMM) quantizes activations to int8:
    # an input that differs by float rounding may move one code by one step, which moves a short example's
    # score by a fraction of a percent; a padding error would move it by far more.
    qn = through(runtime, shrink.quantize(copy.deepcopy(m), "int4-g32", progress=False))
    one, many = compare_models(m, qn, task, tokenizer=tok, batch_size=1), compare_models(m, qn, task, tokenizer=tok, batch_size=5)
    assert one.errors == many.errors == 0
    for a, b in zip(one.examples, many.examples):
        assert a.compressed_score == pytest.approx(b.compressed_score, rel=1e-2, abs=1e-6)
    same = [a.compressed_output == b.compressed_output for a, b in zip(one.examples, many.examples)]
    assert sum(same) >= len(same) - 1
    with pytest.raises(ShrinkError, match="batch_size must be an integer of 1 or more"):
        compare_models(m, q, task, tokenizer=tok, batch_size=0)


@pytest.mark.parametrize("runtime", [False, True], ids=["transformers", "runtime"])
def test_identical_models_have_zero_divergence(tmp_path, tok, runtime, through):
    m = tiny_llama()
    c = compare_models(*through(runtime, m, copy.deepcopy(m)), _gen_task(tmp_path), tokenizer=tok)
    assert c.errors == 0 and not c.flips and c.within
    assert c.divergence["kl"]["mean"] == pytest.approx(0, abs=1e-6)
    assert c.divergence["top1_agreement"] == 1.0
    assert all(e.original_output == e.compressed_output for e in c.examples)


def test_a_model_scores_the_same_whichever_door_it_came_through(tmp_path, tok):
    """shrink.quantize (which also routes the model's own generate through the runtime), the quant part's
    quantize (which does not), and the saved folder loaded back: the comparison asks the runtime for a
    decoder itself, so the three give the same scores; the plain original is scored in the runtime too."""
    from shrink.quant import quantize as quantize_in_place

    m = tiny_llama()
    via_verb = shrink.quantize(copy.deepcopy(m), "int4-g32", progress=False)
    via_part = copy.deepcopy(m)
    quantize_in_place(via_part, "int4-g32", progress=False)
    shrink.save(via_verb, tmp_path / "q")
    via_load = shrink.load(tmp_path / "q")
    task = _gen_task(tmp_path)
    rows = [[(e.original_output, e.compressed_output, e.compressed_score, e.kl_mean) for e in
             compare_models(m, q, task, tokenizer=tok).examples] for q in (via_verb, via_part, via_load)]
    assert rows[0] == rows[1] == rows[2]
    assert decoder_for(m) is not None and decoder_for(via_part) is not None


def test_kl_and_top1_agreement_per_position_match_a_whole_sequence_reference():
    """The comparison's KL, taken in blocks of positions, is scipy's relative entropy of each position's
    two distributions, at every position across block edges; top-1 agreement is the argmax match."""
    from shrink.evaluate.paired import KL_BLOCK_BYTES, Outcome, _kl

    g = torch.Generator().manual_seed(3)
    n = 2 * (KL_BLOCK_BYTES // (8 * 500)) + 3
    x = torch.randn(n, 500, generator=g) * 4
    y = x + 0.3 * torch.randn(n, 500, generator=g)
    y[5] = x[5]  # one position where the models agree exactly
    lp, lq = x.log_softmax(-1), y.log_softmax(-1)
    kl, same = _kl(Outcome("a", 1.0, 0.0, lp), Outcome("b", 1.0, 0.0, lq))
    want = sps.entropy(lp.double().exp().numpy(), lq.double().exp().numpy(), axis=-1)  # it normalises too
    assert kl.shape == (n,) and np.allclose(kl, want, rtol=1e-9, atol=1e-15) and kl[5] == 0
    assert (same == (x.argmax(-1) == y.argmax(-1)).numpy()).all() and not same.all()


@pytest.mark.parametrize("runtime", [False, True], ids=["transformers", "runtime"])
def test_quantized_model_diverges_and_is_measured_on_the_same_tokens(tmp_path, tok, runtime, through):
    m = tiny_llama()
    q = shrink.quantize(copy.deepcopy(m), "int2-g32", keep_output=False)
    c = compare_models(*through(runtime, m, q), _gen_task(tmp_path), tokenizer=tok)
    assert c.divergence["kl"]["mean"] > 0.01 and c.divergence["top1_agreement"] < 1
    assert c.compressed["bytes"] < c.original["bytes"]
    # KL of one example by hand: both models on prompt + the original's greedy answer
    ex = load_task(tmp_path / "task.jsonl").examples[0]
    ids = torch.tensor(tok(ex.input).input_ids)
    new = m.generate(ids.unsqueeze(0), max_new_tokens=4, do_sample=False, eos_token_id=2, pad_token_id=2)[0, len(ids):]
    seq = torch.cat([ids, new]).unsqueeze(0)
    with torch.no_grad():
        lp = torch.log_softmax(m(seq).logits[0, :-1], -1)
        lq = torch.log_softmax(q(seq).logits[0, :-1], -1)
    want = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    assert c.examples[0].kl_mean == pytest.approx(want, rel=1e-4)
    assert c.examples[0].original_output == tok.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("runtime", [False, True], ids=["transformers", "runtime"])
def test_choice_log_likelihood_and_perplexity_by_hand(tmp_path, tok, runtime, through):
    m = through(runtime, tiny_llama())
    choices = ["market", "bank shares", "oil"]
    p = _write(tmp_path, [{"input": "the price of", "choices": choices, "answer": 1}])
    c = compare_models(m, m, p, tokenizer=tok)
    prompt = tok("the price of").input_ids
    scores = []
    for ch in choices:
        ids = torch.tensor(prompt + tok(ch, add_special_tokens=False).input_ids)
        with torch.no_grad():
            lp = torch.log_softmax(m(ids.unsqueeze(0)).logits[0, :-1], -1)
        scores.append(lp[len(prompt) - 1:].gather(1, ids[len(prompt):].unsqueeze(1)).sum().item())
    best = int(np.argmax(scores))
    assert c.examples[0].original_output == choices[best]
    assert c.examples[0].original_score == float(best == 1)
    top = sorted(scores, reverse=True)
    assert c.examples[0].confidence == pytest.approx(top[0] - top[1], rel=1e-5)

    text = word_text(20, seed=5)
    c = compare_models(m, m, _write(tmp_path, [{"text": text}], "ppl.jsonl"), tokenizer=tok)
    ids = torch.tensor([1] + tok(text, add_special_tokens=False).input_ids).unsqueeze(0)
    with torch.no_grad():
        loss = m(ids, labels=ids).loss.item()
    assert c.overall.original == pytest.approx(math.exp(loss), rel=1e-4)
    assert "%" in c.verdict


def test_failing_example_is_recorded_and_others_kept(tmp_path, tok, monkeypatch):
    (tmp_path / "my_scorer.py").write_text(
        "def score(output, example):\n"
        "    if example.id == 'e3':\n"
        "        raise RuntimeError('scorer cannot read this one')\n"
        "    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = tiny_llama()
    c = compare_models(m, m, _gen_task(tmp_path), tokenizer=tok, scorer="my_scorer:score")
    assert c.errors == 1 and c.overall.n == 7 and c.overall.original == 100.0
    bad = next(e for e in c.examples if e.id == "e3")
    assert bad.error == "RuntimeError: scorer cannot read this one"
    with pytest.raises(ShrinkError, match="scorer 'my_scorer:nope': module 'my_scorer' has no function 'nope'"):
        compare_models(m, m, _gen_task(tmp_path), tokenizer=tok, scorer="my_scorer:nope")
    with pytest.raises(ShrinkError, match="scorer 'no_such_mod:f': cannot import 'no_such_mod'"):
        compare_models(m, m, _gen_task(tmp_path), tokenizer=tok, scorer="no_such_mod:f")
    # a file path works too, and the scorer's return value is the score
    (tmp_path / "half.py").write_text("def score(output, example):\n    return 0.25\n")
    c = compare_models(m, m, _gen_task(tmp_path), tokenizer=tok, scorer=f"{tmp_path / 'half.py'}:score")
    assert c.overall.original == 25.0 and c.errors == 0


def test_mismatched_models_are_refused(tmp_path, tok):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "</s>": 2, "other": 3}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    m = tiny_llama()
    with pytest.raises(ShrinkError, match="different tokenizers"):
        compare_models(m, m, _gen_task(tmp_path), tokenizer=tok, compressed_tokenizer=other)
    with pytest.raises(ShrinkError, match="perplexity task, which a tensor classifier model cannot run"):
        compare_models(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), _write(tmp_path, [{"text": "a b"}]))

    def bert(labels):
        cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         num_labels=2, id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})
        return BertForSequenceClassification(cfg).eval()

    task = _write(tmp_path, [{"input": "bank shares rise", "label": "up"}, {"input": "oil price fall", "label": "down"}])
    c = compare_models(bert(["up", "down"]), bert(["up", "down"]), task, tokenizer=tok)
    assert c.task["kind"] == "classification" and c.divergence["kl"]["positions"] == 2
    with pytest.raises(ShrinkError, match="different label sets"):
        compare_models(bert(["up", "down"]), bert(["up", "sideways"]), task, tokenizer=tok)
    with pytest.raises(ShrinkError, match=r"labels \['down'\] that the model does not know"):
        compare_models(bert(["up", "flat"]), bert(["up", "flat"]), task, tokenizer=tok)


def test_encoder_zero_shot_classification(tmp_path, tok):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    enc = BertModel(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).eval()
    task = _write(tmp_path, [{"input": "bank shares rise", "label": "bank"}, {"input": "oil price fall", "label": "oil"}])
    c = compare_models(enc, enc, task, tokenizer=tok)
    assert c.original["kind"] == "encoder"
    assert c.divergence["embedding_cosine"]["min"] == pytest.approx(1.0, abs=1e-5)


def test_an_example_without_the_chat_template_is_plain_text(tok):
    # "chat": false: the input is text the answer continues (a cloze), not a user message
    from shrink.evaluate.adapters import CausalLMAdapter

    tok.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}"
    ad = CausalLMAdapter(tiny_llama(), tok)
    text = "the market rose"
    assert ad.prompt_ids(text, chat=False).tolist() == tok(text).input_ids
    assert ad.prompt_ids(text).tolist() == [1] + tok(text).input_ids + [2]


def test_an_original_named_by_path_runs_alone_and_its_stored_outcomes_are_reused(tmp_path, tok, monkeypatch, capsys):
    """compare(path, path, out=DIR) runs the original alone first, keeps its outcomes in DIR/original-outcomes
    and lets it go before the compressed model is loaded, with the results of both models run together; a
    later comparison into DIR reuses them without loading the original, unless its files or the task changed."""
    from shrink.entrypoints import compare as entry
    from shrink.io import read_model

    m = tiny_llama(seed=3, tie=False)
    m.save_pretrained(tmp_path / "orig")
    tok.save_pretrained(tmp_path / "orig")
    shrink.save(shrink.quantize(copy.deepcopy(m), "int4-g32", progress=False), tmp_path / "q", tokenizer=tok)
    lines = [{"id": f"g{i}", "input": word_text(3 + 2 * i, seed=i), "target": word_text(1, seed=100 + i),
              "match": "contains", "max_new_tokens": 2 + i % 3} for i in range(6)]
    lines += [{"id": f"c{i}", "input": word_text(2 + 3 * i, seed=i), "answer": i % 3,
               "choices": [word_text(1, seed=200 + i), "oil", word_text(2, seed=300 + i)]} for i in range(4)]
    task = _write(tmp_path, lines)
    together = compare_models(read_model(tmp_path / "orig").model, read_model(tmp_path / "q").model, task,
                              tokenizer=tok, batch_size=4)

    loaded = []
    real = entry.resolve
    monkeypatch.setattr(entry, "resolve", lambda spec, tok=None: loaded.append(str(spec)) or real(spec, tok))
    alone = shrink.compare(tmp_path / "orig", tmp_path / "q", task, out=tmp_path / "cmp", batch_size=4, progress=False,
                           one_at_a_time=True)
    assert loaded == [str(tmp_path / "orig"), str(tmp_path / "q")]
    stored = json.loads((tmp_path / "cmp" / "original-outcomes" / "outcomes.json").read_text())
    assert sorted(stored["examples"]) == sorted(x["id"] for x in lines)

    def same(a, b):
        assert [e.id for e in a.examples] == [e.id for e in b.examples]
        for x, y in zip(a.examples, b.examples):
            assert (x.original_output, x.compressed_output, x.original_score, x.compressed_score, x.kl_mean) == \
                (y.original_output, y.compressed_output, y.original_score, y.compressed_score, y.kl_mean)
        assert a.divergence == b.divergence and a.verdict == b.verdict and a.original["bytes"] == b.original["bytes"]

    same(alone, together)
    loaded.clear()
    capsys.readouterr()
    again = shrink.compare(tmp_path / "orig", tmp_path / "q", task, out=tmp_path / "cmp", force=True, batch_size=4,
                           progress=False)
    assert loaded == [str(tmp_path / "q")] and "not run again" in capsys.readouterr().err
    same(again, together)
    # other options, or another task: the original runs again
    loaded.clear()
    shrink.compare(tmp_path / "orig", tmp_path / "q", task, out=tmp_path / "cmp", force=True, batch_size=2, progress=False,
                   one_at_a_time=True)
    assert loaded[0] == str(tmp_path / "orig")
    loaded.clear()
    shrink.compare(tmp_path / "orig", tmp_path / "q", _write(tmp_path, lines[:-1], "fewer.jsonl"), out=tmp_path / "cmp", force=True,
                   batch_size=2, progress=False, one_at_a_time=True)
    assert loaded[0] == str(tmp_path / "orig")
    # a stored batch gone: the comparison names the file and says how to run the original again
    batch = next((tmp_path / "cmp" / "original-outcomes").glob("batch-*.safetensors"))
    batch.unlink()
    with pytest.raises(ShrinkError, match=rf"{batch.name}: the original's stored outcomes cannot be read .* delete"):
        shrink.compare(tmp_path / "orig", tmp_path / "q", _write(tmp_path, lines[:-1], "fewer.jsonl"),
                       out=tmp_path / "cmp", force=True, batch_size=2, progress=False)
    # a disk that fills while they are written: one line, nothing of them kept
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as mp:
        mp.setattr("shrink.evaluate.stored.save_file", full)
        with pytest.raises(ShrinkError, match="cannot write the original's outcomes \\(No space left on device\\)"):
            shrink.compare(tmp_path / "orig", tmp_path / "q", task, out=tmp_path / "cmp3", progress=False,
                           one_at_a_time=True)
    assert not list((tmp_path / "cmp3").glob("*original*"))
    # models that fit in memory together run together by default: nothing is stored
    plain = shrink.compare(tmp_path / "orig", tmp_path / "q", task, out=tmp_path / "cmp2", batch_size=4, progress=False)
    same(plain, together)
    assert not (tmp_path / "cmp2" / "original-outcomes").exists()
    # bad options are refused before the original runs
    loaded.clear()
    with pytest.raises(ShrinkError, match="batch_size"):
        shrink.compare(tmp_path / "orig", tmp_path / "q", task, out=tmp_path / "cmp", force=True, batch_size=0)
    assert loaded == []


def test_a_bf16_original_too_large_in_float32_is_compared_as_stored(tmp_path, tok, monkeypatch, capsys):
    """A bf16 folder that fits in memory as stored but not in float32 is loaded, and run, in bf16 (said so);
    compared by path it runs alone, then the compressed model, with sound results."""
    import shrink.core.memory as memory
    from shrink.io import read_model

    m = tiny_llama(seed=3, tie=False)
    m.to(torch.bfloat16).save_pretrained(tmp_path / "orig")
    tok.save_pretrained(tmp_path / "orig")
    shrink.save(shrink.quantize(copy.deepcopy(m).float(), "int8", progress=False), tmp_path / "q", tokenizer=tok)
    weights = sum(p.numel() for p in m.parameters())
    monkeypatch.setattr(memory, "available_memory", lambda: 5 * weights)  # bf16 and its file fit; float32 does not
    loaded = read_model(tmp_path / "orig")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16} and loaded.source["dtype"] == "bfloat16"
    assert "loaded in bfloat16, as stored" in capsys.readouterr().err
    del loaded
    c = shrink.compare(tmp_path / "orig", tmp_path / "q", _gen_task(tmp_path), out=tmp_path / "cmp", progress=False)
    assert c.errors == 0 and math.isfinite(c.divergence["kl"]["mean"])
    assert 2 * weights <= c.original["bytes"] < 2.1 * weights  # its weights held in bf16 (and a float32 buffer)
    assert c.divergence["top1_agreement"] > 0.5  # int8 of the same weights: mostly the same next tokens
    assert (tmp_path / "cmp" / "original-outcomes" / "outcomes.json").is_file()  # too large together: one at a time
    assert "the original runs alone first" in capsys.readouterr().err
