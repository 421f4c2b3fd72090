"""Speculative decoding in shrink's runtime: a small draft proposes tokens, the target checks them in one pass.

Greedy only, so the output is the target's own: the target runs its last token and the draft's k proposals
as one batch, and its picks are taken for as long as they agree with the proposals, then its own pick at
the first disagreement (or after all k) is added. Decoding on a CPU is bound by reading the weights, so a
pass over k + 1 tokens costs about what a pass over one does; the draft's passes are cheap when it is small.

k adapts to how often the draft is right, as transformers' "heuristic" schedule does: up by 2 after a pass
that took every proposal, down by 1 (not below 1) after one that did not. Each model's key-value cache
holds the tokens agreed so far; a position past them is written over by the next pass (attention at a
position reads only the positions before it), so rejected proposals need no undoing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..core.errors import ShrinkError
from .llama import LlamaDecoder

DRAFT_TOKENS = 4  # proposals in the first pass (then adapted)
MAX_DRAFT_TOKENS = 16


@dataclass
class Speculation:
    """What speculative decoding did over one call: tokens the draft proposed, how many of those the target
    took, the target's passes and the new tokens made."""

    proposed: int = 0
    accepted: int = 0
    target_passes: int = 0
    new_tokens: int = 0

    @property
    def acceptance(self) -> float:
        """The share of proposed tokens the target took (0 when none were proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """New tokens per pass of the target (1.0 is decoding without a draft)."""
        return self.new_tokens / self.target_passes if self.target_passes else 0.0


def check_pair(target: nn.Module, draft: nn.Module) -> None:
    """ShrinkError naming the field where `draft` cannot draft for `target`: their vocabularies (size, and
    the special token ids) must be the same tokens."""
    tc, dc = getattr(target, "config", None), getattr(draft, "config", None)
    for field in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
        a, b = getattr(tc, field, None), getattr(dc, field, None)
        if a != b:
            raise ShrinkError(f"the draft's {field} is {b!r}, the target's {a!r}: a draft must share the target's "
                              "tokenizer and vocabulary")
    rows = (getattr(getattr(target, "lm_head", None), "out_features", None),
            getattr(getattr(draft, "lm_head", None), "out_features", None))
    if rows[0] != rows[1]:
        raise ShrinkError(f"the draft's output layer has {rows[1]} rows, the target's {rows[0]}: a draft must share "
                          "the target's vocabulary")


def speculate(target: LlamaDecoder, draft: LlamaDecoder, prompts: list[torch.Tensor], max_new_tokens: int,
              eos_token_id=None, min_new_tokens: int = 0, draft_tokens: int = DRAFT_TOKENS,
              stats: Speculation | None = None) -> list[torch.Tensor]:
    """The new tokens of each prompt (1-D token ids) under greedy decoding by `target`, proposed by `draft`
    (module docstring): the same tokens the target alone picks, up to `max_new_tokens`, stopping after an
    end-of-sequence token (`eos_token_id`: an id, a list or None), none before `min_new_tokens` (default 0).
    `draft_tokens`: proposals in the first pass (default 4; then adapted, at most MAX_DRAFT_TOKENS).
    `stats` (a Speculation) is added to. Prompts are decoded one after another."""
    if not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise ShrinkError(f"draft_tokens {draft_tokens}: between 1 and {MAX_DRAFT_TOKENS}")
    if target is draft:
        raise ShrinkError("the draft is the target itself: give a smaller model as the draft")
    if target.vocab != draft.vocab:
        raise ShrinkError(f"the draft predicts {draft.vocab} tokens, the target {target.vocab}: a draft must share "
                          "the target's vocabulary")
    eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    stats = stats if stats is not None else Speculation()
    with target._lock, draft._lock:
        return [_one(target, draft, p.reshape(-1).long(), max_new_tokens, eos, min_new_tokens, draft_tokens, stats)
                for p in prompts]


def _pick(logits: torch.Tensor, n_done: int, min_new: int, eos: set) -> int:
    if n_done < min_new and eos:  # as the target alone would: no end-of-sequence token before min_new_tokens
        logits = logits.clone()
        logits[sorted(eos)] = float("-inf")
    return int(logits.argmax())


def _one(target: LlamaDecoder, draft: LlamaDecoder, prompt: torch.Tensor, n_new: int, eos: set, min_new: int,
         k: int, stats: Speculation) -> torch.Tensor:
    if n_new <= 0:
        return torch.empty(0, dtype=torch.long)
    if not len(prompt):
        raise ShrinkError("an empty prompt: decoding needs at least one token to start from")
    capacity = len(prompt) + n_new  # (no pass goes past the last new token: k is cut to what is left)
    target._reserve(1, capacity)
    draft._reserve(1, capacity)
    zero = torch.zeros(len(prompt), dtype=torch.long)
    last = target._run_all(prompt, zero, torch.arange(len(prompt)), torch.tensor([len(prompt) - 1]))[0]
    stats.target_passes += 1
    seq = prompt.tolist()
    news = [_pick(last, 0, min_new, eos)]
    fed = []  # the tokens in the draft's cache, in order
    while news[-1] not in eos and len(news) < n_new:
        seq_now = seq + news
        # the draft: first the agreed tokens it has not seen, then one token a pass
        same = 0
        while same < min(len(fed), len(seq_now)) and fed[same] == seq_now[same]:
            same += 1
        k_here = min(k, n_new - len(news))
        proposals = []
        todo = seq_now[same:]
        pos = same
        for _ in range(k_here):
            t = torch.tensor(todo, dtype=torch.long)
            out = draft._run_all(t, torch.zeros(len(t), dtype=torch.long), torch.arange(pos, pos + len(t)),
                                 torch.tensor([len(t) - 1]))[0]
            pos += len(t)
            proposals.append(_pick(out, len(news) + len(proposals), min_new, eos))
            todo = [proposals[-1]]
        fed = seq_now + proposals[:-1]
        # the target: its last token and the proposals in one pass
        check = torch.tensor([news[-1], *proposals], dtype=torch.long)
        start = len(seq_now) - 1
        rows = target._impl.forward(check, torch.zeros(len(check), dtype=torch.long),
                                    torch.arange(start, start + len(check)), torch.arange(len(check)))
        stats.target_passes += 1
        stats.proposed += len(proposals)
        took = 0
        for j in range(len(check)):  # the target's picks while they agree, then its own at the first that does not
            t = _pick(rows[j], len(news), min_new, eos)
            news.append(t)
            agreed = j < len(proposals) and t == proposals[j]
            took += agreed
            if not agreed or t in eos or len(news) >= n_new:
                break
        stats.accepted += took
        k = min(k + 2, MAX_DRAFT_TOKENS) if took == len(proposals) else max(1, k - 1)
    stats.new_tokens += len(news)
    return torch.tensor(news, dtype=torch.long)
