"""One import name: the built wheel installs `imgfeat` (library and CLI) and nothing called `pipeline` or `jobs`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each source folder lands in the installed package (pyproject's package-dir).
PACKAGE_DIRS = {"pipeline": "imgfeat", "jobs": "imgfeat/cli"}

PROBE = """
import importlib, json, sys
found = {}
for name in ("imgfeat", "imgfeat.cli.main", "pipeline", "jobs"):
    try:
        found[name] = getattr(importlib.import_module(name), "__file__", None) or "namespace"
    except ImportError:
        found[name] = None
print(json.dumps(found))
"""


def pip(*args: str, cwd: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", *args, "--no-input", "--disable-pip-version-check", "-q"],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )


def source_copy(dest: Path) -> Path:
    """What the build reads, copied: building in the checkout would leave build/ behind in it."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for folder in PACKAGE_DIRS:
        shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def installed_name(init: Path) -> str:
    """``pipeline/scan/__init__.py`` -> ``imgfeat/scan/__init__.py`` (where pip puts it)."""
    folder, *rest = init.relative_to(ROOT).parts
    return "/".join([PACKAGE_DIRS[folder], *rest])


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the folder it was installed into with pip --target), built without network."""
    base = tmp_path_factory.mktemp("packaging")
    src = source_copy(base / "src")
    pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(base / "dist"), str(src), cwd=base)
    (wheel,) = (base / "dist").glob("imgfeat-*.whl")
    pip("install", "--no-deps", "--no-compile", "--target", str(base / "target"), str(wheel), cwd=base)
    return wheel, base / "target"


@pytest.mark.slow
def test_the_installed_package_has_one_import_name(installed, tmp_path):
    wheel, target = installed
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith((".dist-info", ".data"))} == {"imgfeat"}
    outside = tmp_path / "elsewhere"  # not the checkout: its pipeline/ and jobs/ must not be found
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=outside, env=env, capture_output=True, text=True, check=True, timeout=120
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["imgfeat"] == str(target / "imgfeat" / "__init__.py")
    assert found["imgfeat.cli.main"] == str(target / "imgfeat" / "cli" / "main.py")
    assert found["pipeline"] is None and found["jobs"] is None


@pytest.mark.slow
def test_every_source_package_is_in_the_wheel(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        installed_name(init)
        for folder in PACKAGE_DIRS
        for init in (ROOT / folder).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert {"imgfeat/__init__.py", "imgfeat/cli/__init__.py", "imgfeat/scan/__init__.py"} <= expected
    missing = sorted(expected - names)
    assert not missing, f"packages missing from the wheel (add them to pyproject's packages list): {missing}"
    assert "imgfeat/resources/imagenet_classes.tsv" in names and "imgfeat/cli/examples/demo.toml" in names
