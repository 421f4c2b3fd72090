"""The package's seams, read from its source, imports inside functions included.

Folder rules (each folder of src/shrink, and what of shrink it may import besides itself):
- core: nothing (errors, paths, switches, atomic writes, output folders, readers, what a model is).
- data: core.            - quant, distillation: core.          - runtime: core, quant.
- evaluate: core, data, runtime (it asks the runtime for a decoder; never quant, distillation, io).
- io: core, data, quant, distillation, runtime.                  - report: core, evaluate.
- entrypoints (compare, distill, search, prepare): everything below them, never api nor cli.
- api: entrypoints, io, quant, runtime, core.                    - cli: all but api.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src" / "shrink"
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "quant": {"core"},
    "distillation": {"core"},
    "runtime": {"core", "quant"},
    "evaluate": {"core", "data", "runtime"},
    "io": {"core", "data", "quant", "distillation", "runtime"},
    "report": {"core", "evaluate"},
    "entrypoints": {"core", "data", "quant", "distillation", "runtime", "evaluate", "io", "report"},
    "api": {"core", "entrypoints", "io", "quant", "runtime"},
    "cli": {"core", "data", "quant", "distillation", "runtime", "evaluate", "io", "report", "entrypoints"},
}


def _imports(path: Path):
    """(absolute module imported, names imported, line) for each import in `path`, at any depth (inside
    functions too), relative ones resolved."""
    package = ["shrink", *path.relative_to(SRC).parent.parts]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - (node.level - 1)] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno


def _modules():
    return sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)


def _folder(path: Path) -> str:
    return path.relative_to(SRC).with_suffix("").parts[0]


def _targets(module: str, names: list[str]) -> list[str]:
    """The folders of shrink an import reaches: `from shrink import x` reaches x's folder (or the top)."""
    if module == "shrink":
        return [n if (SRC / n).is_dir() or (SRC / f"{n}.py").is_file() else "shrink" for n in names]
    if module.startswith("shrink."):
        return [module.split(".")[1]]
    return []


def test_every_folder_has_a_rule():
    folders = {_folder(p) for p in _modules()} - {"__init__"}
    assert folders == set(ALLOWED), f"folders without a rule, or rules without a folder: {folders ^ set(ALLOWED)}"


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_each_folder_imports_only_what_its_rule_allows(folder):
    bad = []
    for path in _modules():
        if _folder(path) != folder:
            continue
        for module, names, line in _imports(path):
            for t in _targets(module, names):
                if t != folder and t not in ALLOWED[folder]:
                    bad.append(f"{path.relative_to(SRC)}:{line} imports {module} ({t})")
    assert not bad, "\n".join(bad)


def test_the_rule_check_catches_a_forbidden_import(tmp_path):
    # the reader resolves a relative import two levels up to its folder, and one inside a function too
    found = {m: n for m, n, _ in _imports(SRC / "quant" / "calibration.py")}
    assert "shrink.core.errors" in found and "ShrinkError" in found["shrink.core.errors"]
    assert _targets("shrink.evaluate.paired", ["compare_models"]) == ["evaluate"]
    assert _targets("shrink", ["__version__"]) == ["shrink"]
    inner = [m for m, _, _ in _imports(SRC / "io" / "models.py")]
    assert "shrink.distillation.students" in inner or "shrink.distillation" in inner  # imported inside a function


def test_no_module_imports_a_private_name_of_another():
    bad = []
    for path in _modules():
        for module, names, line in _imports(path):
            if module.startswith("shrink"):
                bad += [f"{path.relative_to(SRC)}:{line}: {module}.{n}" for n in names
                        if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]
    assert not bad, "\n".join(bad)


def _module_name(path: Path) -> str:
    parts = ["shrink", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles_between_modules():
    """Every import of shrink's own modules, inside functions too: no module reaches itself again."""
    names = {_module_name(p): p for p in _modules()}
    graph = {}
    for name, path in names.items():
        deps = set()
        for module, imported, _ in _imports(path):
            if not module.startswith("shrink"):
                continue
            for a in imported or [None]:  # `from . import awq` imports the module awq
                deps.add(f"{module}.{a}" if a and f"{module}.{a}" in names else module)
        # a package's own __init__ is run by importing any module under it: not an edge back
        graph[name] = {d for d in deps if d in names and d != name and not name.startswith(d + ".")}
    cycles = _cycles(graph)
    assert not cycles, "\n".join(cycles)


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Each cycle met by a depth-first walk of `graph`, as "a -> b -> a"."""
    cycles, state = [], {}

    def visit(n, stack):
        state[n] = 1
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return cycles


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]
    assert _cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


@pytest.mark.parametrize("command, config, at_least", [("distill", "DistillConfig", 14), ("quantize", "GPTQ", 4),
                                                         ("search", "Constraints", 4)])
def test_commands_take_their_defaults_and_help_from_the_library(command, config, at_least):
    from dataclasses import fields

    from shrink.cli import main
    from shrink.distillation import DistillConfig
    from shrink.entrypoints.search import Constraints
    from shrink.quant.recipe import GPTQ

    params = {p.name: p for p in main.commands[command].params}
    cls = {"DistillConfig": DistillConfig, "GPTQ": GPTQ, "Constraints": Constraints}[config]
    shared = [f for f in fields(cls) if f.name in params and "help" in f.metadata]
    assert len(shared) >= at_least
    assert {f.name: params[f.name].default for f in shared} == {f.name: f.default for f in shared}
    assert {f.name: params[f.name].help for f in shared} == {f.name: f.metadata["help"] for f in shared}


def test_the_command_line_catches_only_shrink_errors_and_os_errors():
    from click.testing import CliRunner

    import shrink.cli.common as common
    from shrink.cli import main

    @main.command("boom-for-test", hidden=True)
    def boom():
        raise ValueError("a bug, not bad input")

    @main.command("bad-input-for-test", hidden=True)
    def bad():
        raise common.ShrinkError("model.layers.3: bad input")

    try:
        r = CliRunner().invoke(main, ["boom-for-test"])
        assert isinstance(r.exception, ValueError) and "a bug, not bad input" in str(r.exception)  # a traceback
        r = CliRunner().invoke(main, ["bad-input-for-test"])
        assert r.exit_code == 1 and "Error: model.layers.3: bad input" in r.output
    finally:
        del main.commands["boom-for-test"], main.commands["bad-input-for-test"]
