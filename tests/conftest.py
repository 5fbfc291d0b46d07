"""Shared fixtures: an empty workspace per test, quiet progress bars, deterministic Keras."""

from __future__ import annotations

import os

os.environ.setdefault("IMGFEAT_PROGRESS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402

from pipeline.workspace import Workspace  # noqa: E402


@pytest.fixture
def ws(tmp_path, monkeypatch) -> Workspace:
    """An empty workspace under tmp_path, also exported as IMGFEAT_WORKSPACE."""
    root = tmp_path / "ws"
    root.mkdir()
    monkeypatch.setenv("IMGFEAT_WORKSPACE", str(root))
    return Workspace(root)
