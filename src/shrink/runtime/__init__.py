"""shrink's own decoding runtime: a Llama-family model's whole decoding step in one compiled call
(llama_decoder.cpp), over the same kernels as the model's quantized layers, with a key-value cache of
fixed size. `generate` (transformers' call, decoded here where it can be) is the entry point users,
compare and search share; `install(model)` routes a model's own `generate` through it. Models or requests
it cannot run decode through transformers, and it says so.
"""

from .generation import decoder_for, generate, install
from .llama import Decoded, LlamaDecoder, Sampling, unsupported

__all__ = ["Decoded", "LlamaDecoder", "Sampling", "decoder_for", "generate", "install", "unsupported"]
