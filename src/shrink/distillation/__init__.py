"""Distillation: train a smaller student to imitate a teacher's outputs (soft targets with a temperature,
optionally hidden states), with a student built from the teacher or from a short spec."""

from .cache import model_fingerprint, teacher_topk
from .data import (
                   DistillData,
                   from_tensors,
                   labelled_text,
                   load_tensor_file,
                   mnist,
                   pack_text,
                   read_labelled,
                   read_texts,
                   sentence_data,
)
from .losses import distillation_loss, embedding_loss, hidden_state_loss, soft_target_loss, topk_soft_target_loss
from .students import (
                   CNNClassifier,
                   MLPClassifier,
                   block_importance,
                   channel_importance,
                   hidden_layer_map,
                   most_important,
                   parameter_count,
                   student_from_spec,
                   student_from_teacher,
)
from .train import DistillConfig, DistillResult, evaluate, finish_distributed, init_distributed, train_student

__all__ = [
    "model_fingerprint", "teacher_topk", "block_importance", "channel_importance", "most_important", "CNNClassifier", "DistillConfig", "DistillData", "DistillResult", "MLPClassifier",
    "distillation_loss", "embedding_loss", "evaluate", "finish_distributed", "from_tensors", "hidden_layer_map", "hidden_state_loss", "init_distributed", "labelled_text", "load_tensor_file",
    "mnist", "pack_text", "parameter_count", "read_labelled", "read_texts", "sentence_data", "soft_target_loss", "student_from_spec",
    "student_from_teacher", "topk_soft_target_loss", "train_student",
]
