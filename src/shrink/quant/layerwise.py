"""Run calibration data through a model one block at a time, so memory holds one block's activations.

The model's repeated blocks (a transformer's layers) are found as its `nn.ModuleList`s of same-type
modules: one stack for a decoder or an encoder, two for an encoder-decoder (the encoder's, then the
decoder's). For each stack the inputs of its first block are captured once (for the decoder, with the
encoder already quantized); then each block is run on them
with hooks that gather what the quantizers need from its Linear layers (input Hessians, activation
statistics, a sample of inputs), the caller quantizes the block, and the block is run again to give
the next block its inputs as the quantized model will see them. A model without repeated blocks is
treated as one block whose inputs are the calibration samples.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.architecture import find_stacks
from .distributed import combine, world


@dataclass
class LinearStats:
    """What the quantizers see of one Linear layer's inputs over the calibration data."""

    hessian: torch.Tensor  # 2/n sum x x^T, float64 [in, in]
    abs_mean: torch.Tensor  # mean |x| per input channel, float64 [in]
    tokens: int = 0
    sample: list[torch.Tensor] = field(default_factory=list)  # a few input rows, float32
    sampled: int = 0


class _Stop(Exception):
    pass


def call_model(model: nn.Module, sample: torch.Tensor):
    """The model's forward on one calibration sample: float inputs as they are (pixels, features), token
    ids without a cache, and for an encoder-decoder the same tokens into the decoder too (after features,
    such as Whisper's audio: its start token, four times, so the decoder's layers see inputs as well)."""
    config = getattr(model, "config", None)
    if sample.is_floating_point():
        if getattr(config, "is_encoder_decoder", False):
            start = getattr(config, "decoder_start_token_id", None) or 0
            return model(sample, decoder_input_ids=torch.full((sample.shape[0], 4), start), use_cache=False)
        return model(sample)
    if getattr(config, "is_encoder_decoder", False):
        return model(input_ids=sample, decoder_input_ids=sample, use_cache=False)
    return model(sample, use_cache=False)


def capture_inputs(model: nn.Module, block: nn.Module, samples: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) the first block receives for each sample, computed by running the model up to it."""
    captured = []

    def hook(_mod, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for s in samples:
                try:
                    call_model(model, s)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(captured) != len(samples):
        raise RuntimeError("could not capture the inputs of the model's first block")
    return captured


def first_output(out):
    """A block's output tensor (decoder layers return a tuple in some transformers versions)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """Run `block` on each captured input; return the inputs of the next block (same kwargs)."""
    nxt = []
    with torch.no_grad():
        for args, kwargs in inputs:
            out = first_output(block(*args, **kwargs))
            nxt.append(((out, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": out}))
    return nxt


@contextmanager
def float32_weights(module: nn.Module, workspace: torch.Tensor):
    """Within: `module`'s Linear layers whose weights are held in another dtype (bf16, fp16, as stored) compute
    with them made float32, one layer at a time in `workspace` (contiguous float32, at least the largest such
    weight's size): float32 arithmetic on the same values, with no float32 copy of the module kept. (As
    W x^T: MKL repacks the weight for x W^T, which costs more than the product for a few rows.)"""
    changed = []

    def forward(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        w = workspace.view(-1)[: m.weight.numel()].view(m.weight.shape).copy_(m.weight)
        y = torch.mm(w, x.reshape(-1, x.shape[-1]).t()).t().reshape(*x.shape[:-1], w.shape[0])
        return y if m.bias is None else y + m.bias

    try:
        for m in module.modules():
            w = m._parameters.get("weight") if isinstance(m, nn.Linear) else None
            if w is not None and w.dtype != torch.float32 and w.device.type != "meta":
                if w.numel() > workspace.numel():
                    raise ValueError(f"a workspace of {workspace.numel()} values is too small for a weight of "
                                     f"shape {tuple(w.shape)}")
                m.forward = partial(forward, m)
                changed.append(m)
        yield
    finally:
        for m in changed:
            del m.forward  # the class's own again


def collect_stats(block: nn.Module, inputs: list[tuple[tuple, dict]], names: list[str],
                  keep_rows: int = 0, first_stage_only: bool = False) -> dict[str, LinearStats]:
    """Run `block` on `inputs` and gather LinearStats for its Linear submodules named in `names`.

    keep_rows: how many input rows per layer to keep as a sample (spread over the calibration set).
    Under torchrun the statistics are those of every process's inputs (distributed.combine).
    first_stage_only: stop each run of the block once the first layers reached (those fed one
    tensor, like q, k and v) have their inputs; the rest of the block is not computed.
    """
    stats: dict[str, LinearStats] = {}
    modules = dict(block.named_modules())
    handles = []
    keep_rows //= world()[1]  # processes sharing the windows keep their share of the rows
    per_call = max(1, keep_rows // max(1, len(inputs))) if keep_rows else 0
    # Layers fed the very same tensor in one call (q, k, v; gate, up) share one LinearStats object,
    # computed once: the Hessian product is the expensive part of calibration.
    first_for_input: dict[int, tuple[torch.Tensor, str]] = {}  # holding the tensor keeps its id unique

    def new_call(_mod, _args):
        first_for_input.clear()

    def make_hook(name):
        def hook(mod, args):
            if first_stage_only and first_for_input and id(args[0]) not in first_for_input:
                raise _Stop
            _, first = first_for_input.setdefault(id(args[0]), (args[0], name))
            if first != name:
                stats.setdefault(name, stats[first])
                if stats[name] is stats[first]:
                    return
            x = args[0].detach().reshape(-1, mod.in_features).float()
            st = stats.get(name)
            if st is None:
                k = mod.in_features
                st = stats[name] = LinearStats(torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64))
            n = x.shape[0]
            total = st.tokens + n
            # float32 products per call (fast), accumulated in float64 across calls (accurate)
            st.hessian.mul_(st.tokens / total).add_((x.T @ x).double(), alpha=2.0 / total)
            st.abs_mean.mul_(st.tokens / total).add_(x.abs().sum(0).double(), alpha=1.0 / total)
            st.tokens = total
            if per_call and st.sampled < keep_rows:
                idx = torch.linspace(0, n - 1, min(per_call, n)).long()
                st.sample.append(x[idx].clone())
                st.sampled += len(idx)
        return hook

    handles.append(block.register_forward_pre_hook(new_call))
    for name in names:
        handles.append(modules[name].register_forward_pre_hook(make_hook(name)))
    try:
        with torch.no_grad():
            for args, kwargs in inputs:
                try:
                    block(*args, **kwargs)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    combine(stats)  # every process's windows (nothing when there is one process)
    return stats


class BlockHooks(Protocol):
    """What a walk over blocks held on disk does around each block (`blockwise(..., around=)`): `enter`
    gives the block its weights before it is visited, `leave` writes it out and lets them go after its
    outputs were computed."""

    def enter(self, name: str, block: nn.Module) -> None: ...

    def leave(self, name: str, block: nn.Module) -> None: ...


def blockwise(model: nn.Module, samples: list[torch.Tensor], visit: Callable, progress: bool | None = None,
              desc: str = "calibrate", around: BlockHooks | None = None) -> None:
    """Call `visit(block_name, block, inputs)` for each block of each stack in order, feeding each block
    the outputs of the previous one as `visit` left it (quantized). Without repeated blocks: one call on
    the model. around: hooks called before and after each block (default None: the blocks are in memory)."""
    stacks = find_stacks(model)
    if not stacks:
        visit("", model, [((s,), {}) for s in samples])
        return
    bar = tqdm(total=sum(len(b) for _, b in stacks), desc=desc, unit="block",
               disable=None if progress is None else not progress)
    for prefix, blocks in stacks:
        inputs = capture_inputs(model, blocks[0], samples)  # through the stacks quantized before it
        for i, block in enumerate(blocks):
            if around is not None:
                around.enter(f"{prefix}.{i}", block)
            visit(f"{prefix}.{i}", block, inputs)
            bar.update()
            if i + 1 < len(blocks):
                inputs = run_block(block, inputs)
            if around is not None:
                around.leave(f"{prefix}.{i}", block)
    bar.close()
