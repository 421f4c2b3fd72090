"""shrink's decoding runtime (shrink.runtime) against transformers: logits, greedy and sampled generate,
fallbacks, refusals. Tiny Llama models built from configs; the runtime compiles at first use."""

import warnings

import pytest
import torch
from helpers import tiny_llama
from transformers import GenerationConfig
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import shrink
from shrink.core.errors import ShrinkError
from shrink.runtime import LlamaDecoder, Sampling, decoder_for, install
from shrink.runtime import generate as runtime_generate
from shrink.runtime import generation as generate_module
from shrink.runtime import llama as llama_module

pytestmark = pytest.mark.skipif(llama_module.extension() is None, reason="the runtime cannot be compiled here")


def hf_generate(model, *args, **kwargs):
    """transformers' own generate, whatever the instance's generate is."""
    return type(model).generate(model, *args, **kwargs)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(generate_module, "_said", set())


def ids(n, seed=1):
    return torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(seed))


def left_padded(lengths, seed=0):
    """input_ids [rows, max(lengths)] left-padded with 0 and their attention mask."""
    width = max(lengths)
    out, mask = torch.zeros(len(lengths), width, dtype=torch.long), torch.zeros(len(lengths), width, dtype=torch.long)
    for r, n in enumerate(lengths):
        out[r, width - n:] = ids(n, seed + r)
        mask[r, width - n:] = 1
    return out, mask


@pytest.mark.parametrize("tie", [True, False])
def test_float_logits_match_transformers(tie):
    m = tiny_llama(tie=tie)
    x = ids(40)
    with torch.no_grad():
        want = m(x[None]).logits[0]
    assert torch.allclose(LlamaDecoder(m).logits(x), want, atol=1e-4, rtol=0)


def test_few_row_float_products_match_transformers_at_every_row_count():
    """Float layers of 1-16 rows go through the runtime's own GEMV (one weight row at a time up to 4 rows,
    tiles of 4 rows by 2 weight rows past that): odd output counts and input widths that are no multiple of
    8 take its tail paths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=133, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    d = LlamaDecoder(m)
    x = torch.randint(0, 97, (17,), generator=torch.Generator().manual_seed(2))
    for n in (1, 3, 4, 5, 8, 13, 16, 17):
        with torch.no_grad():
            want = m(x[None, :n]).logits[0]
        assert torch.allclose(d.logits(x[:n]), want, atol=1e-4, rtol=0), n


@pytest.mark.parametrize("spec", ["int8", "int4-g32", "int4-g32-asym", {"*.q_proj": "int3-g32", "*.down_proj": "int2-g32", "*": "int8"},
                                  {"model.embed_tokens": "int8", "*": "int4-g32"},
                                  {"model.embed_tokens": "iq4nl-g32", "*.v_proj": "int5-g32", "*": "iq4nl-g32"}])
@pytest.mark.parametrize("tie", [True, False])
def test_quantized_logits_match_transformers(spec, tie):
    m = tiny_llama(tie=tie)
    shrink.quantize(m, spec, keep_output=False, progress=False)
    x = ids(40)
    with torch.no_grad():
        want = m(x[None]).logits[0]
    err = (LlamaDecoder(m).logits(x) - want).abs().amax(-1)
    # The packed products are the kernel's own; the float work in between (norms, attention) rounds a
    # little differently, which now and then moves one int8 activation code by one step and that row's
    # logits by up to a few hundredths (and, through attention, a few later rows). Which rows that hits is
    # chance (with {"model.embed_tokens": "int8", "*": "int4-g32"}, 8 of 40 here), while every layer computes
    # exactly what the model's own layer does on the same input (the test below). The rest agree to float32
    # rounding.
    assert (err < 1e-4).float().mean() >= 0.75, err
    assert err.max() < 0.15, err


@pytest.mark.parametrize("fmt", ["int4-g32-asym", "int8"])
def test_runtime_uses_the_packed_layers_it_is_given(fmt):
    """A packed layer's product in the runtime is the kernel's, bit for bit, at batch 1, small and large batches."""
    m = tiny_llama(tie=False)
    shrink.quantize(m, fmt, keep_output=False, progress=False)
    ext = llama_module.extension()
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]:
        layer = m.get_submodule(name)
        for rows in (1, 5, 40, 100):
            x = torch.randn(rows, layer.in_features)
            with torch.no_grad():
                assert torch.equal(llama_module._linear(layer, ext)(x), layer(x)), (name, rows)


def test_a_prompt_in_chunks_and_in_a_batch_attends_as_one_pass():
    """Runs of 16 or more tokens attend through fused attention: from position 0 (causal), from further on
    (masked against the keys already cached), and beside another slot's tokens in the same call; each gives
    what the token-by-token path gives (a short run) and what one pass over the whole sequence gives."""
    m = tiny_llama()
    d = LlamaDecoder(m)
    x = ids(45)
    whole = d.logits(x)
    d._impl.reset(2, 45)
    first = d._impl.forward(x[:20], torch.zeros(20, dtype=torch.long), torch.arange(20), torch.arange(20))
    rest = d._impl.forward(x[20:], torch.zeros(25, dtype=torch.long), torch.arange(20, 45), torch.arange(25))
    assert torch.allclose(torch.cat([first, rest]), whole, atol=1e-5, rtol=0)
    # slot 1 takes the same sequence in runs of 5 (token by token) while slot 0 is given it again whole
    d._impl.reset(2, 45)
    for s in range(0, 45, 5):
        d._impl.forward(x[s:s + 5], torch.ones(5, dtype=torch.long), torch.arange(s, s + 5), torch.arange(5))
    both = d._impl.forward(torch.cat([x, x[-1:]]), torch.cat([torch.zeros(45, dtype=torch.long), torch.ones(1, dtype=torch.long)]),
                           torch.cat([torch.arange(45), torch.tensor([44])]), torch.arange(46))
    assert torch.allclose(both[:45], whole, atol=1e-5, rtol=0)
    assert torch.allclose(both[45], whole[44], atol=1e-5, rtol=0)


def test_incremental_decoding_agrees_with_the_whole_sequence():
    """Tokens decoded one at a time over the cache are the ones a single pass over the finished text picks."""
    m = tiny_llama()
    d = LlamaDecoder(m)
    prompt = ids(7)
    new = d.generate([prompt], 20)[0]
    assert len(new) == 20
    whole = d.logits(torch.cat([prompt, new]))
    assert torch.equal(whole[len(prompt) - 1:-1].argmax(-1), new)


@pytest.mark.parametrize("shared", [0, 12], ids=["own prompts", "shared prefix"])
@pytest.mark.parametrize("spec", [None, "int4-g32"])
def test_decode_gives_the_logits_of_the_pass_and_of_forked_continuations(spec, shared):
    """decode's logits over prompt + new tokens, and over continuations run from a copy of the prompt's
    cache, are what one transformers pass over each whole sequence gives; its tokens are generate's. A
    prefix all prompts share (one of them no longer than it plus one token) runs once and is copied."""
    m = tiny_llama()
    if spec:
        shrink.quantize(m, spec, keep_output=False, progress=False)
    d = LlamaDecoder(m)
    common = ids(shared, 9)
    prompts = [torch.cat([common, x]) for x in (ids(1, 1), ids(20, 2), ids(33, 3))]
    assert llama_module._shared_prefix(prompts) == shared
    conts = [[ids(3, 4), ids(1, 5), torch.tensor([], dtype=torch.long)], [ids(18, 6)], []]
    out = d.decode(prompts, [4, 6, 0], None, logits=True, continuations=conts)
    assert [o.new.tolist() for o in out] == [n.tolist() for n in d.generate(prompts, [4, 6, 0])]
    for p, o, cs in zip(prompts, out, conts):
        seq = torch.cat([p, o.new])
        with torch.no_grad():
            want = m(seq[None]).logits[0, :-1]
        assert o.logits.shape == want.shape and torch.allclose(o.logits, want, atol=1e-4, rtol=0)
        assert len(o.continued) == len(cs)
        for c, got in zip(cs, o.continued):
            with torch.no_grad():
                want = m(torch.cat([p, c])[None]).logits[0, len(p) - 1:-1]
            assert got.shape == (len(c), 96) and torch.allclose(got, want, atol=1e-4, rtol=0)
    assert d.decode(prompts[:1], 3)[0].logits is None  # logits only when asked for
    with pytest.raises(ShrinkError, match="2 lists of continuations for 3 prompts"):
        d.decode(prompts, 1, continuations=conts[:2])
    with pytest.raises(ShrinkError, match="continuation of prompt 1 holds token id 500"):
        d.decode(prompts[:1], 1, continuations=[[ids(2), torch.tensor([500])]])
    with pytest.raises(ShrinkError, match=r"\(\d+\) do not fit in the model's context of 64"):
        d.decode(prompts[:1], 1, continuations=[[ids(65)]])


class _Counted:
    """The compiled decoder, counting the tokens each call runs (steps and prompt runs alike)."""

    def __init__(self, impl):
        self.impl, self.tokens = impl, 0

    def __getattr__(self, name):
        return getattr(self.impl, name)

    def forward(self, tokens, *rest):
        self.tokens += len(tokens)
        return self.impl.forward(tokens, *rest)

    def forward_into(self, tokens, *rest):
        self.tokens += len(tokens)
        return self.impl.forward_into(tokens, *rest)


def test_a_draft_gives_the_tokens_and_logits_of_plain_decoding_with_fewer_steps():
    """decode with each prompt's first continuation as a draft: the same new tokens and logits as without
    one, whether the draft is the model's own answer (no step run), wrong from some token on, ends in the
    end-of-sequence token, runs past max_new_tokens or holds that token before min_new_tokens; sampled
    decoding refuses a draft."""
    m = tiny_llama()
    shrink.quantize(m, "int4-g32", keep_output=False, progress=False)
    d = LlamaDecoder(m)
    prompts = [ids(5, 1), ids(9, 2), ids(7, 3), ids(6, 4), ids(8, 5)]
    own = d.generate(prompts, 8)
    eos = int(own[3][2])  # prompt 3 stops at its third token when this is the end-of-sequence token
    wrong = own[1].clone()
    wrong[3] = (wrong[3] + 1) % 96
    drafts = [own[0], wrong, own[2][:4], d.generate(prompts[3:4], 8, eos)[0], own[4][:6]]
    for kw in (dict(max_new_tokens=8), dict(max_new_tokens=8, eos_token_id=eos),
               dict(max_new_tokens=[8, 8, 3, 8, 5], eos_token_id=eos, min_new_tokens=4)):
        d._impl = base = _Counted(d._impl)
        plain = d.decode(prompts, logits=True, continuations=[[c] for c in drafts], **kw)
        d._impl = counted = _Counted(base.impl)
        got = d.decode(prompts, logits=True, continuations=[[c] for c in drafts], draft=True, **kw)
        d._impl = base.impl
        for a, b in zip(plain, got):
            assert torch.equal(a.new, b.new)
            assert a.logits.shape == b.logits.shape and torch.allclose(a.logits, b.logits, atol=1e-4, rtol=0)
            assert torch.allclose(a.continued[0], b.continued[0], atol=1e-4, rtol=0)
        # prompts and drafts run once; only tokens past the agreeing part of a draft take a step each
        assert counted.tokens <= base.tokens - 7  # prompt 0's 7 steps at least
    d._impl = counted = _Counted(d._impl)
    whole = d.decode(prompts[:1], 8, logits=True, continuations=[[own[0]]], draft=True)
    d._impl = counted.impl
    assert torch.equal(whole[0].new, own[0]) and counted.tokens == len(prompts[0]) + len(own[0]) - 1  # no step
    with pytest.raises(ShrinkError, match="greedy"):
        d.decode(prompts, 4, sampling=Sampling(do_sample=True), continuations=[[c] for c in drafts], draft=True)


def test_greedy_generate_matches_transformers_left_padded_batch():
    m = tiny_llama()
    x, mask = left_padded([5, 9, 2])
    want = hf_generate(m, x, attention_mask=mask, max_new_tokens=12, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decoded in the runtime: nothing said
        got = runtime_generate(m, x, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)
    assert torch.equal(runtime_generate(m, x, attention_mask=mask, max_length=x.shape[1] + 4),
                       hf_generate(m, x, attention_mask=mask, max_length=x.shape[1] + 4))


def test_end_of_sequence_stops_a_row_and_pads_it():
    m = tiny_llama()
    x, mask = left_padded([6, 4, 8])
    free = hf_generate(m, x, attention_mask=mask, max_new_tokens=10, do_sample=False)
    eos = int(free[0, x.shape[1] + 2])  # the third token row 0 decodes: it stops there
    want = hf_generate(m, x, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    got = runtime_generate(m, x, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)
    assert (got[0, x.shape[1] + 3:] == 0).all()
    kw = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
    late = runtime_generate(m, x, **kw)
    assert torch.equal(late, hf_generate(m, x, **kw))
    assert (late[:, x.shape[1]:x.shape[1] + 6] != eos).all()
    # the logits decode keeps are the model's, not the copy the end-of-sequence token was masked in
    prompt = x[2][mask[2].bool()]
    o = LlamaDecoder(m).decode([prompt], 6, eos, logits=True, min_new_tokens=6)[0]
    with torch.no_grad():
        want = m(torch.cat([prompt, o.new])[None]).logits[0, :-1]
    assert torch.isfinite(o.logits).all() and torch.allclose(o.logits, want, atol=1e-4, rtol=0)


def test_sampled_generate_matches_transformers_with_the_same_seed():
    m = tiny_llama()
    x = ids(6)[None]
    for kw in ({"top_k": 0}, {"top_k": 5, "temperature": 0.7}, {"top_k": 0, "top_p": 0.8}):
        torch.manual_seed(3)
        want = hf_generate(m, x, max_new_tokens=15, do_sample=True, **kw)
        torch.manual_seed(3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = runtime_generate(m, x, max_new_tokens=15, do_sample=True, **kw)
        assert torch.equal(got, want), kw
    torch.manual_seed(4)
    again = runtime_generate(m, x, max_new_tokens=15, do_sample=True, top_k=0)
    assert not torch.equal(again, got)  # another seed, another text


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.6, 0, 0.9), (1.7, 20, 0.5), (1.0, 0, 1.0)])
def test_sampling_scores_are_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(4, 96, generator=torch.Generator().manual_seed(0)) * 3
    want = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1:
        want = TopPLogitsWarper(top_p)(None, want)
    got = Sampling(True, temperature, top_k, top_p).scores(logits)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)])
    picked = Sampling(True, temperature, top_k, top_p).pick(logits, torch.Generator().manual_seed(1))
    assert not torch.isinf(want.gather(1, picked[:, None])).any()
    assert torch.equal(Sampling(True, 1.0, 1).pick(logits), logits.argmax(-1))


def test_bad_sampling_settings_are_refused():
    with pytest.raises(ShrinkError, match="temperature must be positive"):
        Sampling(True, 0.0)
    with pytest.raises(ShrinkError, match="top_p must be in"):
        Sampling(True, 1.0, 0, 1.5)


def test_other_requests_go_to_transformers_and_say_so():
    m = tiny_llama()
    x = ids(5)[None]
    with pytest.warns(UserWarning, match="decoding with transformers, not shrink's runtime: generation option num_beams=2"):
        got = runtime_generate(m, x, max_new_tokens=6, num_beams=2, do_sample=False)
    assert torch.equal(got, hf_generate(m, x, max_new_tokens=6, num_beams=2, do_sample=False))
    with pytest.warns(UserWarning, match="padding tokens in input_ids without an attention_mask"):
        runtime_generate(m, torch.tensor([[0, 0, 5, 6]]), max_new_tokens=2, pad_token_id=0)


def test_a_machine_without_the_runtime_falls_back_with_one_line(monkeypatch):
    m = tiny_llama()
    x = ids(5)[None]
    monkeypatch.setattr(llama_module, "extension", lambda: None)
    with pytest.warns(UserWarning, match="the runtime is not compiled: it failed to compile here") as said:
        got = runtime_generate(m, x, max_new_tokens=6)
        runtime_generate(m, x, max_new_tokens=6)
    assert len(said) == 1
    assert torch.equal(got, hf_generate(m, x, max_new_tokens=6))


def test_models_it_cannot_run_are_left_alone():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=32)).eval()
    before = gpt2.generate
    assert "model type 'gpt2'" in install(gpt2)
    assert gpt2.generate == before
    half = tiny_llama().to(torch.bfloat16)
    assert "bfloat16" in install(half)
    with pytest.raises(ShrinkError, match="cannot run this model: .*bfloat16"):
        LlamaDecoder(half)


def test_requests_that_cannot_fit_are_refused_before_decoding(monkeypatch):
    m = tiny_llama()  # a context of 64 positions
    d = LlamaDecoder(m)
    with pytest.raises(ShrinkError, match=r"\(70\) do not fit in the model's context of 64"):
        d.generate([ids(10)], 60)
    monkeypatch.setattr(LlamaDecoder, "cache_bytes", lambda self, n, c: 10**15)
    with pytest.raises(ShrinkError, match="GiB of key-value cache and logits.*decode fewer at once"):
        d.generate([ids(10)], 5)
    monkeypatch.undo()
    with pytest.raises(ShrinkError, match="prompt 1 holds token id 200, outside the vocabulary of 96"):
        d.generate([ids(3), torch.tensor([4, 200])], 2)
    with pytest.raises(ShrinkError, match="an empty prompt"):
        d.generate([torch.tensor([], dtype=torch.long)], 2)


def test_the_runtime_follows_the_model_when_its_layers_change():
    m = tiny_llama()
    first = decoder_for(m)
    assert decoder_for(m) is first
    shrink.quantize(m, "int8", progress=False)
    assert decoder_for(m) is not first
    x = ids(5)[None]
    assert torch.equal(m.generate(x, max_new_tokens=8), hf_generate(m, x, max_new_tokens=8))


def test_loaded_models_decode_in_the_runtime(tmp_path):
    m = tiny_llama()
    shrink.quantize(m, "int4-g32", progress=False)
    shrink.save(m, tmp_path / "q")
    loaded = shrink.load(tmp_path / "q")
    assert loaded.generate.__func__ is generate_module._installed_generate
    x, mask = left_padded([4, 7])
    cfg = GenerationConfig(max_new_tokens=9, do_sample=False, pad_token_id=0, eos_token_id=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = loaded.generate(x, cfg, attention_mask=mask)
    want = hf_generate(loaded, x, cfg, attention_mask=mask)
    # The same tokens unless an activation code fell differently (see the logits test): then they agree
    # up to that point.
    assert torch.equal(got[:, :x.shape[1] + 3], want[:, :x.shape[1] + 3])


def test_generate_from_many_threads_gives_each_its_own_answer():
    # one model, one runtime (one cache), called from 8 threads at once: every answer is the one a call
    # alone gives (the runtime serialises its calls), never another thread's tokens or an error
    from concurrent.futures import ThreadPoolExecutor

    model = shrink.quantize(tiny_llama(seed=5), "int8", progress=False)
    install(model)
    prompts = [ids(3 + i % 5, seed=i).unsqueeze(0) for i in range(24)]
    alone = [model.generate(p, max_new_tokens=6 + i % 3, do_sample=False) for i, p in enumerate(prompts)]
    assert decoder_for(model) is not None  # the runtime is what is being run
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda a: model.generate(a[1], max_new_tokens=6 + a[0] % 3, do_sample=False),
                                 enumerate(prompts)))
    assert all(torch.equal(a, b) for a, b in zip(alone, together))


def test_the_runtime_is_built_before_any_example_is_timed(tmp_path, monkeypatch):
    # compiling the runtime (once per machine, about a minute) must not land in the original's timing
    import json as _json

    from helpers import tiny_tokenizer, word_text

    from shrink.evaluate import paired
    from shrink.runtime import LlamaDecoder

    calls = []
    build, decode, run = LlamaDecoder.__init__, LlamaDecoder.decode, paired._run_examples
    monkeypatch.setattr(LlamaDecoder, "__init__", lambda self, m: calls.append("build") or build(self, m))
    monkeypatch.setattr(LlamaDecoder, "decode", lambda self, *a, **k: calls.append("decode") or decode(self, *a, **k))
    monkeypatch.setattr(paired, "_run_examples", lambda *a, **k: calls.append("timed") or run(*a, **k))
    model = shrink.quantize(tiny_llama(seed=2), "int8", progress=False)
    task = tmp_path / "t.jsonl"
    task.write_text("".join(_json.dumps({"input": word_text(4, seed=i), "target": "x", "max_new_tokens": 2}) + "\n"
                            for i in range(4)))
    c = shrink.compare(model, model, str(task), tokenizer=tiny_tokenizer(), warn_small=False)
    assert calls.index("build") < calls.index("timed") < calls.index("decode") and calls.count("build") == 1
    assert c.original["setup_seconds"] >= 0 and c.compressed["setup_seconds"] >= 0


@pytest.mark.slow  # a subprocess or a browser
def test_a_switched_off_runtime_says_which_switch():
    import os
    import subprocess
    import sys

    code = ("import warnings, sys\nsys.path.insert(0, 'tests')\nfrom helpers import tiny_llama\n"
            "from shrink.runtime import install, decoder_for\nm = tiny_llama()\ninstall(m)\n"
            "with warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
            "    assert decoder_for(m) is None\nprint(w[0].message)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "SHRINK_NATIVE": "0"},
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert "SHRINK_NATIVE=0 is set, which turns shrink's compiled code off" in r.stdout, r.stdout + r.stderr
    assert "no C++ compiler" not in r.stdout
