"""The package's layers, as docs/architecture.md declares them: every import inside ``src/pneumoscan`` (at
module level and inside functions, relative or absolute) points to the importing module's own layer or to
one the table says it may import, nothing imports the package's root, and the graph of all of them has no
cycle. Pure parsing: no module is imported."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "src" / "pneumoscan"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def layer_rules(markdown: str) -> dict[str, set[str]]:
    """The layer table of docs/architecture.md: each layer (a subpackage) and the layers it may import."""
    rules = {}
    for row in re.findall(r"^\| `(\w+)/` \|[^|]*\| ([^|]*) \|$", markdown, re.MULTILINE):
        layer, may = row
        rules[layer] = {name for name in re.findall(r"`(\w+)`", may)} if "every layer" not in may else {"*"}
    return rules


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package: Path, modules: set[str]) -> list[tuple[int, str]]:
    """(line, module) for every import of a package module in ``path``, wherever it sits in the file."""
    here = module_name(path, package)
    base = here.split(".") if path.name == "__init__.py" else here.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                root = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            names = [f"{root}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            root, names = "", [a.name for a in node.names]
        else:
            continue
        targets = {n for n in names if n in modules}  # "from pneumoscan.model import bundle": the module
        if not targets:  # "from pneumoscan.model.bundle import Bundle": the module it is taken from
            enclosing = [m for m in modules if root == m or root.startswith(m + ".")]
            targets = {max(enclosing, key=len)} if enclosing else set()
        found += [(node.lineno, t) for t in targets if t != here]
    return found


def import_graph(package: Path) -> tuple[dict[str, set[str]], dict[str, list[tuple[int, str]]]]:
    files = {module_name(p, package): p for p in package.rglob("*.py")}
    lines = {m: imports_of(p, package, set(files)) for m, p in files.items()}
    return {m: {t for _, t in found} for m, found in lines.items()}, lines


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(package: Path, rules: dict[str, set[str]]) -> list[str]:
    """Imports against the layer rules, one line each: FILE:LINE importer -> imported."""
    _, lines = import_graph(package)
    name = package.name
    wrong = []
    for module, found in sorted(lines.items()):
        layer = module.split(".")[1] if "." in module else None  # None: the package's root (the public face)
        for line, target in found:
            target_layer = target.split(".")[1] if "." in target else None
            if target_layer is None:
                wrong.append(f"{module}:{line} imports the package's root {name} (nothing inside may)")
            elif layer is not None and target_layer != layer and not rules[layer] & {target_layer, "*"}:
                wrong.append(f"{module}:{line} -> {target}: {layer} may not import {target_layer}")
    return wrong


def test_the_architecture_page_declares_every_layer_and_nothing_else():
    rules = layer_rules(ARCHITECTURE.read_text())
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert set(rules) == folders and len(folders) >= 6, (sorted(rules), sorted(folders))
    assert all(may - {"*"} <= set(rules) for may in rules.values())
    assert not [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]  # every module in a layer


def test_every_import_points_down_and_there_is_no_cycle():
    rules = layer_rules(ARCHITECTURE.read_text())
    assert violations(PACKAGE, rules) == []
    graph, _ = import_graph(PACKAGE)
    assert cycles(graph) == []
    assert sum(map(len, graph.values())) > 300  # every import was read, inside functions too


def test_each_layer_says_in_one_line_what_it_owns_and_holds_no_code():
    for init in PACKAGE.glob("*/__init__.py"):
        tree = ast.parse(init.read_text())
        doc = ast.get_docstring(tree)
        assert doc and "\n" not in doc.strip(), f"{init}: a one-line docstring"
        assert len(tree.body) == 1, f"{init}: a layer's __init__ holds its docstring only (no re-exports)"


def test_the_check_sees_an_upward_import_inside_a_function_and_the_cycle_it_makes(tmp_path):
    package = tmp_path / "pneumoscan"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("default_model", "__pycache__", "static"))
    errors = package / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _late():\n    from ..model import bundle\n")
    rules = layer_rules(ARCHITECTURE.read_text())
    wrong = violations(package, rules)
    assert any(w.startswith("pneumoscan.core.errors:") and "core may not import model" in w for w in wrong), wrong
    graph, _ = import_graph(package)
    assert any({"pneumoscan.core.errors", "pneumoscan.model.bundle"} <= set(c) for c in cycles(graph))


@pytest.mark.parametrize("layer", ["core", "io", "report"])
def test_the_lower_layers_import_no_heavy_library_at_module_level(layer):
    """core, io and report load without torch, onnxruntime or matplotlib: they import them inside functions."""
    heavy = {"torch", "torchvision", "lightning", "onnxruntime", "onnx", "matplotlib", "timm", "fastapi"}
    for path in (PACKAGE / layer).rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            assert not {n.split(".")[0] for n in names} & heavy, f"{path}: {names}"
