"""The shape of the code: the project's import graph (read from the source, nothing is imported).

Arrows run downward (storage <- kernels <- models <- data <- stages <- callbacks <- entry points),
there are no import circles between modules (function-level imports included: a circle hidden in a
function is still two modules that cannot be understood apart), no module imports another's private
name, and the crash-safe file layer is a leaf."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "models", "datamodules", "lightning_modules", "callbacks", "experiments")
# what each package may import from the project (the layers below it)
ALLOWED = {
    "kernels": set(),
    "models": {"kernels"},
    "datamodules": {"models"},
    "lightning_modules": {"models", "datamodules", "kernels"},
    "callbacks": {"models", "datamodules", "lightning_modules", "kernels"},
    "experiments": set(PACKAGES),
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(root: Path = ROOT, packages=PACKAGES) -> list[tuple[str, str, str | None]]:
    """(importing module, imported module, name) for every import of a project module, at any depth
    of the file; ``from pkg import sub`` counts as importing the module ``pkg.sub`` where one exists."""
    modules = {module_name(p, root) for pkg in packages for p in (root / pkg).rglob("*.py")}
    found = []
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            here = module_name(path, root)
            package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found += [(here, a.name, None) for a in node.names if a.name.split(".")[0] in packages]
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = package.split(".")
                        base = base[: len(base) - node.level + 1]
                        target = ".".join(base + ([node.module] if node.module else []))
                    else:
                        target = node.module or ""
                    if target.split(".")[0] not in packages:
                        continue
                    for alias in node.names:
                        sub = f"{target}.{alias.name}"
                        found.append((here, sub, None) if sub in modules else (here, target, alias.name))
    return found


def import_cycles(edges: list[tuple[str, str, str | None]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        if a != b:
            graph.setdefault(a, set()).add(b)
            graph.setdefault(b, set())
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_there_are_no_import_circles():
    edges = [(a, b, n) for a, b, n in project_imports() if a not in PACKAGES]  # package __init__ re-exports
    assert import_cycles(edges) == []


def test_no_module_imports_another_modules_private_name():
    private = [f"{a} imports {n} from {b}" for a, b, n in project_imports()
               if n and n.startswith("_") and not n.startswith("__")]
    assert private == []


def test_packages_import_only_the_layers_below_them():
    upward = sorted({f"{a} -> {b}" for a, b, _ in project_imports()
                     if b.split(".")[0] != a.split(".")[0] and b.split(".")[0] not in ALLOWED[a.split(".")[0]]})
    assert upward == []


def test_the_file_layer_is_a_leaf():
    assert [b for a, b, _ in project_imports() if a == "models.storage"] == []


def test_the_checks_see_a_circle_a_private_import_and_an_upward_arrow(tmp_path):
    """The walker itself: on a made-up tree it finds what it must refuse."""
    for rel, text in {
        "models/__init__.py": "",
        "models/a.py": "from .b import thing\n",
        "models/b.py": "def f():\n    from models.a import _secret\n",
        "datamodules/__init__.py": "",
        "datamodules/c.py": "from lightning_modules.d import x\n",
        "lightning_modules/__init__.py": "",
        "lightning_modules/d.py": "from models import a\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    edges = project_imports(tmp_path, ("models", "datamodules", "lightning_modules"))
    assert import_cycles(edges) == [["models.a", "models.b"]]
    assert ("models.b", "models.a", "_secret") in edges
    assert ("lightning_modules.d", "models.a", None) in edges  # `from pkg import module` is the module
    assert ("datamodules.c", "lightning_modules.d", "x") in edges


@pytest.mark.parametrize("limit", [500])
def test_no_source_file_is_a_novel(limit):
    """Files doing one job stay readable: none over 500 lines."""
    long = {str(p.relative_to(ROOT)): n for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > limit}
    assert long == {}
