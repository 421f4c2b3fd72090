"""The built-in task: read and validated like any task file, of several kinds, tagged by difficulty measured
on the original, and sharing no text with the demo's calibration text."""

import json
from importlib import resources

from shrink.evaluate import builtin_task, load_task
from shrink.evaluate.tasks import read_jsonl


def test_the_builtin_task_is_a_task_file_of_several_kinds():
    task = load_task(None)
    assert task.name == "default" and task.kind == "mixed" and len(task.examples) >= 400
    assert task.source.endswith(".jsonl") and read_jsonl(task.source).kind == "mixed"  # validated by the reader
    kinds = {k: sum(e.kind == k for e in task.examples) for k in task.kinds()}
    assert kinds["generation"] >= 100 and kinds["choice"] >= 200
    cloze = [e for e in task.examples if "cloze" in e.tags]
    assert len(cloze) >= 100 and all(e.data["chat"] is False for e in cloze)
    assert all(c.startswith(" ") for e in cloze for c in e.data["choices"])
    assert load_task(None).source == task.source  # written once, the same file after


def test_difficulty_was_measured_on_these_very_examples():
    record = json.loads(resources.files("shrink.data").joinpath("default_task_difficulty.json").read_text())
    task = load_task(None)
    assert set(record["tags"]) == {e.id for e in task.examples}, "run scripts/measure_default_task.py again"
    assert set(record["tags"].values()) == {"easy", "hard", "missed"}
    for e in task.examples:
        assert e.tags[0] == record["tags"][e.id]


def test_calibration_text_and_examples_share_no_text():
    calibration = builtin_task.calibration_text()
    task = load_task(None)
    bbc = [e for e in task.examples if "cloze" in e.tags or "headlines" in e.tags]
    assert len(bbc) >= 150
    for e in bbc:
        text = e.input if "cloze" in e.tags else e.input.split('"')[1]  # the opening, or the headline
        assert text not in calibration, e.id
    for title, body in (a for arts in builtin_task.task_articles().values() for a in arts):
        assert body[:200] not in calibration and title not in calibration.split("\n")
