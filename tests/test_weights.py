"""Weights identity and the offline cache: resolve, digest cache, and imgfeat weights/backbones commands."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from imgfeat.backbones import get_backbone, list_backbones
from imgfeat.backbones import weights as weights_mod
from imgfeat.backbones.cache import import_weights
from imgfeat.backbones.weights import file_digests, is_cached, keras_cache_dir, resolve_weights
from imgfeat.cli.main import main
from imgfeat.core.errors import ConfigError, ImgfeatError


@pytest.fixture(autouse=True)
def keras_home(tmp_path, monkeypatch):
    """Every test gets its own empty Keras cache: nothing here reads or writes ~/.keras."""
    home = tmp_path / "keras_home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.quick
def test_none_and_file_weights_resolve_to_their_identity(tmp_path):
    spec = get_backbone("resnet50")
    for value in (None, "none", "None", ""):
        assert resolve_weights(spec, value) == weights_mod.WeightsRef("none", None, None)
    f = tmp_path / "w.weights.h5"
    f.write_bytes(b"abc")
    ref = resolve_weights(spec, str(f))
    assert ref.kind == "file" and ref.identity == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.quick
def test_digests_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch, keras_home):
    f = tmp_path / "w.h5"
    f.write_bytes(b"one")
    calls = []
    real = weights_mod._hash_file
    monkeypatch.setattr(weights_mod, "_hash_file", lambda p: calls.append(p) or real(p))
    first = file_digests(f)
    assert file_digests(f) == first and len(calls) == 1  # second call (or next run) reads the cache file
    assert (keras_home / "models" / weights_mod.DIGEST_CACHE).is_file()
    assert not (tmp_path / weights_mod.DIGEST_CACHE).exists()  # nothing written beside the user's file
    f.write_bytes(b"two, longer")
    assert file_digests(f)["sha256"] != first["sha256"] and len(calls) == 2


@pytest.mark.quick
def test_imagenet_for_a_pip_shipped_backbone_uses_its_function(monkeypatch, tmp_path):
    f = tmp_path / "lite.weights.h5"
    f.write_bytes(b"lite")
    monkeypatch.setattr("imgfeat.backbones.lite.lite0_imagenet_weights", lambda: f)
    from imgfeat.backbones import resolve

    resolve.cache_clear()
    try:
        ref = resolve_weights(get_backbone("efficientnet_lite0"), "imagenet")
    finally:
        resolve.cache_clear()
    assert ref.kind == "imagenet" and ref.path == f and ref.sha256 == file_digests(f)["sha256"]


@pytest.mark.quick
def test_import_puts_a_file_under_its_keras_name_after_checking_the_hash(tmp_path, keras_home):
    spec = get_backbone("mobilenet")  # Keras pins no hash for MobileNet V1: any file is accepted
    brought = tmp_path / "downloaded.h5"
    brought.write_bytes(b"weights from another machine")
    assert not is_cached(spec)
    got_spec, path = import_weights(brought, spec)
    assert got_spec is spec and path == keras_home / "models" / "mobilenet_1_0_224_tf_no_top.h5"
    assert path.read_bytes() == brought.read_bytes() and is_cached(spec)
    assert not list((keras_home / "models").glob("*.tmp"))
    with pytest.raises(ConfigError, match="Keras pins 4d473c1dd8becc155b73f8504c6f6626"):
        import_weights(brought, get_backbone("resnet50"))  # resnet50's file is pinned by md5
    assert not (keras_home / "models" / get_backbone("resnet50").keras_weights.file_name).exists()


@pytest.mark.quick
def test_import_recognises_the_backbone_by_file_name_or_says_to_name_it(tmp_path, keras_home):
    named = tmp_path / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    named.write_bytes(b"x")
    spec, _ = import_weights(named)
    assert spec.name == "mobilenet_v2"
    other = tmp_path / "model.h5"
    other.write_bytes(b"y")
    with pytest.raises(ConfigError, match="--backbone"):
        import_weights(other)


def test_fetch_offline_fails_fast_with_a_clear_message(keras_home, monkeypatch):
    def no_network(*args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)  # an offline machine, without touching the network
    before = socket.getdefaulttimeout()
    t0 = time.perf_counter()
    with pytest.raises(ImgfeatError) as info:
        weights_mod.fetch_weights(get_backbone("mobilenet_v3_small"))
    assert time.perf_counter() - t0 < 10 and not isinstance(info.value, ConfigError)  # exit 1
    assert "could not download" in str(info.value) and "imgfeat weights import" in str(info.value)
    assert socket.getdefaulttimeout() == before
    assert not any((keras_home / "models").glob("weights_mobilenet_v3_small*"))


@pytest.mark.quick
def test_weights_list_and_import_commands(tmp_path, keras_home, capsys):
    assert main(["weights", "list", "--json"]) == 0
    listed = _last_json(capsys)
    assert listed["cache"] == str(keras_home / "models")
    rows = {r["backbone"]: r for r in listed["weights"]}
    assert set(rows) == {s.name for s in list_backbones()}
    assert rows["resnet50"]["file"] == "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert not rows["resnet50"]["cached"]
    brought = tmp_path / "nasnet.h5"
    brought.write_bytes(b"not nasnet")
    assert main(["weights", "import", str(brought), "--backbone", "nasnet_mobile"]) == 2  # wrong hash
    assert main(["weights", "import", "--json"]) == 2  # no FILE
    capsys.readouterr()
    assert main(["weights", "fetch", "resnt50"]) == 2
    assert "did you mean 'resnet50'" in capsys.readouterr().err


def test_backbones_command_lists_everything_without_importing_tensorflow(tmp_path, keras_home):
    # A process of its own: the test process has TensorFlow loaded already.
    code = (
        "import sys, json; from imgfeat.cli.main import main; rc = main(['backbones', '--json']);"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'imported TF';"
        "sys.exit(rc)"
    )
    env = {**os.environ, "IMGFEAT_WORKSPACE": str(tmp_path / "ws")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    rows = {r["name"]: r for r in summary["backbones"]}
    assert summary["count"] == len(rows) == len(list_backbones())
    assert rows["inception_v3"]["input_size"] == 299 and rows["inception_v3"]["dim"] == 2048
    assert rows["vgg16"]["imagenet_top"] is False and rows["resnet50"]["cached"] is False
    assert not (tmp_path / "ws" / "runs").exists()  # a listing is not a run


def test_backbones_command_prints_a_table_and_layer_names(capsys):
    assert main(["backbones", "--family", "convnext"]) == 0
    out = capsys.readouterr().out
    assert "convnext_tiny" in out and "resnet50" not in out and "weights MB" in out
    assert main(["backbones", "--layers", "mobilenet_v3_small", "--json"]) == 0
    layers = [r["layer"] for r in _last_json(capsys)["layers"]]
    assert layers[0] == "input_layer" or "input" in layers[0]
    assert "expanded_conv_project" in layers


@pytest.mark.quick
def test_keras_cache_dir_follows_keras_home(keras_home):
    assert keras_cache_dir() == keras_home / "models"
