"""The child process that runs a GGUF file in llama.cpp (through llama-cpp-python's C bindings).

It runs apart from shrink so that a crash inside llama.cpp (a segfault in a kernel) ends this process,
not the user's. Protocol, one request at a time: a JSON line on stdin; the answer is a JSON line on
stdout, followed, when it says `"bytes": n`, by n raw bytes (float32 log-probabilities, row-major).
Requests: {"op": "logprobs", "ids": [...]}, {"op": "generate", "ids": [...], "max_new_tokens": n},
{"op": "bench", "prompt": n, "decode": n, "token": id}. Token ids come from the caller's tokenizer, so
both runtimes see exactly the same tokens.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time

import numpy as np


def _quiet(level, text, user_data):  # llama.cpp's log lines would flood the caller's stderr
    pass


class Runtime:
    def __init__(self, path: str, n_ctx: int, threads: int, repack: bool):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        self._log = L.llama_log_callback(_quiet)
        L.llama_log_set(self._log, ctypes.c_void_p(0))
        mp = L.llama_model_default_params()
        mp.use_extra_bufts = repack  # llama.cpp's repacked AVX2 Q4_0 GEMM crashes on prompts on some CPUs
        self.repack = repack
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"{path}: llama.cpp could not load the file")
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"{path}: llama.cpp could not make a context of {n_ctx} tokens")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = n_ctx
        self.batch = L.llama_batch_init(n_ctx, 0, 1)

    def _decode(self, ids: list[int], start: int, all_logits: bool) -> None:
        L, b = self.L, self.batch
        b.n_tokens = len(ids)
        for i, t in enumerate(ids):
            b.token[i] = t
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = all_logits or i == len(ids) - 1
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _run(self, ids: list[int], start: int, all_logits: bool) -> np.ndarray:
        """Logits after `ids` at positions start...: [len(ids), vocab] if all_logits, else [1, vocab] for the
        last. With repacking, one token per batch (its kernels crash on batches of more than one)."""
        if not self.repack or len(ids) == 1:
            self._decode(ids, start, all_logits)
            return self._logits(len(ids) if all_logits else 1)
        rows = []
        for i, t in enumerate(ids):
            self._decode([t], start + i, True)
            if all_logits or i == len(ids) - 1:
                rows.append(self._logits(1))
        return np.concatenate(rows)

    def _reset(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def _logits(self, n: int) -> np.ndarray:
        ptr = self.L.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab)).copy()

    def logprobs(self, ids: list[int]) -> np.ndarray:
        self._check(len(ids))
        self._reset()
        x = self._run(ids, 0, True)[:-1].astype(np.float64)
        x -= x.max(axis=1, keepdims=True)
        return (x - np.log(np.exp(x).sum(axis=1, keepdims=True))).astype(np.float32)

    def generate(self, ids: list[int], max_new: int) -> list[int]:
        self._check(len(ids) + max_new)
        self._reset()
        logits = self._run(ids, 0, False)
        out = []
        pos = len(ids)
        for _ in range(max_new):
            tok = int(np.argmax(logits[0]))
            out.append(tok)
            if self.L.llama_vocab_is_eog(self.vocab, tok):
                break
            logits = self._run([tok], pos, False)
            pos += 1
        return out

    def bench(self, prompt: int, decode: int, token: int) -> dict:
        """Seconds to process a prompt of `prompt` tokens (one batch; None with repacking, which cannot), and
        to decode `decode` tokens greedily after a one-token prompt."""
        self._check(prompt + decode)
        t_prompt = None
        if not self.repack:
            self._reset()
            t = time.perf_counter()
            self._decode([token] * prompt, 0, False)
            t_prompt = time.perf_counter() - t
        self._reset()
        logits = self._run([token], 0, False)
        t = time.perf_counter()
        for i in range(decode):
            logits = self._run([int(np.argmax(logits[0]))], i + 1, False)
        return {"prompt_s": t_prompt, "decode_s": time.perf_counter() - t}

    def _check(self, n: int) -> None:
        if n > self.n_ctx:
            raise ValueError(f"{n} tokens do not fit in the context of {self.n_ctx}")


def main() -> None:
    path, n_ctx, threads, repack = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything the C library prints goes to stderr, never into the protocol
    def answer(head: dict, payload: bytes = b"") -> None:
        out.write((json.dumps(head) + "\n").encode())
        out.write(payload)
        out.flush()
    try:
        rt = Runtime(path, n_ctx, threads, repack)
    except Exception as e:
        answer({"ok": False, "error": str(e)})
        return
    answer({"ok": True, "n_vocab": rt.n_vocab, "n_ctx_train": rt.L.llama_model_n_ctx_train(rt.model)})
    for line in sys.stdin:
        try:
            req = json.loads(line)
            op = req["op"]
            if op == "logprobs":
                lp = rt.logprobs(req["ids"])
                answer({"ok": True, "shape": list(lp.shape), "bytes": lp.nbytes}, lp.tobytes())
            elif op == "generate":
                answer({"ok": True, "ids": rt.generate(req["ids"], req["max_new_tokens"])})
            elif op == "bench":
                answer({"ok": True, **rt.bench(req["prompt"], req["decode"], req["token"])})
            else:
                answer({"ok": False, "error": f"unknown op {op!r}"})
        except Exception as e:
            answer({"ok": False, "error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main()
