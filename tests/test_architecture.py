"""The codebase's shape, measured with `ast`: loose-dict returns, hashing, in-function imports, CLI defaults, one of each concept."""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "jobs")


@functools.cache
def _parsed(folder: str) -> tuple[tuple[Path, ast.Module], ...]:
    return tuple(
        (path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        for path in sorted((ROOT / folder).rglob("*.py"))
    )


def _modules(*folders: str) -> Iterator[tuple[Path, ast.Module]]:
    for folder in folders:
        yield from _parsed(folder)


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _is_loose_dict(node: ast.expr | None) -> bool:
    """`dict`, `dict[str, Any]`, `Mapping[str, Any]`, `Dict[...]`, each optionally `| None` or Optional."""
    if node is None:
        return False
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a quoted annotation
        return _is_loose_dict(ast.parse(node.value, mode="eval").body)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        sides = [node.left, node.right]
        nones = [s for s in sides if isinstance(s, ast.Constant) and s.value is None]
        return len(nones) == 1 and any(_is_loose_dict(s) for s in sides if s not in nones)
    if isinstance(node, ast.Name | ast.Attribute):
        return _name(node) in {"dict", "Dict", "Mapping"}
    if isinstance(node, ast.Subscript):
        base = _name(node.value)
        if base == "Optional":
            return _is_loose_dict(node.slice)
        if base in {"dict", "Dict", "Mapping"} and isinstance(node.slice, ast.Tuple):
            return _name(node.slice.elts[-1]) == "Any"
    return False


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def loose_dict_functions() -> list[str]:
    """`path:line name` of every function in pipeline/ and jobs/ whose return annotation is a loose dict."""
    return [
        f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}"
        for path, tree in _modules(*PACKAGES)
        for fn in _functions(tree)
        if _is_loose_dict(fn.returns)
    ]


def hashlib_importers() -> list[str]:
    found = []
    for path, tree in _modules(*PACKAGES):
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if "hashlib" in names:
                found.append(str(path.relative_to(ROOT)))
                break
    return found


def own_imports_in_functions() -> list[str]:
    """Imports of our own modules (`imgfeat.` or relative) inside function bodies."""
    found = []
    for path, tree in _modules(*PACKAGES):
        for fn in _functions(tree):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("imgfeat")):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                elif isinstance(node, ast.Import) and any(a.name.startswith("imgfeat") for a in node.names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return sorted(set(found))


def module_name(path: Path) -> str:
    """``pipeline/a/b.py`` -> ``imgfeat.a.b``, ``jobs/x.py`` -> ``imgfeat.cli.x``, a package's ``__init__`` -> the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts[:1] = ["imgfeat"] if parts[0] == "pipeline" else ["imgfeat", "cli"]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runs_at_import(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports a module runs when it is imported: not those in functions or ``if TYPE_CHECKING:``."""

    def visit(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child
            yield from visit(child)

    yield from visit(tree)


def import_graph(*folders: str) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports at import time; ``from pkg import sub`` names the submodule."""
    paths = {module_name(path): (path, tree) for path, tree in _modules(*folders)}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, (path, tree) in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runs_at_import(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
            graph[name] |= {t for t in targets if t in paths and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def cli_defaults() -> int:
    return sum(
        1
        for _, tree in _modules("jobs")
        for node in ast.walk(tree)
        if isinstance(node, ast.keyword) and node.arg == "default"
    )


def defined(kind: type[ast.AST], name: str) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path, tree in _modules(*PACKAGES)
        for node in ast.walk(tree)
        if isinstance(node, kind) and getattr(node, "name", None) == name
    ]


# ---------------------------------------------------------------- the counter itself


def test_the_loose_dict_counter_sees_each_spelling():
    src = """
def a() -> dict: ...
def b() -> dict[str, Any]: ...
def c() -> Mapping[str, Any] | None: ...
def d() -> "dict[str, Any]": ...
def e() -> Optional[Dict[str, Any]]: ...
def f() -> dict[str, int]: ...
def g() -> Summary: ...
def h() -> None: ...
"""
    flagged = [fn.name for fn in _functions(ast.parse(src)) if _is_loose_dict(fn.returns)]
    assert flagged == ["a", "b", "c", "d", "e"]


# ---------------------------------------------------------------- the targets of issue 25


def test_at_most_ten_functions_return_a_loose_dict():
    found = loose_dict_functions()
    assert len(found) <= 10, "\n".join(found)


def test_only_one_module_imports_hashlib():
    found = hashlib_importers()
    assert found == ["pipeline/core/hashing.py"], found


def test_at_most_fifteen_in_function_imports_of_our_own_modules():
    found = own_imports_in_functions()
    assert len(found) <= 15, f"{len(found)}:\n" + "\n".join(found)


def test_the_cycle_finder_sees_a_cycle_and_only_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_import_graph_resolves_packages_submodules_and_relative_imports():
    graph = import_graph("pipeline", "jobs")
    assert "imgfeat.backbones.spec" in graph["imgfeat.backbones"]
    assert "imgfeat.finetune.config" in graph["imgfeat.finetune.loop"]  # `from imgfeat.finetune import config`
    assert "imgfeat.cli.common" in graph["imgfeat.cli.main"]


def test_the_import_graph_of_the_library_has_no_cycles():
    """Imports run at import time only (top level, not TYPE_CHECKING): each cycle found is a shared
    piece to move down a layer."""
    assert cycles(import_graph("pipeline", "jobs")) == []


def test_at_most_twenty_five_defaults_in_the_cli():
    assert cli_defaults() <= 25, cli_defaults()


def test_exactly_one_build_model():
    found = defined(ast.FunctionDef, "build_model")
    assert len(found) == 1, found


def test_exactly_one_shard_writer_class():
    assert len(defined(ast.ClassDef, "ShardWriter")) == 1
    assert defined(ast.ClassDef, "TableShardWriter") == []
