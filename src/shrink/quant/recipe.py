"""Quantization methods as objects: a recipe of steps applied per block, parsed once from the strings the
CLI and the search use ("rtn", "gptq", "awq", "awq+gptq", each optionally after "rotate+" or "rotate-online+"
and followed by "+tune" or "+tuneN")."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..core.errors import ShrinkError

METHODS = ("rtn", "gptq", "awq", "awq+gptq")  # the base methods; shrink.json's "method" is one of them
ROTATED = ("rotate", "rotate+gptq", "rotate+awq", "rotate+awq+gptq")  # the same after a rotation
# and after a rotation with the down projections' inputs rotated online too (only shrink runs the result)
ROTATED_ONLINE = tuple(m.replace("rotate", "rotate-online", 1) for m in ROTATED)
DEFAULT_TUNE_STEPS = 32  # "+tune" without a count


@dataclass(frozen=True)
class AWQ:
    """Activation-aware scaling of each layer's inputs, folded into what feeds them (checked), and a search
    of each group's clipping range when GPTQ does not follow."""


@dataclass(frozen=True)
class GPTQ:
    """GPTQ: Hessian of the layer's inputs with dampening `damp` (a fraction of its mean diagonal),
    activation order (`act_order`, groups kept static), Hessians from the block's full-precision run unless
    `true_sequential`, and group scales re-solved for the chosen codes after (`refit`)."""

    damp: float = field(default=0.01, metadata={"help": "GPTQ: Hessian dampening, fraction of its mean diagonal."})
    act_order: bool = field(default=True, metadata={
        "help": "GPTQ: quantize columns in order of activation size (groups stay static, so the format is unchanged)."})
    true_sequential: bool = field(default=False, metadata={
        "help": "GPTQ: collect each layer's Hessian after the layers before it in its block are quantized, "
                "instead of from the block's full-precision run."})
    refit: bool = field(default=True, metadata={
        "help": "GPTQ: after rounding, solve each layer's group scales again for the codes it chose."})


@dataclass(frozen=True)
class Rotate:
    """Before the method: the residual stream and each attention head's values rotated by Hadamard matrices
    with random signs, folded into the weights (rotate.py; checked numerically), so outliers spread over
    every channel before rounding. The architecture is unchanged: the result saves, loads and exports as
    any other. With `online`, each MLP's down projection also has its input rotated as the model runs
    (online.py, QuaRot's R4): less error at 3 and 4 bits, but only shrink runs the result (no GGUF export,
    no transformers loading, decoding by transformers' generate)."""

    seed: int = field(default=0, metadata={"help": "Rotation: the seed of the random signs."})
    online: bool = field(default=False, metadata={
        "help": "Rotation: also rotate the down projections' inputs online (only shrink runs the result)."})


@dataclass(frozen=True)
class QAD:
    """After the method: quantization-aware distillation (qad.py): the quantized model's scales and norms
    trained end to end against the original's next-token distributions on data (codes fixed, or trained by a
    straight-through estimator with `codes_lr`), for `steps`
    Adam steps and/or `seconds`, whichever ends first; kept only if the held-out KL went down."""

    steps: int = field(default=0, metadata={"help": "QAD: Adam steps, one window each (0: as many as the time allows)."})
    seconds: float | None = field(default=None, metadata={"help": "QAD: time budget in seconds (None: steps alone)."})
    lr: float = field(default=1e-3, metadata={"help": "QAD: learning rate of the scales' relative changes."})
    top_k: int = field(default=64, metadata={"help": "QAD: the teacher's top k tokens the KL is taken over."})
    codes_lr: float = field(default=0.0, metadata={
        "help": "QAD: also train the integer codes through a straight-through estimator, at this learning rate in "
                "units of a code step (0: codes fixed; 5e-3 moves a code by at most one in about 100 steps)."})

    def __post_init__(self):
        def count(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0
        if not count(self.steps) or not (self.seconds is None or (isinstance(self.seconds, (int, float))
                                                                   and 0 < self.seconds < float("inf"))):
            raise ShrinkError(f"QAD(steps={self.steps!r}, seconds={self.seconds!r}): steps must be an integer >= 0, "
                              "seconds a positive number or None")
        if not self.steps and self.seconds is None:
            raise ShrinkError("QAD needs a budget: steps=N or seconds=S (or both: whichever ends first)")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1) or not (count(self.top_k) and self.top_k >= 1):
            raise ShrinkError(f"QAD(lr={self.lr!r}, top_k={self.top_k!r}): lr must be in (0, 1), top_k an integer >= 1")
        if not (isinstance(self.codes_lr, (int, float)) and 0 <= self.codes_lr < 1):
            raise ShrinkError(f"QAD(codes_lr={self.codes_lr!r}): must be in [0, 1) (0: the codes stay fixed)")


MAX_TUNE_STEPS = 100_000  # far past where tuning stops paying (32 is a good value); a bound on the work


@dataclass(frozen=True)
class Tune:
    """Block tuning after the method: each block's fp16 scales and norm weights (codes fixed), `steps`
    Adam steps against the full-precision block's output."""

    steps: int = field(default=DEFAULT_TUNE_STEPS, metadata={
        "help": "After a calibrated method, tune each block's scales and norm weights (codes fixed) by this many "
                "steps against the full-precision block's output (0: off)."})


@dataclass(frozen=True)
class Recipe:
    """The steps of a quantization: round-to-nearest alone when all are None."""

    awq: AWQ | None = None
    gptq: GPTQ | None = None
    tune: Tune | None = None
    rotate: Rotate | None = None
    qad: QAD | None = None

    @property
    def method(self) -> str:
        """The base method's name (one of METHODS)."""
        return "+".join(n for n, s in (("awq", self.awq), ("gptq", self.gptq)) if s is not None) or "rtn"

    @property
    def name(self) -> str:
        """The recipe as a string parse_method reads back ("awq+gptq+tune32", "rotate+gptq", "rotate")."""
        base = self.method + (f"+tune{self.tune.steps}" if self.tune else "")
        if self.rotate is None:
            return base
        rotate = "rotate-online" if self.rotate.online else "rotate"
        return rotate if base == "rtn" else f"{rotate}+{base}"

    @property
    def calibrated(self) -> bool:
        return self.method != "rtn" or self.tune is not None


def parse_method(method: str | Recipe | list, *, damp: float = GPTQ.damp, act_order: bool = GPTQ.act_order,
                 tune_steps: int = 0, true_sequential: bool = GPTQ.true_sequential, refit: bool = GPTQ.refit) -> Recipe:
    """The Recipe of a method string, of a list of method objects in the order they run ([Rotate(), AWQ(),
    GPTQ(), Tune()]), or a Recipe (returned as is). A string is one of METHODS, optionally after "rotate+"
    or "rotate-online+" ("rotate" alone: rotation, then round to nearest) and followed by "+tune" (DEFAULT_TUNE_STEPS steps) or
    "+tuneN". damp, act_order, true_sequential and refit configure GPTQ (defaults: GPTQ's); tune_steps > 0
    adds tuning to a string without it. ShrinkError naming the methods for anything else."""
    if isinstance(method, Recipe):
        return method
    if isinstance(method, (list, tuple)):
        return _from_steps(method)
    m = re.fullmatch(r"(rotate(?:-online)?\+?)?(rtn|gptq|awq|awq\+gptq)?(?:\+tune(\d*))?", method) \
        if isinstance(method, str) else None
    # a rotation before a method ends in "+", one alone does not; "" is no method
    if m is None or not (m.group(1) or m.group(2)) or (m.group(1) and m.group(1).endswith("+") != bool(m.group(2))):
        raise ShrinkError(f"unknown method {method!r}: available methods are {', '.join(METHODS)}, each optionally "
                         "after 'rotate+' or 'rotate-online+' ('rotate' alone: rotation and round to nearest), a "
                         "calibrated one may end in +tune or +tuneN")
    rotate, base, tune = m.group(1), m.group(2) or "rtn", m.group(3)
    if tune is not None and base == "rtn":
        raise ShrinkError(f"method {method!r}: tuning needs a calibrated method (gptq, awq, awq+gptq)")
    steps = (int(tune) if tune else DEFAULT_TUNE_STEPS) if tune is not None else tune_steps
    if tune is not None and tune_steps and tune_steps != steps:
        raise ShrinkError(f"method {method!r} and tune_steps={tune_steps} disagree; give the steps once")
    return Recipe(awq=AWQ() if base.startswith("awq") else None,
                  gptq=GPTQ(damp, act_order, true_sequential, refit) if base.endswith("gptq") else None,
                  tune=Tune(steps) if steps else None,
                  rotate=Rotate(online=rotate.startswith("rotate-online")) if rotate else None)


def _from_steps(steps) -> Recipe:
    """A Recipe from method objects in the order they run: Rotate, AWQ, GPTQ, Tune, then QAD, each at most once."""
    kinds = {Rotate: "rotate", AWQ: "awq", GPTQ: "gptq", Tune: "tune", QAD: "qad"}
    order = list(kinds)
    found: dict[str, object] = {}
    last = -1
    for step in steps:
        kind = kinds.get(type(step))
        if kind is None:
            raise ShrinkError(f"method step {step!r}: expected Rotate(), AWQ(), GPTQ(...), Tune(...) or QAD(...)")
        if kind in found:
            raise ShrinkError(f"method steps: {type(step).__name__} given twice")
        if order.index(type(step)) < last:
            raise ShrinkError(f"method steps: {type(step).__name__} must come before "
                              f"{', '.join(type(s).__name__ for s in found.values())} (they run Rotate, AWQ, GPTQ, Tune, QAD)")
        last = order.index(type(step))
        found[kind] = step
    if "tune" in found and not ("awq" in found or "gptq" in found):
        raise ShrinkError("method steps: Tune needs a calibrated method before it (AWQ() or GPTQ())")
    return Recipe(awq=found.get("awq"), gptq=found.get("gptq"), tune=found.get("tune"), rotate=found.get("rotate"),
                  qad=found.get("qad"))
