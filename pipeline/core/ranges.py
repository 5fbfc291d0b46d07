"""Every numeric option's allowed range, defined once for its flag, its job-file key and its config.

A value out of range is a usage error (exit 2) that names the key, the value and the range, at
the edge: a typo such as ``in_flight = 4611686018427387904`` must never reach an allocation or a
loop. The bounds are sane limits, not tuning advice: far above any useful value, far below one
that would exhaust memory or time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from imgfeat.core.errors import ConfigError
from imgfeat.core.sizes import BUDGET_MAX, BUDGET_MIN, parse_size

SEED_MAX = 2**32 - 1  # numpy, Keras and FAISS seeds are 32-bit
WEEK_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Range:
    """Inclusive bounds of one option; ``integer``: whole numbers only (booleans never)."""

    lo: float
    hi: float
    integer: bool = True

    def allows(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        return math.isfinite(value) and self.lo <= value <= self.hi

    def text(self) -> str:
        kind = "an integer" if self.integer else "a number"
        return f"{kind} from {_num(self.lo)} to {_num(self.hi)}"


def _num(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) and not v.is_integer() else f"{int(v)}"


def _ints(lo: int, hi: int) -> Range:
    return Range(lo, hi, True)


def _floats(lo: float, hi: float) -> Range:
    return Range(lo, hi, False)


FRACTION = _floats(0.0, 1.0)

# Keyed by the config field (and job-file key) name; a flag names its key (``--top-k`` -> top_k).
RANGES: dict[str, Range] = {
    # scan
    "max_pixels": _ints(1, 1 << 34),
    "test_fraction": FRACTION,
    # extract and its executors
    "input_size": _ints(1, 4096),
    "batch_size": _ints(1, 8192),
    "shard_size": _ints(1, 1 << 20),
    "workers": _ints(1, 1024),
    "in_flight": _ints(1, 64),
    "max_file_bytes": _ints(1, 64 << 30),
    "seed": _ints(0, SEED_MAX),
    "actors": _ints(1, 4096),
    "ray_actors": _ints(1, 4096),
    "gpus_per_worker": _floats(0.0, 64.0),
    "cpus_per_worker": _floats(0.001, 1024.0),
    "max_error_rate": FRACTION,
    # train, predict, report
    "cv": _ints(2, 100),
    "c": _floats(1e-12, 1e12),  # each value of a logreg/svm C grid (c_grid: at most C_GRID_MAX of them)
    "random_state": _ints(0, SEED_MAX),
    "cv_max_rows": _ints(1, 100_000_000),
    "max_iter": _ints(1, 10_000_000),
    "epochs": _ints(1, 100_000),
    "hidden": _ints(1, 65_536),
    "dropout": _floats(0.0, 0.99),
    "learning_rate": _floats(1e-12, 10.0),
    "patience": _ints(1, 100_000),
    "n_jobs": _ints(1, 1024),
    "top_k": _ints(1, 1000),
    "chunk_rows": _ints(1, 1 << 24),
    "shard_rows": _ints(1, 1 << 24),
    "max_mistakes": _ints(0, 10_000),
    "max_points": _ints(2, 1_000_000),
    "thumb_size": _ints(8, 1024),
    # train, predict, report, index, dedup: bytes of features held at once (core/sizes.py parses "256MB")
    "memory_budget": _ints(BUDGET_MIN, BUDGET_MAX),  # a size: core/sizes.parse_size reads the text
    # finetune
    "unfreeze_blocks": _ints(1, 1000),
    "warmup_epochs": _ints(0, 100_000),
    "warmup_learning_rate": _floats(1e-12, 10.0),
    "val_fraction": FRACTION,
    # index, similar, dedup
    "nlist": _ints(1, 1 << 20),
    "nprobe": _ints(1, 1 << 20),
    "hnsw_m": _ints(2, 256),
    "ef_search": _ints(1, 1 << 20),
    "top": _ints(1, 10_000),
    "neighbours": _ints(1, 1000),
    "threshold": FRACTION,
    "calibration_images": _ints(0, 10_000),
    # tools
    "per_class": _ints(1, 100_000),
    "repeat": _ints(1, 1000),
    "limit": _ints(1, 100_000_000),
    # every lock wait: 0 (fail fast) to a week; never nan, inf or negative
    "wait": _floats(0.0, WEEK_S),
}

C_GRID_MAX = 100


def range_of(key: str) -> Range:
    return RANGES[key]


def check_range(key: str, value: Any, where: str = "") -> None:
    """ConfigError unless ``value`` (None: unset) is in ``key``'s range; ``where`` names the
    value as the user wrote it (``[run] in_flight``, ``features.x.batch_size``)."""
    rng = RANGES.get(key)
    if value is None or rng is None or rng.allows(value):
        return
    raise ConfigError(f"{where or key} = {value!r}: expected {rng.text()}")


def check_fields(config: Any, where: str = "") -> None:
    """Check every field of a config dataclass that has a range (call from ``__post_init__``); a
    ``memory_budget`` given as a size text (``256MB``) is first set to its bytes."""
    if getattr(config, "memory_budget", None) is not None:
        object.__setattr__(config, "memory_budget", parse_size(config.memory_budget, f"{where}memory_budget"))
    for key in RANGES:
        if hasattr(config, key):
            check_range(key, getattr(config, key), f"{where}{key}")
