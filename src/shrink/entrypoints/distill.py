"""`shrink.distill`: resolve teacher, student and data from names, paths or objects, train, and save the
student as a normal model folder (Hugging Face for HF students), ready for `shrink quantize`."""

from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn
from safetensors.torch import load_model as load_weights
from safetensors.torch import save_model

from ..core.architecture import CAUSAL_LM, ENCODER, MASKED_LM, SEQ2SEQ, SEQUENCE_CLASSIFIER, model_kind
from ..core.atomic import atomic_dir, write_json
from ..core.errors import ShrinkError
from ..distillation import (
    DistillConfig,
    DistillData,
    from_tensors,
    hidden_layer_map,
    labelled_text,
    load_tensor_file,
    mnist,
    pack_text,
    read_labelled,
    read_texts,
    sentence_data,
    block_importance,
    channel_importance,
    most_important,
    student_from_spec,
    student_from_teacher,
    train_student,
)
from ..io import resolve
from ..io.manifest import read_json
from ..quant.record import update_record

STUDENT_SPEC = "student.json"
OUT_NAMES = ("checkpoint", "best", "model", "results.json")  # what a distillation writes in its folder


def load_data(data, tokenizer=None, seq_len: int = 256, eval_fraction: float | None = None,
              max_sequences: int | None = None, model: nn.Module | None = None) -> DistillData:
    """DistillData from "mnist", a .npz/.safetensors file (x, y), a (x, y) pair of tensors, DistillData,
    or a text file (needs the tokenizer), read as `model` (the teacher, else the student) learns: a
    causal LM (also when model is None) from .txt/.jsonl text packed into sequences of seq_len tokens;
    a sequence classifier from a .jsonl of {"input", "label"} (labels as in its config.id2label, or
    class ids); an encoder from a .jsonl of texts or a .txt (one text per non-empty line), each cut at
    seq_len tokens. max_sequences caps the sequences (LM) or texts (encoder) used."""
    if isinstance(data, DistillData):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        return from_tensors(*data, eval_fraction=eval_fraction or 0.1)
    if str(data) == "mnist":
        return mnist(eval_fraction or 0.2)
    path = Path(data)
    if path.suffix in (".npz", ".safetensors"):
        return load_tensor_file(path, eval_fraction or 0.1)
    if tokenizer is None:
        raise ShrinkError(f"{path}: text data needs the teacher's tokenizer")
    kind = model_kind(model) if model is not None else CAUSAL_LM
    if kind == SEQUENCE_CLASSIFIER:
        labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
        return labelled_text(read_labelled(path), tokenizer, labels, seq_len, eval_fraction or 0.1, str(path))
    if kind == ENCODER:
        texts = read_texts(path, "training data")
        if path.suffix.lower() not in (".jsonl", ".json"):
            texts = [line for line in texts[0].splitlines() if line.strip()]
        return sentence_data(texts[:max_sequences], tokenizer, seq_len, eval_fraction or 0.1, str(path))
    return pack_text(read_texts(path, "training data"), tokenizer, seq_len, eval_fraction or 0.05, str(path), max_sequences)


def check_distillable(model: nn.Module | None, role: str) -> None:
    """Refuse, naming the kind, models whose distillation shrink does not do: encoder-decoders and
    masked LMs."""
    if model is None:
        return
    kind = model_kind(model)
    if kind == SEQ2SEQ:
        raise ShrinkError(f"the {role} ({type(model).__name__}) is an {kind}: shrink does not distill "
                          "encoder-decoders (T5, BART) yet; quantize it instead (shrink quantize)")
    if kind == MASKED_LM:
        raise ShrinkError(f"the {role} ({type(model).__name__}) is a {kind}: shrink distills causal LMs, "
                          "sequence classifiers and encoders; load its encoder alone (AutoModel) to distill "
                          "its embeddings")


def build_student(student, teacher: nn.Module | None, intermediate_size: int | None = None,
                  data: DistillData | None = None) -> tuple[nn.Module, dict]:
    """The student and a record of how it was made: a module as is; a spec "mlp:..."/"cnn:..."; from the
    teacher: "every-other", "layers=N" (N spread evenly), "layers=0,3,6", or "layers=N:importance" (the N
    blocks that change their input most on the first rows of `data`, a language model's token rows:
    `block_importance`; each block's importance goes into the record; with `intermediate_size`, the MLP
    channels kept are those of largest mean activation on the same rows: `channel_importance`)."""
    if isinstance(student, nn.Module):
        return student, {"kind": "module", "class": type(student).__name__}
    spec = str(student)
    if spec.startswith(("mlp:", "cnn:")):
        return student_from_spec(spec), {"kind": "spec", "spec": spec}
    if teacher is None:
        raise ShrinkError(f"student {spec!r}: building a student from the teacher needs a teacher")
    check_distillable(teacher, "teacher")
    importance = channels = None
    if spec.startswith("layers=") and spec.endswith(":importance"):
        count = spec[len("layers="):-len(":importance")]
        if not count.isdigit():
            raise ShrinkError(f"student {spec!r}: choosing blocks by importance takes a count (layers=N:importance)")
        if data is None or data.kind != "text":
            raise ShrinkError(f"student {spec!r}: measuring the blocks' importance needs a language model's text "
                              "data (--data)")
        importance = block_importance(teacher, data.train_x)
        layers = most_important(importance, int(count))
        if intermediate_size is not None:  # the MLP's channels by their activations on the same rows
            channels = channel_importance(teacher, data.train_x)
    elif spec == "every-other":
        layers = "every-other"
    elif spec.startswith("layers="):
        body = spec[len("layers="):]
        layers = [int(x) for x in body.split(",")] if "," in body else body
    else:
        raise ShrinkError(f"student {spec!r}: expected 'every-other', 'layers=N', 'layers=0,2,4', "
                          "'layers=N:importance', 'mlp:784-128-10' or 'cnn:1x28x28-16-32-10'")
    model, idx = student_from_teacher(teacher, layers, intermediate_size, channels)
    record = {"kind": "from-teacher", "teacher_layers": idx, "intermediate_size": intermediate_size}
    if importance is not None:
        record["importance"] = [round(v, 6) for v in importance]
        if channels is not None:
            record["channels"] = "activation magnitude"
    return model, record


def resolve_teacher(teacher):
    """(model, tokenizer, name) of a teacher given as a module, a name or path (shrink.io.read_model), or
    None / "none" (no teacher: hard labels alone), which gives (None, None, None)."""
    if teacher is None or (isinstance(teacher, str) and teacher.lower() == "none"):
        return None, None, None
    model, tok, name = resolve(teacher)
    return model, tok, name or type(model).__name__


def save_student(student: nn.Module, folder: Path, record: dict, tokenizer=None) -> None:
    """A Hugging Face folder for HF students; model.safetensors + student.json for spec-built ones."""
    with atomic_dir(folder) as tmp:
        if hasattr(student, "save_pretrained"):
            student.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        elif record.get("kind") == "spec":
            save_model(student, str(tmp / "model.safetensors"))
            write_json(tmp / STUDENT_SPEC, {"spec": record["spec"]})
        else:
            save_model(student, str(tmp / "model.safetensors"))


def distill(teacher, student, data, config: DistillConfig | None = None, *, out: str | os.PathLike | None = None,
            tokenizer=None, intermediate_size: int | None = None, student_record: dict | None = None,
            seq_len: int = 256, max_sequences: int | None = None,
            hidden_layers: bool = False, cache_topk: int = 0, task=None, resume: bool = False, force: bool = False,
            progress: bool | None = None, **options):
    """Distill `teacher` into `student` on `data`; returns (student, DistillResult).

    teacher: a module, a LoadedModel, a name/path for `shrink.io.read_model`, or None (hard labels alone).
    student: a module, a spec ("mlp:784-128-10", "cnn:1x28x28-16-32-10"), or built from the teacher
    ("every-other", "layers=N", "layers=0,2,4"; intermediate_size narrows its MLP).
    data: see `load_data`. config: DistillConfig (or its fields as keyword options). student_record: how a
    student module was built (from `build_student`), so that it is saved the same way.
    hidden_layers: match each student layer's output to the teacher layer it was copied from (with
    config.hidden_weight > 0). config.layer_fit_steps > 0 (a student built from the teacher): first fit
    each student layer alone to the span of teacher layers it stands for (distillation/layerfit.py).
    cache_topk: keep the teacher's top-k logits per position in shrink's cache (computed once, reused by
    later epochs and runs on the same teacher and data; default 0: off).
    task: a task for `shrink.compare` (path or Task): at every evaluation the student is compared with the
    teacher on it, and the scores, change and verdict go into the history. out: folder for checkpoints,
    best/, model/ (the best student) and results.json: new or empty, or a distillation folder shrink wrote
    (resume=True continues it, force=True starts it again; default neither), checked before any work.
    """
    from contextlib import nullcontext

    from ..core.outdir import claim
    from ..distillation import init_distributed

    held = out is not None and init_distributed()[0] == 0  # under torchrun only rank 0 writes
    with claim(out, "distill", OUT_NAMES, force=force, resume=resume) if held else nullcontext():
        return _distill(teacher, student, data, out, config, tokenizer, intermediate_size, student_record, seq_len,
                        max_sequences, hidden_layers, cache_topk, task, resume, progress, options)


def _distill(teacher, student, data, out, config, tokenizer, intermediate_size, student_record, seq_len,
             max_sequences, hidden_layers, cache_topk, task, resume, progress, options):
    cfg = config or DistillConfig(**options)
    t_model, t_tok, t_name = resolve_teacher(teacher)
    check_distillable(t_model, "teacher")
    tok = tokenizer or t_tok
    if isinstance(student, nn.Module) and student_record is not None:
        s_model, record = student, student_record  # built by build_student already
    else:
        dd = None
        if isinstance(student, str) and student.endswith(":importance") and t_model is not None:
            dd = load_data(data, tok, seq_len, max_sequences=max_sequences, model=t_model)
        s_model, record = build_student(student, t_model, intermediate_size, dd)
    check_distillable(s_model, "student")
    dd = load_data(data, tok, seq_len, max_sequences=max_sequences, model=t_model if t_model is not None else s_model)
    if cache_topk and dd.kind == "sentences":
        raise ShrinkError("an encoder is distilled on the teacher's embeddings, not its logits: drop the top-k cache")
    layer_map = None
    if (hidden_layers or cfg.layer_fit_steps) and record.get("teacher_layers"):
        layer_map = hidden_layer_map(record["teacher_layers"], t_model.config.num_hidden_layers)
    cache = None
    if cache_topk and t_model is not None and cfg.alpha > 0:
        from ..core.paths import cache_dir
        from ..distillation import teacher_topk

        cache = teacher_topk(t_model, dd, cache_topk, cache_dir() / "teacher", batch_size=cfg.batch_size, progress=progress)
    on_eval = None
    if task is not None:
        if t_model is None:
            raise ShrinkError("comparing on a task needs a teacher to compare the student with")
        from ..evaluate import compare_models, load_task

        tk = load_task(task)

        def on_eval(step, metrics):
            was = s_model.training
            c = compare_models(t_model, s_model, tk, tokenizer=tok, names=("teacher", "student"), progress=False)
            s_model.train(was)
            metrics["task"] = {"teacher": c.overall.original, "student": c.overall.compressed,
                               "change": c.overall.change, "within": c.within, "verdict": c.verdict}

    result = train_student(t_model, s_model, dd, cfg, out=out, resume=resume, layer_map=layer_map, progress=progress,
                   teacher_cache=cache, on_eval=on_eval)
    if out is not None:
        out = Path(out)
        if (out / "best" / "student.safetensors").is_file():
            load_weights(s_model, str(out / "best" / "student.safetensors"), strict=True)
        save_student(s_model, out / "model", record, tok)
        if (out / "results.json").is_file():  # how the student was made (its teacher layers, their importance)
            write_json(out / "results.json", {**read_json(out / "results.json", "distillation results"),
                                              "student": record})
    # where the student came from, recorded by a later save in shrink.json's source
    update_record(s_model, source={"kind": "distilled", "teacher": t_name, "student": record})
    return s_model, result
