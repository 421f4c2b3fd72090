"""Students: built from the teacher (fewer transformer layers, optionally a narrower MLP) or from a
short spec for plain classifiers ("mlp:784-800-800-10", "cnn:1x28x28-16-32-10")."""

from __future__ import annotations

import copy
import re

import torch
import torch.nn as nn

from ..core.architecture import find_stacks
from ..core.errors import ShrinkError
from ..core.memory import check_fits_memory

# MLP projections by architecture: (rows sliced when narrowing: gate/up or BERT's intermediate; columns sliced: down/output)
_MLP_NAMES = (
    (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),  # Llama, Mistral, Qwen2, SmolLM
    (("intermediate.dense",), ("output.dense",)),             # BERT-style encoders
)


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of a Hugging Face transformer's stack of config.num_hidden_layers blocks."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    stacks = [(name, m) for name, m in find_stacks(model, min_blocks=1) if len(m) == n]
    if not stacks:
        raise ShrinkError(f"{type(model).__name__}: cannot find its list of {n} transformer layers to take a subset of")
    return stacks[0]


def parse_layers(keep: str | int | list[int], n: int) -> list[int]:
    """Teacher layer indices for the student: "every-other" (0, 2, 4, ...; the default), "first-N",
    "N" or an int (N layers spread evenly, always keeping the first and last), or a list."""
    if isinstance(keep, (list, tuple)):
        idx = [int(i) for i in keep]
    elif keep == "every-other":
        idx = list(range(0, n, 2))
    elif isinstance(keep, str) and keep.startswith("first-"):
        idx = list(range(int(keep[6:])))
    else:
        try:
            k = int(keep)
        except (TypeError, ValueError):
            raise ShrinkError(f"student layers {keep!r}: expected 'every-other', 'first-N', a count, or a list of indices") from None
        if not 1 <= k <= n:
            raise ShrinkError(f"student layers {k}: the teacher has {n} layers")
        idx = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)}) if k > 1 else [0]
    if not idx or any(not 0 <= i < n for i in idx) or len(set(idx)) != len(idx):
        raise ShrinkError(f"student layers {idx}: need distinct indices between 0 and {n - 1}")
    return idx


IMPORTANCE_WINDOWS = 8  # data rows the block importance is measured on


def block_importance(model: nn.Module, inputs: torch.Tensor) -> list[float]:
    """How much each block of the model's layer stack changes what it is given, on `inputs` (token rows
    [N, T], at most IMPORTANCE_WINDOWS of them used): 1 - the mean cosine similarity of each position's
    hidden state leaving the block with the one entering it (ShortGPT's block influence). A block that
    changes little can go with least loss."""
    _, blocks = layer_list(model)
    sums = [0.0] * len(blocks)
    count = [0] * len(blocks)

    def hook(i):
        def measure(_m, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, (tuple, list)) else out
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            sums[i] += float((1 - cos).sum())
            count[i] += cos.numel()
        return measure

    _run_rows(model, inputs, [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)], count)
    return [s_ / c for s_, c in zip(sums, count)]


def channel_importance(model: nn.Module, inputs: torch.Tensor) -> dict[int, torch.Tensor]:
    """{block index: the mean magnitude of each MLP intermediate channel} on `inputs` (token rows [N, T], at
    most IMPORTANCE_WINDOWS of them): what each channel feeds the down projection (Llama's down_proj, BERT's
    output.dense), as Minitron ranks channels by their activations."""
    prefix, blocks = layer_list(model)
    sums: dict[int, torch.Tensor] = {}
    count = [0] * len(blocks)

    def hook(i):
        def measure(_m, args):
            x = args[0].detach().float().abs()
            sums[i] = sums.get(i, 0) + x.reshape(-1, x.shape[-1]).sum(0)
            count[i] += x.numel() // x.shape[-1]
        return measure

    readers = [next((b.get_submodule(c) for _, cols in _MLP_NAMES for c in cols if _has(b, c)), None) for b in blocks]
    if None in readers:
        raise ShrinkError(f"{prefix}.{readers.index(None)}: narrowing the MLP knows Llama-style (gate/up/down) and "
                          "BERT-style layers only")
    _run_rows(model, inputs, [r.register_forward_pre_hook(hook(i)) for i, r in enumerate(readers)], count)
    return {i: sums[i] / count[i] for i in sums}


def _run_rows(model: nn.Module, inputs: torch.Tensor, hooks: list, count: list[int]) -> None:
    """The first IMPORTANCE_WINDOWS rows of `inputs` through `model` (no gradients), its measuring `hooks`
    removed after; ShrinkError when some block measured nothing (`count` per block)."""
    try:
        with torch.no_grad():
            for row in inputs[:IMPORTANCE_WINDOWS]:
                model(row.reshape(1, -1))
    finally:
        for h in hooks:
            h.remove()
    if not all(count):
        raise ShrinkError(f"{type(model).__name__}: its blocks did not run on the data, so their importance "
                          "cannot be measured")


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def most_important(importance: list[float], keep: int) -> list[int]:
    """The indices of the `keep` blocks of largest importance, in order."""
    if not 1 <= keep <= len(importance):
        raise ShrinkError(f"student layers {keep}: the teacher has {len(importance)} layers")
    return sorted(sorted(range(len(importance)), key=lambda i: -importance[i])[:keep])


def student_from_teacher(teacher: nn.Module, layers: str | int | list[int] = "every-other",
                         intermediate_size: int | None = None,
                         channels: dict[int, torch.Tensor] | None = None) -> tuple[nn.Module, list[int]]:
    """A Hugging Face student with a subset of the teacher's layers, initialised from them (as DistilBERT
    was), and optionally a narrower MLP keeping the intermediate channels of largest importance: `channels`
    ({teacher block: per-channel importance}, `channel_importance`) where given, else the norms of the weights
    that write and read each channel. Embeddings, norms and head are copied. Returns (student, teacher layer
    index per student layer)."""
    config = getattr(teacher, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise ShrinkError(f"{type(teacher).__name__}: building a student from the teacher needs a Hugging Face "
                          "transformer; give a student module or a spec such as 'mlp:784-128-10'")
    prefix, _ = layer_list(teacher)
    n = config.num_hidden_layers
    idx = parse_layers(layers, n)
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = len(idx)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [config.layer_types[i] for i in idx]
    if intermediate_size is not None:
        if not hasattr(cfg, "intermediate_size") or not 0 < intermediate_size <= cfg.intermediate_size:
            raise ShrinkError(f"intermediate size {intermediate_size}: must be between 1 and the teacher's "
                              f"{getattr(cfg, 'intermediate_size', '?')}")
        cfg.intermediate_size = intermediate_size
    student = type(teacher)(cfg).eval()
    for name, _ in list(student.named_children()):
        if getattr(teacher, name, True) is None:  # a part the teacher was built without (BertModel's pooler)
            setattr(student, name, None)
    sd = teacher.state_dict()
    out = {}
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    for k, v in sd.items():
        m = pat.match(k)
        if m is None:
            out[k] = v
        elif int(m.group(1)) in idx:
            out[f"{prefix}.{idx.index(int(m.group(1)))}.{m.group(2)}"] = v
    if intermediate_size is not None and intermediate_size < config.intermediate_size:
        out = _narrow_mlp(out, prefix, len(idx), intermediate_size,
                          None if channels is None else [channels[i] for i in idx])
    missing, unexpected = student.load_state_dict(out, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ShrinkError(f"student from {type(teacher).__name__}: cannot map weights "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False) and hasattr(student, "tie_weights"):
        student.tie_weights()
    return student, idx


def hidden_layer_map(teacher_layers: list[int], teacher_depth: int) -> dict[int, int]:
    """Which teacher hidden state each student layer's output should match (indices into HF
    hidden_states, 0 = embeddings): student layer j was copied from teacher layer teacher_layers[j] and
    stands for the teacher's layers up to the next one copied, so it is matched to the teacher's output
    at the end of that span (the last student layer to the teacher's last layer), as TinyBERT maps layers."""
    ends = list(teacher_layers[1:]) + [teacher_depth]
    return {j + 1: end for j, end in enumerate(ends)}


def _narrow_mlp(sd: dict, prefix: str, n_layers: int, width: int, scores: list | None = None) -> dict:
    for i in range(n_layers):
        for rows, cols in _MLP_NAMES:
            rk = [f"{prefix}.{i}.{r}.weight" for r in rows]
            ck = [f"{prefix}.{i}.{c}.weight" for c in cols]
            if not all(k in sd for k in rk + ck):
                continue
            # importance of an intermediate channel: measured, or the norms of what writes it and what reads it
            score = scores[i] if scores is not None else \
                sum(sd[k].float().norm(dim=1) for k in rk) * sum(sd[k].float().norm(dim=0) for k in ck)
            keep = score.topk(width).indices.sort().values
            for k in rk:
                sd[k] = sd[k][keep].clone()
                b = k[:-len("weight")] + "bias"
                if b in sd:
                    sd[b] = sd[b][keep].clone()
            for k in ck:
                sd[k] = sd[k][:, keep].clone()
            break
        else:
            raise ShrinkError(f"layer {i}: narrowing the MLP knows Llama-style (gate/up/down) and BERT-style layers only")
    return sd


class MLPClassifier(nn.Sequential):
    """Flatten, then Linear+ReLU layers of the given widths, then a Linear to the classes."""

    def __init__(self, widths: list[int], dropout: float = 0.0):
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths[:-2], widths[1:-1]):
            layers += [nn.Linear(a, b), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
        layers.append(nn.Linear(widths[-2], widths[-1]))
        super().__init__(*layers)


class CNNClassifier(nn.Module):
    """Conv 3x3 + ReLU + 2x2 max-pool per channel count, then global average pooling and a Linear."""

    def __init__(self, in_shape: tuple[int, int, int], channels: list[int], classes: int):
        super().__init__()
        c_in = in_shape[0]
        self.in_shape = in_shape
        blocks: list[nn.Module] = []
        for c in channels:
            blocks += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, classes)

    def forward(self, x):
        x = x.reshape(x.shape[0], *self.in_shape)
        return self.head(self.features(x).mean((2, 3)))


def student_from_spec(spec: str) -> nn.Module:
    """A plain classifier from a short spec: "mlp:784-128-10" (input, hidden..., classes; optional
    ",dropout=0.1") or "cnn:1x28x28-16-32-10" (input shape, conv channels..., classes)."""
    m = re.fullmatch(r"(mlp|cnn):([0-9x\-]+)(?:,dropout=([0-9.]+))?", spec.strip())
    if m is None:
        raise ShrinkError(f"student spec {spec!r}: expected e.g. 'mlp:784-128-10' or 'cnn:1x28x28-16-32-10'")
    kind, body, dropout = m.groups()
    parts = body.split("-")
    try:
        if kind == "mlp":
            widths = [int(p) for p in parts]
            if len(widths) < 2 or min(widths) < 1:
                raise ValueError
            params = sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))
        else:
            shape = tuple(int(p) for p in parts[0].split("x"))
            chans = [int(p) for p in parts[1:]]
            if len(shape) != 3 or len(chans) < 2 or min(shape + tuple(chans)) < 1:
                raise ValueError
            ins = [shape[0]] + chans[:-2]
            params = sum((9 * a + 1) * b for a, b in zip(ins, chans[:-1])) + (chans[-2] + 1) * chans[-1]
    except ValueError:
        raise ShrinkError(f"student spec {spec!r}: widths must be positive integers, e.g. 'mlp:784-128-10' or "
                          "'cnn:1x28x28-16-32-10'") from None
    # counted before anything is allocated: weights, their gradients and Adam's two moments, in float32
    check_fits_memory(16 * params, f"student spec {spec!r} ({params:,} parameters, trained)")
    if kind == "mlp":
        return MLPClassifier(widths, float(dropout or 0))
    return CNNClassifier(shape, chans[:-1], chans[-1])


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (tied ones once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
