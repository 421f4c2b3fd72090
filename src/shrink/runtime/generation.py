"""`generate(model, input_ids, ...)`: transformers' `generate` call and result, decoded in shrink's runtime
where the model and the request allow, by transformers otherwise; `install(model)` makes a model's own
`generate` do this. `decoder_for(model)` is the runtime over a model's current tensors, which comparisons
ask for directly, so a model is scored the same way however it was made or loaded.

The runtime takes greedy and sampled decoding (temperature, top-k, top-p), end-of-sequence tokens, left
padding through the attention mask, and max_new_tokens / min_new_tokens / max_length. A request for anything else
(beams, repetition penalty, streamers, scores out, ...) goes to transformers unchanged, and the first time
for each reason one warning says why. An `assistant_model` makes greedy decoding speculative (speculative.py;
`last_speculation(model)` says how it went); with sampling it is refused (the output would not be the
target's), and where either model cannot run here it goes to transformers' assisted generation.
"""

from __future__ import annotations

import threading
import types
import warnings
import weakref

import torch
import torch.nn as nn

from ..core.errors import ShrinkError
from .llama import LlamaDecoder, Sampling, unsupported
from .speculative import Speculation, check_pair, speculate

_HANDLED = {"max_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "use_cache"}
_IDS = {"pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "max_new_tokens",
        "_from_model_config", "transformers_version"}
_decoders: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, LlamaDecoder]]" = weakref.WeakKeyDictionary()
_said: set[str] = set()
_speculations: "weakref.WeakKeyDictionary[nn.Module, Speculation]" = weakref.WeakKeyDictionary()


def _say_once(reason: str) -> None:
    if reason not in _said:
        _said.add(reason)
        warnings.warn(f"shrink: decoding with transformers, not shrink's runtime: {reason}", stacklevel=3)


def _fingerprint(model: nn.Module) -> tuple:
    """Changes when a layer or tensor of the model is replaced (quantized, reloaded), so the runtime
    built over the old tensors is rebuilt."""
    return tuple((id(m), *(t.data_ptr() for t in m._buffers.values() if t is not None),
                  *(p.data_ptr() for p in m._parameters.values() if p is not None)) for m in model.modules())


_building = threading.Lock()


def decoder_for(model: nn.Module) -> LlamaDecoder | None:
    """The runtime over `model`'s current tensors (built once, rebuilt when they change), or None with
    the reason said once when the model cannot use it."""
    reason = unsupported(model)
    if reason:
        _say_once(reason)
        return None
    key = _fingerprint(model)
    with _building:  # threads asking at once share one decoder (built once)
        held = _decoders.get(model)
        if held is None or held[0] != key:
            decoder = LlamaDecoder(model)  # may change the layers' buffers (their first tiling): key them after
            held = (_fingerprint(model), decoder)
            _decoders[model] = held
    return held[1]


def _request(model, generation_config, kwargs):
    """(resolved generation config, model kwargs) as transformers resolves them, or a reason it is not
    a request the runtime takes."""
    try:
        config, extra = model._prepare_generation_config(generation_config, **kwargs)
    except Exception as exc:  # transformers' own generate will report what is wrong with the request
        return None, f"transformers could not resolve the request ({type(exc).__name__})"
    extra = {k: v for k, v in extra.items() if v is not None}
    extra.pop("attention_mask", None)
    if extra:
        return None, f"arguments {sorted(extra)}"
    defaults = config._get_default_generation_params()
    for key, value in vars(config).items():
        if key in _HANDLED or key in _IDS or key.startswith("_"):
            continue
        default = defaults.get(key)
        if value != default and not (default is None and value in ({}, [], False, 0)):
            return None, f"generation option {key}={value!r}"
    if not config.use_cache:
        return None, "use_cache=False"
    return config, None


def _prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_id, eos) -> list[torch.Tensor] | str:
    """Each row's tokens without its left padding, or the reason the input is not one the runtime takes."""
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.device.type != "cpu":
        return "input_ids that are not a 2-D integer tensor on the CPU"
    if attention_mask is None:
        if pad_id is not None and pad_id not in eos and bool((input_ids == pad_id).any()):
            return "padding tokens in input_ids without an attention_mask"
        return [row for row in input_ids]
    mask = attention_mask.to(torch.bool)
    if mask.shape != input_ids.shape:
        return "an attention_mask of another shape than input_ids"
    starts = (~mask).sum(1)
    if not bool((mask == (torch.arange(mask.shape[1]) >= starts[:, None])).all()):
        return "an attention_mask that is not left padding"
    return [row[int(s):] for row, s in zip(input_ids, starts)]


def generate(model: nn.Module, inputs: torch.Tensor | None = None, generation_config=None, *, fallback=None,
             **kwargs) -> torch.Tensor:
    """`model.generate(inputs, generation_config, **kwargs)`: the same arguments (attention_mask among the
    kwargs) and the same result (the inputs followed by the new tokens, rows that stop early filled with
    the padding id), decoded in shrink's runtime when the model and the request allow (see the module's
    docstring), else by `fallback` (default: the model's transformers `generate`), saying why once."""
    original = fallback or type(model).generate.__get__(model)
    if inputs is None:
        inputs = kwargs.pop("input_ids", None)
    if inputs is None:
        return original(generation_config=generation_config, **kwargs)
    attention_mask = kwargs.get("attention_mask")
    assistant = kwargs.pop("assistant_model", None)
    config, reason = _request(model, generation_config, kwargs)
    if assistant is not None:
        check_pair(model, assistant)
        if config is not None and config.do_sample:
            raise ShrinkError("do_sample=True with an assistant_model: shrink drafts for greedy decoding only, where "
                              "the output is exactly the target's")
    decoder = decoder_for(model) if config is not None else None
    helper = decoder_for(assistant) if assistant is not None and decoder is not None else None
    if config is None or decoder is None or (assistant is not None and helper is None):
        if reason:
            _say_once(reason)
        if assistant is not None:
            kwargs["assistant_model"] = assistant  # transformers' assisted generation, as exact under greedy
        return original(inputs, generation_config=generation_config, **kwargs)
    eos = config.eos_token_id
    eos = [] if eos is None else [int(eos)] if isinstance(eos, int) or torch.is_tensor(eos) and eos.dim() == 0 \
        else [int(e) for e in eos]
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    prompts = _prompts(inputs, attention_mask, config.pad_token_id, eos)
    if isinstance(prompts, str):
        _say_once(prompts)
        return original(inputs, generation_config=generation_config, **kwargs)
    width = inputs.shape[1]
    n_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - width
    if n_new <= 0:
        return inputs.clone()
    sampling = Sampling(bool(config.do_sample), float(config.temperature if config.temperature is not None else 1.0),
                        int(config.top_k or 0), float(config.top_p if config.top_p is not None else 1.0))
    if helper is not None:
        stats = Speculation()
        news = speculate(decoder, helper, prompts, n_new, eos, int(config.min_new_tokens or 0), stats=stats)
        _speculations[model] = stats
    else:
        news = decoder.generate(prompts, n_new, eos, sampling, min_new_tokens=int(config.min_new_tokens or 0))
    longest = max(len(n) for n in news)
    if longest and pad is None and min(len(n) for n in news) < longest:
        raise ShrinkError("rows stopped at different lengths and there is no pad_token_id to fill them with")
    out = torch.full((inputs.shape[0], width + longest), pad if pad is not None else 0, dtype=inputs.dtype)
    out[:, :width] = inputs
    for r, n in enumerate(news):
        out[r, width:width + len(n)] = n
    return out


def last_speculation(model: nn.Module) -> Speculation | None:
    """What the last `generate` of `model` with an assistant_model did in the runtime (proposed and accepted
    draft tokens, the target's passes; `Speculation`), or None when none ran there."""
    return _speculations.get(model)


def install(model: nn.Module) -> str | None:
    """Make `model.generate` decode in shrink's runtime where it can (this module's `generate`), falling
    back to transformers' for anything else: for users' own `generate` calls (comparisons ask the runtime
    for a decoder themselves, `decoder_for`, whatever the model). Returns None when installed, else why the
    model cannot use the runtime (then the model is left as it was). The runtime is compiled at first use."""
    reason = unsupported(model, compiled=False)
    if reason:
        return reason
    if not isinstance(getattr(model, "generate", None), types.MethodType) or \
            getattr(model.generate, "__func__", None) is not _installed_generate:
        model.generate = types.MethodType(_installed_generate, model)
    return None


def _installed_generate(self, inputs=None, generation_config=None, **kwargs):
    """transformers' generate, decoded in shrink's runtime where the request allows (shrink.runtime.generate)."""
    return generate(self, inputs, generation_config, **kwargs)
