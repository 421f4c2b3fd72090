"""Reading a model's output, whatever it returns, and comparing two output distributions: one answer for
quantization, distillation and evaluation."""

from __future__ import annotations

import torch


def main_output(out) -> torch.Tensor:
    """The tensor a model's output stands for: logits, else the last hidden state, else the output itself."""
    for key in ("logits", "last_hidden_state", "pooler_output"):
        t = getattr(out, key, None)
        if isinstance(t, torch.Tensor):
            return t
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot read a tensor out of the model's output ({type(out).__name__})")


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension from log-probabilities, per position (differentiable); classes p
    rules out (probability 0) add nothing, even where q is -inf there too."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden states [batch, positions, width] over the positions `mask` [batch, positions] keeps:
    a sentence encoder's embedding of each text (before normalising)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(-2) / m.sum(-2)
