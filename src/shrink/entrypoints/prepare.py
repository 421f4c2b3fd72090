"""Do once, ahead of time, what shrink otherwise does at first use, so no command's time limit is spent on it:

    python -m shrink.entrypoints.prepare

compiles the quantized kernel and the decoding runtime (cached under the shrink cache, by a hash of their
sources, torch's and Python's versions), converts the default model's GGUF file to a Hugging Face folder
(cached), and writes the built-in task. `scripts/setup.sh` runs it. Each step says what it did and how long
it took; a step that cannot be done here (no C++ compiler, no AVX2) says why and the rest go on.
`--kernels-only` compiles the two extensions and stops.
"""

from __future__ import annotations

import sys
import time


def prepare(default_model: bool = True) -> list[str]:
    """Compile the kernel and the runtime, then (default_model=True) convert the default model and write the
    built-in task. Returns one line per step, as printed."""
    from ..quant.kernels import native
    from ..runtime.llama import extension

    lines = []

    def step(what: str, fn) -> None:
        t0 = time.perf_counter()
        result = fn()
        lines.append(f"{what}: {result} ({time.perf_counter() - t0:.0f} s)")
        print(lines[-1], file=sys.stderr, flush=True)

    step("kernel", lambda: "compiled and loaded" if native.load() is not None else
         "not available here (the PyTorch path will be used; see the warning above)")
    step("runtime", lambda: "compiled and loaded" if extension() is not None else
         "not available here (transformers will decode; see the warning above)")
    if default_model:
        from ..evaluate.builtin_task import builtin_path
        from ..io import read_model

        step("default model", lambda: f"ready ({read_model('default').source['name']})")
        step("built-in task", lambda: str(builtin_path()))
    return lines


if __name__ == "__main__":
    prepare(default_model="--kernels-only" not in sys.argv[1:])
