"""Shared fixtures: an empty workspace per test, quiet progress bars, deterministic Keras, no network.

Tiny generated images for tests live in ``tiny_images.py`` beside this file.
"""

from __future__ import annotations

import os

os.environ.setdefault("IMGFEAT_PROGRESS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("IMGFEAT_COMPILE_CACHE", "0")  # JAX's compile cache stays out of ~/.cache; its test turns it on

import ipaddress
import logging
import socket

import pytest

from imgfeat.core.workspace import Workspace

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


# The xdist groups that take longest (minutes of model builds, training, Ray, processes), longest
# first, measured with --durations. A worker takes these first and the many short files fill in
# after, so neither worker is left alone with a long file at the end. A new file that takes more
# than ~20 s belongs here by its cost; a name that no longer exists is harmless.
LONGEST_GROUPS = (
    "ray",
    "test_finetune",
    "test_run",
    "test_scale_bench",
    "test_object_store",
    "test_heads_stream",
    "test_extract_crash",
    "test_backbones",
    "test_finetune_job",
    "test_finetune_checkpoint",
    "test_fidelity",
    "test_forward",
    "test_finetune_blocks",
    "test_readers",
    "test_extract_trust",
    "test_extract",
    "test_extract_gpu_path",
    "test_gpudecode",
    "test_train",
    "test_shard_tags",
    "test_lite",
    "test_bench",
    "test_examples",
    "test_classify",
    "test_index_job",
    "test_dedup",
    "test_dedup_job",
    "test_report",
    "test_heads",
    "test_run_no_accuracy",
    "test_api",
    "test_decodepool",
    "test_damaged_names",
)


def _group_of(item) -> str:
    uses_ray = item.get_closest_marker("ray") is not None or item.module.__name__ == "test_ray"
    return "ray" if uses_ray else item.module.__name__


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``-n 2 --dist loadgroup --no-loadscope-reorder``, the default in
    pyproject.toml), a test file runs on one worker (its module fixtures are built once), and every
    test that starts a Ray cluster runs on the same worker, one at a time (two local clusters would
    find each other). Workers hand out the groups in collection order: the longest first.
    Without xdist (``-n 0``) the order stays the files' own."""
    rank = {name: i for i, name in enumerate(LONGEST_GROUPS)}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group_of(item)))
    if hasattr(config, "workerinput"):  # an xdist worker: what it collects is what gets scheduled
        items.sort(key=lambda item: rank.get(_group_of(item), len(rank)))  # stable: file order within
        if config.getvalue("loadgroup"):
            for item in items:
                _tag_with_group(item, _group_of(item))


def _tag_with_group(item, group: str) -> None:
    """What xdist's loadgroup does with the xdist_group mark: append ``@group`` to the test's id.

    xdist 3.8 writes ``item._nodeid``, which pytest 9.2 no longer reads (a test's id comes from
    ``item._id``), so its groups were silently dropped: a file's tests went to both workers, each
    building its module fixtures, and Ray tests ran on both at once. Done here for both versions;
    xdist appending the same suffix again on an older pytest changes nothing (the scheduler takes
    what follows the last ``@``).
    """
    tagged = f"{item.nodeid}@{group}"
    if hasattr(item, "_id"):
        from _pytest.nodeid import coerce_node_id

        item._id = coerce_node_id(tagged)
    else:
        item._nodeid = tagged


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
