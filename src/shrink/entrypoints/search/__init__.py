"""Search for the sweet spot: candidates across quantization, distillation and both, measured on the
user's task against their constraints, the Pareto frontier, and one recommended model.

This part uses the others (quant, distill, evaluate, io, report); none of them uses it.
"""

from .candidates import Candidate, order, quantization_candidates, skip_reason, student_candidates
from .constraints import Constraints, parse_duration, parse_latency, parse_size
from .frontier import explain, judge, pareto, recommend
from .records import CandidateResult, Judgement, Original, Skipped, TaskSummary
from .run import SearchResult, min_possible_bytes, search

__all__ = ["Candidate", "CandidateResult", "Constraints", "Judgement", "Original", "SearchResult", "Skipped", "TaskSummary", "explain", "judge", "min_possible_bytes", "order", "pareto",
           "parse_duration", "parse_latency", "parse_size", "quantization_candidates", "recommend", "search",
           "skip_reason", "student_candidates"]
