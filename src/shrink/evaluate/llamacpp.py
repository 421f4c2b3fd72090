"""Run a GGUF file in llama.cpp, so that what is judged is what llama.cpp computes.

llama.cpp runs in a child process (`llamacpp_worker.py`, through llama-cpp-python's bindings): a crash
inside it becomes a ShrinkError here, never the end of the caller. Token ids come from the caller's
Hugging Face tokenizer, so the original model and the GGUF file see exactly the same tokens; only the
arithmetic differs. llama-cpp-python is an optional extra (`scripts/setup.sh --llama-cpp` builds it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from ..core.errors import ShrinkError
from ..core.peers import llama_cpp_missing
from ..runtime import Decoded
from .adapters import DEFAULT_MAX_NEW_TOKENS, CausalLMAdapter

RUNTIMES = ("shrink", "llama.cpp")


class LlamaCpp:
    """One GGUF file loaded in a llama.cpp child process. n_ctx: tokens of context (default 2048);
    threads: default all cores; repack: llama.cpp's repacked CPU kernels, its default for decoding
    (default off: on some AVX2 CPUs its repacked Q4_0 GEMM crashes on any batch of more than one token;
    on, every token is fed in a batch of its own, so prompts are slower). Close it (or use it as a
    context manager) to end the process."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, threads: int | None = None, repack: bool = False):
        why = llama_cpp_missing()
        if why:
            raise ShrinkError(why)
        self.path = Path(path)
        if not self.path.is_file():
            raise ShrinkError(f"{self.path}: no such GGUF file")
        self.n_ctx = n_ctx
        threads = threads or os.cpu_count() or 1
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shrink.evaluate.llamacpp_worker", str(self.path), str(n_ctx), str(threads),
             "1" if repack else "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        head = self._read_head()
        if not head.get("ok"):
            self.close()
            raise ShrinkError(f"{self.path}: {head.get('error')}")
        self.n_vocab = head["n_vocab"]
        self.n_ctx_train = head["n_ctx_train"]

    def _read_head(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            raise ShrinkError(f"{self.path}: llama.cpp stopped ({how})" + (f": {err[-1][:300]}" if err else ""))
        return json.loads(line)

    def request(self, **req) -> tuple[dict, bytes]:
        """Send one request; its answer and payload. ShrinkError if llama.cpp failed or crashed."""
        if self.proc.poll() is not None:
            raise ShrinkError(f"{self.path}: the llama.cpp process has ended")
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the process died; _read_head says how
        head = self._read_head()
        if not head.get("ok"):
            raise ShrinkError(f"{self.path}: llama.cpp: {head.get('error')}")
        payload = self.proc.stdout.read(head["bytes"]) if head.get("bytes") else b""
        return head, payload

    def logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities at every position but the last: [len(ids) - 1, vocabulary]."""
        head, payload = self.request(op="logprobs", ids=[int(i) for i in ids])
        return torch.from_numpy(np.frombuffer(payload, dtype=np.float32).reshape(head["shape"]).copy())

    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding until an end-of-generation token or `max_new_tokens`; the new ids."""
        head, _ = self.request(op="generate", ids=[int(i) for i in prompt], max_new_tokens=int(max_new_tokens))
        return torch.tensor(head["ids"], dtype=torch.long)

    def bench(self, prompt: int = 512, decode: int = 64, token: int = 1) -> dict:
        """Seconds llama.cpp takes for one prompt of `prompt` tokens (None with repacking, which cannot run
        a batch) and for `decode` greedy tokens after a one-token prompt."""
        head, _ = self.request(op="bench", prompt=prompt, decode=decode, token=token)
        return {"prompt_s": head["prompt_s"], "decode_s": head["decode_s"]}

    def eval(self):
        return self

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class LlamaCppBackend:
    """Scoring by a llama.cpp process (`LlamaCpp`): greedy generation and log-probabilities, one sequence at
    a time, in the form the other backends give (`Decoded`)."""

    def __init__(self, runtime: LlamaCpp):
        self.runtime = runtime

    def decode(self, prompts, max_new_tokens, continuations=None, draft: bool = False) -> list[Decoded]:
        n_new = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        out = []
        for p, n, cs in zip(prompts, n_new, continuations or [[] for _ in prompts]):
            new = self.runtime.generate(p, n) if n else torch.empty(0, dtype=torch.long)
            out.append(Decoded(new, self.runtime.logprobs(torch.cat([p, new])),
                               [self.runtime.logprobs(torch.cat([p, c]))[len(p) - 1:] for c in cs]))
        return out


class LlamaCppAdapter(CausalLMAdapter):
    """A GGUF file in llama.cpp as a causal LM for `compare` and `search`: the same prompts (chat template
    included), greedy generation and log-likelihoods as the PyTorch adapter, computed by llama.cpp."""

    def __init__(self, path: str | os.PathLike | LlamaCpp, tokenizer, chat_template: bool | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, n_ctx: int = 2048):
        """path: the GGUF file (a llama.cpp process is started with `n_ctx`, default 2048), or a running
        LlamaCpp to use. tokenizer: gives the token ids, which must lie in the file's vocabulary."""
        runtime = path if isinstance(path, LlamaCpp) else LlamaCpp(path, n_ctx=n_ctx)
        super().__init__(runtime, tokenizer, chat_template, max_new_tokens)
        self.runtime = runtime
        self.context = min(runtime.n_ctx, runtime.n_ctx_train or runtime.n_ctx)
        if len(tokenizer) > runtime.n_vocab:
            raise ShrinkError(f"{runtime.path}: the tokenizer has {len(tokenizer)} tokens, the GGUF file "
                              f"{runtime.n_vocab}")

    def backend(self) -> LlamaCppBackend:
        return LlamaCppBackend(self.runtime)

    def size_bytes(self) -> int:
        """The GGUF file's size."""
        return self.runtime.path.stat().st_size
