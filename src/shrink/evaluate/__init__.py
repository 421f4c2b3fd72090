"""Evaluation on the user's own task: tasks, model adapters, per-example comparison, statistics."""

from .adapters import (
    Adapter,
    CausalLMAdapter,
    EncoderAdapter,
    SequenceClassifierAdapter,
    TensorClassifierAdapter,
    adapter_for,
)
from .paired import Comparison, ExampleResult, SliceResult, compare_models, model_bytes, store_original
from .stored import StoredOutcomes, task_digest
from .tasks import Example, Task, default_task, load_task

__all__ = [
    "Adapter", "CausalLMAdapter", "Comparison", "EncoderAdapter", "Example", "ExampleResult",
    "SequenceClassifierAdapter", "SliceResult", "Task", "TensorClassifierAdapter", "adapter_for", "compare_models",
    "default_task", "load_task", "model_bytes", "store_original", "StoredOutcomes", "task_digest",
]
