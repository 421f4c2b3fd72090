"""Re-quantizing layers that no GGUF type holds exactly (int6, int3, int2, groups of 16) into GGUF types.

`--requantize Q4_K,Q5_0` is a list: each layer takes the first type whose block divides its inputs (K-quants
need multiples of 256; llama.cpp falls back the same way, to Q5_0 for Q4_K). The rounding is ggml's own,
from llama-cpp-python's `libggml-base` where that is installed: every type llama.cpp writes (K-quants,
i-quants), each taking an importance vector per input: the mean square input of each layer over calibration
text, as llama-quantize uses it, measured by shrink on the model itself (`--calibration`) or read from the
file llama-imatrix writes (`--imatrix`). Without llama-cpp-python, gguf-py's own quantizers (Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0), without importance.
"""

from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import ShrinkError
from ..core.peers import LLAMA_CPP_HINT


GGUF_PY_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # the block types gguf-py's numpy code rounds into


@dataclass
class Requant:
    """How layers without an exact GGUF type are re-quantized: the types tried in order (gguf-py's
    GGMLQuantizationType), the importance vectors by GGUF tensor name ([matrices, inputs] float32: one row, or
    one per expert), and which quantizer rounds ("ggml" or "gguf-py")."""

    types: tuple
    importance: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    quantizer: str = "gguf-py"
    by_module: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # measured: module name -> [inputs]

    def weighted(self) -> bool:
        """Whether any importance is known (measured or read)."""
        return bool(self.importance or self.by_module)

    def covers(self, gname: str, module: str) -> bool:
        """Whether the layer `module` (GGUF tensor `gname`) has an importance vector."""
        return module in self.by_module or gname in self.importance

    def type_for(self, in_features: int):
        """The first type whose block divides `in_features`, or None."""
        import gguf

        return next((t for t in self.types if in_features % gguf.GGML_QUANT_SIZES[t][0] == 0), None)

    def names(self) -> str:
        return ",".join(t.name for t in self.types)

    def quantize(self, w: np.ndarray, qtype, gname: str, expert: int | None = None, module: str = "") -> np.ndarray:
        """The rows of `w` ([rows, inputs] float32) as `qtype` blocks, [rows, bytes] uint8; weighted by the
        importance measured for `module`, else read for tensor `gname` (its row `expert` for stacked experts)."""
        import gguf

        if self.quantizer == "gguf-py":
            return gguf.quants.quantize(w, qtype)
        imp = self.by_module.get(module)
        if imp is None and (imp := self.importance.get(gname)) is not None:
            imp = imp[expert if expert is not None and len(imp) > 1 else 0]
        if imp is not None:
            if imp.shape[0] != w.shape[1]:
                raise ShrinkError(f"importance matrix: {gname} has {imp.shape[0]} inputs, the layer {w.shape[1]}")
        return _ggml_quantize(np.ascontiguousarray(w, dtype=np.float32), qtype, imp)


def plan(requantize: str | None, imatrix: str | Path | None = None, calibration: bool = False) -> Requant | None:
    """The Requant for `--requantize TYPE[,TYPE...]` and `--imatrix FILE` (None without --requantize), its
    importance to be measured where `calibration` (by `measure_importance`); ShrinkError, before any work, for
    a name that is no GGUF type, a type no quantizer here writes, a type that needs an importance matrix
    without one, or an imatrix file that cannot be read."""
    import gguf

    what = "--imatrix" if imatrix is not None else "--calibration" if calibration else None
    if imatrix is not None and calibration:
        raise ShrinkError("--imatrix and --calibration both give the importance of inputs: give one")
    if requantize is None:
        if what:
            raise ShrinkError(f"{what} weights the rounding of re-quantized layers: give --requantize TYPE too")
        return None
    types = []
    for name in (n.strip() for n in requantize.split(",")):
        try:
            types.append(gguf.GGMLQuantizationType[name.upper()])
        except KeyError:
            raise ShrinkError(f"--requantize {name!r}: not a GGUF type (e.g. Q4_0, Q5_0, Q4_K, IQ4_NL)") from None
    lib = _ggml()
    quantizer = "ggml" if lib is not None else "gguf-py"
    for t in types:
        if lib is None and t.name not in GGUF_PY_TYPES:
            raise ShrinkError(f"--requantize {t.name}: gguf-py quantizes only Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0; "
                              f"llama.cpp's quantizers write {t.name} ({LLAMA_CPP_HINT})")
        if lib is not None and lib.ggml_quantize_requires_imatrix(int(t)) and what is None:
            raise ShrinkError(f"--requantize {t.name}: llama.cpp rounds {t.name} only with an importance matrix; "
                              "give --calibration FILE (text) or --imatrix FILE (llama-imatrix's output)")
    importance = {}
    if what and lib is None:
        raise ShrinkError(f"{what}: gguf-py's quantizers take no importance; llama.cpp's do ({LLAMA_CPP_HINT})")
    if imatrix is not None:
        importance = read_imatrix(Path(imatrix))
    return Requant(tuple(types), importance, quantizer)


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """llama-imatrix's GGUF file: per tensor `NAME.in_sum2` [matrices, inputs] and `NAME.counts` [matrices];
    the importance is their ratio, the mean square input. ShrinkError naming the file otherwise."""
    import gguf

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ShrinkError(f"--imatrix {path}: {e.strerror}") from None
    if magic != b"GGUF":
        raise ShrinkError(f"--imatrix {path}: not a GGUF imatrix file (an older .dat one converts with "
                          f"`llama-imatrix --in-file {path.name} -o imatrix.gguf`)")
    try:
        tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in gguf.GGUFReader(str(path)).tensors}
    except Exception as e:  # noqa: BLE001 - any damage: one line naming the file
        raise ShrinkError(f"--imatrix {path}: cannot be read as GGUF ({e})") from None
    out = {}
    for key, sums in tensors.items():
        if not key.endswith(".in_sum2"):
            continue
        name = key[: -len(".in_sum2")]
        counts = tensors.get(f"{name}.counts")
        if counts is None:
            raise ShrinkError(f"--imatrix {path}: {key} has no {name}.counts beside it")
        sums = sums.reshape(counts.size, -1)
        out[name] = sums / np.maximum(counts.reshape(-1, 1), 1)
    if not out:
        raise ShrinkError(f"--imatrix {path}: no `.in_sum2` tensors: not llama-imatrix's output")
    return out


def measure_importance(module, calibration, tokenizer, n_samples: int, seq_len: int) -> dict[str, np.ndarray]:
    """The mean square input of every weight layer of `module` (module name -> [inputs] float32) over the
    calibration windows, as llama-imatrix measures it; with progress."""
    import torch
    from tqdm.auto import tqdm

    from ..quant import QuantLinear
    from ..quant.calibration import prepare

    data = prepare(calibration, tokenizer, module, n_samples, seq_len)
    sums: dict[str, list] = {}

    def hook(name):
        def record(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            acc = sums.setdefault(name, [torch.zeros(x.shape[1], dtype=torch.float64), 0])
            acc[0] += x.pow(2).sum(0, dtype=torch.float64)
            acc[1] += x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in module.named_modules()
               if isinstance(m, (QuantLinear, torch.nn.Linear))]
    try:
        with torch.no_grad():
            for ids in tqdm(data.samples, desc="importance", unit="window", disable=None):
                module(ids)
    finally:
        for h in handles:
            h.remove()
    return {n: (s / max(c, 1)).float().numpy() for n, (s, c) in sums.items()}


_LIB: list = []


def _ggml():
    """llama-cpp-python's libggml-base with the quantizer entry points typed, or None where it is not installed."""
    if _LIB:
        return _LIB[0]
    lib = None
    spec = importlib.util.find_spec("llama_cpp")
    path = Path(spec.origin).parent / "lib" / "libggml-base.so" if spec and spec.origin else None
    if path is not None and path.exists():
        try:
            lib = ctypes.CDLL(str(path))
            lib.ggml_quantize_chunk.restype = ctypes.c_size_t
            lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
            lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
            lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        except (OSError, AttributeError):
            lib = None
    _LIB.append(lib)
    return lib


def _ggml_quantize(w: np.ndarray, qtype, importance: np.ndarray | None) -> np.ndarray:
    """ggml_quantize_chunk over all rows of `w` (the caller has checked the block divides the rows)."""
    import gguf

    lib = _ggml()
    rows, n = w.shape
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.empty((rows, n // block * size), dtype=np.uint8)
    imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    lib.ggml_quantize_init(int(qtype))
    wrote = lib.ggml_quantize_chunk(int(qtype), w.ctypes.data, out.ctypes.data, 0, rows, n,
                                    None if imp is None else imp.ctypes.data)
    if wrote != out.nbytes:
        raise ShrinkError(f"ggml wrote {wrote} bytes of {qtype.name} where {out.nbytes} were expected")
    return out
