"""Candidates of a search: what to try, in which order, and how to build each from the original model.

A candidate is a way to build a model: quantize the original (a format, or a bit budget for mixed precision, with a
method), distill a student from it, or both (distill, then quantize the student). The order puts cheap,
likely-good candidates first: round-to-nearest from 8 bits down, then calibrated methods where
round-to-nearest fell short, then mixed precision, then students. Each candidate belongs to a
direction (a method on a model, widest first); once one fails the quality bar, the narrower ones in
its direction are not tried.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch.nn as nn

from ...core.errors import ShrinkError
from ...evaluate.verdict import CANNOT_TELL, status_of
from ...quant import MixedPrecision, parse_format, parse_method, quantize
from ...quant.kmix import is_mix
from ...quant.recipe import DEFAULT_TUNE_STEPS
from ...quant.spec import SUPERBLOCK

METHODS_CALIBRATED = ("gptq", "awq", "awq+gptq", "gptq+tune", "awq+gptq+tune")
TUNE_STEPS = DEFAULT_TUNE_STEPS  # block tuning steps of the "+tune" methods (shrink.quantize's tune_steps)
RTN_FORMATS = ("int8", "int4-g32", "int4-g64", "int3-g32", "int2-g32")
CALIBRATED_FORMATS = ("int4-g32", "int4-g64", "int3-g32", "int2-g32")
MIXED_BITS = (6.0, 4.5, 3.5)
# judged in llama.cpp, a candidate must be a GGUF type's exact copy: Q8_0, llama.cpp's K-quant mixes (Q4_K_M ...;
# on layers whose inputs are not a multiple of 256, llama.cpp's own fallbacks), IQ4_NL and Q4_0 (no mixed
# precision: its ladder's per-channel formats have no GGUF type)
LLAMA_CPP_FORMATS = ("int8-g32", "q6k", "q5k-m", "q4k-m", "iq4nl-g32", "int4-g32", "q3k-m", "q2k-m")
LLAMA_CPP_CALIBRATED = ("q5k-m", "q4k-m", "iq4nl-g32", "q3k-m", "q2k-m")
MIX_EXTRA_BITS = {"s": 0.1, "m": 0.4, "l": 0.7}  # a mix's bits over its base type, for ordering (llama.cpp's
# files of Llama-3-8B: Q4_K_M 4.89 bits per weight, Q3_K_M 3.91, Q5_K_M 5.70)
STUDENT_FORMATS = ("int8", "int4-g32")
TYPICAL_IN_FEATURES = 576  # for ordering only: per-channel scales cost 16 bits per row of this width


@dataclass(frozen=True)
class Candidate:
    """One way to build a model. name is unique in a search ("rtn:int4-g64", "awq+gptq:mixed-4.5",
    "student:every-other", "student:every-other+rtn:int8")."""

    name: str
    method: str | None = "rtn"  # None: the student as trained, not quantized
    format: str | None = None
    target_bits: float | None = None
    student: str | None = None  # student spec (see shrink.distill); None: the original model

    @property
    def bits(self) -> float:
        """Expected bits per quantized weight, for ordering (16 when nothing is quantized)."""
        if self.target_bits is not None:
            return self.target_bits
        if self.format is None:
            return 16.0
        if is_mix(self.format):
            base, _, size = self.format.lower().partition("-")
            return parse_format(base).bits_per_weight(SUPERBLOCK) + MIX_EXTRA_BITS[size]
        return parse_format(self.format).bits_per_weight(TYPICAL_IN_FEATURES)

    @property
    def direction(self) -> str:
        """Candidates that share a direction get narrower along it; a failure stops the rest of it."""
        base = f"student:{self.student}" if self.student else "original"
        kind = "mixed" if self.target_bits is not None else "uniform"
        return f"{base}|{self.method or 'none'}|{kind}"

    @property
    def needs_calibration(self) -> bool:
        return self.method not in (None, "rtn") or self.target_bits is not None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        return cls(**{k: d.get(k) for k in ("name", "method", "format", "target_bits", "student")})


def quantization_candidates(formats=RTN_FORMATS, methods=("awq+gptq",), calibrated_formats=CALIBRATED_FORMATS,
                            mixed_bits=MIXED_BITS, calibration: bool = False, mixed_method: str = "awq",
                            student: str | None = None, llama_cpp: bool = False) -> list[Candidate]:
    """The quantization ladder: rtn at `formats` (widest first); with calibration, each of `methods` at
    `calibrated_formats` and mixed precision (`mixed_method`) at each of `mixed_bits`. llama_cpp: the ladder
    of what GGUF types hold exactly instead (LLAMA_CPP_FORMATS, LLAMA_CPP_CALIBRATED, no mixed precision)."""
    if llama_cpp:
        formats, calibrated_formats, mixed_bits = LLAMA_CPP_FORMATS, LLAMA_CPP_CALIBRATED, ()
    prefix = f"student:{student}+" if student else ""
    out = [Candidate(f"{prefix}rtn:{f}", "rtn", f, student=student) for f in formats]
    if calibration:
        for m in methods:
            out += [Candidate(f"{prefix}{m}:{f}", m, f, student=student) for f in calibrated_formats]
        out += [Candidate(f"{prefix}{mixed_method}:mixed-{b:g}", mixed_method, None, b, student=student)
                for b in mixed_bits]
    return out


def student_candidates(students, formats=STUDENT_FORMATS) -> list[Candidate]:
    """Each student as trained, then quantized (rtn) at `formats`."""
    out = []
    for s in students:
        out.append(Candidate(f"student:{s}", None, None, None, s))
        out += [Candidate(f"student:{s}+rtn:{f}", "rtn", f, None, s) for f in formats]
    return out


def order(candidates: list[Candidate]) -> list[Candidate]:
    """Cheap and likely-good first: the original's rtn ladder, then calibrated methods, then mixed
    precision, then students; widest first within each. Stable for equal keys."""
    def key(c: Candidate):
        stage = 3 if c.student else 0 if c.method == "rtn" else 2 if c.target_bits is not None else 1
        student_stage = 0 if c.method is None else 1
        return (stage, c.student or "", student_stage, -c.bits)
    return sorted(candidates, key=key)


def skip_reason(c: Candidate, done: list, objective: str) -> str | None:
    """Why `c` need not be measured, given the finished results (`CandidateResult`s), or None.

    - a wider candidate of its direction is already past the sweet spot (a verdict of CANNOT TELL does not
      close a direction: the narrower one may still be told apart);
    - its student is past the sweet spot (a quantized student cannot do better than the student);
    - optimising size, a candidate that qualified is already no wider than this one would be.
    """
    for r in done:
        if not r.done or r.quality_ok or status_of(r.verdict) == CANNOT_TELL:
            continue
        rc = r.candidate
        if rc.direction == c.direction and rc.bits >= c.bits:
            return f"{rc.name} is already past the sweet spot"
        if c.student and rc.student == c.student and rc.method is None and c.method is not None:
            return f"its student {rc.name} is already past the sweet spot"
    if objective == "size" and not c.student:
        qualifying_bits = [r.candidate.bits for r in done if r.done and r.qualifies and not r.candidate.student]
        if qualifying_bits and min(qualifying_bits) <= c.bits:
            return f"a qualifying candidate of {min(qualifying_bits):.2f} bits per weight is already no wider"
    return None


def build(c: Candidate, original: nn.Module, *, students: dict[str, nn.Module], calibration=None, tokenizer=None,
          n_samples: int = 128, seq_len: int = 512, progress: bool | None = None) -> nn.Module:
    """The candidate's model: a copy of the original (or of its trained student) quantized by its method.
    `students` maps student specs to trained students (see `search.run`); calibration and tokenizer feed
    calibrated methods (n_samples windows of seq_len tokens)."""
    base = students[c.student] if c.student else original
    model = copy.deepcopy(base)
    if c.method is None:
        return model
    kw = {}
    if c.needs_calibration:
        if calibration is None:
            raise ShrinkError(f"candidate {c.name}: needs calibration data")
        kw = dict(calibration=calibration, tokenizer=tokenizer, n_samples=n_samples, seq_len=seq_len)
    method = parse_method(c.method)  # "+tune" adds block tuning (TUNE_STEPS)
    if c.target_bits is not None:
        return quantize(model, MixedPrecision(c.target_bits), method=method, progress=progress, **kw)
    # a K-quant given to every layer by a pattern: a layer whose inputs are not a multiple of 256 gets llama.cpp's
    # fallback for it (given by name, it would be refused)
    kquant = not is_mix(c.format) and parse_format(c.format).kquant
    return quantize(model, {"*": c.format} if kquant else c.format, method=method, progress=progress, **kw)
