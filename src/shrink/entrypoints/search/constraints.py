"""What the user asks of a compressed model: a quality tolerance, a size, a latency, and a search budget.

Sizes and times are read the way people write them ("60MB", "60 MB", "60mb", "6e7"; "50ms", "2s",
"20ms/token") and anything else is refused with an example of the right form.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from ...core.errors import ShrinkError

_SIZE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
               "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_TIME_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "m": 60.0, "min": 60.0, "h": 3600.0}
_NUMBER = r"(\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+(?:e[+-]?\d+)?)"


def parse_size(text: str | float | int, what: str = "--max-size") -> int:
    """Bytes from "60MB", "60 MB", "60mb", "1.5GiB", "6e7" or a number. Decimal units (MB = 10^6 bytes),
    binary with an i (MiB = 2^20). Raises ShrinkError with an example of the right form."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(_NUMBER + r"\s*([a-z]*)", str(text).strip().lower())
        if not m or m.group(2) not in _SIZE_UNITS:
            raise ShrinkError(f"{what} {text!r}: not a size; write it like 60MB, 60 MB, 1.5GiB or 6e7 (bytes)")
        value = float(m.group(1)) * _SIZE_UNITS[m.group(2)]
    if not math.isfinite(value) or value >= 2 ** 63:
        raise ShrinkError(f"{what} {text!r}: too large a size; write it like 60MB, 60 MB, 1.5GiB or 6e7 (bytes)")
    if not value > 0:
        raise ShrinkError(f"{what} {text!r}: a size must be more than 0 bytes")
    return int(round(value))


def parse_latency(text: str | float, what: str = "--max-latency") -> tuple[float, str]:
    """(seconds, "example" or "token") from "50ms", "2s", "0.3" (seconds per example), "20ms/token",
    "20 ms per token". Raises ShrinkError with an example of the right form."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit, per = float(text), "", "example"
    else:
        m = re.fullmatch(_NUMBER + r"\s*([a-zµ]*)\s*(?:(?:/|per)\s*(example|token|tok))?", str(text).strip().lower())
        if not m or m.group(2) not in _TIME_UNITS:
            raise ShrinkError(f"{what} {text!r}: not a latency; write it like 50ms, 2s (per example) or 20ms/token")
        value, unit = float(m.group(1)), m.group(2)
        per = "token" if (m.group(3) or "").startswith("tok") else "example"
    seconds = value * _TIME_UNITS[unit]
    if not math.isfinite(seconds) or seconds > 1e9:
        raise ShrinkError(f"{what} {text!r}: too long a time (at most 10^9 seconds); write it like 50ms, 2s or 10m")
    if not seconds > 0:
        raise ShrinkError(f"{what} {text!r}: a latency must be more than 0")
    return seconds, per


def parse_duration(text: str | float, what: str = "--time") -> float:
    """Seconds from "10m", "90s", "1.5h", "600"."""
    try:
        seconds, per = parse_latency(text, what)
    except ShrinkError:
        per = None
    if per != "example":
        raise ShrinkError(f"{what} {text!r}: a time budget is a duration, like 10m, 90s or 1.5h")
    return seconds


@dataclass
class Constraints:
    """The user's constraints on a candidate and on the search.

    max_drop: quality the candidate may lose, in points (absolute, default 1.0), or in percent of the
    original's score with relative=True (perplexity tasks: percent of perplexity). A candidate qualifies
    only when the lower end of its 95% interval is within it and no slice is past the sweet spot.
    max_size: bytes on disk (None: any). max_latency: seconds per example or per token (latency_per),
    measured on this machine (None: any). objective: what the recommendation minimises among qualifying
    candidates, "size" (default) or "latency". time: seconds the search may spend (None: no limit);
    max_trials: candidates it may measure (None: no limit).
    """

    max_drop: float = field(default=1.0, metadata={
        "help": "Quality the compressed model may lose, in points (0-100), at the far end of its 95% interval; "
                "with --relative, percent of the original's score."})
    relative: bool = field(default=False, metadata={"help": "--max-drop is a percentage of the original's score."})
    max_size: int | None = None
    max_latency: float | None = None
    latency_per: str = "example"
    objective: str = field(default="size", metadata={
        "help": "What the recommendation minimises among the candidates that qualify: size or latency."})
    time: float | None = None
    max_trials: int | None = field(default=None, metadata={"help": "Measure at most this many candidates."})

    def __post_init__(self):
        problems = []
        if not self.max_drop >= 0:
            problems.append(f"max_drop must be 0 or more (got {self.max_drop})")
        if self.objective not in ("size", "latency"):
            problems.append(f"objective must be 'size' or 'latency' (got {self.objective!r})")
        if self.latency_per not in ("example", "token"):
            problems.append(f"latency_per must be 'example' or 'token' (got {self.latency_per!r})")
        if self.max_trials is not None and self.max_trials < 1:
            problems.append(f"max_trials must be at least 1 (got {self.max_trials})")
        if self.time is not None and not self.time > 0:
            problems.append(f"time must be more than 0 seconds (got {self.time})")
        if problems:
            raise ShrinkError("search constraints: " + "; ".join(problems))

    @classmethod
    def of(cls, max_drop: float = 1.0, relative: bool = False, max_size=None, max_latency=None,
           objective: str = "size", time=None, max_trials: int | None = None) -> "Constraints":
        """Constraints from values as people write them: max_size "60MB" or bytes, max_latency "50ms",
        "20ms/token" or seconds per example, time "10m" or seconds."""
        lat, per = parse_latency(max_latency) if max_latency is not None else (None, "example")
        return cls(max_drop=max_drop, relative=relative, max_size=parse_size(max_size) if max_size is not None else None,
                   max_latency=lat, latency_per=per, objective=objective,
                   time=parse_duration(time) if time is not None else None, max_trials=max_trials)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def times_examples_alone(self) -> bool:
        """Whether a latency per example is a limit or the objective: then examples are measured one at a
        time (their latency), else in batches (each example's time is its share of a batch's)."""
        return self.latency_per == "example" and (self.max_latency is not None or self.objective == "latency")

    def describe(self) -> str:
        """One line, as people say it: "quality within 1 point, at most 60.0 MB, ...". """
        drop = f"{self.max_drop:g}% of the original score" if self.relative else f"{self.max_drop:g} points"
        parts = [f"quality within {drop}"]
        if self.max_size is not None:
            parts.append(f"at most {human_bytes(self.max_size)} on disk")
        if self.max_latency is not None:
            parts.append(f"at most {_ms(self.max_latency)} per {self.latency_per}")
        parts.append(f"smallest {'size' if self.objective == 'size' else 'latency'} first")
        return ", ".join(parts)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def human_bytes(n: float) -> str:
    """1234567 -> "1.2 MB" (decimal units, as --max-size reads them)."""
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= f:
            return f"{n / f:,.1f} {unit}"
    return f"{int(n)} B"
