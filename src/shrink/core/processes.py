"""The processes torchrun starts for one job (distillation, calibrated quantization): joining their group,
this process's place in it, and leaving it cleanly. gloo on CPUs, nccl where there are GPUs."""

from __future__ import annotations

from . import switches


def world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) when no process group is joined."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join() -> tuple[int, int]:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); returns `world()`."""
    import torch
    import torch.distributed as dist

    if switches.world_size() > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world()


def leave() -> None:
    """Wait for every process (the first may still be writing), then leave the group: a process that exits
    with gloo's threads still running aborts."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
