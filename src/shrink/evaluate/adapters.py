"""Model adapters: one way to run each kind of model on each kind of example.

An adapter turns an example into an `Outcome`: the output as text, its score, the original model's
confidence in it (for difficulty slices), and what the comparison needs to measure divergence: the
next-token log-probabilities over a token sequence (language models), the label distribution
(classifiers) or an embedding (encoders). For language models the sequence is the prompt followed by
the *original* model's answer, so both models are measured on exactly the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.architecture import CAUSAL_LM, SEQ2SEQ, SEQUENCE_CLASSIFIER, model_kind
from ..core.errors import ShrinkError
from ..core.model_outputs import main_output, mean_pool
from .scorers import checked_score, score_generation
from .tasks import Example, Task

DEFAULT_MAX_NEW_TOKENS = 32


@dataclass
class Outcome:
    """What one model did on one example."""

    output: str
    score: float
    confidence: float  # higher = easier for this model (margin or mean log-probability)
    logprobs: torch.Tensor | None = None  # [positions, vocabulary or labels], log-softmax
    embedding: torch.Tensor | None = None  # encoders: L2-normalized sentence embedding
    ids: torch.Tensor | None = None  # LMs: the token sequence the log-probabilities are over


class Adapter:
    """Base class. `kind` names the model type; `run` evaluates one example."""

    kind = "model"
    tasks: tuple[str, ...] = ()

    def check_task(self, task: Task) -> None:
        for kind in task.kinds():
            if kind not in self.tasks:
                what = f"a {task.kind} task" if task.kind != "mixed" else f"a task holding {kind} examples"
                raise ShrinkError(f"task {task.name!r} is {what}, which a {self.kind} model cannot run "
                                  f"(it runs: {', '.join(self.tasks)})")

    def run(self, example: Example, task: Task, ids: torch.Tensor | None = None, scorer=None) -> Outcome:
        raise NotImplementedError

    def run_batch(self, examples: list[Example], task: Task, ids: list | None = None, scorer=None) -> list[Outcome]:
        """The outcomes of several examples, as `run` gives them one at a time (the default: one at a
        time; adapters that batch override it). ids: per example, as `run` takes it."""
        ids = ids or [None] * len(examples)
        return [self.run(ex, task, ids=i, scorer=scorer) for ex, i in zip(examples, ids)]

    def signature(self) -> object:
        """What must match between the original and the compressed model (tokenizer vocabulary, labels)."""
        return None


def _margin(values: list[float] | torch.Tensor) -> float:
    v = torch.as_tensor(values, dtype=torch.float64).sort(descending=True).values
    return float(v[0] - v[1]) if len(v) > 1 else float(v[0])


class _TextAdapter(Adapter):
    """Hugging Face models that read text through their tokenizer."""

    def __init__(self, model: nn.Module, tokenizer):
        if tokenizer is None:
            raise ShrinkError(f"a {self.kind} model needs its tokenizer (none found beside the model)")
        self.model, self.tok = model.eval(), tokenizer

    def signature(self):
        return ("vocab", tuple(sorted(self.tok.get_vocab().items())))


def _log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities from float32 logits the caller owns (the runtime's, kept for this outcome), in place:
    a comparison keeps a row of the vocabulary per position, and a second copy of it would be touched for nothing."""
    return torch.log_softmax(logits, -1, out=logits)


class CausalLMAdapter(_TextAdapter):
    """Hugging Face causal LMs: greedy generation (the same deterministic decoding for both models),
    log-likelihood of choices and labels, perplexity of text. Prompts go through the tokenizer's chat
    template when it has one (chat_template=None), always (True) or never (False)."""

    kind = "causal language"
    tasks = ("generation", "choice", "classification", "perplexity")

    def __init__(self, model: nn.Module, tokenizer, chat_template: bool | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        super().__init__(model, tokenizer)
        has = bool(getattr(tokenizer, "chat_template", None))
        if chat_template and not has:
            raise ShrinkError("chat template requested, but the tokenizer has none")
        self.chat = has if chat_template is None else chat_template
        self.max_new_tokens = max_new_tokens
        self.context = getattr(getattr(model, "config", None), "max_position_embeddings", None)

    def check_task(self, task):
        """Generation lengths must fit in the model's context (max_position_embeddings)."""
        super().check_task(task)
        if self.context is None or "generation" not in task.kinds():
            return
        if self.max_new_tokens > self.context:
            raise ShrinkError(f"max_new_tokens {self.max_new_tokens} is more than the model's context of "
                              f"{self.context} tokens")
        for ex in task.examples:
            n = (ex.data.get("max_new_tokens") or 0) if ex.kind == "generation" else 0
            if n > self.context:
                raise ShrinkError(f"{task.source}:{ex.line}: 'max_new_tokens' {n} is more than the model's context "
                                  f"of {self.context} tokens")

    def prompt_ids(self, text: str, chat: bool = True) -> torch.Tensor:
        """The prompt's token ids: through the chat template when the adapter uses one and `chat` (an
        example's "chat" field, default True) allows it; else the text itself."""
        if self.chat and chat:
            ids = self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return torch.tensor(ids, dtype=torch.long)
        return torch.tensor(self.tok(text).input_ids, dtype=torch.long)

    def _perplexity_ids(self, example) -> torch.Tensor:
        """The text's tokens, after the beginning-of-sequence token when the tokenizer has one."""
        seq = self._text_ids(example.input)
        if self.tok.bos_token_id is not None:
            seq = torch.cat([torch.tensor([self.tok.bos_token_id]), seq])
        return seq

    def _text_ids(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tok(text, add_special_tokens=False).input_ids, dtype=torch.long)

    @torch.no_grad()
    def logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the next token at every position but the last: [len(ids) - 1, vocab]."""
        out = self.model(ids.unsqueeze(0), use_cache=False)
        return F.log_softmax(out.logits[0, :-1].float(), -1)

    def _pad_id(self) -> int:
        return self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id

    def _greedy(self, max_new_tokens: int, **extra):
        """The generation config of every comparison: greedy, stopping at the end-of-sequence token."""
        from transformers import GenerationConfig

        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.tok.eos_token_id,
                                pad_token_id=self._pad_id(), **extra)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding, stopping at the end-of-sequence token; the new token ids."""
        out = self.model.generate(prompt.unsqueeze(0), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  generation_config=self._greedy(max_new_tokens))
        return out[0, len(prompt):]

    def _continuation_logprob(self, lp: torch.Tensor, start: int, ids: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of ids[start:] given what precedes them, from `lp` = logprobs(ids)."""
        return lp[start - 1:].gather(1, ids[start:].unsqueeze(1)).squeeze(1)

    def _choice_scores(self, prompt: torch.Tensor, choices: list[str]) -> tuple[list[float], list[torch.Tensor]]:
        scores, seqs = [], []
        for c in choices:
            seq = torch.cat([prompt, self._text_ids(c)])
            lp = self.logprobs(seq)
            scores.append(float(self._continuation_logprob(lp, len(prompt), seq).sum()))
            seqs.append(seq)
        return scores, seqs

    def run(self, example, task, ids=None, scorer=None):
        if self._decoder() is not None:  # one example is a batch of one through the model's runtime
            return self.run_batch([example], task, [ids], scorer)[0]
        kind = example.kind
        if kind == "perplexity":
            seq = self._perplexity_ids(example) if ids is None else ids
            if len(seq) < 2:
                raise ShrinkError(f"example {example.id!r}: text is shorter than two tokens")
            lp = self.logprobs(seq)
            mean = float(self._continuation_logprob(lp, 1, seq).mean())
            return Outcome(f"mean log-likelihood {mean:.3f}", mean, mean, lp, ids=seq)
        prompt = self.prompt_ids(example.input, example.data.get("chat", True))
        if kind == "generation":
            n_new = example.data.get("max_new_tokens") or self.max_new_tokens
            if self.context is not None and len(prompt) + n_new > self.context:
                raise ShrinkError(f"prompt of {len(prompt)} tokens and {n_new} new tokens do not fit in the model's "
                                  f"context of {self.context}")
            new = self.generate(prompt, n_new)
            text = self.tok.decode(new, skip_special_tokens=True).strip()
            score = checked_score(scorer(text, example), "--scorer") if scorer else score_generation(text, example.data)
            seq = torch.cat([prompt, new]) if ids is None else ids
            conf = float("nan")  # the confidence slices are the original's: not measured on given tokens
            if ids is None:
                target = torch.cat([prompt, self._text_ids(str(example.data["target"][0]))])
                conf = float(self._continuation_logprob(self.logprobs(target), len(prompt), target).mean())
            return Outcome(text, score, conf, self.logprobs(seq), ids=seq)
        choices = example.data["choices"] if kind == "choice" else task.labels()
        answer = example.data["answer"] if kind == "choice" else choices.index(str(example.data["label"]))
        scores, seqs = self._choice_scores(prompt, choices)
        pick = max(range(len(scores)), key=scores.__getitem__)
        seq = seqs[answer] if ids is None else ids
        return Outcome(choices[pick], float(pick == answer), _margin(scores), self.logprobs(seq), ids=seq)


    # ---- batches: the same outcomes as `run`, with the model run on many sequences at once ----------

    def prepare(self) -> None:
        """Build what the model's runtime needs before any example is timed (its one-time compilation)."""
        fn = getattr(self.model, "shrink_prepare", None)
        if type(self) is CausalLMAdapter and callable(fn):
            fn()

    def _decoder(self):
        """The model's `shrink_decode` (shrink's runtime, given to the model by `shrink.runtime.install`:
        decode(prompts, max_new_tokens, eos_token_id, logits=, continuations=) -> per prompt .new, .logits,
        .continued, or None when it cannot run the model now), for this class only; else None."""
        fn = getattr(self.model, "shrink_decode", None)
        return fn if type(self) is CausalLMAdapter and callable(fn) else None

    def _decoded(self, prompts, max_new_tokens, continuations, draft: bool = False):
        """The runtime's decoding of `prompts` (greedy, stopping at the end-of-sequence token), with the
        logits after every token and those before each token of each prompt's `continuations`, from one
        pass; None when the model has no runtime (then transformers runs the batch). With `draft` (default
        False) each prompt's first continuation drafts its new tokens (LlamaDecoder.decode)."""
        fn = self._decoder()
        if fn is None:
            return None
        return fn(prompts, max_new_tokens, self.tok.eos_token_id, logits=True, continuations=continuations,
                  draft=draft)

    @staticmethod
    def _forced(d, prompt_len: int, j: int) -> torch.Tensor:
        """Log-probabilities over prompt + continuation j of a decoded prompt (as `logprobs` of that sequence)."""
        return _log_softmax_(torch.cat([d.logits[: prompt_len - 1], d.continued[j]]))

    def _fill_alone(self, lps: list, ids: list) -> None:
        """Fill the None entries of `lps` with the log-probabilities of those `ids` scored on their own
        (given tokens that do not start with the example's prompt)."""
        alone = [k for k, lp in enumerate(lps) if lp is None]
        for k, d in zip(alone, self._decoded([ids[k] for k in alone], 0, None) if alone else []):
            lps[k] = _log_softmax_(d.logits)

    @staticmethod
    def _tail(seq: torch.Tensor | None, prompt: torch.Tensor) -> torch.Tensor | None:
        """What follows `prompt` in `seq`, or None when seq does not start with it."""
        if seq is None or len(seq) < len(prompt) or not torch.equal(seq[: len(prompt)], prompt):
            return None
        return seq[len(prompt):]

    def _padded(self, seqs: list[torch.Tensor], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask) of `seqs` padded to the longest, on the right or (generation) the left."""
        longest = max(len(q) for q in seqs)
        ids = torch.full((len(seqs), longest), self._pad_id(), dtype=torch.long)
        mask = torch.zeros(len(seqs), longest, dtype=torch.long)
        for r, q in enumerate(seqs):
            at = slice(longest - len(q), longest) if left else slice(0, len(q))
            ids[r, at], mask[r, at] = q, 1
        return ids, mask

    @torch.no_grad()
    def logprobs_batch(self, seqs: list[torch.Tensor], max_rows: int = 16) -> list[torch.Tensor]:
        """`logprobs` of each sequence, run `max_rows` at a time, padded on the right: a causal model's
        positions before the padding do not see it, so each row is what `logprobs` gives alone (up to
        float rounding of the larger matrix products)."""
        out = []
        for i in range(0, len(seqs), max_rows):
            chunk = seqs[i:i + max_rows]
            ids, mask = self._padded(chunk)
            logits = self.model(ids, attention_mask=mask, use_cache=False).logits
            out += [F.log_softmax(logits[r, :len(q) - 1].float(), -1) for r, q in enumerate(chunk)]
        return out

    @torch.no_grad()
    def continuation_logprobs_batch(self, seqs: list[torch.Tensor], starts: list[int], max_rows: int = 16):
        """Per sequence, the log-probability of each of its tokens from `starts[i]` on given those before
        (as `_continuation_logprob` of `logprobs` gives it), with the output layer run only on the
        positions some row needs (transformers' logits_to_keep), not on every prompt position."""
        import inspect

        keeps = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        out = []
        for i in range(0, len(seqs), max_rows):
            chunk, first = seqs[i:i + max_rows], starts[i:i + max_rows]
            ids, mask = self._padded(chunk)
            lo = min(first) - 1 if keeps else 0
            kw = {"logits_to_keep": torch.arange(lo, ids.shape[1] - 1)} if keeps else {}
            logits = self.model(ids, attention_mask=mask, use_cache=False, **kw).logits
            for r, (q, s0) in enumerate(zip(chunk, first)):
                lp = F.log_softmax(logits[r, s0 - 1 - lo:len(q) - 1 - lo].float(), -1)
                out.append(lp.gather(1, q[s0:].unsqueeze(1)).squeeze(1))
        return out

    @torch.no_grad()
    def generate_batch(self, prompts: list[torch.Tensor], max_new_tokens: list[int]) -> list[torch.Tensor]:
        """`generate` of each prompt, all at once: prompts padded on the left (positions from the mask),
        greedy decoding to the longest `max_new_tokens`, then each row cut at its own length and at its
        first end-of-sequence token (kept), as decoding it alone stops there."""
        eos = self.tok.eos_token_id
        ids, mask = self._padded(prompts, left=True)
        longest = ids.shape[1]
        out = self.model.generate(ids, attention_mask=mask, generation_config=self._greedy(max(max_new_tokens)))
        news = []
        for r, n in enumerate(max_new_tokens):
            new = out[r, longest:longest + n]
            stop = (new == eos).nonzero()
            news.append(new[: int(stop[0]) + 1] if len(stop) else new)
        return news

    def run_batch(self, examples, task, ids=None, scorer=None):
        """As `run` on each example, with generation and log-likelihoods batched (causal LMs; other
        adapters built on this one run one example at a time)."""
        if type(self) is not CausalLMAdapter or (len(examples) == 1 and self._decoder() is None):
            return super().run_batch(examples, task, ids, scorer)
        ids = ids or [None] * len(examples)
        kind = examples[0].kind
        if kind == "perplexity":
            return self._perplexity_batch(examples, [self._perplexity_ids(ex) if i is None else i
                                                     for ex, i in zip(examples, ids)])
        prompts = [self.prompt_ids(ex.input, ex.data.get("chat", True)) for ex in examples]
        if kind == "generation":
            return self._generation_batch(examples, prompts, ids, scorer)
        return self._choice_batch(examples, task, prompts, ids)

    def _perplexity_batch(self, examples, ids):
        for ex, seq in zip(examples, ids):
            if len(seq) < 2:
                raise ShrinkError(f"example {ex.id!r}: text is shorter than two tokens")
        decoded = self._decoded(ids, 0, None)
        lps = self.logprobs_batch(ids) if decoded is None else [_log_softmax_(d.logits) for d in decoded]
        out = []
        for seq, lp in zip(ids, lps):
            mean = float(self._continuation_logprob(lp, 1, seq).mean())
            out.append(Outcome(f"mean log-likelihood {mean:.3f}", mean, mean, lp, ids=seq))
        return out

    def _generation_batch(self, examples, prompts, ids, scorer):
        n_new = [ex.data.get("max_new_tokens") or self.max_new_tokens for ex in examples]
        for p, n in zip(prompts, n_new):
            if self.context is not None and len(p) + n > self.context:
                raise ShrinkError(f"prompt of {len(p)} tokens and {n} new tokens do not fit in the model's "
                                  f"context of {self.context}")
        confs = [float("nan")] * len(examples)  # as `run`: the original's confidence only
        targets = [self._text_ids(str(ex.data["target"][0])) if i is None else None for ex, i in zip(examples, ids)]
        tails = [self._tail(i, p) if i is not None else None for i, p in zip(ids, prompts)]
        # the runtime scores the original's target, or the given tokens, as continuations of the prompt; in a
        # batch they draft its answer too (the given tokens are the original's answer, which a close model
        # mostly repeats). One example alone is decoded on its own: its time is then its latency.
        forced = [tg if i is None else tl for tg, tl, i in zip(targets, tails, ids)]
        decoded = self._decoded(prompts, n_new, [[f] if f is not None else [] for f in forced],
                                draft=len(examples) > 1)
        if decoded is None:
            news, lps = self._generation_transformers(prompts, n_new, ids, targets, confs)
        else:
            news, lps = [d.new for d in decoded], []
            for k, (d, p) in enumerate(zip(decoded, prompts)):
                if ids[k] is None:
                    lps.append(_log_softmax_(d.logits))
                    conf = F.log_softmax(d.continued[0].float(), -1).gather(1, targets[k].unsqueeze(1))
                    confs[k] = float(conf.mean())
                else:
                    lps.append(self._forced(d, len(p), 0) if tails[k] is not None else None)
            self._fill_alone(lps, ids)
        seqs = [torch.cat([p, new]) if i is None else i for p, new, i in zip(prompts, news, ids)]
        out = []
        for k, (ex, new) in enumerate(zip(examples, news)):
            text = self.tok.decode(new, skip_special_tokens=True).strip()
            score = checked_score(scorer(text, ex), "--scorer") if scorer else score_generation(text, ex.data)
            out.append(Outcome(text, score, confs[k], lps[k], ids=seqs[k]))
        return out

    def _generation_transformers(self, prompts, n_new, ids, targets, confs):
        """(new tokens, log-probabilities over the measured sequences) by transformers: generation, the
        target's log-likelihood (the original's confidence, into `confs`), then a scoring pass."""
        news = self.generate_batch(prompts, n_new)
        todo = [k for k, i in enumerate(ids) if i is None]
        if todo:
            seqs = [torch.cat([prompts[k], targets[k]]) for k in todo]
            for k, lp in zip(todo, self.continuation_logprobs_batch(seqs, [len(prompts[k]) for k in todo])):
                confs[k] = float(lp.mean())
        return news, self.logprobs_batch([torch.cat([p, new]) if i is None else i for p, new, i in zip(prompts, news, ids)])

    def _choice_batch(self, examples, task, prompts, ids):
        choices = [ex.data["choices"] if ex.kind == "choice" else task.labels() for ex in examples]
        answers = [ex.data["answer"] if ex.kind == "choice" else cs.index(str(ex.data["label"]))
                   for ex, cs in zip(examples, choices)]
        tails = [[self._text_ids(c) for c in cs] for cs in choices]
        given = [self._tail(i, p) if i is not None else None for i, p in zip(ids, prompts)]
        decoded = self._decoded(prompts, 0, [ts + ([g] if g is not None else []) for ts, g in zip(tails, given)])
        seqs = [[torch.cat([p, t]) for t in ts] for p, ts in zip(prompts, tails)]
        measured = [qs[a] if i is None else i for qs, a, i in zip(seqs, answers, ids)]
        if decoded is None:
            cont = iter(self.continuation_logprobs_batch([q for qs in seqs for q in qs],
                                                         [len(p) for p, qs in zip(prompts, seqs) for _ in qs]))
            scores = [[float(next(cont).sum()) for _ in qs] for qs in seqs]
            lps = self.logprobs_batch(measured)
        else:
            scores = [[float(F.log_softmax(d.continued[j].float(), -1).gather(1, t.unsqueeze(1)).sum())
                       for j, t in enumerate(ts)] for d, ts in zip(decoded, tails)]
            lps = [self._forced(d, len(p), a if i is None else len(ts)) if i is None or g is not None else None
                   for d, p, a, i, g, ts in zip(decoded, prompts, answers, ids, given, tails)]
            self._fill_alone(lps, ids)
        out = []
        for cs, sc, a, seq, lp in zip(choices, scores, answers, measured, lps):
            pick = max(range(len(sc)), key=sc.__getitem__)
            out.append(Outcome(cs[pick], float(pick == a), _margin(sc), lp, ids=seq))
        return out


class Seq2SeqAdapter(CausalLMAdapter):
    """Hugging Face encoder-decoders (T5, BART): the prompt goes to the encoder, the answer comes out of the
    decoder by greedy generation; choices and labels are scored by the decoder's log-likelihood of them.
    A sequence here is the prompt followed by the answer; its log-probabilities are the decoder's, one row
    per answer token (that is what the comparison's KL is over)."""

    kind = "encoder-decoder language"
    tasks = ("generation", "choice", "classification")

    def __init__(self, model: nn.Module, tokenizer, chat_template: bool | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        super().__init__(model, tokenizer, chat_template, max_new_tokens)
        self.context = None  # positions are relative (T5) or per stack: prompt and answer are checked apart
        self.start = model.config.decoder_start_token_id
        if self.start is None:
            raise ShrinkError(f"{type(model).__name__}: config has no decoder_start_token_id")
        self._prompt_len = 0

    def prompt_ids(self, text: str, chat: bool = True) -> torch.Tensor:
        ids = super().prompt_ids(text, chat)
        self._prompt_len = len(ids)  # where the answer starts in the sequences built from this prompt
        return ids

    @torch.no_grad()
    def logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        """The decoder's log-probabilities of each answer token of `ids` (prompt, then answer): [answer, vocab]."""
        prompt, answer = ids[: self._prompt_len], ids[self._prompt_len:]
        dec = torch.cat([torch.tensor([self.start]), answer[:-1]]) if len(answer) else torch.tensor([self.start])
        out = self.model(input_ids=prompt.unsqueeze(0), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         decoder_input_ids=dec.unsqueeze(0), use_cache=False)
        return F.log_softmax(out.logits[0, : len(answer)].float(), -1)

    def _continuation_logprob(self, lp: torch.Tensor, start: int, ids: torch.Tensor) -> torch.Tensor:
        return lp.gather(1, ids[start:].unsqueeze(1)).squeeze(1)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        out = self.model.generate(prompt.unsqueeze(0), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  generation_config=self._greedy(max_new_tokens, decoder_start_token_id=self.start))
        return out[0, 1:]  # without the decoder's start token


class SequenceClassifierAdapter(_TextAdapter):
    """Hugging Face sequence classifiers: the predicted label from `config.id2label`."""

    kind = "sequence classifier"
    tasks = ("classification",)

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__(model, tokenizer)
        self.labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]

    def signature(self):
        return ("labels", tuple(self.labels), *super().signature())

    def check_task(self, task):
        super().check_task(task)
        missing = [lb for lb in task.labels() if lb not in self.labels]
        if missing:
            raise ShrinkError(f"task {task.name!r} has labels {missing} that the model does not know "
                              f"(its labels: {self.labels})")

    @torch.no_grad()
    def run(self, example, task, ids=None, scorer=None):
        enc = self.tok(example.input, return_tensors="pt", truncation=True)
        lp = F.log_softmax(self.model(**enc).logits[0].float(), -1)
        pick = int(lp.argmax())
        label = self.labels[pick]
        return Outcome(label, float(label == str(example.data["label"])), _margin(lp.exp()), lp.unsqueeze(0))


class EncoderAdapter(_TextAdapter):
    """Hugging Face encoders without a task head (sentence encoders such as MiniLM): mean-pooled,
    normalized embeddings; classification is zero-shot, by the label whose own embedding is nearest."""

    kind = "encoder"
    tasks = ("classification",)

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__(model, tokenizer)
        self._label_cache: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, text: str) -> torch.Tensor:
        enc = self.tok(text, return_tensors="pt", truncation=True)
        h = self.model(**enc).last_hidden_state.float()
        return F.normalize(mean_pool(h, enc["attention_mask"])[0], dim=0)

    def run(self, example, task, ids=None, scorer=None):
        labels = task.labels()
        key = tuple(labels)
        if key not in self._label_cache:
            self._label_cache[key] = torch.stack([self.embed(lb) for lb in labels])
        e = self.embed(example.input)
        sims = self._label_cache[key] @ e
        pick = int(sims.argmax())
        return Outcome(labels[pick], float(labels[pick] == str(example.data["label"])), _margin(sims),
                       embedding=e)


class TensorClassifierAdapter(Adapter):
    """Plain PyTorch classifiers: one input tensor in, class logits out."""

    kind = "tensor classifier"
    tasks = ("tensor",)

    def __init__(self, model: nn.Module):
        self.model = model.eval()

    @torch.no_grad()
    def run(self, example, task, ids=None, scorer=None):
        out = self.model(example.input.unsqueeze(0))
        logits = main_output(out).reshape(-1).float()
        lp = F.log_softmax(logits, -1)
        pick = int(lp.argmax())
        return Outcome(str(pick), float(pick == example.data["label"]), _margin(lp.exp()), lp.unsqueeze(0))


def adapter_for(model: nn.Module, tokenizer=None, chat_template: bool | None = None,
                max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Adapter:
    """The adapter that fits `model`, by what it can do: causal LM, encoder-decoder, sequence classifier,
    encoder, or plain classifier."""
    if isinstance(model, Adapter):
        return model
    needs = getattr(model, "main_input_name", None)
    if getattr(model, "config", None) is not None and needs not in (None, "input_ids", "pixel_values"):
        # Whisper reads audio features (input_features): no task of text or tensors of pixels can feed it
        raise ShrinkError(f"{type(model).__name__} reads {needs!r} (e.g. audio features), which shrink's tasks cannot "
                          "provide yet (they hold text, or tensors for pixel models); compare it on its own "
                          "data with your own evaluation")
    kind = model_kind(model)
    if kind == CAUSAL_LM:
        return CausalLMAdapter(model, tokenizer, chat_template, max_new_tokens)
    if kind == SEQ2SEQ:
        return Seq2SeqAdapter(model, tokenizer, chat_template, max_new_tokens)
    if kind == SEQUENCE_CLASSIFIER:
        return SequenceClassifierAdapter(model, tokenizer)
    if getattr(model, "config", None) is not None and tokenizer is not None:
        return EncoderAdapter(model, tokenizer)
    return TensorClassifierAdapter(model)
