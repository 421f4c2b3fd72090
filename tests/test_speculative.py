"""Speculative decoding in shrink's runtime (runtime/speculative.py): a draft's proposals checked by the target
in one pass give exactly the tokens the target alone gives under greedy decoding, in fewer passes of the target
when the draft agrees with it; pairs that cannot be exact are refused naming the field."""

import warnings

import pytest
import torch
from helpers import tiny_llama

import shrink
from shrink.runtime import generate, last_speculation
from shrink.runtime import llama as llama_module
from shrink.runtime.speculative import MAX_DRAFT_TOKENS, Speculation, speculate

pytestmark = pytest.mark.skipif(llama_module.extension() is None, reason="the runtime cannot be compiled here")
IDS = torch.randint(3, 96, (3, 10), generator=torch.Generator().manual_seed(0))


def _draft(kind: str):
    """Drafts from always right to mostly wrong: the target itself (a copy), the target with one layer
    changed, an unrelated model of the same vocabulary, and the target quantized to int4."""
    model = tiny_llama(seed=0).eval()
    if kind == "changed":
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.mul_(0.5)
    elif kind == "unrelated":
        model = tiny_llama(seed=7).eval()
    elif kind == "int4":
        shrink.quantize(model, "int4-g32", backend="torch", progress=False)
    return model


@pytest.mark.parametrize("kind", ["copy", "changed", "unrelated", "int4"])
def test_greedy_tokens_are_the_targets_own_whatever_the_draft(kind):
    target = tiny_llama(seed=0).eval()
    alone = generate(target, IDS, max_new_tokens=40, do_sample=False)
    assert torch.equal(alone, target.generate(IDS, max_new_tokens=40, do_sample=False))  # (transformers' own)
    drafted = generate(target, IDS, max_new_tokens=40, do_sample=False, assistant_model=_draft(kind))
    assert torch.equal(drafted, alone)
    s = last_speculation(target)
    assert s.new_tokens == 3 * 40 and s.proposed >= s.accepted >= 0
    if kind == "copy":  # every proposal taken: k grows by 2 a pass, many tokens a pass
        assert s.accepted == s.proposed and s.tokens_per_pass > 4
    if kind == "unrelated":  # (measured: about a third right)
        assert s.acceptance < 0.8


def test_end_of_sequence_min_new_tokens_and_left_padding_as_the_target_alone():
    target = tiny_llama(seed=0).eval()
    draft = _draft("changed")
    alone = generate(target, IDS, max_new_tokens=30, do_sample=False)
    eos = int(alone[0, 15])  # a token the first row makes early: it stops there
    kw = dict(max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0)
    for extra in ({}, {"min_new_tokens": 12}):
        want = generate(target, IDS, **kw, **extra)
        assert torch.equal(generate(target, IDS, **kw, **extra, assistant_model=draft), want)
    padded = IDS.clone()
    padded[1, :4] = 0
    mask = (torch.arange(10) >= torch.tensor([0, 4, 0])[:, None]).long()
    want = generate(target, padded, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(generate(target, padded, attention_mask=mask, max_new_tokens=20, do_sample=False,
                                assistant_model=draft), want)


def test_the_number_of_proposals_adapts_and_the_counts_add_up():
    from shrink.runtime import decoder_for

    target, draft = decoder_for(tiny_llama(seed=0).eval()), decoder_for(_draft("copy"))
    stats = Speculation()
    news = speculate(target, draft, [IDS[0]], 50, draft_tokens=1, stats=stats)
    # a draft always right: 1 + (1 + 3 + 5 + ... up to MAX_DRAFT_TOKENS) proposals and one more token a pass
    assert len(news[0]) == 50 and stats.accepted == stats.proposed
    sizes, left, k = [], 49, 1
    while left > 0:
        k_here = min(k, left)
        sizes.append(k_here)
        left -= min(k_here + 1, left)
        k = min(k + 2, MAX_DRAFT_TOKENS)
    assert stats.target_passes == 1 + len(sizes) and stats.proposed == sum(sizes)


def test_pairs_that_cannot_be_exact_are_refused_naming_the_field():
    target = tiny_llama(seed=0).eval()
    other = tiny_llama(seed=0)
    other.config.eos_token_id = 5
    with pytest.raises(shrink.ShrinkError, match="the draft's eos_token_id is 5, the target's 2"):
        generate(target, IDS, max_new_tokens=4, assistant_model=other)
    with pytest.raises(shrink.ShrinkError, match="do_sample=True with an assistant_model"):
        generate(target, IDS, max_new_tokens=4, do_sample=True, assistant_model=_draft("copy"))
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    with pytest.raises(shrink.ShrinkError, match="the draft's vocab_size is 128, the target's 96"):
        generate(target, IDS, max_new_tokens=4, assistant_model=wider)


def test_a_target_the_runtime_cannot_run_drafts_through_transformers_assisted_generation(monkeypatch):
    from shrink.runtime import generation

    monkeypatch.setattr(generation, "_said", set())  # (each reason is said once a process)
    target = tiny_llama(seed=0).eval()
    shrink.quantize(target, "int4-g32", method="rotate-online", backend="torch", progress=False)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        out = generate(target, IDS[:1], max_new_tokens=12, do_sample=False, assistant_model=_draft("changed"))
    assert torch.equal(out, target.generate(IDS[:1], max_new_tokens=12, do_sample=False))
    assert last_speculation(target) is None
    assert any("rotates its input online" in str(w.message) for w in said)
