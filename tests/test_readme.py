"""The README's two commands, CI's test command, and ARCHITECTURE.md's module tables stay true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

pytestmark = pytest.mark.quick


def two_commands() -> list[str]:
    # the title, then straight away the block with the two commands
    block = re.match(r"# imgfeat\s*\n\s*```bash\n(.*?)```", README, re.S)
    assert block, "the README must start with its two commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands():
    demo, tests = two_commands()
    assert "imgfeat demo" in demo and "pip install" in demo
    assert "pytest" in tests and "'.[test]'" in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert two_commands()[1] in ci


ARCHITECTURE = (ROOT / "ARCHITECTURE.md").read_text()


def test_readme_architecture_section_points_to_architecture_md():
    section = README.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    assert "(ARCHITECTURE.md)" in section


def test_architecture_tables_name_every_module_and_only_real_ones():
    tables = ARCHITECTURE.split("## What each module owns", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`((?:pipeline|jobs)/[\w/]+\.py)`", tables))
    for path in named:
        assert (ROOT / path).is_file(), f"ARCHITECTURE.md names {path}, which does not exist"
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "pipeline").rglob("*.py")}
    missing = {m for m in modules if m not in named and not m.endswith("__init__.py")}
    assert not missing, f"modules missing from ARCHITECTURE.md's tables: {sorted(missing)}"


@pytest.mark.parametrize("doc", ["README.md", "ARCHITECTURE.md"])
def test_every_file_the_docs_name_is_in_the_repository(doc):
    text = (ROOT / doc).read_text()
    named = set(re.findall(r"`((?:pipeline|jobs|tests|benchmarks|scripts)/[\w/.-]+\.(?:py|sh|toml))`", text))
    assert named, f"{doc} names no file: the pattern is wrong"
    absent = sorted(p for p in named if not (ROOT / p).is_file())
    assert not absent, f"{doc} names files that are not in the repository: {absent}"
