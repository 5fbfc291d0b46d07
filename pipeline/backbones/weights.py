"""Weights identity and the offline Keras weights cache: resolve, hash, fetch (listing the cache and
importing a file into it, which need the backbone table, are cache.py)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgfeat.backbones.dotted import resolve
from imgfeat.core import hashing
from imgfeat.core.errors import ConfigError, ImgfeatError
from imgfeat.core.storage import write_json_atomic
from imgfeat.core.stores import is_uri, local_copy

if TYPE_CHECKING:
    from imgfeat.backbones.spec import BackboneSpec, KerasWeightsFile

log = logging.getLogger(__name__)

WEIGHT_KINDS = ("imagenet", "none", "file")  # WeightsRef.kind
DIGEST_CACHE = "imgfeat-digests.json"  # in the Keras cache folder, keyed by path + size + mtime
FETCH_TIMEOUT_S = 15.0  # a socket that says nothing for this long is an offline machine, not a slow one
_GET_FILE_LOCK = threading.Lock()


@dataclass(frozen=True)
class WeightsRef:
    """What weights a model is built with; sha256 is the identity that goes into the fingerprint."""

    kind: str  # "imagenet" | "none" | "file"
    path: Path | None
    sha256: str | None

    @property
    def identity(self) -> str:
        return self.sha256 or "none"

    @property
    def file(self) -> Path:
        """The weights file, which every kind but "none" has."""
        if self.path is None:
            raise ValueError(f"{self.kind} weights have no file")
        return self.path


# ------------------------------------------------------------------------------ cache location


def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded weights: ``$KERAS_HOME/models`` (default ``~/.keras/models``).

    Read from the environment on each call (Keras reads it once at import); the build step hands
    Keras the file found here, so both always agree.
    """
    home = os.environ.get("KERAS_HOME")
    if not home:
        base = Path.home()
        home = str((base if os.access(base, os.W_OK) else Path("/tmp")) / ".keras")
    return Path(home).expanduser() / "models"


def keras_file(spec: BackboneSpec, include_top: bool = False) -> KerasWeightsFile:
    """The Keras-pinned file entry for this backbone, or ConfigError if Keras does not download it."""
    entry = spec.keras_top_weights if include_top else spec.keras_weights
    if entry is None:
        raise ConfigError(f"{spec.name} has no Keras-downloaded ImageNet weights file")
    return entry


def expected_file(
    spec: BackboneSpec, input_size: int | None = None, include_top: bool = False
) -> tuple[Path, str, str | None]:
    """(cache path, URL, Keras hash) of the ImageNet file Keras would load for this build."""
    entry = keras_file(spec, include_top)
    name, url = entry.for_size(input_size or spec.input_size)
    return keras_cache_dir() / name, url, entry.file_hash


def is_cached(spec: BackboneSpec, input_size: int | None = None) -> bool:
    """Whether ImageNet weights for this backbone are on disk (no network, no hashing)."""
    if spec.imagenet_weights:
        return _pip_weights_available(spec)
    if spec.keras_weights is None:
        return False
    return expected_file(spec, input_size)[0].is_file()


def _pip_weights_available(spec: BackboneSpec) -> bool:
    """Whether a spec whose weights come from its own function can produce them offline."""
    if not spec.imagenet_available:
        return True  # the spec gives no cheap check; resolving will say what is missing
    return bool(resolve(spec.imagenet_available)(spec.name))


# ------------------------------------------------------------------------------------ resolve


def resolve_weights(
    spec: BackboneSpec,
    weights: str | os.PathLike | None,
    input_size: int | None = None,
    include_top: bool = False,
) -> WeightsRef:
    """Map a ``--weights`` value to a WeightsRef; never touches the network."""
    if weights is None or (isinstance(weights, str) and weights.strip().lower() in ("none", "")):
        return WeightsRef("none", None, None)
    if isinstance(weights, str) and weights.strip().lower() == "imagenet":
        return _resolve_imagenet(spec, input_size, include_top)
    # an object (s3://.../x.weights.h5): a local copy, cached by ETag; identified by its bytes' hash
    path = local_copy(str(weights)) if is_uri(weights) else Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"weights {str(weights)!r} is not 'imagenet', 'none' or an existing file "
            f"(for a file, save it with model.save_weights('NAME.weights.h5') from {spec.name})"
        )
    return WeightsRef("file", path.resolve(), file_digests(path)["sha256"])


def _resolve_imagenet(spec: BackboneSpec, input_size: int | None, include_top: bool) -> WeightsRef:
    if spec.imagenet_weights:
        path = Path(resolve(spec.imagenet_weights)())
        return WeightsRef("imagenet", path, file_digests(path)["sha256"])
    path, url, file_hash = expected_file(spec, input_size, include_top)
    if not path.is_file():
        raise ConfigError(missing_message(spec, path, url))
    digests = file_digests(path)
    if file_hash and file_hash not in (digests["md5"], digests["sha256"]):
        raise ConfigError(
            f"{path} does not match the hash Keras pins for it ({file_hash}): the file is damaged "
            f"or not {spec.name}'s. Delete it, then run 'imgfeat weights fetch {spec.name}' "
            f"or 'imgfeat weights import FILE --backbone {spec.name}'"
        )
    return WeightsRef("imagenet", path, digests["sha256"])


def missing_message(spec: BackboneSpec, path: Path, url: str) -> str:
    return (
        f"ImageNet weights for {spec.name} are not cached: {path} is missing "
        f"(Keras downloads it from {url}). On a machine with internet run "
        f"'imgfeat weights fetch {spec.name}'; or copy the file to this machine and run "
        f"'imgfeat weights import FILE --backbone {spec.name}'; or set KERAS_HOME to a folder "
        f"whose models/ holds {path.name}. Use --weights none for random weights."
    )


# ------------------------------------------------------------------------------------ digests


def file_digests(path: Path) -> dict[str, str]:
    """md5 (Keras' pin for most files) and sha256 (our identity) of a file, cached on disk.

    The cache lives in the Keras cache folder (never beside a user's own file) and is keyed by
    absolute path, size and mtime, so a replaced file is hashed again and a 500 MB file is not
    re-read on every run.
    """
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = keras_cache_dir() / DIGEST_CACHE
    cache = _read_digest_cache(cache_file)
    if key in cache:
        return cache[key]
    digests = _hash_file(path)
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{path}|")}
    cache[key] = digests
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, cache_file)
    return digests


def _read_digest_cache(cache_file: Path) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(cache_file.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _hash_file(path: Path) -> dict[str, str]:
    return hashing.file_digests(path, ("md5", "sha256"))


# ----------------------------------------------------------------------- hand Keras the file


@contextlib.contextmanager
def keras_offline(path: Path) -> Iterator[None]:
    """While building with weights='imagenet', Keras' get_file returns our verified file, never downloads.

    Keras must see weights='imagenet' (EfficientNet adds a layer for it), but its get_file would try
    the network if its cache path differed from ours; this pins it to the file we hashed.
    """
    from keras.src.utils import file_utils

    def cached_only(fname: str, origin: str | None = None, **_: Any) -> str:
        if Path(fname).name != path.name:
            raise ConfigError(f"Keras asked for {fname}, expected {path.name}: the registry is out of date")
        return str(path)

    with _GET_FILE_LOCK:
        original = file_utils.get_file
        file_utils.get_file = cached_only
        try:
            yield
        finally:
            file_utils.get_file = original


# ------------------------------------------------------------------------------- list, fetch, import


def fetch_weights(spec: BackboneSpec, timeout_s: float = FETCH_TIMEOUT_S) -> Path:
    """Download the ImageNet no-top file into the Keras cache (machines with internet only)."""
    if spec.imagenet_weights:
        return resolve_weights(spec, "imagenet").file  # the pip package provides it
    path, url, file_hash = expected_file(spec)
    if path.is_file():
        return resolve_weights(spec, "imagenet").file
    import keras

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # urllib inherits it: an offline machine fails fast
    try:
        got = keras.utils.get_file(
            path.name, url, cache_subdir="models", cache_dir=str(path.parent.parent), file_hash=file_hash
        )
    except Exception as exc:  # URLError, timeout, hash mismatch: all mean "not fetched"
        raise ImgfeatError(
            f"could not download {url}: {type(exc).__name__}: {exc}. This machine may be offline: "
            f"download the file elsewhere and run 'imgfeat weights import FILE --backbone {spec.name}'"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return Path(got)
