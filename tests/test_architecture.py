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
LANDING = "until the other helpers of issue 25 land"


@functools.cache
def _parsed(folder: str) -> tuple[tuple[Path, ast.Module], ...]:
    return tuple((path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
                 for path in sorted((ROOT / folder).rglob("*.py")))


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


@pytest.mark.xfail(strict=False, reason=f"hashing in one module {LANDING}")
def test_only_one_module_imports_hashlib():
    found = hashlib_importers()
    assert found == ["pipeline/core/hashing.py"], found


@pytest.mark.xfail(strict=False, reason=f"imports at module top {LANDING}")
def test_at_most_fifteen_in_function_imports_of_our_own_modules():
    found = own_imports_in_functions()
    assert len(found) <= 15, f"{len(found)}:\n" + "\n".join(found)


@pytest.mark.xfail(strict=False, reason=f"the CLI derives defaults from the configs {LANDING}")
def test_at_most_twenty_five_defaults_in_the_cli():
    assert cli_defaults() <= 25, cli_defaults()


@pytest.mark.xfail(strict=False, reason=f"one model builder {LANDING}")
def test_exactly_one_build_model():
    found = defined(ast.FunctionDef, "build_model")
    assert len(found) == 1, found


@pytest.mark.xfail(strict=False, reason=f"one shard writer {LANDING}")
def test_exactly_one_shard_writer_class():
    assert len(defined(ast.ClassDef, "ShardWriter")) == 1
    assert defined(ast.ClassDef, "TableShardWriter") == []
