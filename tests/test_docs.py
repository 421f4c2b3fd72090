"""The README is a front door whose links lead somewhere, and every benchmark result the docs cite exists."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_links_between_the_pages_exist():
    broken = [f"{page.name}: {x}" for page in PAGES for x in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text())
              if not (page.parent / x).is_file()]
    assert not broken, broken
    assert len(re.findall(r"\]\(docs/", (ROOT / "README.md").read_text())) >= 8  # the front door leads to the docs


def test_every_cited_benchmark_result_exists_and_parses():
    cited = {(page.name, m) for page in PAGES for m in re.findall(r"results/([A-Za-z0-9_.-]+\.json)", page.read_text())}
    assert cited, "the benchmarks page cites its results"
    missing = [f"{page}: results/{name}" for page, name in sorted(cited)
               if not (ROOT / "benchmarks" / "results" / name).is_file()]
    assert not missing, missing
    for _, name in cited:
        json.loads((ROOT / "benchmarks" / "results" / name).read_text())


def test_every_benchmark_script_the_docs_run_exists():
    scripts = {m for page in PAGES for m in re.findall(r"benchmarks/([a-z_0-9]+\.py)", page.read_text())}
    assert scripts and not [s for s in scripts if not (ROOT / "benchmarks" / s).is_file()]


def test_every_environment_switch_is_listed_with_its_default():
    from shrink.core.switches import SWITCHES

    text = (ROOT / "docs" / "cli.md").read_text()
    for name, (default, what) in SWITCHES.items():
        assert f"| `{name}` | {default} | {what} |" in text, name
    # and nothing else in shrink reads the environment
    src = ROOT / "src" / "shrink"
    readers = [p.relative_to(src).as_posix() for p in src.rglob("*.py")
               if "os.environ.get(" in p.read_text() or "os.environ[" in p.read_text() or "getenv(" in p.read_text()]
    assert readers == ["core/switches.py"], readers
