"""Activation-aware scaling (after AWQ, Lin et al., 2023) and clipping search.

Input channels that carry large activations matter most; scaling those weight columns up by s (and the
activations down by 1/s, folded into the operation that produces them) makes their rounding error
relatively smaller. s = mean|x| ** alpha, with alpha searched on a grid to minimise the quantized
layers' output error on calibration inputs. Folding keeps the model's function unchanged before
rounding. Then, per group, the weight range can be clipped (a factor searched on a grid) when that
lowers the output error.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .format import dequantize, group_params, kquant_params, rounded
from .rtn import kquant_weight
from .spec import QuantSpec

# (module producing the input, Linear layers sharing that input), by the names Llama-style decoder
# blocks use (Llama, Mistral, Qwen2, SmolLM); pairs whose shapes do not fit are skipped.
SCALE_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
)


def scale_groups(block: nn.Module, sample: tuple[tuple, dict] | None = None) -> list[tuple[str, list[str]]]:
    """The (producer, consumers) pairs of `block` where a per-channel scale may fold: traced on one input
    `sample` (args, kwargs), every group of Linear layers whose input is the very output of one module (a
    norm or a Linear) whatever it is called (Gemma2's pre_feedforward_layernorm, OPT's
    self_attn_layer_norm); the Llama-style names above only for layers the trace did not place (or with
    no sample). Whether a fold is exact is decided by checking it numerically (`checked_fold`)."""
    mods = dict(block.named_modules())
    pairs = _traced_groups(block, sample) if sample is not None else []
    placed = {n for _, linears in pairs for n in linears}
    pairs += [(prev, list(linears)) for prev, linears in SCALE_GROUPS if not placed & set(linears)]
    out = []
    for prev, linears in pairs:
        if prev not in mods or not all(n in mods and isinstance(mods[n], nn.Linear) for n in linears):
            continue
        if any(getattr(mods[n], "input_rotation", None) is not None for n in linears):
            continue  # its input is rotated as it runs: a scale of the producer's channels is not one of its inputs
        width = {mods[n].in_features for n in linears}
        if len(width) != 1:
            continue
        p = mods[prev]
        produced = p.out_features if isinstance(p, nn.Linear) else getattr(p, "weight", torch.empty(0)).numel()
        if produced != width.pop() or (not isinstance(p, nn.Linear) and getattr(p, "weight", None) is None):
            continue  # e.g. v_proj -> o_proj under grouped-query attention, or a producer without weights
        out.append((prev, list(linears)))
    return out


@torch.no_grad()
def _traced_groups(block: nn.Module, sample: tuple[tuple, dict]) -> list[tuple[str, list[str]]]:
    """Run `block` once with hooks: which module's output tensor is each Linear layer's input."""
    producer: dict[int, str] = {}
    fed: dict[str, int] = {}
    keep = []  # holding the tensors keeps their ids unique during the run
    handles = []

    def on_output(name):
        def hook(_mod, _args, out):
            if isinstance(out, torch.Tensor) and id(out) not in producer:  # dropout passes its input on
                producer[id(out)] = name
                keep.append(out)
        return hook

    def on_input(name):
        def hook(_mod, args):
            if args and isinstance(args[0], torch.Tensor):
                fed[name] = id(args[0])
                keep.append(args[0])
        return hook

    for name, m in block.named_modules():
        if not name:
            continue
        handles.append(m.register_forward_hook(on_output(name)))
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_pre_hook(on_input(name)))
    try:
        args, kwargs = sample
        block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: dict[str, list[str]] = {}
    for name, t in fed.items():
        if t in producer and producer[t] != name:
            groups.setdefault(producer[t], []).append(name)
    return list(groups.items())


def fake_quant(w: torch.Tensor, spec: QuantSpec, clip=1.0) -> torch.Tensor:
    """w rounded to the format's grid and back to float (groups along the input)."""
    n, k = w.shape
    g = spec.group_for(k)
    wg = w.reshape(n, k // g, g)
    if spec.kquant:  # both scale levels quantized, as the layer will be
        q = kquant_weight(wg, kquant_params(wg, spec, clip), spec)
        return dequantize(q.codes, q.scales, q.zeros, q.zero_const, superscales=q.superscales)
    scale, zero = group_params(wg, spec, clip)
    return rounded(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), spec).reshape(n, k)


def search_scale(weights: list[torch.Tensor], x: torch.Tensor, abs_mean: torch.Tensor, spec: QuantSpec,
                 grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """Best per-input-channel scale for layers sharing input `x` [T, K]: (s [K], alpha, error ratio
    to alpha=0). The error is the squared output error of all the layers together."""
    w = torch.cat([wi.detach().float() for wi in weights], 0)
    ref = x @ w.T
    base = abs_mean.float().clamp(min=1e-8)
    best = (None, 0.0, float("inf"))
    err0 = None
    for i in range(grid + 1):
        alpha = i / grid
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # keep the scales centred around 1
        wq = fake_quant(w * s, spec) / s
        err = (x @ wq.T - ref).pow(2).mean().item()
        if i == 0:
            err0 = err
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2] / err0 if err0 else 1.0


@torch.no_grad()
def fold_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor, offset: float = 0.0) -> None:
    """Divide what `prev` produces by s and multiply the consumers' input columns by s (exact when `prev`
    is a Linear, or a norm computing x * (offset + w): offset 0 for most, 1 for Gemma's)."""
    # new tensors rather than in-place changes: whoever holds the old ones (quantize's undo on failure,
    # checked_fold) still holds the original values
    if isinstance(prev, nn.Linear):
        prev.weight.data = prev.weight.data / s.unsqueeze(1).to(prev.weight.dtype)
        if prev.bias is not None:
            prev.bias.data = prev.bias.data / s.to(prev.bias.dtype)
    else:  # a norm layer with a per-channel weight (and maybe bias)
        prev.weight.data = (prev.weight.data + offset) / s.to(prev.weight.dtype) - offset
        if getattr(prev, "bias", None) is not None:
            prev.bias.data = prev.bias.data / s.to(prev.bias.dtype)
    for lin in linears:
        lin.weight.data = lin.weight.data * s.unsqueeze(0).to(lin.weight.dtype)


FOLD_TOLERANCE = 1e-5  # relative change of a block's output that a fold may cause before rounding


@torch.no_grad()
def checked_fold(block: nn.Module, prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor, inputs: list,
                 reference: list[torch.Tensor]) -> tuple[float, str]:
    """Fold s into `prev` and the consumers, run `block` on `inputs` and compare with `reference` (its
    outputs before any fold). For a norm, the fold is tried as y = x * w (w / s) and, if that moves the
    output, as y = x * (1 + w) (Gemma's norm: w -> (1 + w) / s - 1). Returns the largest relative change
    of the fold kept and how it was folded; when none is within FOLD_TOLERANCE the tensors are restored
    exactly, from copies, and the change of the last one tried is returned with the form "none"."""
    from .distributed import largest
    from .layerwise import first_output

    saved = [t.data for t in _fold_tensors(prev, linears)]  # fold_scale makes new tensors: these stay as they are
    forms = ("w", "1+w") if not isinstance(prev, nn.Linear) else ("w",)
    moved = float("nan")
    for form in forms:
        fold_scale(prev, linears, s, offset=1.0 if form == "1+w" else 0.0)
        moved = 0.0
        for (a, k), ref in zip(inputs, reference):
            out = first_output(block(*a, **k)).float()
            moved = max(moved, float((out - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)))
        moved = largest(moved)  # under torchrun each process checks its own windows: all decide alike
        if moved <= FOLD_TOLERANCE:
            return moved, form
        for t, old in zip(_fold_tensors(prev, linears), saved):
            t.data = old
    return moved, "none"


def _fold_tensors(prev: nn.Module, linears: list[nn.Linear]) -> list[torch.Tensor]:
    out = [prev.weight] + ([prev.bias] if getattr(prev, "bias", None) is not None else [])
    return out + [lin.weight for lin in linears]


def search_clip(weight: torch.Tensor, x: torch.Tensor, spec: QuantSpec, steps: int = 10,
                min_ratio: float = 0.5) -> torch.Tensor:
    """Per-group clipping factors [out, groups] minimising each group's output error on `x` [T, K]."""
    w = weight.detach().float()
    n, k = w.shape
    g = spec.group_for(k)
    xg = x.reshape(x.shape[0], k // g, g)  # [T, G, g]
    best_err = torch.full((n, k // g), float("inf"))
    best = torch.ones(n, k // g)
    for i in range(steps + 1):
        ratio = 1.0 - (1.0 - min_ratio) * i / steps
        dq = (fake_quant(w, spec, ratio) - w).reshape(n, k // g, g)
        err = torch.einsum("tGj,nGj->tnG", xg, dq).pow(2).mean(0)  # [n, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best
