"""Shared fixtures: an empty workspace per test, quiet progress bars, deterministic Keras."""

from __future__ import annotations

import os

os.environ.setdefault("IMGFEAT_PROGRESS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import logging  # noqa: E402

import pytest  # noqa: E402

from pipeline.workspace import Workspace  # noqa: E402


@pytest.fixture
def ws(tmp_path, monkeypatch) -> Workspace:
    """An empty workspace under tmp_path, also exported as IMGFEAT_WORKSPACE."""
    root = tmp_path / "ws"
    root.mkdir()
    monkeypatch.setenv("IMGFEAT_WORKSPACE", str(root))
    return Workspace(root)


@pytest.fixture(autouse=True)
def _keep_logging():
    """A CLI run points the root logger at the captured stderr; give it back after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


@pytest.fixture(scope="module")
def keras_home(tmp_path_factory):
    """A private Keras cache per test module: nothing read from or written to ~/.keras."""
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("keras_home")
        mp.setenv("KERAS_HOME", str(home))
        yield home
