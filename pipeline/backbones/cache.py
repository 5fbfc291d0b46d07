"""The offline Keras weights cache as a table (the file each backbone needs, cached or not) and a file
brought from elsewhere imported into it, identified by its hash or name; the weights themselves are weights.py."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from imgfeat.backbones.registry import BACKBONES
from imgfeat.backbones.spec import BackboneSpec
from imgfeat.backbones.weights import _hash_file, expected_file, is_cached
from imgfeat.core.errors import ConfigError
from imgfeat.core.storage import atomic_path

log = logging.getLogger(__name__)


def weights_table() -> list[dict[str, Any]]:
    """One row per backbone: the ImageNet file it needs, whether it is cached, and where."""
    rows = []
    path: Path | None
    file_hash: str | None
    source: str | None
    for spec in BACKBONES:
        if spec.keras_weights is not None:
            path, url, file_hash = expected_file(spec)
            source = url
        else:
            path, file_hash, source = None, None, spec.imagenet_weights
        rows.append(
            {
                "backbone": spec.name,
                "file": path.name if path else "(from a pip package)",
                "cached": is_cached(spec),
                "path": str(path) if path else None,
                "source": source,
                "file_hash": file_hash,
            }
        )
    return rows


def import_weights(source: Path, spec: BackboneSpec | None = None) -> tuple[BackboneSpec, Path]:
    """Copy a weights file brought from elsewhere into the Keras cache under its Keras name."""
    source = Path(source).expanduser()
    if not source.is_file():
        raise ConfigError(f"no such weights file: {source}")
    digests = _hash_file(source)
    spec = spec or _identify(source, digests)
    path, _, file_hash = expected_file(spec)
    if file_hash and file_hash not in digests.values():
        raise ConfigError(
            f"{source} is not {spec.name}'s ImageNet no-top file: its hash is {digests['md5']} (md5), "
            f"Keras pins {file_hash} for {path.name}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)
    log.info("imported %s as %s", source, path)
    return spec, path


def _identify(source: Path, digests: dict[str, str]) -> BackboneSpec:
    """Which backbone a file belongs to: by its Keras hash, else by its Keras file name."""
    keras_specs = [s for s in BACKBONES if s.keras_weights is not None]
    for spec in keras_specs:
        if spec.keras_weights is not None and spec.keras_weights.file_hash in digests.values():  # (always set)
            return spec
    for spec in keras_specs:
        if expected_file(spec)[0].name == source.name:
            return spec
    raise ConfigError(
        f"cannot tell which backbone {source.name} belongs to (neither its hash nor its name is a "
        f"Keras ImageNet no-top file); pass --backbone NAME"
    )
