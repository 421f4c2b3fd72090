"""shrink's own decoding runtime: a Llama-family model's whole decoding step in one compiled call
(llama_decoder.cpp), over the same kernels as the model's quantized layers, with a key-value cache of
fixed size. `generate` (transformers' call, decoded here where it can be) is the entry point users,
compare and search share; `install(model)` routes a model's own `generate` through it. Models or requests
it cannot run decode through transformers, and it says so. With `assistant_model=` (a draft sharing the
target's vocabulary) greedy decoding is speculative (speculative.py): the target's own tokens, fewer passes.
"""

from .generation import decoder_for, generate, install, last_speculation
from .llama import Decoded, LlamaDecoder, Sampling, unsupported
from .speculative import Speculation, speculate

__all__ = ["Decoded", "LlamaDecoder", "Sampling", "Speculation", "decoder_for", "generate", "install",
           "last_speculation", "speculate", "unsupported"]
