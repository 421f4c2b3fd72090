"""Distillation losses: soft targets with a temperature (Hinton et al., 2015) under a choice of divergence
(forward KL; reverse KL as MiniLLM uses it; the generalized Jensen-Shannon divergence of GKD), hard labels,
hidden states."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core.errors import ShrinkError
from ..core.model_outputs import kl_divergence


DIVERGENCES = ("forward", "reverse", "jsd")
JSD_BETA = 0.5  # the mixture's weight on the teacher (GKD's beta; 0.5: the symmetric Jensen-Shannon divergence)


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str = "forward", beta: float = JSD_BETA) -> torch.Tensor:
    """Per position, from the teacher's (p) and the student's (q) log-probabilities over the last dimension:
    "forward" KL(p || q) (mass-covering: the student spreads over all the teacher allows), "reverse" KL(q || p)
    (mode-seeking: the student keeps to what the teacher finds likely), or "jsd", the generalized
    Jensen-Shannon divergence beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q
    (bounded; default beta 0.5)."""
    if kind == "forward":
        return kl_divergence(log_p, log_q)
    if kind == "reverse":
        return kl_divergence(log_q, log_p)
    if kind == "jsd":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
        return beta * kl_divergence(log_p, log_m) + (1 - beta) * kl_divergence(log_q, log_m)
    raise ShrinkError(f"divergence {kind!r}: expected one of {', '.join(DIVERGENCES)}")


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
                     mask: torch.Tensor | None = None, kind: str = "forward") -> torch.Tensor:
    """The `divergence` (default forward KL(teacher || student)) of the temperature-softened distributions,
    times T² so that its gradients keep their size as T changes. Logits [..., classes]; mask [...] selects
    positions (default: all). Mean over the selected positions."""
    t = temperature
    log_p = F.log_softmax(teacher_logits.float() / t, -1)
    log_q = F.log_softmax(student_logits.float() / t, -1)
    kl = divergence(log_p, log_q, kind)
    if mask is not None:
        kl = kl[mask]
    return kl.mean() * t * t


def topk_soft_target_loss(student_logits: torch.Tensor, top_values: torch.Tensor, top_indices: torch.Tensor,
                          temperature: float = 2.0, mask: torch.Tensor | None = None, kind: str = "forward") -> torch.Tensor:
    """Soft-target loss from a cached teacher: only its top-k logits per position are kept. The teacher's
    distribution is the softmax over those k. Forward KL takes the student's full-vocabulary
    log-probabilities at the same indices (the cross-entropy to the truncated teacher, less its entropy);
    reverse KL and JSD need the student's distribution where the teacher's is known, so they take the
    student's renormalised over the same k tokens."""
    t = temperature
    log_p = F.log_softmax(top_values.float() / t, -1)
    picked = (student_logits.float() / t).gather(-1, top_indices) if kind != "forward" else None
    log_q = F.log_softmax(student_logits.float() / t, -1).gather(-1, top_indices) if picked is None else \
        F.log_softmax(picked, -1)
    kl = divergence(log_p, log_q, kind)
    if mask is not None:
        kl = kl[mask]
    return kl.mean() * t * t


def hard_label_loss(student_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy with the true labels (next tokens for LMs); positions labelled ignore_index skipped."""
    return F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]), labels.reshape(-1),
                           ignore_index=ignore_index)


def embedding_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of each text's student and teacher embeddings, averaged over the batch."""
    return (1 - F.cosine_similarity(student_embedding.float(), teacher_embedding.float(), dim=-1)).mean()


def hidden_state_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, kind: str = "mse",
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Distance between a student's and a teacher's hidden states of the same width: "mse" or "cosine"
    (1 - cosine similarity per position). Mean over positions selected by mask."""
    s, t = student_hidden.float(), teacher_hidden.float()
    if s.shape != t.shape:
        raise ShrinkError(f"hidden states differ in shape: student {tuple(s.shape)}, teacher {tuple(t.shape)}; "
                         "map layers of the same width or add a projection")
    if kind == "mse":
        d = (s - t).pow(2).mean(-1)
    elif kind == "cosine":
        d = 1 - F.cosine_similarity(s, t, dim=-1)
    else:
        raise ShrinkError(f"hidden-state loss {kind!r}: expected 'mse' or 'cosine'")
    if mask is not None:
        d = d[mask]
    return d.mean()


def distillation_loss(student_logits, teacher_logits=None, labels=None, *, temperature: float = 2.0,
                      alpha: float = 0.5, teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
                      ignore_index: int = -100, kind: str = "forward") -> tuple[torch.Tensor, dict]:
    """alpha * soft-target loss (its `divergence` `kind`, default forward KL) + (1 - alpha) * hard-label loss;
    returns (loss, parts as floats).

    The teacher comes as full logits or as cached (top-k values, indices). With alpha=1 no labels are
    needed; with alpha=0 no teacher.
    """
    parts = {}
    total = student_logits.new_zeros(())
    mask = labels != ignore_index if labels is not None else None
    if alpha > 0:
        if teacher_topk is not None:
            soft = topk_soft_target_loss(student_logits, *teacher_topk, temperature=temperature, mask=mask, kind=kind)
        elif teacher_logits is not None:
            soft = soft_target_loss(student_logits, teacher_logits, temperature, mask=mask, kind=kind)
        else:
            raise ValueError("alpha > 0 needs the teacher's logits (or its cached top-k)")
        total = total + alpha * soft
        parts["soft"] = soft.item()
    if alpha < 1:
        if labels is None:
            raise ValueError("alpha < 1 needs hard labels")
        hard = hard_label_loss(student_logits, labels, ignore_index)
        total = total + (1 - alpha) * hard
        parts["hard"] = hard.item()
    return total, parts
