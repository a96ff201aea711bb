"""The project's shape, as the README's layout promises it: a small top level, modules and classes of a
readable size, a config that imports no model code, and an import graph without cycles, so that no
module imports one that sits above it (the run's plumbing never imports training, nor the sweeps)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "runs", "sweeps")
MAX_TOP_LEVEL = 10
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for the top level and the packages (tests and benchmarks are users, not parts)."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    for package in PACKAGES:
        for p in (ROOT / package).glob("*.py"):
            found[package if p.stem == "__init__" else f"{package}.{p.stem}"] = p
    return found


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports, at the top or inside a function alike."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out |= {n for n in names if n in known}
    return out


def _unit(module: str) -> str:
    return module.split(".")[0]  # a package counts as one unit; a top-level module is its own


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m) :] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = "done"
        stack.pop()
        return []

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return []


def test_the_top_level_is_small_and_no_module_or_class_is_too_long():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, top
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES, name
        for c in ast.walk(tree):
            if isinstance(c, ast.ClassDef):
                assert c.end_lineno - c.lineno + 1 <= MAX_CLASS_LINES, f"{name}.{c.name}"


def test_config_imports_no_model_code():
    known = _modules()
    assert not {m for m in _imports(known["config"], known) if _unit(m) == "models"}
    assert "torch.nn" not in (known["config"]).read_text()


def test_the_import_graph_has_no_cycle_between_modules_or_packages():
    known = _modules()
    graph = {name: _imports(path, known) - {name} for name, path in known.items()}
    assert not _cycle(graph), _cycle(graph)
    units: dict[str, set[str]] = {}
    for name, targets in graph.items():
        units.setdefault(_unit(name), set()).update(_unit(t) for t in targets if _unit(t) != _unit(name))
    assert not _cycle(units), _cycle(units)  # e.g. runs -> figures -> runs would be one
    assert not units["runs"] & {"training", "recipe", "sweeps", "step", "evaluation"}  # plumbing sits below
    assert not any("sweeps" in targets for unit, targets in units.items() if unit != "sweeps")


def test_the_checks_above_can_fail():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []
