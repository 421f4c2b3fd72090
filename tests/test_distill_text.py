"""Distilling encoders and sequence classifiers on text (issue 14): a student built from the teacher's
layers learns the teacher's class distribution (labelled text) or its embeddings (plain texts); models
shrink does not distill are refused naming their kind."""

import json

import pytest
import torch
from helpers import WORDS, tiny_tokenizer, widen, word_text
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    T5Config,
    T5ForConditionalGeneration,
)

import shrink
from shrink.core.architecture import ENCODER, MASKED_LM, SEQ2SEQ, SEQUENCE_CLASSIFIER, model_kind
from shrink.core.errors import ShrinkError
from shrink.distillation import (
    DistillConfig,
    evaluate,
    labelled_text,
    read_labelled,
    sentence_data,
    student_from_teacher,
    train_student,
)
from shrink.distillation.data import PAD, split_padded
from shrink.entrypoints.distill import load_data

LABELS = ["business", "sport", "tech"]


def bert_config(**kw):
    return BertConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      max_position_embeddings=64, **kw)


def bert_classifier(seed=0):
    torch.manual_seed(seed)
    return widen(BertForSequenceClassification(bert_config(num_labels=3, id2label=dict(enumerate(LABELS)),
                                                           label2id={n: i for i, n in enumerate(LABELS)})))


def bert_encoder(seed=0):
    torch.manual_seed(seed)
    return widen(BertModel(bert_config(), add_pooling_layer=False))


def labelled_file(path, n=120):
    """Texts of 3-12 words; the label is decided by the first word, so the file is learnable."""
    lines = []
    for i in range(n):
        text = word_text(3 + i % 10, seed=i)
        lines.append(json.dumps({"input": text, "label": LABELS[WORDS.index(text.split()[0]) % 3]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_labelled_text_is_padded_with_its_own_mask(tmp_path):
    tok = tiny_tokenizer()
    rows = [("the bank", "sport", 1), ("a market rise fall", 2, 2), ("tax", "business", 3)]
    d = labelled_text(rows, tok, LABELS, max_len=3, eval_fraction=0.34)
    x = torch.cat([d.train_x, d.eval_x])
    y = torch.cat([d.train_y, d.eval_y])
    assert d.kind == "labelled" and x.shape == (3, 3)  # truncated to max_len
    by_label = {int(lb): row for lb, row in zip(y, x)}
    assert by_label[1].tolist() == tok("the bank").input_ids + [PAD]
    assert by_label[2].tolist() == tok("a market rise").input_ids  # class id 2 given as an integer
    ids, mask = split_padded(torch.stack([by_label[1], by_label[0]]))
    assert mask.tolist() == [[1, 1], [1, 0]] and ids.min() >= 0  # cut to the longest text of the batch
    with pytest.raises(ShrinkError, match=r"<labelled text>:2: label 'politics' is not one of the model's labels"):
        labelled_text([("a", "tech", 1), ("b", "politics", 2)], tok, LABELS)
    with pytest.raises(ShrinkError, match=r"<labelled text>:1: class id 3 is out of range"):
        labelled_text([("a", 3, 1), ("b", 0, 2)], tok, LABELS)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "label": "tech"}\n{"input": "b"}\n')
    with pytest.raises(ShrinkError, match=r"bad.jsonl:2: expected"):
        read_labelled(bad)


def test_sequence_classifier_student_learns_the_teachers_labels(tmp_path):
    teacher, tok = bert_classifier(), tiny_tokenizer()
    data = load_data(labelled_file(tmp_path / "train.jsonl"), tok, seq_len=16, model=teacher)
    assert data.kind == "labelled" and data.train_y.max() == 2
    student, _ = student_from_teacher(teacher, 2)
    cfg = DistillConfig(steps=40, batch_size=16, lr=2e-3, eval_every=40, alpha=1.0)
    before = evaluate(student, teacher, data, cfg)
    result = train_student(teacher, student, data, cfg, progress=False)
    after = result.history[-1]
    assert after["kl"] < 0.5 * before["kl"]
    assert after["top1_agreement"] >= before["top1_agreement"]
    assert {"accuracy", "teacher_accuracy", "ce"} <= set(after)


def test_encoder_student_learns_the_teachers_embeddings(tmp_path):
    teacher, tok = bert_encoder(), tiny_tokenizer()
    texts = [word_text(4 + i % 9, seed=100 + i) for i in range(120)]
    data = sentence_data(texts, tok, max_len=16)
    student, _ = student_from_teacher(teacher, 2)
    cfg = DistillConfig(steps=40, batch_size=16, lr=2e-3, eval_every=20)
    before = evaluate(student, teacher, data, cfg)
    result = train_student(teacher, student, data, cfg, progress=False)
    after = result.history[-1]
    assert after["cosine"] > before["cosine"] and after["embedding_distance"] < 0.7 * before["embedding_distance"]
    assert result.best["embedding_distance"] == min(h["embedding_distance"] for h in result.history)
    with pytest.raises(ShrinkError, match="needs a teacher"):
        train_student(None, student, data, DistillConfig(steps=2, batch_size=4, alpha=0.0), progress=False)


def test_model_kinds_by_capability():
    assert model_kind(bert_classifier()) == SEQUENCE_CLASSIFIER
    assert model_kind(bert_encoder()) == ENCODER
    assert model_kind(BertForMaskedLM(bert_config())) == MASKED_LM
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=96, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16))
    assert model_kind(t5) == SEQ2SEQ


@pytest.mark.slow  # a subprocess or a browser
def test_cli_distills_a_classifier_folder_and_refuses_what_it_cannot(tmp_path):
    from click.testing import CliRunner

    from shrink.cli import main

    teacher = tmp_path / "teacher"
    bert_classifier().save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    data = labelled_file(tmp_path / "train.jsonl")
    out = tmp_path / "out"
    base = ["--student", "layers=2", "--steps", "8", "--batch-size", "8", "--seq-len", "16", "--eval-every", "4"]
    r = CliRunner().invoke(main, ["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
                                  "--task", str(data), "--hidden-weight", "0.1"] + base)
    assert r.exit_code == 0, r.output
    assert "teacher_accuracy" in r.output and "on the task at the last evaluation" in r.output
    student = shrink.io.read_model(out / "model")
    assert type(student.model).__name__ == "BertForSequenceClassification"
    assert student.model.config.num_hidden_layers == 2 and student.model.config.id2label[1] == "sport"
    hist = json.loads((out / "results.json").read_text())["history"]
    assert len(hist) == 2 and all("hidden" in h for h in hist)

    text = tmp_path / "plain.txt"
    text.write_text(word_text(200))
    r = CliRunner().invoke(main, ["distill", "--teacher", str(teacher), "--data", str(text), "--out", str(tmp_path / "o2")] + base)
    assert r.exit_code == 1 and "a sequence classifier learns from labelled examples" in r.output

    t5 = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=96, d_model=32, d_ff=64, num_layers=2, num_heads=2,
                                        d_kv=16)).save_pretrained(t5)
    tiny_tokenizer().save_pretrained(t5)
    r = CliRunner().invoke(main, ["distill", "--teacher", str(t5), "--data", str(data), "--out", str(tmp_path / "o3")] + base)
    assert r.exit_code == 1 and "is an encoder-decoder: shrink does not distill encoder-decoders" in r.output


def test_cli_distills_an_encoder_on_lines_of_text(tmp_path):
    from click.testing import CliRunner

    from shrink.cli import main

    teacher = tmp_path / "teacher"
    torch.manual_seed(0)
    widen(BertModel(bert_config())).save_pretrained(teacher)  # with its pooler, as MiniLM's folder has it
    tiny_tokenizer().save_pretrained(teacher)
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(word_text(3 + i % 7, seed=i) for i in range(60)) + "\n")
    r = CliRunner().invoke(main, ["distill", "--teacher", str(teacher), "--student", "layers=2", "--data", str(text),
                                  "--out", str(tmp_path / "out"), "--steps", "6", "--batch-size", "8", "--seq-len", "16",
                                  "--eval-every", "3"])
    assert r.exit_code == 0, r.output
    assert "cosine" in r.output and "worst_cosine" in r.output
    student = shrink.io.read_model(tmp_path / "out" / "model")
    assert type(student.model).__name__ == "BertModel" and student.model.config.num_hidden_layers == 2
