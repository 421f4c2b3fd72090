"""A small distillation run in its own process, for the kill/resume and multi-process tests.

    python tests/distill_worker.py OUT STEPS BATCH [--resume] [--no-dropout]
Under torchrun each rank takes BATCH examples of every global batch.
"""

import sys

import torch

from shrink.distillation import (
    DistillConfig,
    finish_distributed,
    from_tensors,
    init_distributed,
    student_from_spec,
    train_student,
)


def setup(dropout: float = 0.1):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 32, generator=g)
    y = (x @ torch.randn(32, 6, generator=g)).argmax(1)
    data = from_tensors(x, y)
    torch.manual_seed(1)
    teacher = student_from_spec("mlp:32-128-6")
    with torch.no_grad():  # a teacher that knows the rule: least squares on one-hot targets
        teacher[1].weight.normal_(0, 0.3)
    torch.manual_seed(2)
    # dropout: the RNG state must survive a resume (and is off where processes would draw differently)
    student = student_from_spec(f"mlp:32-16-6,dropout={dropout}" if dropout else "mlp:32-16-6")
    return teacher, student, data


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    init_distributed()
    teacher, student, data = setup(0.0 if "--no-dropout" in sys.argv else 0.1)
    cfg = DistillConfig(steps=steps, batch_size=batch, eval_every=50, checkpoint_every=10, lr=3e-3, temperature=3)
    train_student(teacher, student, data, cfg, out=out, resume="--resume" in sys.argv, progress=False)
    finish_distributed()
