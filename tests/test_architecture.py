"""The package's seams, read from its source: the parts that do the work (quant, distill, evaluate) import
neither each other nor the parts above them, and no module imports another's private names."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src" / "shrink"
PARTS = ("quant", "distill", "evaluate")
ABOVE = ("search", "io", "report", "cli", "comparing", "distilling", "outdir", "runtime")  # what may use the parts, not the reverse


def _imports(path: Path):
    """(absolute module imported, names imported) for each import in `path`, relative ones resolved."""
    package = ["shrink", *path.relative_to(SRC).parent.parts]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - (node.level - 1)] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _modules():
    return sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("part", PARTS)
def test_the_working_parts_depend_on_nothing_above_them_nor_on_each_other(part):
    forbidden = [f"shrink.{p}" for p in ABOVE + tuple(x for x in PARTS if x != part)]
    bad = []
    for path in sorted((SRC / part).rglob("*.py")):
        for module, names in _imports(path):
            targets = [module] + [f"{module}.{n}" for n in names] if module == "shrink" else [module]
            for t in targets:
                if any(t == f or t.startswith(f + ".") for f in forbidden):
                    bad.append(f"{path.relative_to(SRC)} imports {t}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layer, forbidden", [
    ("search", ("shrink.api", "shrink.cli")),
    # the decoding runtime runs models the parts made; loaders and the verbs hand models to it
    ("runtime", ("shrink.api", "shrink.cli", "shrink.search", "shrink.comparing", "shrink.distilling", "shrink.io",
                 "shrink.report", "shrink.evaluate", "shrink.distill")),
    ("comparing", ("shrink.api", "shrink.cli", "shrink.search")),
    ("distilling", ("shrink.api", "shrink.cli", "shrink.search")),
    ("io", ("shrink.api", "shrink.cli", "shrink.search", "shrink.comparing", "shrink.distilling", "shrink.report")),
    ("report", ("shrink.api", "shrink.cli", "shrink.search", "shrink.comparing", "shrink.distilling", "shrink.io")),
])
def test_the_layers_above_the_parts_depend_downwards_only(layer, forbidden):
    # the verbs (api) and the command line sit on top; search composes the verbs' workers, never the reverse
    paths = sorted((SRC / layer).rglob("*.py")) if (SRC / layer).is_dir() else [SRC / f"{layer}.py"]
    bad = [f"{p.relative_to(SRC)} imports {m}" for p in paths for m, _ in _imports(p)
           if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not bad, "\n".join(bad)


def test_no_module_imports_a_private_name_of_another():
    bad = []
    for path in _modules():
        for module, names in _imports(path):
            if module.startswith("shrink"):
                bad += [f"{path.relative_to(SRC)}: {module}.{n}" for n in names
                        if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]
    assert not bad, "\n".join(bad)


def test_the_check_sees_imports():
    # the reader itself: a relative import two levels up resolves to the top package
    found = dict(_imports(SRC / "quant" / "calibration.py"))
    assert "shrink.errors" in found and "ShrinkError" in found["shrink.errors"]


def _module_name(path: Path) -> str:
    parts = ["shrink", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles_between_modules():
    """Imports at module level (the ones that run on import; those inside functions are deferred on purpose)."""
    names = {_module_name(p): p for p in _modules()}
    graph = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:  # `from . import awq` imports the module awq
                    deps.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in names else mod)
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
    from shrink.distill import DistillConfig
    from shrink.quant.recipe import GPTQ
    from shrink.search import Constraints

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
