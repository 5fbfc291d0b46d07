"""A featureset's identity: the provenance of its numbers, their fingerprint, and the featureset name."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

# Only these provenance keys change the numbers; everything else (versions, dates) is informative.
FINGERPRINT_KEYS = (
    "backbone",
    "weights",
    "input_size",
    "pooling",
    "layer",
    "interpolation",
    "fast_decode",
    "exif",
    "precision",
    "dtype",
)
_UNSAFE = re.compile(r"[^A-Za-z0-9._]+")


def fingerprint(provenance: dict[str, Any]) -> str:
    """sha256 over the number-changing keys, as canonical JSON (stable across runs and hosts)."""
    core = {k: provenance.get(k) for k in FINGERPRINT_KEYS}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def featureset_name(provenance: dict[str, Any]) -> str:
    """``<backbone>-<size>-<pooling or layer>-<dtype>-<fingerprint8>``."""
    what = provenance["layer"] or provenance["pooling"]
    if provenance["layer"]:
        what = f"{_UNSAFE.sub('_', what)}.{provenance['pooling']}"
    parts = (provenance["backbone"], str(provenance["input_size"]), what, provenance["dtype"])
    return "-".join(parts) + "-" + fingerprint(provenance)[:8]


def weights_identity(kind: str, sha256: str | None, seed: int) -> str:
    """What the fingerprint records for the weights: the file's sha256, or ``none`` + seed + backend.

    A seeded random init draws different numbers on each Keras backend, so for ``none`` the backend
    is part of the identity; a weights file gives the same numbers on every backend.
    """
    return f"sha256:{sha256}" if sha256 else f"none:seed={seed}:backend={keras_backend()}"


def keras_backend() -> str:
    """The Keras backend in use, without importing Keras (which would import TensorFlow) when possible."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    config = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "keras.json"
    try:
        return json.loads(config.read_text()).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def make_provenance(core: dict[str, Any], dim: int) -> dict[str, Any]:
    """The full ``_featureset.json`` object: the numbers' inputs plus where and when it was made.

    ``core`` also carries ``weights_kind``, ``weights_source`` and ``seed``, so the config can be
    rebuilt from the file (``imgfeat predict IMAGE``).
    """
    import keras

    prov = dict(core)
    prov.update(
        {
            "dim": int(dim),
            "keras_version": keras.__version__,
            "backend": keras.backend.backend(),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "fingerprint": fingerprint(prov),
        }
    )
    prov["featureset"] = featureset_name(prov)
    return prov
