"""The package layout holds: each module of chalicelib.bundle imports only the layers below it, and
no module of chalicelib or dagcast is part of an import cycle (imports inside functions included)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# chalicelib.bundle, lowest layer first; a module may import the package's modules of lower layers only
LAYERS: dict[str, int] = {
    "report": 0, "threads": 0,
    "format": 1, "scan": 1, "dag_ids": 1, "cache": 1,
    "rules": 2, "dag_scan": 2,
    "python": 3, "delta": 3, "segments": 3,
    "compile_workers": 4,
    "validate": 5,
    "extract": 6, "written": 6,
    "rebuild": 7,
}
OUTSIDE_ALLOWED = {"chalicelib.exceptions"}  # what the bundle package may import from the rest of the project


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def project_imports(path: Path, *, type_checking: bool) -> set[str]:
    """Project modules path imports (with `from a import b`, a.b when it is a module)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    if not type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for n in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in ("chalicelib", "dagcast", "app") and name in MODULES:
                found.add(name)
    return found


FILES = sorted([*(ROOT / "chalicelib").rglob("*.py"), *(ROOT / "dagcast").rglob("*.py"), ROOT / "app.py"])
MODULES = {module_name(p): p for p in FILES}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_a_bundle_module_imports_only_the_layers_below_it(name: str) -> None:
    path = ROOT / "chalicelib" / "bundle" / f"{name}.py"
    for imported in project_imports(path, type_checking=False):
        if imported == "chalicelib.bundle":
            pytest.fail(f"{name} imports the package itself (import the module it needs)")
        if imported.startswith("chalicelib.bundle."):
            other = imported.rsplit(".", 1)[1]
            assert LAYERS[other] < LAYERS[name], f"{name} (layer {LAYERS[name]}) imports {other} (layer {LAYERS[other]})"
        else:
            assert imported in OUTSIDE_ALLOWED, f"chalicelib.bundle.{name} imports {imported}"


def test_every_bundle_module_has_a_layer_and_a_docstring() -> None:
    modules = {p.stem for p in (ROOT / "chalicelib" / "bundle").glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS)
    for name in modules:
        doc = ast.get_docstring(ast.parse((ROOT / "chalicelib" / "bundle" / f"{name}.py").read_text()))
        assert doc and len(doc) > 80, f"{name}.py says in its docstring what it is for"


def test_no_module_is_part_of_an_import_cycle() -> None:
    graph = {name: project_imports(path, type_checking=False) - {name} for name, path in MODULES.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
