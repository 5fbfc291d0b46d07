"""Shared fixtures: an empty workspace per test, quiet progress bars, deterministic Keras, no network.

Tiny generated images for tests live in ``tiny_images.py`` beside this file.
"""

from __future__ import annotations

import os

os.environ.setdefault("IMGFEAT_PROGRESS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import ipaddress  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402

import pytest  # noqa: E402

from imgfeat.core.workspace import Workspace  # noqa: E402

QUICK = "quick"


def pytest_ignore_collect(collection_path, config):
    """Under exactly ``-m quick``, skip importing test files that mark nothing quick.

    Such a file cannot contribute a test to the quick tier, and importing it may cost seconds
    (Keras, scikit-learn): the quick tier's one-minute budget includes collection.
    """
    if config.getoption("markexpr", "") != QUICK or collection_path.suffix != ".py":
        return None
    if not collection_path.name.startswith("test_"):
        return None
    if f"mark.{QUICK}" in collection_path.read_text(encoding="utf-8", errors="replace"):
        return None
    return True


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``-n 2 --dist loadgroup``, the default in pyproject.toml), a test file
    runs on one worker (its module fixtures are built once), and every test that starts a Ray
    cluster runs on the same worker, one at a time (two local clusters would find each other)."""
    for item in items:
        uses_ray = item.get_closest_marker("ray") is not None or item.module.__name__ == "test_ray"
        item.add_marker(pytest.mark.xdist_group("ray" if uses_ray else item.module.__name__))


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


def _local(host: object) -> bool:
    if host in ("localhost", "", None):
        return True
    try:
        ip = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False  # a host name other than localhost: resolving it is already the network
    return ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified


@pytest.fixture(autouse=True, scope="session")
def _no_network():
    """Tests never touch the network: a Python-level connect to a public address fails loudly.

    Loopback and this host's private addresses stay open (a local Ray cluster lives there), so
    this catches what matters here: a download such as Keras' ``get_file`` for imagenet weights.
    """
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(address: object) -> None:
        host = address[0] if isinstance(address, tuple) else None
        if not isinstance(address, (str, bytes)) and not _local(host):
            raise OSError(f"a test tried to reach {address!r}: tests never use the network")

    def connect(self, address):
        refuse(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        refuse(address)
        return real_connect_ex(self, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket.socket, "connect_ex", connect_ex)
        yield
