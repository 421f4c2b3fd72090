"""The records a search passes between its steps and writes to its files: what a candidate measured,
how it was judged against the constraints, what was skipped, and the original's measurements.

Each record is a dataclass read by attribute. `to_json()` gives the form stored in results.jsonl and
results.json (the same keys in the same order as before these records existed, so files written by
earlier versions resume), and `from_json` reads it back. `record["key"]` and `record.get("key")` read that
stored form too, for code written against the dicts a search used to return.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from .candidates import Candidate


class _ReadsAsJson:
    """`r["key"]`/`r.get("key")` read `r.to_json()`: the stored form, for code that reads results as dicts."""

    def to_json(self) -> dict:
        raise NotImplementedError

    def __getitem__(self, key: str):
        return self.to_json()[key]

    def get(self, key: str, default=None):
        return self.to_json().get(key, default)


@dataclass(frozen=True)
class Judgement(_ReadsAsJson):
    """A measured candidate against the constraints: the tolerance it was judged with (in the task's
    unit, kept so a resumed search judges again alike) and what it misses, by how much ("quality":
    points beyond the tolerance; "size"/"latency": fraction over the limit). Empty `miss`: it qualifies."""

    allowed: float
    miss: dict[str, float] = field(default_factory=dict)

    @property
    def quality_ok(self) -> bool:
        return "quality" not in self.miss

    @property
    def qualifies(self) -> bool:
        return not self.miss

    def to_json(self) -> dict:
        return {"allowed": self.allowed, "quality_ok": self.quality_ok, "miss": dict(self.miss),
                "qualifies": self.qualifies}


@dataclass(frozen=True)
class CandidateResult(_ReadsAsJson):
    """One finished candidate: status "done" with its measurements (quality change and 95% interval in
    the task's unit, size on disk, memory, latency, the examples it broke and fixed) and, once judged, its
    `judgement`; or status "error" with the error that stopped it being built or run."""

    candidate: Candidate
    status: str  # "done" or "error"
    score: float | None = None
    original_score: float | None = None
    change: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    within: bool | None = None  # no slice past the sweet spot (the comparison's verdict)
    verdict: str | None = None
    slices_past: list[str] = field(default_factory=list)
    slices: dict[str, float] = field(default_factory=dict)
    size_bytes: int | None = None
    memory_bytes: int | None = None
    latency_example: float | None = None
    latency_token: float | None = None
    broke: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    # the first examples it broke: id, input, target, and the original's and this candidate's answers
    broke_examples: list[dict] = field(default_factory=list)
    kl_mean: float | None = None
    errors: int = 0  # examples that raised
    build_seconds: float | None = None
    seconds: float | None = None
    original_latency_example: float | None = None
    error: str | None = None
    judgement: Judgement | None = None

    @property
    def name(self) -> str:
        return self.candidate.name

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def qualifies(self) -> bool:
        return self.judgement is not None and self.judgement.qualifies

    @property
    def quality_ok(self) -> bool:
        return self.judgement is not None and self.judgement.quality_ok

    @property
    def miss(self) -> dict[str, float]:
        return dict(self.judgement.miss) if self.judgement is not None else {}

    def cost(self, name: str) -> float | None:
        """A measured cost by its stored name: "size_bytes", "latency_example" or "latency_token"."""
        if name not in ("size_bytes", "memory_bytes", "latency_example", "latency_token"):
            raise ValueError(f"cost {name!r}: choose size_bytes, memory_bytes, latency_example or latency_token")
        return getattr(self, name)

    def judged(self, judgement: Judgement) -> "CandidateResult":
        return replace(self, judgement=judgement)

    @classmethod
    def failed(cls, candidate: Candidate, error: str) -> "CandidateResult":
        return cls(candidate, "error", error=error)

    def to_json(self) -> dict:
        head = {"candidate": self.candidate.to_dict(), "status": self.status}
        if not self.done:
            return {**head, "error": self.error}
        measured = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_MEASURED
                    and not (f.name == "broke_examples" and not self.broke_examples)}  # as files before it hold
        return {**head, **measured, **(self.judgement.to_json() if self.judgement is not None else {})}

    @classmethod
    def from_json(cls, d: dict) -> "CandidateResult":
        """From a results.jsonl line (checked by the reader; unknown keys are ignored)."""
        cand = Candidate.from_dict(d["candidate"])
        if d.get("status") != "done":
            return cls.failed(cand, d.get("error") or "")
        measured = {f.name: d[f.name] for f in fields(cls) if f.name not in _NOT_MEASURED and f.name in d}
        judgement = Judgement(d["allowed"], dict(d.get("miss") or {})) if "allowed" in d else None
        return cls(cand, "done", **measured, judgement=judgement)


_NOT_MEASURED = ("candidate", "status", "error", "judgement")


@dataclass(frozen=True)
class Skipped(_ReadsAsJson):
    """A candidate not measured, and why (a wider one of its direction failed, or one as narrow qualified)."""

    candidate: str
    reason: str

    def to_json(self) -> dict:
        return {"candidate": self.candidate, "reason": self.reason}


@dataclass
class Original(_ReadsAsJson):
    """The original model's measurements: size of its saved folder, memory, latency per token (a language
    model) and, from the first comparison, per example and its score on the task."""

    name: str
    size_bytes: int
    memory_bytes: int
    latency_token: float | None = None
    latency_example: float | None = None
    score: float | None = None

    def to_json(self) -> dict:
        out = {"name": self.name, "size_bytes": self.size_bytes, "memory_bytes": self.memory_bytes,
               "latency_token": self.latency_token, "latency_example": self.latency_example}
        return out if self.score is None else {**out, "score": self.score}


@dataclass(frozen=True)
class TaskSummary(_ReadsAsJson):
    """The task a search measured on, as its report names it."""

    name: str
    kind: str
    source: str | None
    examples: int

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "source": self.source, "examples": self.examples}


__all__ = ["CandidateResult", "Judgement", "Original", "Skipped", "TaskSummary"]
