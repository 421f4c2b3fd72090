"""Online rotations (QuaRot's R4): a layer's input multiplied by a Hadamard matrix as the model runs.

The input of each MLP's down projection is the product of two activations, so no weight before it can
hold a rotation (rotate.py folds the others); its outliers stay until the layer is quantized. Rotating it
as it runs spreads them: the layer keeps W R (R = diag(signs) H / sqrt(n), orthogonal) in its weight and
its input is multiplied by R first, so before rounding it computes what it did, and after rounding its
error is spread over all its inputs (measured on SmolLM2 with GPTQ: 8-10% less KL at int3-g32 and
int4-g64, benchmarks/results/quant_quality_r4.json).

R is the Kronecker product of small Hadamard matrices (Sylvester's 2 x 2 ones grouped into blocks of up to
MAX_CHUNK, and one of Paley's for the odd part), so the product costs n * (sum of the blocks' orders) a
row, not n * n: for SmolLM2's 1536 inputs 128 + 12 = 140 products an input.

The rotation is a submodule `input_rotation` of the layer, run by a forward pre-hook, so the calibration
hooks registered after it (GPTQ's Hessians, AWQ's statistics) see the rotated input, and it moves with the
layer when quantization replaces it (`carry`). Only shrink runs such a model: its folder is kept in
shrink's own layout (transformers would load the weights and skip the rotation), the C++ runtime hands
it to transformers' generate (said), and GGUF export refuses it.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn as nn

from ..core.errors import ShrinkError
from .rotate import paley

MAX_CHUNK = 256  # the largest block multiplied at once: larger ones cost more products than they save calls
ONLINE_TOLERANCE = 1e-4  # the rotated model's output, relative to the original's: float32 rounding


@lru_cache(maxsize=32)
def chunks(n: int) -> tuple[torch.Tensor, ...] | None:
    """Normalised Hadamard blocks (float32, each orthogonal) whose Kronecker product is the n x n rotation
    before signs: n = 2^k m, the odd part in the smallest Paley matrix of order m 2^j, the rest Sylvester's
    in blocks of up to MAX_CHUNK; None where no such matrix is built here (said by `rotate_inputs`)."""
    k = (n & -n).bit_length() - 1
    odd = None
    for j in range(k + 1):  # the odd part's matrix takes as few of the twos as it can
        order = (n >> k) << j
        odd = torch.ones(1, 1, dtype=torch.float64) if order == 1 else paley(order)
        if odd is not None:
            break
    if odd is None:
        return None
    twos = n // odd.shape[0]
    blocks = []
    while twos > 1:
        size = min(twos, MAX_CHUNK)
        blocks.append(_sylvester(size))
        twos //= size
    if odd.shape[0] > 1:
        blocks.append(odd)
    return tuple((b / math.sqrt(b.shape[0])).float() for b in blocks) or (torch.ones(1, 1),)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rotation_matrix(n: int, signs: torch.Tensor) -> torch.Tensor:
    """The n x n orthogonal matrix R = diag(signs) kron(chunks) (float64) an online rotation multiplies by."""
    blocks = chunks(n)
    r = blocks[0].double()
    for b in blocks[1:]:
        r = torch.kron(r, b.double())
    return signs.double()[:, None] * r


class HadamardInput(nn.Module):
    """x -> x R along the last dimension, R = diag(signs) H / sqrt(n) applied block by block (module
    docstring). `signs` (+-1, float32) is a buffer: saved and loaded with the layer it belongs to."""

    def __init__(self, n: int, signs: torch.Tensor | None = None):
        super().__init__()
        if chunks(n) is None:
            raise ShrinkError(f"no Hadamard matrix of order {n} is built here (n = 2^k m needs one of Paley's of "
                              f"order m 2^j), so an input of {n} cannot be rotated online")
        self.n = n
        self.register_buffer("signs", torch.ones(n) if signs is None else signs.float().clone())
        self.blocks = len(chunks(n))
        for i, b in enumerate(chunks(n)):  # buffers, not saved: they move with the model (.to(device))
            self.register_buffer(f"block{i}", b.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = [getattr(self, f"block{i}").float() for i in range(self.blocks)]
        y = (x.float() * self.signs.float()).reshape(-1, *(b.shape[0] for b in blocks))
        for i, b in enumerate(blocks):  # (float32 whatever the model's dtype: the product is exact to its rounding)
            y = torch.movedim(torch.movedim(y, i + 1, -1) @ b, -1, i + 1)
        return y.reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.n}, blocks={'x'.join(str(b.shape[0]) for b in chunks(self.n))}"


def _rotate_first_argument(module: nn.Module, args: tuple):
    return (module.input_rotation(args[0]), *args[1:])


def attach(module: nn.Module, rotation: HadamardInput) -> None:
    """Make `module` compute on its input times `rotation` (a submodule run by a forward pre-hook, first of
    its pre-hooks); nothing is folded into its weight here."""
    if getattr(module, "input_rotation", None) is not None:
        raise ShrinkError(f"{type(module).__name__} is rotated online already")
    module.input_rotation = rotation
    module.register_forward_pre_hook(_rotate_first_argument, prepend=True)


def carry(old: nn.Module | None, new: nn.Module) -> None:
    """Give `new`, which replaces `old`, old's online rotation (if it has one and new has none)."""
    rotation = getattr(old, "input_rotation", None) if old is not None else None
    if isinstance(rotation, HadamardInput) and getattr(new, "input_rotation", None) is None:
        attach(new, rotation)


def online_rotated(model: nn.Module) -> list[str]:
    """The names of `model`'s layers rotated online."""
    return [name for name, m in model.named_modules() if isinstance(getattr(m, "input_rotation", None), HadamardInput)]


def refuse_online(model_or_names, what: str) -> None:
    """ShrinkError saying `what` cannot hold an online rotation, naming the first layer that has one (a
    model, or the layer names a folder's record lists)."""
    names = online_rotated(model_or_names) if isinstance(model_or_names, nn.Module) else list(model_or_names or [])
    if names:
        raise ShrinkError(f"{what}: {names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''} rotate their "
                          "input online (--method rotate-online+...), which only shrink's own model runs; quantize "
                          "with --method rotate+... for a model that exports")


def down_projections(model: nn.Module) -> list[str]:
    """The MLP down projections of a Llama-shaped decoder's blocks (the layers an online rotation goes
    before); ShrinkError naming the first block without one."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ShrinkError(f"cannot rotate online: {type(model).__name__} has no 'model.layers'")
    names = []
    for i, block in enumerate(layers):
        down = getattr(getattr(block, "mlp", None), "down_proj", None)
        if not isinstance(down, nn.Linear):
            raise ShrinkError(f"cannot rotate online: model.layers.{i}.mlp has no down_proj Linear layer "
                              f"(a {type(down).__name__})")
        names.append(f"model.layers.{i}.mlp.down_proj")
    return names


def rotate_inputs(model: nn.Module, names: list[str], seed: int = 0) -> dict:
    """Rotate the input of each layer in `names` (Linear layers in float32) online: its weight becomes W R
    and a HadamardInput runs before it (module docstring), with random signs from `seed` (default 0), one
    set for all. The model's output is checked before and after on random tokens; ShrinkError, the model
    left as it was, when it moved beyond float rounding or a layer cannot be rotated (naming it). Returns
    the record: the layers, the blocks of R, the seed and the measured change."""
    layers = {n: model.get_submodule(n) for n in names}
    for n, m in layers.items():
        if not isinstance(m, nn.Linear) or m.weight.dtype != torch.float32:
            raise ShrinkError(f"cannot rotate online: {n} is not a float32 Linear layer ({type(m).__name__})")
        if getattr(m, "input_rotation", None) is not None:
            raise ShrinkError(f"cannot rotate online: {n} is rotated online already")
        if chunks(m.in_features) is None:
            raise ShrinkError(f"cannot rotate online: {n} has {m.in_features} inputs, and no Hadamard matrix of that "
                              "order is built here")
    sizes = {m.in_features for m in layers.values()}
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        before = model(ids).logits.float()
    g = torch.Generator().manual_seed(seed)
    signs = {k: torch.randint(0, 2, (k,), generator=g).float() * 2 - 1 for k in sorted(sizes)}
    kept = {n: m.weight.data for n, m in layers.items()}
    try:
        with torch.no_grad():
            for n, m in layers.items():
                k = m.in_features
                m.weight.data = (m.weight.double() @ rotation_matrix(k, signs[k])).float().contiguous()
                attach(m, HadamardInput(k, signs[k]))
            after = model(ids).logits.float()
        change = float((after - before).abs().max() / before.abs().max().clamp_min(1e-30))
        if not change <= ONLINE_TOLERANCE:
            raise ShrinkError(f"the model rotated online differs from the original by {change:.2e} (relative; float "
                              f"rounding is below {ONLINE_TOLERANCE:g})")
    except BaseException:
        for n, m in layers.items():
            m.weight.data = kept[n]
            if isinstance(getattr(m, "input_rotation", None), HadamardInput):
                detach(m)
        raise
    return {"layers": list(names), "blocks": {str(k): "x".join(str(b.shape[0]) for b in chunks(k)) for k in sorted(sizes)},
            "seed": seed, "change": change}


def detach(module: nn.Module) -> None:
    """Take `module`'s online rotation and its hook off (nothing unfolded from its weight)."""
    del module.input_rotation
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is _rotate_first_argument:
            del module._forward_pre_hooks[key]


def attach_recorded(model: nn.Module, record: dict | None, where: str) -> None:
    """Give a loaded model's layers the online rotations its record lists (signs to be loaded from its
    weights); ShrinkError naming `where` and the layer for a record that does not fit the model."""
    online = (record or {}).get("online")
    if not online:
        return
    layers = online.get("layers") if isinstance(online, dict) else None
    if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
        raise ShrinkError(f"{where}: rotation.online.layers must be a list of layer names")
    for n in layers:
        try:
            m = model.get_submodule(n)
        except AttributeError:
            raise ShrinkError(f"{where}: rotation.online names {n!r}, which the model does not have") from None
        k = getattr(m, "in_features", None)
        if not isinstance(k, int):
            raise ShrinkError(f"{where}: rotation.online names {n!r}, a {type(m).__name__} without in_features")
        if getattr(m, "input_rotation", None) is None:  # (a model passed in rotated already keeps its own)
            with torch.device("cpu"):
                attach(m, HadamardInput(k))
