"""One verdict rule for compare and search: WITHIN / PAST / CANNOT TELL on constructed outcomes, said the
same way by both, and a task too small for any verdict said so before anything runs."""

import math
import warnings

import pytest

import shrink
from shrink.entrypoints.search import Candidate, CandidateResult, Constraints, judge
from shrink.entrypoints.search.frontier import explain
from shrink.entrypoints.search.records import Original
from shrink.evaluate.adapters import Adapter, Outcome
from shrink.evaluate.tasks import Example, Task
from shrink.evaluate.verdict import CANNOT_TELL, PAST, WITHIN, decide, examples_needed, status_of, too_small


class Scripted(Adapter):
    """A model whose score on example i is scripted: right (1.0) or wrong (0.0)."""

    kind = "scripted"
    tasks = ("generation",)

    def __init__(self, right: list[bool]):
        self.right = right

    def run(self, example, task, ids=None, scorer=None):
        ok = self.right[int(example.id)]
        return Outcome("a" if ok else "b", float(ok), confidence=float(int(example.id) % 7))


def _task(n: int) -> Task:
    return Task("scripted", "generation", [Example(str(i), "generation", f"question {i}", {"target": ["a"]})
                                           for i in range(n)])


def _compare(orig: list[bool], comp: list[bool], tolerance: float):
    return shrink.compare(Scripted(orig), Scripted(comp), _task(len(orig)), max_drop=tolerance, progress=False)


def test_all_equal_is_within():
    right = [i % 3 != 0 for i in range(400)]
    c = _compare(right, right, 1.0)
    assert c.status == WITHIN and c.within and c.needed is None
    assert c.verdict == ("WITHIN TOLERANCE (1 point, absolute): overall +0.0 points (95% CI +0.0…+0.0) on 400 "
                         "examples; the interval's worst end is within the tolerance and no slice lost significantly more")


def test_a_clear_loss_is_past():
    orig = [True] * 400
    comp = [i >= 60 for i in range(400)]  # 60 of 400 broke: -15 points, the whole interval past 1 point
    c = _compare(orig, comp, 1.0)
    assert c.status == PAST and not c.within
    assert c.verdict.startswith("PAST THE SWEET SPOT (1 point, absolute): overall -15.0 points (95% CI -18.")
    assert c.verdict.endswith("even the interval's best end loses more than the tolerance")


def test_one_flip_in_few_examples_cannot_tell_and_says_so_up_front():
    orig, comp = [True] * 40, [i != 7 for i in range(40)]
    with pytest.warns(UserWarning, match="a task of 40 examples is too small to judge a tolerance of 1 point, "
                                         "absolute: .* at least 300 examples are needed"):
        c = _compare(orig, comp, 1.0)
    assert c.status == CANNOT_TELL and not c.within
    assert c.overall.change == pytest.approx(-2.5) and c.overall.ci_low == pytest.approx(-7.5)
    assert "CANNOT TELL (1 point, absolute): overall -2.5 points (95% CI -7.5…+0.0) on 40 examples" in c.verdict
    # the interval halves with four times the examples: (3.75 / 1.5)^2 * 40 = 250
    assert c.needed == 250 and "about 250 examples would tell" in c.verdict
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = _compare([True] * 300, [i != 7 for i in range(300)], 1.0)  # 300 examples: enough, and no warning
    assert ok.status == WITHIN


def test_the_rule_and_its_edges():
    assert decide(-1.0, -2.0, 0.0, 2.0, 100, "t").status == WITHIN  # worst end exactly at the tolerance
    assert decide(-3.0, -4.0, -2.0001, 2.0, 100, "t").status == PAST
    assert decide(-2.0, -3.0, -1.0, 2.0, 100, "t").needed is None  # the change sits on the tolerance
    assert decide(0.0, 0.0, 0.0, 1.0, 10, "t", slice_past="the tag:hard slice lost 50 points").status == PAST
    assert decide(math.nan, 0.0, 0.0, 1.0, 10, "t").status == PAST
    assert examples_needed(1.0) == 300 and examples_needed(3.0) == 100 and too_small(410, 1.0, "t") is None
    assert status_of("CANNOT TELL (x)") == CANNOT_TELL and status_of("RECOMMENDED") is None


def test_search_says_the_same_verdict_as_compare():
    # what a search stores and prints for a candidate is compare's verdict, word for word; and judging the
    # stored record again (a resume) reaches the same status
    orig, comp = [True] * 40, [i != 7 for i in range(40)]
    with pytest.warns(UserWarning):
        c = _compare(orig, comp, 1.0)
    r = CandidateResult(Candidate("rtn:int4-g32", "rtn", "int4-g32"), "done", score=c.overall.compressed,
                        original_score=c.overall.original, change=c.overall.change, ci_low=c.overall.ci_low,
                        ci_high=c.overall.ci_high, within=c.within, verdict=c.verdict, size_bytes=50)
    con = Constraints(max_drop=1.0)
    judged = judge(r, con, c.allowed_drop())
    assert not judged.quality_ok
    line = explain(judged, con, Original("m", 100, 100))
    assert line.startswith("NOTHING MEETS") and c.verdict in line
    within = _compare([True] * 400, [True] * 400, 1.0)
    r2 = CandidateResult(Candidate("rtn:int8", "rtn", "int8"), "done", change=0.0, ci_low=0.0, ci_high=0.0,
                         within=True, verdict=within.verdict, size_bytes=60)
    line = explain(judge(r2, con, 1.0), con, Original("m", 100, 100))
    assert line.startswith("RECOMMENDED: rtn:int8") and line.endswith(within.verdict)


def test_a_record_from_before_verdict_lines_still_reads():
    # results.jsonl written by earlier versions holds "verdict": "within": the line says the numbers instead
    old = CandidateResult(Candidate("rtn:int8", "rtn", "int8"), "done", change=-0.5, ci_low=-0.9, ci_high=0.1,
                          within=True, verdict="within", size_bytes=60)
    con = Constraints(max_drop=1.0)
    line = explain(judge(old, con, 1.0), con, Original("m", 100, 100))
    assert line.endswith("Quality -0.5 points (95% CI -0.9…+0.1).") and "None" not in line
