"""The code's layout rules, checked on the source: sizes, imports, the public surface, the README's module map."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import fv_plugin

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fv_plugin"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules(folder: Path = PACKAGE) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (or of another folder of the repository: ``demo``)."""
    found = {}
    for path in sorted(folder.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _type_checking_blocks(tree: ast.Module) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks (imports there never run)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(name: str, path: Path, *, type_checking: bool = False) -> Iterator[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import that runs, at any depth (also those under
    ``if TYPE_CHECKING:`` with ``type_checking=True``)."""
    tree = _tree(path)
    skip = set() if type_checking else _type_checking_blocks(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if getattr(node, "lineno", 0) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            yield base, [a.name for a in node.names], node.lineno


def test_no_module_or_function_is_too_long() -> None:
    too_long = []
    for name, path in _modules().items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name} (line {node.lineno}): {length} lines")
    assert not too_long, too_long


def _import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules (among ``modules``) it imports, counting every import statement: at module level,
    inside functions (lazy imports) and under ``if TYPE_CHECKING:``."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names, _ in _imports(name, path, type_checking=True):
            candidates = [target] + [f"{target}.{n}" for n in names]
            graph[name].update(c for c in candidates if c in modules and c != name and c != "fv_plugin")
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each back edge of a depth-first walk (empty: the graph has no cycle)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycles_among_the_package_and_demo_modules() -> None:
    """No module reaches itself through imports, in the package and in the demo.

    The rule is strict: every import statement counts, at module level, inside a function (a lazy import) or under
    ``if TYPE_CHECKING:``. A lazy or type-only import hides a cycle from the interpreter, not from the reader: the
    two modules still depend on each other, so the shared piece belongs in one of them (or in a third). Modules
    whose class calls back into them read it through a protocol instead (``fv_plugin.merge.Additive``,
    ``fv_plugin.vector_files.Stored``).
    """
    modules = _modules()
    assert not _cycles(_import_graph(modules)), _cycles(_import_graph(modules))
    demo = _modules(ROOT / "demo")
    assert not _cycles(_import_graph({**modules, **demo})), _cycles(_import_graph({**modules, **demo}))
    # The package's own modules never import the package's __init__ (which imports them all).
    importers = [
        f"{n}: {names}"
        for n, path in modules.items()
        for t, names, _ in _imports(n, path)
        if t == "fv_plugin" and any(f"fv_plugin.{x}" not in modules for x in names)
    ]
    assert importers == [], importers


def test_the_cycle_check_sees_lazy_and_type_only_imports(tmp_path: Path) -> None:
    """The rule above, on two modules that import each other once lazily and once for type checking only."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "a.py").write_text("def f():\n    from pkg.b import g\n    return g\n", encoding="utf-8")
    (folder / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\ndef g(): pass\n",
        encoding="utf-8",
    )
    graph = _import_graph({"pkg.a": folder / "a.py", "pkg.b": folder / "b.py"})
    assert _cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


def _sources() -> Iterator[tuple[str, Path]]:
    yield from _modules().items()
    for folder in ("demo", "examples"):
        for path in sorted((ROOT / folder).glob("*.py")):
            yield f"{folder}.{path.stem}", path


def test_no_private_name_is_imported_across_modules() -> None:
    private = []
    for name, path in _sources():
        for target, names, line in _imports(name, path):
            ours = target.split(".")[0] in ("fv_plugin", "demo")
            hidden = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if ours and (hidden or any(p.startswith("_") for p in target.split("."))):
                private.append(f"{path.relative_to(ROOT)}:{line}: from {target} import {', '.join(names)}")
    assert not private, private


def public_submodules() -> set[str]:
    """The submodules the package's docstring declares public (``fv_plugin.viz`` ...)."""
    doc = fv_plugin.__doc__ or ""
    return set(re.findall(r"^- ``fv_plugin\.(\w+)``", doc, flags=re.MULTILINE))


def test_demo_and_examples_use_only_the_public_surface() -> None:
    public = set(fv_plugin.__all__)
    submodules = public_submodules()
    assert {"viz", "compare", "benchmarks"} <= submodules
    outside = []
    for name, path in _sources():
        if name.startswith("fv_plugin"):
            continue
        tree = _tree(path)
        for target, names, line in _imports(name, path):
            if target == "fv_plugin":
                outside += [f"{path.name}:{line}: {n}" for n in names if n not in public and n not in submodules]
            elif target.startswith("fv_plugin.") and target.split(".")[1] not in submodules:
                outside.append(f"{path.name}:{line}: {target}")
        for node in ast.walk(tree):  # fv_plugin.name used as an attribute
            named = isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "fv_plugin"
            if named and node.attr not in public and node.attr not in submodules:  # type: ignore[attr-defined]
                outside.append(f"{path.name}:{node.lineno}: fv_plugin.{node.attr}")  # type: ignore[attr-defined]
    assert not outside, outside


def test_the_public_surface_exists() -> None:
    for name in fv_plugin.__all__:
        assert hasattr(fv_plugin, name), name
    assert len(set(fv_plugin.__all__)) == len(fv_plugin.__all__)


def test_readme_module_map_names_every_module_once() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- `(fv_plugin/[\w/]+(?:\.py|/))`", section, flags=re.MULTILINE)
    assert len(listed) == len(set(listed)), "a module is listed twice"
    files = {str(p.relative_to(ROOT)) for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    folders = {f"{p.relative_to(ROOT)}/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert set(listed) == files | folders
