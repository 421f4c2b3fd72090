"""A mixture of experts' fused expert weights as one Linear layer per expert, so every format, method and
saved layout shrink has for Linear layers applies to each expert.

transformers (5.x) stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE as two 3-D parameters,
`gate_up_proj` [experts, 2 x intermediate, hidden] and `down_proj` [experts, hidden, intermediate], and its
expert module loops over the experts a token was routed to. `LinearExperts` computes the same function
from `gate_up.<e>` and `down.<e>` Linear layers: a calibration hook on an expert's layer sees exactly the
tokens routed to that expert (or, with `all_tokens`, every token, for statistics only: the output still
uses the routing), and its token count is recorded. The router stays as it is (a parameter, not a Linear).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class LinearExperts(nn.Module):
    """The experts of a fused expert module, one `nn.Linear` per expert and projection, same function."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act_fn, device=None):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden, intermediate
        self.act_fn = act_fn
        self.gate_up = nn.ModuleList(nn.Linear(hidden, 2 * intermediate, bias=False, device=device)
                                     for _ in range(num_experts))
        self.down = nn.ModuleList(nn.Linear(intermediate, hidden, bias=False, device=device)
                                  for _ in range(num_experts))
        self.all_tokens = False  # calibration: every token through every expert, for statistics only

    @classmethod
    def from_fused(cls, fused: nn.Module) -> "LinearExperts":
        """The same experts as `fused` (its tensors shared, not copied: the Linear layers view them)."""
        gate_up, down = fused.gate_up_proj, fused.down_proj
        new = cls(gate_up.shape[0], gate_up.shape[2], down.shape[2], fused.act_fn, device="meta")
        for e in range(new.num_experts):
            new.gate_up[e].weight = nn.Parameter(gate_up.data[e], requires_grad=False)
            new.down[e].weight = nn.Parameter(down.data[e], requires_grad=False)
        return new

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        hit = {int(e[0]) for e in hit} - {self.num_experts}
        for e in range(self.num_experts) if self.all_tokens else sorted(hit):
            pos, tokens = torch.where(mask[e])
            # all_tokens (calibration statistics): every token through the expert, its routed rows kept
            x = hidden_states if self.all_tokens else hidden_states[tokens]
            gate, up = self.gate_up[e](x).chunk(2, dim=-1)
            h = self.down[e](self.act_fn(gate) * up)
            if e not in hit:
                continue
            h = (h[tokens] if self.all_tokens else h) * top_k_weights[tokens, pos, None]
            out.index_add_(0, tokens, h.to(out.dtype))
        return out


def fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The expert modules of `model` in transformers' fused layout that LinearExperts can stand for: 3-D
    `gate_up_proj` and `down_proj`, concatenated gate and up, not transposed, no biases."""
    found = []
    for name, m in model.named_modules():
        gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
        if not (isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3):
            continue
        if getattr(m, "is_transposed", False) or getattr(m, "has_bias", False) or not getattr(m, "is_concatenated", True) \
                or not getattr(m, "has_gate", True) or not hasattr(m, "act_fn"):
            continue
        e, two_i, h = gu.shape
        if dn.shape != (e, h, two_i // 2) or two_i % 2:
            continue
        found.append((name, m))
    return found


def unfuse_experts(model: nn.Module, names=None) -> dict[str, nn.Module]:
    """Replace each fused expert module of `model` (those at `names`, default all `fused_experts` finds) by
    its LinearExperts; returns {name: the fused module} so a caller can put one back."""
    replaced = {}
    for name, m in fused_experts(model):
        if names is not None and name not in names:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, LinearExperts.from_fused(m))
        replaced[name] = m
    return replaced


def expert_layers(model: nn.Module) -> dict[str, str]:
    """{Linear layer name: its LinearExperts' name} for every expert layer of `model`."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LinearExperts):
            for sub, _ in m.named_modules():
                if sub and "." in sub:
                    out[f"{name}.{sub}"] = name
    return out


def routers(model: nn.Module) -> list[str]:
    """Linear layers beside a mixture's experts that weigh them (Qwen2-MoE's `shared_expert_gate`; a router
    built as a Linear): kept in full precision unless a layer glob names them, as the experts' routing
    depends on their every bit."""
    out = []
    for name, m in model.named_modules():
        if isinstance(getattr(m, "experts", None), (LinearExperts, nn.Module)) and hasattr(m, "experts") and \
                (fused_experts(m.experts) or isinstance(m.experts, LinearExperts)):
            for sub, child in m.named_children():
                if isinstance(child, nn.Linear) and "gate" in sub:
                    out.append(f"{name}.{sub}" if name else sub)
    return out


def all_tokens(model: nn.Module, on: bool) -> None:
    """Route every calibration token through every expert for statistics (on) or not (off)."""
    for m in model.modules():
        if isinstance(m, LinearExperts):
            m.all_tokens = on
