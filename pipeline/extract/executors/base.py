"""The executor interface: `ExecutorConfig`, `ExtractJob`, `BatchReport`, `Executor`, and the recipe's
model built and timed (`timed_build`); the executors (local.py, ray.py) build on it, the package picks one."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from imgfeat.backbones import build_model
from imgfeat.core.errors import ConfigError, unknown_value
from imgfeat.core.options import opt
from imgfeat.core.ranges import check_fields
from imgfeat.core.results import JsonObject
from imgfeat.core.schemas import ErrorRow
from imgfeat.core.workspace import Workspace
from imgfeat.extract.batches import InputSpec, Item
from imgfeat.extract.compilecache import enable_compile_cache
from imgfeat.extract.recipe import Provenance, Resolved, keras_backend

EXECUTORS = ("local", "ray")
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExecutorConfig:
    """Where the model runs and how wide. ``workers``: decoders, on every executor (threads or
    processes here, default the CPU count; concurrent decode tasks on Ray, default as many as fit).
    ``in_flight``: batches submitted to the model before the oldest is fetched (both). Ray only:
    ``actors`` backbone actors (default one per GPU, or one per node without GPUs), ``address``,
    ``gpus_per_worker`` and ``cpus_per_worker`` (per backbone actor)."""

    name: str = opt(
        "local",
        flag="--executor",
        choices=EXECUTORS,
        help="run here, or on Ray Data: decode as CPU tasks, the backbone in an actor pool",
    )
    workers: int | None = None  # the flag is extract's (ExtractConfig.workers), handed on here
    actors: int | None = opt(
        None,
        flag="--ray-actors",
        metavar="N",
        help="backbone actors (default: one per GPU, or one per node without GPUs)",
    )
    address: str | None = opt(
        None,
        flag="--ray-address",
        metavar="ADDR",
        help="'auto' (an existing cluster), 'local', 'ray://HOST:PORT' or HOST:PORT "
        "(default: $RAY_ADDRESS, a cluster on this machine, else a private one)",
    )
    gpus_per_worker: float | None = opt(
        None, metavar="G", help="GPUs per backbone actor (default: 1 when the cluster has GPUs, else 0)"
    )
    cpus_per_worker: float = 1.0
    # batches submitted to the model and not yet fetched (imgfeat.extract.forward)
    in_flight: int = opt(
        2,
        metavar="N",
        help="batches submitted to the model before the oldest result is fetched (default 2; changes no numbers)",
    )

    def __post_init__(self) -> None:
        if self.name not in EXECUTORS:
            raise unknown_value("executor", str(self.name), EXECUTORS)
        for key in ("workers", "actors", "in_flight"):
            w = getattr(self, key)
            if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
                raise ConfigError(f"{key.replace('_', ' ')} must be a positive integer, got {w!r}")
        a = self.address
        if a is not None and not (
            isinstance(a, str) and (a in ("auto", "local") or a.startswith("ray://") or _host_port(a))
        ):
            raise ConfigError(f"invalid Ray address {a!r}: use 'auto', 'local', 'ray://HOST:PORT' or HOST:PORT")
        g, c = self.gpus_per_worker, self.cpus_per_worker
        if g is not None and not (_is_number(g) and g >= 0):
            raise ConfigError(f"gpus per worker must be a number, 0 or more, got {g!r}")
        if not (_is_number(c) and c > 0):
            raise ConfigError(f"cpus per worker must be a number more than 0, got {c!r}")
        check_fields(self)  # and below the ranges of core/ranges.py: never an allocation by a typo


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _host_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit()


@dataclass(frozen=True)
class ExtractJob:
    """What an executor needs to build its model and write shards: builders, not built objects."""

    ws: Workspace
    resolved: Resolved
    provenance: Provenance
    inputs: InputSpec
    shard_size: int
    npy: bool
    run_id: str  # what the rows say
    shard_tag: str  # what the shards are named by: unique per extract call in the featureset (next_shard_tag)
    # a workspace in a bucket: its URI, so a worker on another machine writes its shards there itself
    workspace_uri: str | None = None

    @property
    def featureset(self) -> str:
        return self.provenance.featureset


@dataclass
class BatchReport:
    """What a batch of the shard task computed (rows, error rows, timings), or, in a shard's last
    report, the feature shards it committed; Ray sends one per shard (``local.shard_report``)."""

    extracted: int
    errors: list[ErrorRow] = field(default_factory=list)  # decode / read error rows
    model_seconds: float = 0.0
    decode_seconds: float = 0.0
    input_wait_seconds: float = 0.0  # the model idle before this batch: the pipeline's stall time
    build_seconds: float = 0.0  # a model build paid before this batch
    shards: list[str] = field(default_factory=list)  # feature shards the shard task committed

    def to_json(self) -> JsonObject:
        return {**asdict(self), "errors": [r.to_json() for r in self.errors]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> BatchReport:
        return cls(**{**obj, "errors": [ErrorRow.from_json(r) for r in obj["errors"]]})


class Executor(Protocol):
    """Runs the backbone over todo items; the driver holds the lock and writes provenance and scan errors."""

    name: str

    def run(self, job: ExtractJob, items: Iterable[Item], sink: Any) -> Iterator[BatchReport]:
        """Yield one report per batch; ``sink.put(ids, X, errors)`` commits rows in order (local)."""
        ...

    def info(self) -> JsonObject:
        """Executor-specific figures for the summary (e.g. the Ray pool plan)."""
        ...


def timed_build(resolved: Resolved, precision: str) -> tuple[Any, float]:
    """The recipe's model, built once under the precision's policy, and the seconds it took."""
    # Said before Keras loads (seconds of silence otherwise): the first line a user sees is ours.
    r = resolved.recipe
    log.info("building %s at %d px (%s weights) ...", r.backbone, r.input_size, resolved.source.kind)
    t0 = time.perf_counter()
    if keras_backend() == "jax":  # before the first compile: the initialisers are compiles too
        enable_compile_cache()
    model = build_model(
        resolved.spec,
        resolved.source.build_arg(),
        r.input_size,
        r.pooling,
        r.layer,
        resolved.source.seed,
        resolved_weights=resolved.ref,
        dtype_policy=PRECISIONS[precision],
    )
    return model, time.perf_counter() - t0
