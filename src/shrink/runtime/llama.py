"""LlamaDecoder: a transformers Llama model (quantized by shrink or not) decoding in llama_decoder.cpp.

The decoder reads the model's own tensors (packed codes, scales, norms; float weights that are already
float32 are not copied), so it decodes what the model holds. It needs the compiled runtime (built at
first use, like the kernel); `unsupported(model)` says why a model cannot use it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..core import switches
from ..core.errors import ShrinkError
from ..quant.embedding import QuantEmbedding
from ..quant.kernels import LARGE_BATCH, native, native_supports, tiled
from ..quant.linear import CastLinear, QuantLinear
from ..quant.online import online_rotated

PREFILL_CHUNK = 512  # prompt tokens per call: bounds the activations' memory, keeps GEMMs large
SHARED_PREFIX = 8  # leading tokens all prompts of a call share that are run once and copied
_ROPE_FIXED = ("default", "linear", "llama3", "yarn")  # rotary types whose frequencies do not change with length


def extension():
    """The compiled decoding runtime (its C++, quant/kernels/llama_decoder.cpp, is built into the kernels' one
    extension module), or None where it cannot be built (then transformers decodes)."""
    return native.load()


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: greedy (do_sample False, the default), or sampled from the softmax of
    logits / temperature restricted to the top_k tokens (0: all) and the top_p probability mass (1.0: all),
    in transformers' order (temperature, top-k, top-p)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ShrinkError(f"temperature must be positive to sample, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ShrinkError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise ShrinkError(f"top_k must be 0 (all tokens) or positive, not {self.top_k}")

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The next token of each row of logits [rows, vocab]."""
        if not self.do_sample:
            return logits.argmax(-1)
        return torch.multinomial(self.scores(logits).softmax(-1), 1, generator=generator).squeeze(1)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits sampling draws from: divided by the temperature, tokens outside top-k and top-p at -inf."""
        logits = logits / self.temperature
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), -1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            ordered, index = logits.sort(-1)
            drop = ordered.softmax(-1).cumsum(-1) <= 1 - self.top_p
            drop[:, -1] = False  # the most likely token always stays
            logits = logits.masked_fill(drop.scatter(1, index, drop), float("-inf"))
        return logits


@dataclass
class Decoded:
    """What `LlamaDecoder.decode` gives for one prompt: the new tokens; with logits=True the logits after
    each token of prompt + new but the last [len(prompt) + len(new) - 1, vocab] (else None); per
    continuation the logits before each of its tokens [len(continuation), vocab]."""

    new: torch.Tensor
    logits: torch.Tensor | None
    continued: list[torch.Tensor]


def _packed_part(model: nn.Module, name: str) -> bool:
    """Whether tensor `name` belongs to a layer that computes in float32 whatever it stores (scales in
    float16, a CastLinear's narrow weight), or is a rotary table transformers rebuilds in float32."""
    owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return isinstance(owner, (QuantLinear, QuantEmbedding, CastLinear)) or name.endswith("inv_freq")


def unsupported(model: nn.Module, compiled: bool = True) -> str | None:
    """Why `model` cannot decode in shrink's runtime (a sentence), or None when it can; with `compiled`
    False only the model is looked at (the runtime is not built). SHRINK_RUNTIME=0 turns the runtime off."""
    if not switches.runtime_enabled():
        return "SHRINK_RUNTIME=0 is set"
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llama":
        return f"model type {getattr(config, 'model_type', type(model).__name__)!r} (the runtime decodes Llama-family models)"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "an activation other than SiLU or pretraining_tp > 1"
    rope = getattr(getattr(model.model, "rotary_emb", None), "rope_type", None)
    if rope not in _ROPE_FIXED:
        return f"rotary embedding type {rope!r} (its frequencies change with the length)"
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type != "cpu":
            return f"{name} is on {t.device} (the runtime decodes on the CPU)"
        if t.is_floating_point() and t.dtype != torch.float32 and not _packed_part(model, name):
            return f"{name} is {str(t.dtype).removeprefix('torch.')} (the runtime computes in float32)"
    rotated = online_rotated(model)
    if rotated:
        return f"{rotated[0]} rotates its input online (--method rotate-online+...), which the runtime does not run"
    for name, m in model.named_modules():
        if m is model or not name.startswith(("model.layers", "model.embed_tokens", "lm_head")):
            continue
        if isinstance(m, (nn.Linear, QuantLinear, CastLinear, nn.Embedding, QuantEmbedding)):
            continue
        if not any(True for _ in m.children()) and any(True for _ in m.parameters(recurse=False)) \
                and not type(m).__name__.endswith("RMSNorm"):
            return f"layer {name!r} is a {type(m).__name__}"
    if compiled and extension() is None:
        return f"the runtime is not compiled: {native.unavailable_reason()}"
    return None


_EMPTY = {dt: torch.empty(0, dtype=dt) for dt in (torch.uint8, torch.float16, torch.float32, torch.int64)}


def _linear(m: nn.Module, ext, products: bool = True):
    """The runtime's view of a weight layer or embedding table: packed where the kernel computes the
    model's own forward, else the float32 weight the model's forward multiplies by. `products`: whether
    the runtime multiplies by it (default True); a table it only reads rows of needs no tiled copy."""
    u8, f32, i64 = _EMPTY[torch.uint8], _EMPTY[torch.float32], _EMPTY[torch.int64]
    bias = getattr(m, "bias", None)
    bias = f32 if bias is None else bias.detach().float().contiguous()
    if isinstance(m, (QuantLinear, QuantEmbedding)):
        native_ok = m.uses_native() if isinstance(m, QuantLinear) else (
            native.available() and native_supports(m.in_features, m.spec.group_for(m.in_features), m.spec.bits,
                                                    m.spec.grid, m.spec.kquant))
        if native_ok:
            t = tiled.for_layer(m) if products else None
            f16 = _EMPTY[torch.float16]
            tcodes, tscales, tzeros = (u8, f16, u8) if t is None else (t.codes, t.scales,
                                                                        u8 if t.zeros is None else t.zeros)
            b = m._buffers  # a layer holding the tiled layout alone: no row form, none needed
            return ext.Linear(b.get("qweight", u8), b.get("scales", f16),
                              u8 if m.zeros is None else m.zeros, f32, bias,
                              i64 if m.input_order is None else m.input_order, m.zero_const, m.spec.bits,
                              m.spec.group_for(m.in_features), m.in_features, m.out_features, LARGE_BATCH,
                              tcodes, tscales, tzeros)
        weight = m.dequantized_weight()
    elif isinstance(m, (nn.Linear, CastLinear, nn.Embedding)):
        weight = m.weight.detach()
    else:
        raise ShrinkError(f"the decoding runtime cannot read a {type(m).__name__}")
    rows, cols = weight.shape
    return ext.Linear(u8, _EMPTY[torch.float16], u8, weight.float().contiguous(), bias, i64, 0, 0, 0, cols, rows,
                      LARGE_BATCH, u8, _EMPTY[torch.float16], u8)


def _shared_prefix(prompts: list[torch.Tensor]) -> int:
    """How many leading tokens all of several prompts share, when worth running once (SHARED_PREFIX or
    more), leaving each prompt at least its last token of its own (its logits pick the first new token); else 0."""
    if len(prompts) < 2:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        differ = (p[:n] != first[:n]).nonzero()
        n = int(differ[0]) if len(differ) else n
    return n if n >= SHARED_PREFIX else 0


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous()


class LlamaDecoder:
    """Decoding of a transformers Llama model in shrink's C++ runtime: `generate` prompts to new tokens.
    Raises ShrinkError (with `unsupported`'s reason) for a model it cannot run."""

    def __init__(self, model: nn.Module):
        reason = unsupported(model)
        if reason:
            raise ShrinkError(f"shrink's decoding runtime cannot run this model: {reason}")
        ext = extension()
        cfg = model.config
        layers = []
        for block in model.model.layers:
            a, f = block.self_attn, block.mlp
            layers.append(ext.Layer(_f32(block.input_layernorm.weight), _f32(block.post_attention_layernorm.weight),
                                    *(_linear(x, ext) for x in (a.q_proj, a.k_proj, a.v_proj, a.o_proj,
                                                                 f.gate_proj, f.up_proj, f.down_proj))))
        rot = model.model.rotary_emb
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.vocab = model.lm_head.out_features
        self.layers = len(layers)
        self.kv_heads, self.head_dim = cfg.num_key_value_heads, head_dim
        self._impl = ext.Decoder(cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, float(cfg.rms_norm_eps),
                                 _f32(rot.inv_freq), float(rot.attention_scaling),
                                 float(model.model.layers[0].self_attn.scaling), _linear(model.model.embed_tokens, ext, products=False),
                                 layers, _f32(model.model.norm.weight), _linear(model.lm_head, ext))
        self.context = getattr(cfg, "max_position_embeddings", None)
        # one cache and one set of scratch buffers: calls from several threads take turns (serialised)
        self._lock = threading.Lock()

    def cache_bytes(self, sequences: int, capacity: int) -> int:
        """Bytes of the key-value cache for `sequences` sequences of `capacity` positions."""
        return 2 * self.layers * sequences * self.kv_heads * capacity * self.head_dim * 4

    def _reserve(self, sequences: int, capacity: int, rows: int | None = None) -> None:
        """Size the cache for `sequences` slots of `capacity` positions, refused before any work when it
        and `rows` rows of logits kept (default: one per sequence) would not fit in free memory."""
        if self.context is not None and capacity > self.context:
            raise ShrinkError(f"prompt and new tokens ({capacity}) do not fit in the model's context of {self.context}")
        need = self.cache_bytes(sequences, capacity) + (sequences if rows is None else rows) * self.vocab * 4 * 2
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if need > 0.8 * free:
            raise ShrinkError(f"{sequences} sequences of {capacity} tokens need {need / 2**30:.1f} GiB of key-value cache "
                              f"and logits; {free / 2**30:.1f} GiB of memory is free: decode fewer at once or fewer tokens")
        self._impl.reset(sequences, capacity)

    @torch.no_grad()
    def generate(self, prompts: list[torch.Tensor], max_new_tokens: int | list[int], eos_token_id=None,
                 sampling: Sampling = Sampling(), generator: torch.Generator | None = None,
                 min_new_tokens: int = 0) -> list[torch.Tensor]:
        """The new tokens of each prompt (1-D token ids, no padding), all decoded together: up to its
        max_new_tokens, stopping after an end-of-sequence token (`eos_token_id`: an id, a list, or None)
        which is kept, and never picking one before min_new_tokens (default 0). Greedy unless `sampling`
        says otherwise."""
        return [d.new for d in self.decode(prompts, max_new_tokens, eos_token_id, sampling, generator, min_new_tokens)]

    def decode(self, *args, **kwargs) -> list["Decoded"]:
        """See `_decode` (the same arguments); one call at a time per decoder, whatever the thread."""
        with self._lock:
            return self._decode(*args, **kwargs)

    @torch.no_grad()
    def _decode(self, prompts: list[torch.Tensor], max_new_tokens: int | list[int], eos_token_id=None,
               sampling: Sampling = Sampling(), generator: torch.Generator | None = None, min_new_tokens: int = 0,
               *, logits: bool = False, continuations: list[list[torch.Tensor]] | None = None,
               draft: bool = False) -> list["Decoded"]:
        """`generate`, with what a comparison measures from the same pass, per prompt a `Decoded`: with
        `logits` (default False) the logits after every token of prompt + new tokens but the last, and for
        each of its `continuations` (default none: per prompt, a list of 1-D token ids scored after the
        prompt, as if forced) the logits before each of its tokens. Continuations go on from a copy of their
        prompt's cache, so the prompt is run once for its generation and all its continuations.
        With `draft` (default False; greedy only) each prompt's first continuation is also a draft of its
        new tokens, as in speculative decoding: the model's picks from that continuation's logits are its
        new tokens for as long as they agree with the draft, and decoding goes on step by step from the
        first that does not (a comparison gives the original's answer, which a close model mostly repeats)."""
        if not prompts:
            return []
        if draft and sampling.do_sample:
            raise ShrinkError("a draft is checked against greedy picks; sampled decoding cannot take one")
        n_new = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(n_new) != len(prompts) or min(n_new) < 0:
            raise ShrinkError("one non-negative max_new_tokens per prompt")
        conts = [[c.reshape(-1).long() for c in cs] for cs in continuations] if continuations is not None \
            else [[] for _ in prompts]
        if len(conts) != len(prompts):
            raise ShrinkError(f"{len(conts)} lists of continuations for {len(prompts)} prompts: one list per prompt")
        if min(len(p) for p in prompts) == 0:
            raise ShrinkError("an empty prompt: decoding needs at least one token to start from")
        for what, seqs in (("prompt", prompts), ("continuation of prompt", [c for cs in conts for c in cs])):
            for i, p in enumerate(seqs):
                if len(p) and not 0 <= int(p.min()) <= int(p.max()) < self.vocab:
                    bad = p[(p < 0) | (p >= self.vocab)][0]
                    raise ShrinkError(f"{what} {i} holds token id {int(bad)}, outside the vocabulary of {self.vocab}")
        eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        lengths = [len(p) for p in prompts]
        capacity = max(max([len(p) + n] + [len(p) + len(c) for c in cs]) for p, n, cs in zip(prompts, n_new, conts))
        # Every row of logits kept lands in one tensor, written there by the runtime: per prompt (logits) its
        # rows and one per new token but the last, then per continuation its rows. Untouched rows (new tokens
        # not generated) cost no memory.
        sizes = [len(p) + max(n - 1, 0) if logits else 0 for p, n in zip(prompts, n_new)]
        sizes += [len(c) for cs in conts for c in cs]
        self._reserve(len(prompts) + sum(len(cs) for cs in conts), capacity, sum(sizes) + len(prompts))
        starts = torch.tensor([0] + sizes).cumsum(0).tolist()
        store = torch.empty(starts[-1], self.vocab)
        at = starts[:len(prompts)]
        if logits:
            self._prefill(prompts, store, at)
            last = store[torch.tensor([a + n - 1 for a, n in zip(at, lengths)])]
        else:
            last = self._prefill(prompts)
        continued = self._continue(prompts, conts, last, store, starts[len(prompts):])
        news: list[list[int]] = [[] for _ in prompts]
        slot_of = list(range(len(prompts)))  # where each prompt's generation runs: its own slot or its draft's
        banned = torch.tensor(sorted(eos), dtype=torch.long)

        def picks(step: torch.Tensor, live: list[int]) -> list[int]:
            early = [r for r, i in enumerate(live) if len(news[i]) < min_new_tokens]
            if early and len(banned):  # as transformers' MinNewTokensLengthLogitsProcessor (on a copy: kept rows stay)
                step[torch.tensor(early)[:, None], banned[None, :]] = float("-inf")
            return sampling.pick(step, generator).tolist()

        def goes_on(i: int, t: int) -> bool:
            news[i].append(t)
            return t not in eos and len(news[i]) < n_new[i]

        live = [i for i, n in enumerate(n_new) if n > 0]
        drafted = [i for i in live if draft and conts[i] and len(conts[i][0])]
        plain = [i for i in live if i not in drafted]
        going = [i for i, t in zip(plain, picks(last[plain], plain)) if goes_on(i, t)] if plain else []
        first = torch.tensor([0] + [len(cs) for cs in conts]).cumsum(0).tolist()  # each prompt's first forked slot
        for i in drafted:
            if self._accept_draft(i, conts[i][0], continued[i][0], picks, goes_on):
                going.append(i)
            slot_of[i] = len(prompts) + first[i]
            if logits and len(news[i]) > 1:  # rows after accepted tokens: the draft's, already computed
                store[at[i] + lengths[i]:at[i] + lengths[i] + len(news[i]) - 1] = continued[i][0][1:len(news[i])]
        live = sorted(going)
        while live:
            tokens = torch.tensor([news[i][-1] for i in live], dtype=torch.long)
            pos = torch.tensor([lengths[i] + len(news[i]) - 1 for i in live], dtype=torch.long)
            slots, rows = torch.tensor([slot_of[i] for i in live], dtype=torch.long), torch.arange(len(live))
            if logits:  # the row after new token j goes to the prompt's row len(prompt) + j
                dest = torch.tensor([at[i] + lengths[i] + len(news[i]) - 1 for i in live])
                self._impl.forward_into(tokens, slots, pos, rows, store, dest)
                step = store[dest]
            else:
                step = self._impl.forward(tokens, slots, pos, rows)
            live = [i for i, t in zip(live, picks(step, live)) if goes_on(i, t)]
        out = []
        for i, n in enumerate(news):  # the row after the last new token predicts past the sequence: not kept
            lg = store[at[i]:at[i] + lengths[i] + len(n) - 1] if logits else None
            out.append(Decoded(torch.tensor(n, dtype=torch.long), lg, continued[i]))
        return out

    @staticmethod
    def _accept_draft(i: int, draft: torch.Tensor, rows: torch.Tensor, picks, goes_on) -> bool:
        """Take prompt i's new tokens from its `draft` while the picks from `rows` (the logits before each
        draft token) agree with it: the picks up to the first that differs, which is the model's own, or
        to the end of the draft. Whether decoding goes on after them (no end-of-sequence token, room left)."""
        for k in range(len(draft)):
            t = picks(rows[k:k + 1].clone(), [i])[0]  # a copy: masking before min_new_tokens leaves kept rows
            if not goes_on(i, t):
                return False
            if t != int(draft[k]):
                return True
        return True

    def _continue(self, prompts, conts, last, store, starts) -> list[list[torch.Tensor]]:
        """The logits before each token of each continuation (rows of `store` from `starts`, one start per
        continuation): the prompt's last row (`last`, one per prompt), then the rows after each of the
        continuation's tokens but its last, run in slots forked from the prompt's."""
        forced = [(i, c) for i, cs in enumerate(conts) for c in cs]
        tokens, slots, pos, dest = [], [], [], []
        out: list[list[torch.Tensor]] = [[] for _ in prompts]
        for slot, ((i, c), at) in enumerate(zip(forced, starts), start=len(prompts)):
            n = len(prompts[i])
            out[i].append(store[at:at + len(c)])
            if not len(c):
                continue
            store[at] = last[i]
            self._impl.fork(i, slot, n)
            tokens.append(c[:-1])
            slots.append(torch.full((len(c) - 1,), slot, dtype=torch.long))
            pos.append(torch.arange(n, n + len(c) - 1))
            dest.append(torch.arange(at + 1, at + len(c)))
        if tokens:
            self._run_all(torch.cat(tokens), torch.cat(slots), torch.cat(pos), out=store, dest=torch.cat(dest))
        return out

    def _run_all(self, tokens, slots, pos, rows: torch.Tensor | None = None, out: torch.Tensor | None = None,
                 dest: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run `tokens` (each at its slot and position) in chunks of PREFILL_CHUNK; the logits after the
        tokens `rows` (ascending indices into tokens; default: every one) [len(rows), vocab], or with `out`
        written into its rows `dest` (one per row) and None returned."""
        rows = torch.arange(len(tokens)) if rows is None else rows
        kept = torch.empty(len(rows), self.vocab) if out is None else None
        for start in range(0, len(tokens), PREFILL_CHUNK):
            stop = min(start + PREFILL_CHUNK, len(tokens))
            here = ((rows >= start) & (rows < stop)).nonzero().squeeze(1)
            args = (tokens[start:stop], slots[start:stop], pos[start:stop], rows[here] - start)
            if out is not None:
                self._impl.forward_into(*args, out, dest[here])
            else:
                self._impl.forward_into(*args, kept, here)
        return kept

    def _prefill(self, prompts: list[torch.Tensor], out: torch.Tensor | None = None,
                 at: list[int] | None = None) -> torch.Tensor | None:
        """Run every prompt token in chunks: the logits after each prompt's last token [len(prompts), vocab],
        or (`out`) those after every token of prompt i written into rows at[i].. of out (and None returned).
        Tokens all prompts begin with (a chat template's system turn, few-shot examples) run once, in the first
        slot, then are copied to the others."""
        prompts = [p.reshape(-1).long() for p in prompts]
        shared = _shared_prefix(prompts)
        if shared:
            head_rows = torch.arange(shared)  # with `out`, every row lands in prompt 0's; else none is wanted
            self._run_all(prompts[0][:shared], torch.zeros(shared, dtype=torch.long), head_rows,
                          None if out is not None else head_rows[:0], out, None if out is None else head_rows + at[0])
            for i in range(1, len(prompts)):
                self._impl.fork(0, i, shared)
                if out is not None:
                    out[at[i]:at[i] + shared] = out[at[0]:at[0] + shared]
        rest = [p[shared:] for p in prompts]
        tokens = torch.cat(rest)
        slots = torch.cat([torch.full((len(r),), i, dtype=torch.long) for i, r in enumerate(rest)])
        pos = torch.cat([torch.arange(shared, len(p)) for p in prompts])
        if out is None:
            ends = torch.tensor([len(r) for r in rest]).cumsum(0)
            return self._run_all(tokens, slots, pos, ends - 1)
        dest = torch.cat([torch.arange(a + shared, a + len(p)) for a, p in zip(at, prompts)])
        self._run_all(tokens, slots, pos, out=out, dest=dest)
        return None

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The logits after every token of one sequence [len(ids), vocab] (a fresh cache): for checks."""
        with self._lock:
            self._reserve(1, len(ids))
            ids = ids.reshape(-1).long()
            return self._impl.forward(ids, torch.zeros_like(ids), torch.arange(len(ids)), torch.arange(len(ids)))
