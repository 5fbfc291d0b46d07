"""Light heads on bottleneck features: train, predict and report stages (see each module).

The names below load on first use (PEP 562), so importing one module of this package, such as
``imgfeat.heads.data``, does not import every stage with scikit-learn and matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "LoadedHead": "artifacts",
    "load_head": "artifacts",
    "HEAD_KINDS": "train",
    "KerasMLPClassifier": "estimators",
    "PredictConfig": "predict",
    "run_predict": "predict",
    "ReportConfig": "report",
    "run_report": "report",
    "TrainConfig": "train",
    "run_train": "train",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
