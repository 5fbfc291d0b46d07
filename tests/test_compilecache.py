"""JAX's persistent compilation cache: a second process loads what the first compiled, and the
cache lives only in a folder no one else can write to (a cached executable is code we run)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from imgfeat.extract import compilecache as C


class FakeConfig:
    def __init__(self, **preset) -> None:
        self.values = dict(preset)

    def __getattr__(self, name):
        return self.__dict__["values"].get(name)

    def update(self, name, value) -> None:
        self.values[name] = value


@pytest.fixture
def cache_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("IMGFEAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(C.ENV_SWITCH, raising=False)
    return tmp_path / "cache" / "jax"


@pytest.mark.quick
def test_the_cache_is_a_private_folder_of_the_users_cache(cache_home):
    config = FakeConfig()
    assert C.enable_compile_cache(config) == cache_home
    assert config.values["jax_compilation_cache_dir"] == str(cache_home)
    assert config.values["jax_persistent_cache_min_compile_time_secs"] == C.MIN_COMPILE_SECONDS
    assert config.values["jax_compilation_cache_max_size"] == C.MAX_CACHE_BYTES
    assert cache_home.is_dir() and cache_home.stat().st_mode & 0o777 == 0o700


@pytest.mark.quick
@pytest.mark.parametrize("mode", [0o770, 0o757, 0o777])
def test_a_folder_others_may_write_to_is_not_used(cache_home, mode, caplog):
    cache_home.mkdir(parents=True)
    cache_home.chmod(mode)
    config = FakeConfig()
    with caplog.at_level(logging.WARNING):
        assert C.enable_compile_cache(config) is None
        assert C.enable_compile_cache(config) is None  # asked again (the model, then GPU decode): said once
    assert config.values == {}
    assert str(cache_home) in caplog.text and caplog.text.count("others may write to it") == 1


@pytest.mark.quick
def test_a_folder_of_another_user_is_not_used(cache_home, monkeypatch, caplog):
    cache_home.mkdir(parents=True, mode=0o700)
    monkeypatch.setattr(os, "getuid", lambda: cache_home.stat().st_uid + 1)
    config = FakeConfig()
    assert C.enable_compile_cache(config) is None and config.values == {}
    assert "belongs to another user" in caplog.text


@pytest.mark.quick
def test_a_link_or_a_file_in_its_place_is_not_used(cache_home, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    cache_home.parent.mkdir(parents=True)
    cache_home.symlink_to(elsewhere)  # someone points our cache at a folder of their choosing
    assert C.private_folder(cache_home) == "it is not a folder"
    cache_home.unlink()
    cache_home.write_bytes(b"")
    assert C.private_folder(cache_home) is not None


@pytest.mark.quick
def test_a_parent_others_may_write_to_is_refused_unless_sticky(cache_home):
    cache_home.parent.mkdir(parents=True)
    cache_home.parent.chmod(0o777)  # anyone could rename our folder away and put theirs in its place
    assert C.private_folder(cache_home) == "others may write to its parent folder, and so replace it"
    cache_home.parent.chmod(0o1777)  # as /tmp: only an entry's owner may rename it
    assert C.private_folder(cache_home) is None


@pytest.mark.quick
@pytest.mark.parametrize("off", ["0", "off", "False"])
def test_the_switch_turns_it_off(cache_home, monkeypatch, off):
    monkeypatch.setenv(C.ENV_SWITCH, off)
    config = FakeConfig()
    assert C.enable_compile_cache(config) is None and config.values == {} and not cache_home.exists()


@pytest.mark.quick
def test_the_users_own_jax_setting_stands(cache_home, tmp_path):
    config = FakeConfig(jax_compilation_cache_dir=str(tmp_path / "theirs"))
    assert C.enable_compile_cache(config) == tmp_path / "theirs"
    assert config.values == {"jax_compilation_cache_dir": str(tmp_path / "theirs")} and not cache_home.exists()


PROCESS = textwrap.dedent(
    """
    import collections, json, jax, jax.numpy as jnp
    from imgfeat.extract.compilecache import enable_compile_cache
    events = collections.Counter()
    jax.monitoring.register_event_listener(lambda name, **kw: events.update([name.rpartition("/")[2]]))
    enable_compile_cache()
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=1))
    f(jnp.ones((5, 3))).block_until_ready()
    print(json.dumps(dict(events)))
    """
)


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    env = {**os.environ, "IMGFEAT_CACHE": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    env.pop(C.ENV_SWITCH, None)
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", PROCESS], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first.get("cache_misses", 0) > 0 and not first.get("cache_hits")
    assert second.get("cache_hits", 0) == first["cache_misses"] and not second.get("cache_misses")
    assert any((tmp_path / "jax").iterdir())
