"""The compiled AVX2 kernel: built on first use with the machine's C++ compiler, cached, optional.

Building at first use (rather than at install) keeps pip from fetching another torch into an isolated
build environment, and lets a machine without a compiler or without AVX2 fall back to the PyTorch path.
Set SHRINK_NATIVE=0 to never build or use it.
"""

from __future__ import annotations

import hashlib
import re
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from ...core import switches
from ...core.paths import cache_dir

SOURCE = Path(__file__).with_name("qgemm_avx2.cpp")
# The decoding runtime's C++ (shrink.runtime is its Python half), built into the same module: one build,
# one copy of the kernels in memory.
DECODER_SOURCE = Path(__file__).with_name("llama_decoder.cpp")
REQUIRED_FLAGS = ("avx2", "fma", "f16c")


def unavailable_reason() -> str:
    """Why compiled code is not used here, naming the switch or the missing capability."""
    if not switches.native_enabled():
        return "SHRINK_NATIVE=0 is set, which turns shrink's compiled code off"
    if not cpu_supported():
        return f"this CPU does not report {'/'.join(f.upper() for f in REQUIRED_FLAGS)}"
    return "it failed to compile here (the warning printed when it was tried says why: no C++ compiler, or an error)"


def cpu_supported() -> bool:
    """True on x86-64 Linux CPUs that report AVX2, FMA and F16C."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return all(f in flags for f in REQUIRED_FLAGS)
    return False


HEADER = Path(__file__).with_name("qgemm_avx2.h")
# The tiled kernel's loops built for AVX512-VNNI CPUs, linked into every module that includes the kernels.
VNNI_SOURCE = Path(__file__).with_name("tiled_vnni.cpp")
_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)


def build_inputs(sources: list[Path], include: tuple[Path, ...] = ()) -> list[Path]:
    """Every file a build of `sources` reads: the sources and, recursively, each file they include by
    `#include "..."`, looked up beside the including file, then in the kernels' folder and `include`.
    This is what the build hashes and what an installed package must ship (a test checks the wheel)."""
    seen: dict[Path, None] = {}
    todo = [Path(s) for s in sources]
    while todo:
        path = todo.pop(0)
        if path in seen:
            continue
        seen[path] = None
        for name in _INCLUDE.findall(path.read_text()):
            found = next((d / name for d in (path.parent, HEADER.parent, *include) if (d / name).is_file()), None)
            if found is None:
                raise FileNotFoundError(f"{path}: includes {name!r}, which is not beside it nor in "
                                        f"{HEADER.parent} (a file missing from the installed package)")
            todo.append(found)
    return list(seen)
# No contraction of a * b + c into one rounding where the source does not ask for it: the kernel inlined into
# another extension (the decoding runtime) then rounds exactly as the kernel's own module does.
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off")


@lru_cache(maxsize=1)
def load():
    """The compiled extension module, or None when it is disabled, unsupported or fails to build."""
    ext = build("shrink_native", [SOURCE, VNNI_SOURCE, DECODER_SOURCE], "the AVX2 kernels and decoding runtime")
    if ext is not None:
        _register_shapes()
    return ext


def build(stem: str, sources: list[Path], what: str, include: tuple[Path, ...] = ()):
    """Compile `sources` (with the kernel headers beside them) into an extension module, cached under the
    shrink cache by a hash of the sources, the header, torch's and Python's versions; None (and one
    warning saying so) when SHRINK_NATIVE=0, the CPU lacks AVX2/FMA/F16C, or the build fails."""
    if not switches.native_enabled() or not cpu_supported():
        return None
    try:
        inputs = build_inputs(sources, include)
    except OSError as exc:  # an installed package without a file its build reads: say which, use PyTorch
        warnings.warn(f"shrink: {what} unavailable ({exc}); using the PyTorch path", stacklevel=3)
        return None
    digest = hashlib.sha256(" ".join(CFLAGS).encode())
    for src in inputs:
        digest.update(src.name.encode() + src.read_bytes())
    key = hashlib.sha256(digest.digest() + torch.__version__.encode() + sys.version.encode()).hexdigest()[:16]
    build_dir = cache_dir() / "kernels" / key
    build_dir.mkdir(parents=True, exist_ok=True)
    name = f"{stem}_{key}"
    if not any(build_dir.glob(f"{name}*.so")):
        print(f"shrink: compiling {what} (once per machine, about a minute)...", file=sys.stderr, flush=True)
    try:
        from torch.utils.cpp_extension import load as compile_and_load

        return compile_and_load(
            name=name,
            sources=[str(s) for s in sources],
            extra_include_paths=[str(HEADER.parent), *map(str, include)],
            build_directory=str(build_dir),
            extra_cflags=list(CFLAGS),
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # a missing compiler or headers must not stop the user: use PyTorch
        warnings.warn(f"shrink: {what} unavailable ({type(exc).__name__}: {exc}); using the PyTorch path",
                      stacklevel=3)
        return None


def _register_shapes() -> None:
    """Output shapes of the extension's dispatcher ops (torch.ops.shrink.*), which torch.compile traces
    with instead of running them."""
    @torch.library.register_fake("shrink::qlinear")
    def _(x, qweight, scales, zeros, zero_const, bias, bits, group_size):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("shrink::tiled_qlinear")
    def _(x, codes, scales, zeros, zero_const, bias, bits, group_size):
        return x.new_empty(*x.shape[:-1], codes.shape[0] * 8)

    @torch.library.register_fake("shrink::linear")
    def _(x, qweight, scales, zeros, zero_const, bias, bits, group_size, tcodes, tscales, tzeros, large_batch):
        return x.new_empty(*x.shape[:-1], tcodes.shape[0] * 8 if tcodes.numel() else qweight.shape[0])

    @torch.library.register_fake("shrink::round_rows")
    def _(w, bits, group_size):
        return [w.new_empty(w.shape[0], w.shape[1] * bits // 8, dtype=torch.uint8),
                w.new_empty(w.shape[0], w.shape[1] // group_size, dtype=torch.float16)]

    @torch.library.register_fake("shrink::dequantize")
    def _(qweight, scales, zeros, zero_const, bits, group_size, k):
        return qweight.new_empty(qweight.shape[0], k, dtype=torch.float32)


def vnni() -> bool:
    """Whether the tiled kernel runs its AVX512-VNNI copy here (the CPU has it and SHRINK_VNNI is not 0)."""
    ext = load()
    return ext is not None and ext.uses_vnni()


def available() -> bool:
    """Whether the native kernel can be used on this machine."""
    return load() is not None
