"""Extract executors: the interface (base.py), the local executor (local.py) and the Ray one (ray.py),
picked by name here."""

from __future__ import annotations

from typing import Any

from imgfeat.extract.executors.base import (
    EXECUTORS,
    PRECISIONS,
    BatchReport,
    Executor,
    ExecutorConfig,
    ExtractJob,
    timed_build,
)
from imgfeat.extract.executors.local import LocalExecutor
from imgfeat.extract.executors.ray import RayExecutor

__all__ = [
    "EXECUTORS",
    "PRECISIONS",
    "BatchReport",
    "Executor",
    "ExecutorConfig",
    "ExtractJob",
    "timed_build",
    "make_executor",
]


def make_executor(cfg: ExecutorConfig, seam: Any = None) -> Executor:
    """The executor ``cfg`` names; ``seam`` (a ``local.ShardSeam``, tests only) reaches its shard tasks."""
    if cfg.name == "ray":
        return RayExecutor(cfg, seam) if seam is not None else RayExecutor(cfg)
    return LocalExecutor(cfg, seam) if seam is not None else LocalExecutor(cfg)
