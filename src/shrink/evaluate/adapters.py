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
from .. import runtime
from ..runtime import Decoded
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
    """Log-probabilities from float32 logits the caller owns (a backend's, kept for this outcome), in place:
    a comparison keeps a row of the vocabulary per position, and a second copy of it would be touched for nothing."""
    return torch.log_softmax(logits, -1, out=logits)


class TransformersBackend:
    """Scoring by transformers for a causal LM: greedy generation with the prompts padded on the left, then
    the logits from forward passes over right-padded sequences, `max_rows` (default 16) at a time; a
    causal model's positions before the padding do not see it, so each row is what the sequence gives alone
    (up to float rounding of the larger matrix products)."""

    def __init__(self, model: nn.Module, pad_id: int, eos_id: int | None, max_rows: int = 16):
        self.model, self.pad_id, self.eos_id, self.max_rows = model, pad_id, eos_id, max_rows

    def _padded(self, seqs: list[torch.Tensor], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask) of `seqs` padded to the longest, on the right or (generation) the left."""
        longest = max(len(q) for q in seqs)
        ids = torch.full((len(seqs), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), longest, dtype=torch.long)
        for r, q in enumerate(seqs):
            at = slice(longest - len(q), longest) if left else slice(0, len(q))
            ids[r, at], mask[r, at] = q, 1
        return ids, mask

    @torch.no_grad()
    def generate(self, prompts: list[torch.Tensor], max_new_tokens: list[int]) -> list[torch.Tensor]:
        """Greedy decoding of every prompt at once to the longest `max_new_tokens`, each row then cut at its
        own length and after its first end-of-sequence token, as decoding it alone stops there."""
        from transformers import GenerationConfig

        ids, mask = self._padded(prompts, left=True)
        cfg = GenerationConfig(max_new_tokens=max(max_new_tokens), do_sample=False, eos_token_id=self.eos_id,
                               pad_token_id=self.pad_id)
        out = self.model.generate(ids, attention_mask=mask, generation_config=cfg)
        news = []
        for r, n in enumerate(max_new_tokens):
            new = out[r, ids.shape[1]:ids.shape[1] + n]
            stop = (new == self.eos_id).nonzero()
            news.append(new[: int(stop[0]) + 1] if len(stop) else new)
        return news

    @torch.no_grad()
    def logits(self, seqs: list[torch.Tensor], starts: list[int]) -> list[torch.Tensor]:
        """Per sequence, float32 logits before each of its tokens from `starts[i]` on ([len - starts[i], vocab]),
        the output layer run only on the positions some row of a chunk needs (transformers' logits_to_keep)."""
        import inspect

        keeps = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        out = []
        for i in range(0, len(seqs), self.max_rows):
            chunk, first = seqs[i:i + self.max_rows], starts[i:i + self.max_rows]
            ids, mask = self._padded(chunk)
            lo = min(first) - 1 if keeps else 0
            kw = {"logits_to_keep": torch.arange(lo, ids.shape[1] - 1)} if keeps else {}
            logits = self.model(ids, attention_mask=mask, use_cache=False, **kw).logits
            out += [logits[r, s0 - 1 - lo:len(q) - 1 - lo].float() for r, (q, s0) in enumerate(zip(chunk, first))]
        return out

    def decode(self, prompts, max_new_tokens, continuations=None, draft: bool = False) -> list[Decoded]:
        """The backends' one call, as shrink's runtime answers it (`runtime.LlamaDecoder.decode`): per prompt a
        `Decoded` (the new tokens, greedy, cut after the first end-of-sequence token; the logits before each
        token of prompt + new but the first; per continuation the logits before each of its tokens given the
        prompt). `draft` is the runtime's; here the answer is generated in full."""
        n_new = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        empty = torch.empty(0, dtype=torch.long)
        news = self.generate(prompts, n_new) if any(n_new) else [empty] * len(prompts)
        full = self.logits([torch.cat([p, n]) for p, n in zip(prompts, news)], [1] * len(prompts))
        conts = continuations or [[] for _ in prompts]
        flat = [(k, torch.cat([p, c]), len(p)) for k, (p, cs) in enumerate(zip(prompts, conts)) for c in cs]
        tails = iter(self.logits([s for _, s, _ in flat], [s0 for _, _, s0 in flat]) if flat else [])
        return [Decoded(n, lg, [next(tails) for _ in cs]) for n, lg, cs in zip(news, full, conts)]


class RuntimeBackend:
    """Scoring in shrink's runtime (`shrink.runtime`): the logits come from the decoding pass itself."""

    def __init__(self, decoder, eos_id: int | None):
        self.decoder, self.eos_id = decoder, eos_id

    def decode(self, prompts, max_new_tokens, continuations=None, draft: bool = False):
        return self.decoder.decode(prompts, max_new_tokens, self.eos_id, logits=True, continuations=continuations,
                                   draft=draft)


class _LanguageAdapter(_TextAdapter):
    """Language models, scored one way per task kind over a backend's `decode` (shrink's runtime,
    transformers, llama.cpp): greedy generation (the same deterministic decoding for both models),
    log-likelihood of choices and labels, perplexity of text. A batch and one example alone take the same
    path. Prompts go through the tokenizer's chat template when it has one (chat_template=None), always
    (True) or never (False)."""

    tasks = ("generation", "choice", "classification", "perplexity")

    def __init__(self, model: nn.Module, tokenizer, chat_template: bool | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        super().__init__(model, tokenizer)
        has = bool(getattr(tokenizer, "chat_template", None))
        if chat_template and not has:
            raise ShrinkError("chat template requested, but the tokenizer has none")
        self.chat = has if chat_template is None else chat_template
        self.max_new_tokens = max_new_tokens
        self.context: int | None = None  # tokens the model can take (prompt and answer together), when one number says it

    def backend(self):
        """What scores this model: an object with `decode(prompts, max_new_tokens, continuations, draft)`
        returning a `Decoded` per prompt."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Build what the backend needs before any example is timed (the runtime's one-time compilation)."""
        self.backend()

    def _prompt_rows(self, prompt_len: int) -> int:
        """How many rows of `Decoded.logits` belong to the prompt."""
        return prompt_len - 1

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

    def _pad_id(self) -> int:
        return self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id

    def _forced(self, d, prompt_len: int, j: int) -> torch.Tensor:
        """Log-probabilities over prompt + continuation j of a decoded prompt."""
        return _log_softmax_(torch.cat([d.logits[: self._prompt_rows(prompt_len)], d.continued[j].float()]))

    def _fill_alone(self, backend, lps: list, ids: list) -> None:
        """Fill the None entries of `lps` with the log-probabilities of those `ids` scored on their own
        (given tokens that do not start with the example's prompt)."""
        alone = [k for k, lp in enumerate(lps) if lp is None]
        for k, d in zip(alone, backend.decode([ids[k] for k in alone], 0, None) if alone else []):
            lps[k] = _log_softmax_(d.logits)

    @staticmethod
    def _tail(seq: torch.Tensor | None, prompt: torch.Tensor) -> torch.Tensor | None:
        """What follows `prompt` in `seq`, or None when seq does not start with it."""
        if seq is None or len(seq) < len(prompt) or not torch.equal(seq[: len(prompt)], prompt):
            return None
        return seq[len(prompt):]

    def run(self, example, task, ids=None, scorer=None):
        """One example: a batch of one (the same path, so its time is its latency)."""
        return self.run_batch([example], task, [ids], scorer)[0]

    @torch.no_grad()
    def run_batch(self, examples, task, ids=None, scorer=None):
        """The outcomes of examples of one kind, scored together by the backend. ids: per example, the
        tokens to measure on (the original's), or None to measure on this model's own."""
        ids = ids or [None] * len(examples)
        kind, backend = examples[0].kind, self.backend()
        if kind == "perplexity":
            return self._perplexity_batch(backend, examples, [self._perplexity_ids(ex) if i is None else i
                                                              for ex, i in zip(examples, ids)])
        prompts = [self.prompt_ids(ex.input, ex.data.get("chat", True)) for ex in examples]
        if kind == "generation":
            return self._generation_batch(backend, examples, prompts, ids, scorer)
        return self._choice_batch(backend, examples, task, prompts, ids)

    def _perplexity_batch(self, backend, examples, ids):
        for ex, seq in zip(examples, ids):
            if len(seq) < 2:
                raise ShrinkError(f"example {ex.id!r}: text is shorter than two tokens")
        out = []
        for seq, d in zip(ids, backend.decode(ids, 0, None)):
            lp = _log_softmax_(d.logits)
            mean = float(lp.gather(1, seq[1:].unsqueeze(1)).mean())
            out.append(Outcome(f"mean log-likelihood {mean:.3f}", mean, mean, lp, ids=seq))
        return out

    def _generation_batch(self, backend, examples, prompts, ids, scorer):
        n_new = [ex.data.get("max_new_tokens") or self.max_new_tokens for ex in examples]
        for p, n in zip(prompts, n_new):
            if self.context is not None and len(p) + n > self.context:
                raise ShrinkError(f"prompt of {len(p)} tokens and {n} new tokens do not fit in the model's "
                                  f"context of {self.context}")
        confs = [float("nan")] * len(examples)  # the confidence slices are the original's: not measured on given tokens
        targets = [self._text_ids(str(ex.data["target"][0])) if i is None else None for ex, i in zip(examples, ids)]
        tails = [self._tail(i, p) if i is not None else None for i, p in zip(ids, prompts)]
        # the original's target, or the given tokens, are scored as continuations of the prompt; in a batch
        # they draft the answer too in the runtime (the given tokens are the original's answer, which a close
        # model mostly repeats). One example alone is decoded on its own: its time is then its latency.
        forced = [tg if i is None else tl for tg, tl, i in zip(targets, tails, ids)]
        decoded = backend.decode(prompts, n_new, [[f] if f is not None else [] for f in forced],
                                 draft=len(examples) > 1)
        lps = []
        for k, (d, p) in enumerate(zip(decoded, prompts)):
            if ids[k] is None:
                lps.append(_log_softmax_(d.logits))
                conf = F.log_softmax(d.continued[0].float(), -1).gather(1, targets[k].unsqueeze(1))
                confs[k] = float(conf.mean())
            else:
                lps.append(self._forced(d, len(p), 0) if tails[k] is not None else None)
        self._fill_alone(backend, lps, ids)
        out = []
        for k, (ex, d, p) in enumerate(zip(examples, decoded, prompts)):
            text = self.tok.decode(d.new, skip_special_tokens=True).strip()
            score = checked_score(scorer(text, ex), "--scorer") if scorer else score_generation(text, ex.data)
            seq = torch.cat([p, d.new]) if ids[k] is None else ids[k]
            out.append(Outcome(text, score, confs[k], lps[k], ids=seq))
        return out

    def _choice_batch(self, backend, examples, task, prompts, ids):
        choices = [ex.data["choices"] if ex.kind == "choice" else task.labels() for ex in examples]
        answers = [ex.data["answer"] if ex.kind == "choice" else cs.index(str(ex.data["label"]))
                   for ex, cs in zip(examples, choices)]
        tails = [[self._text_ids(c) for c in cs] for cs in choices]
        given = [self._tail(i, p) if i is not None else None for i, p in zip(ids, prompts)]
        decoded = backend.decode(prompts, 0, [ts + ([g] if g is not None else []) for ts, g in zip(tails, given)])
        measured = [torch.cat([p, ts[a]]) if i is None else i for p, ts, a, i in zip(prompts, tails, answers, ids)]
        scores = [[float(F.log_softmax(d.continued[j].float(), -1).gather(1, t.unsqueeze(1)).sum())
                   for j, t in enumerate(ts)] for d, ts in zip(decoded, tails)]
        lps = [self._forced(d, len(p), a if i is None else len(ts)) if i is None or g is not None else None
               for d, p, a, i, g, ts in zip(decoded, prompts, answers, ids, given, tails)]
        self._fill_alone(backend, lps, ids)
        out = []
        for cs, sc, a, seq, lp in zip(choices, scores, answers, measured, lps):
            pick = max(range(len(sc)), key=sc.__getitem__)
            out.append(Outcome(cs[pick], float(pick == a), _margin(sc), lp, ids=seq))
        return out


class CausalLMAdapter(_LanguageAdapter):
    """Hugging Face causal LMs, scored in shrink's runtime where it can run the model (asked for a decoder
    over the model's current tensors, whichever way the model was made or loaded; SHRINK_RUNTIME=0 turns it
    off), else by transformers."""

    kind = "causal language"

    def __init__(self, model: nn.Module, tokenizer, chat_template: bool | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        super().__init__(model, tokenizer, chat_template, max_new_tokens)
        self.context = getattr(getattr(model, "config", None), "max_position_embeddings", None)

    def backend(self):
        """shrink's runtime over the model as it is now (built at first use, rebuilt after its tensors change)
        when the model is one it runs; else transformers (silently for models the runtime never runs, with
        the reason said once for one it could run but cannot now)."""
        if runtime.unsupported(self.model, compiled=False) is None:
            decoder = runtime.decoder_for(self.model)
            if decoder is not None:
                return RuntimeBackend(decoder, self.tok.eos_token_id)
        return TransformersBackend(self.model, self._pad_id(), self.tok.eos_token_id)


class Seq2SeqBackend:
    """Scoring by transformers for an encoder-decoder: the prompt goes to the encoder; the answer comes out of
    the decoder by greedy generation, one prompt at a time, and its logits (and each continuation's) are the
    decoder's given the prompt."""

    def __init__(self, model: nn.Module, start: int, pad_id: int, eos_id: int | None):
        self.model, self.start, self.pad_id, self.eos_id = model, start, pad_id, eos_id

    def _answer_logits(self, prompt: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
        dec = torch.cat([torch.tensor([self.start]), answer[:-1]]) if len(answer) else torch.tensor([self.start])
        out = self.model(input_ids=prompt.unsqueeze(0), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         decoder_input_ids=dec.unsqueeze(0), use_cache=False)
        return out.logits[0, : len(answer)].float()

    @torch.no_grad()
    def decode(self, prompts, max_new_tokens, continuations=None, draft: bool = False) -> list[Decoded]:
        from transformers import GenerationConfig

        n_new = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        out = []
        for p, n, cs in zip(prompts, n_new, continuations or [[] for _ in prompts]):
            new = torch.empty(0, dtype=torch.long)
            if n:
                cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=self.eos_id,
                                       pad_token_id=self.pad_id, decoder_start_token_id=self.start)
                new = self.model.generate(p.unsqueeze(0), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                          generation_config=cfg)[0, 1:]  # without the decoder's start token
            out.append(Decoded(new, self._answer_logits(p, new), [self._answer_logits(p, c) for c in cs]))
        return out


class Seq2SeqAdapter(_LanguageAdapter):
    """Hugging Face encoder-decoders (T5, BART): the prompt goes to the encoder, the answer comes out of the
    decoder by greedy generation; choices and labels are scored by the decoder's log-likelihood of them.
    A sequence here is the prompt followed by the answer; its log-probabilities are the decoder's, one row
    per answer token (that is what the comparison's KL is over)."""

    kind = "encoder-decoder language"
    tasks = ("generation", "choice", "classification")

    def __init__(self, model: nn.Module, tokenizer, chat_template: bool | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        super().__init__(model, tokenizer, chat_template, max_new_tokens)
        # positions are relative (T5) or per stack: prompt and answer are checked apart (context stays None)
        self.start = model.config.decoder_start_token_id
        if self.start is None:
            raise ShrinkError(f"{type(model).__name__}: config has no decoder_start_token_id")

    def backend(self):
        return Seq2SeqBackend(self.model, self.start, self._pad_id(), self.tok.eos_token_id)

    def _prompt_rows(self, prompt_len: int) -> int:
        return 0  # the decoder's rows are the answer's alone


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
