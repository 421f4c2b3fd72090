"""The package's seams, read from its source: the parts that do the work (quant, distill, evaluate) import
neither each other nor the parts above them, and no module imports another's private names."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src" / "shrink"
PARTS = ("quant", "distill", "evaluate")
ABOVE = ("search", "io", "report", "cli", "comparing", "distilling", "outdir")  # what may use the parts, not the reverse


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


def test_the_distill_command_takes_its_defaults_from_the_library():
    from dataclasses import fields

    from shrink.cli import distill
    from shrink.distill import DistillConfig

    options = {p.name: p.default for p in distill.params}
    shared = [f for f in fields(DistillConfig) if f.name in options]
    assert len(shared) >= 12
    assert {f.name: options[f.name] for f in shared} == {f.name: f.default for f in shared}
