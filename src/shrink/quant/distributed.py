"""Calibration spread over processes (`torchrun --nproc-per-node N shrink quantize ...`): each process runs
its share of the calibration windows through the blocks, and the statistics the methods read (each layer's
input Hessian, mean absolute input, token count, sampled input rows) are combined across processes before
any weight is chosen, so every process quantizes the very same weights (the only difference from one
process is the order floating-point sums are taken in). gloo on CPUs, nccl where there are GPUs.

Nothing here runs unless torch.distributed is initialised with more than one process.
"""

from __future__ import annotations

import torch

from ..core import processes


world = processes.world  # (rank, processes); (0, 1) outside torchrun
join = processes.join  # the group torchrun describes (WORLD_SIZE > 1)
leave = processes.leave


def my_share(samples: list) -> list:
    """This process's calibration windows: a contiguous slice, in rank order, so that the windows taken
    together are in the order one process takes them (ShrinkError when there are fewer than processes)."""
    rank, size = world()
    if size == 1:
        return samples
    from ..core.errors import ShrinkError

    if len(samples) < size:
        raise ShrinkError(f"{len(samples)} calibration windows cannot be shared among {size} processes: give "
                          f"--samples {size} or more")
    bounds = [len(samples) * r // size for r in range(size + 1)]
    return samples[bounds[rank]:bounds[rank + 1]]


def combine(stats: dict) -> None:
    """Make each LinearStats of `stats` (layer -> LinearStats; layers sharing an input share one) the
    statistics of all processes' windows: token-weighted means of the Hessian and the mean absolute input,
    the token counts summed, the sampled rows gathered in rank order. In place; nothing when not distributed."""
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return
    for st in {id(s): s for s in stats.values()}.values():
        tokens = torch.tensor([float(st.tokens)], dtype=torch.float64)
        dist.all_reduce(tokens)
        total = float(tokens[0])
        for name in ("hessian", "abs_mean"):
            t = getattr(st, name) * float(st.tokens)
            dist.all_reduce(t)
            setattr(st, name, t / max(total, 1.0))
        st.tokens = int(total)
        st.sample = _gather_rows(st.sample)
        st.sampled = sum(len(x) for x in st.sample)


def _gather_rows(sample: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every process's sampled input rows, in rank order (rows padded to the longest, then cut)."""
    import torch.distributed as dist

    _, size = world()
    rows = torch.cat(sample) if sample else None
    width = torch.tensor([rows.shape[1] if rows is not None else 0])
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    if int(width) == 0:
        return []
    rows = rows if rows is not None else torch.zeros(0, int(width))
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([rows.shape[0]]))
    longest = max(int(c) for c in counts)
    padded = torch.zeros(longest, int(width), dtype=rows.dtype)
    padded[:rows.shape[0]] = rows
    parts = [torch.zeros_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return [p[:int(c)] for p, c in zip(parts, counts) if int(c)]


def largest(value: float) -> float:
    """The largest of `value` over the processes (a check every process must decide the same way)."""
    import torch.distributed as dist

    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0])
