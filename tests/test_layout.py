"""The layout's rules, read off the source: the compression core imports nothing from the harness or the tasks,
the tasks import nothing from rocketkv, no import (lazy ones included) runs both ways, and core files stay small."""
import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("rocketkv", "evals")
CORE_MAX_LINES = 300


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path, name: str, known: dict) -> set[str]:
    """Project modules ``name`` imports anywhere in its file (``from a import b`` counts ``a.b`` when it is a
    module, else ``a``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, name, known) for name, path in known.items()}


def test_core_imports_only_the_core():
    for name, deps in graph().items():
        if name.startswith("rocketkv.core"):
            assert all(d.startswith("rocketkv.core") for d in deps), (name, sorted(deps))


def test_tasks_import_nothing_from_rocketkv():
    for name, deps in graph().items():
        if name.startswith("evals"):
            assert not any(d.startswith("rocketkv") for d in deps), (name, sorted(deps))


def test_no_import_cycle():
    edges = graph()
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(edges[node]):
            assert state.get(dep) != "open", " -> ".join([*path, node, dep])
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_core_files_stay_small():
    for path in sorted((REPO / "rocketkv" / "core").rglob("*.py")):
        assert len(path.read_text().splitlines()) <= CORE_MAX_LINES, path


def test_the_walk_sees_real_imports():
    edges = graph()  # guards the test itself: a walk that found nothing would pass every rule above
    assert "rocketkv.core.cache" in edges["rocketkv.core.methods.ops"]
    assert "evals.prompting" in edges["rocketkv.harness.runner"]
    assert "rocketkv.core.kernels" in edges["rocketkv.core.methods.quest"]
