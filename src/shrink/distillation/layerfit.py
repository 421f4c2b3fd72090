"""Layer-wise fitting: teach each student layer the teacher span it replaces, on the teacher's own states.

A student built from every other teacher layer starts broken (on SmolLM2, perplexity in the millions):
each kept layer now has to do the work of two. Before end-to-end distillation, each student layer j is
fed the teacher's hidden state at the start of its span and trained to produce the teacher's state at
the end of it. The layers learn independently (their inputs come from the teacher, detached), so the
signal is dense and nothing has to flow back through a broken stack. The loss is the squared error of
the layer's update (output minus input) relative to the size of the teacher span's update, so the
residual stream that passes through unchanged neither dominates nor hides the error.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core.errors import ShrinkError
from .students import layer_list


def spans(layer_map: dict[int, int]) -> list[tuple[int, int]]:
    """(start, end) teacher hidden-state indices per student layer, from a layer map (student hidden
    index j+1 -> teacher hidden index at the end of the span student layer j stands for): each layer's
    span starts where the previous one ended; the first starts at the embeddings (0)."""
    ends = [layer_map[j] for j in sorted(layer_map)]
    if sorted(layer_map) != list(range(1, len(ends) + 1)):
        raise ShrinkError(f"layer fitting needs a layer map for every student layer 1..N, got keys {sorted(layer_map)}")
    starts = [0] + ends[:-1]
    if any(b <= a for a, b in zip(starts, ends)):
        raise ShrinkError(f"layer map {layer_map}: each student layer must stand for at least one teacher layer, in order")
    return list(zip(starts, ends))


class _Stop(Exception):
    pass


@torch.no_grad()
def teacher_states(teacher: nn.Module, x: torch.Tensor, upto: int) -> tuple[list[torch.Tensor], tuple, dict]:
    """The teacher's residual stream before each of its first `upto` layers and after layer upto-1
    (so `upto` + 1 states, the last not normalised), plus the (args, kwargs) its layers are called with
    besides the hidden state. The teacher's layers after `upto` and its head are not run."""
    _, layers = layer_list(teacher)
    states: list[torch.Tensor] = []
    call: dict = {}

    def pre(_mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        states.append(h)
        if not call:
            call["args"], call["kwargs"] = args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}

    def post(_mod, _args, _kwargs, out):
        states.append(out[0] if isinstance(out, (tuple, list)) else out)
        raise _Stop

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in list(layers)[:upto]]
    handles.append(layers[upto - 1].register_forward_hook(post, with_kwargs=True))
    try:
        teacher(x, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return states, call["args"], call["kwargs"]


def layer_fit_loss(teacher: nn.Module, student: nn.Module, x: torch.Tensor, layer_spans: list[tuple[int, int]]):
    """Mean over student layers of |f_j(h_a) - h_b|^2 / |h_b - h_a|^2, with h the teacher's residual
    stream on tokens `x`, (a, b) student layer j's span and f_j the student layer. Differentiable in the
    student's layer weights only."""
    _, s_layers = layer_list(student)
    states, args, kwargs = teacher_states(teacher, x, layer_spans[-1][1])
    total = 0.0
    for layer, (a, b) in zip(s_layers, layer_spans):
        h_in, h_out = states[a], states[b]
        out = layer(h_in, *args, **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        delta = h_out - h_in
        total = total + (out - h_out).float().pow(2).mean() / delta.float().pow(2).mean().clamp(min=1e-12)
    return total / len(layer_spans)
