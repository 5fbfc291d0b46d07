"""Job files: a TOML document parsed and checked into frozen stage configs for `imgfeat run`."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgfeat.core.errors import ConfigError
from imgfeat.core.workspace import check_name

EXECUTORS = ("local", "ray")
SECTIONS = ("run", "datasets", "features", "heads")
# [run] keys that configure the extract executor (ExecutorConfig fields, after EXECUTOR_FIELDS).
EXECUTOR_KEYS = ("workers", "ray_actors", "ray_address", "gpus_per_worker")
EXECUTOR_FIELDS = {"ray_actors": "actors", "ray_address": "address"}
RUN_KEYS = ("max_error_rate", "executor", "wait", "workspace", *EXECUTOR_KEYS)
# Keys of a [features.NAME] table that are not ExtractConfig fields.
FEATURE_KEYS = ("datasets",)
# Keys of a [heads.NAME] table that are not TrainConfig fields.
HEAD_KEYS = ("features", "predict", "report")
# Config fields holding paths: relative values are resolved against the job file's folder.
PATH_KEYS = ("root", "labels_csv")


@dataclass(frozen=True)
class FeatureJob:
    """A featureset recipe (ExtractConfig without a dataset) and the datasets it runs on."""

    name: str
    options: dict[str, Any]
    datasets: tuple[str, ...]


@dataclass(frozen=True)
class HeadJob:
    """A head to train on one dataset's features, what to predict with it, whether to report."""

    name: str
    dataset: str
    features: str
    options: dict[str, Any]
    predict: tuple[str, ...]
    report: bool = True


@dataclass(frozen=True)
class JobSpec:
    """A whole job file, checked: every name it refers to exists."""

    source: str
    datasets: dict[str, dict[str, Any]]
    features: tuple[FeatureJob, ...]
    heads: tuple[HeadJob, ...]
    max_error_rate: float | None = None
    executor: str = "local"
    wait: float | None = None
    workspace: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    executor_options: dict[str, Any] = field(default_factory=dict)  # ExecutorConfig fields from [run]


def load_job(path: Path, overrides: tuple[str, ...] = (), workspace: Path | None = None) -> JobSpec:
    """Read a job file, apply ``--set section.name.key=value`` overrides, check it."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"job file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for item in overrides:
        apply_override(doc, item)
    return parse_job(doc, base=path.parent.absolute(), source=str(path), workspace=workspace)


def apply_override(doc: dict[str, Any], item: str) -> None:
    """``features.lite0.batch_size=64``: the value is read as TOML, else kept as a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE (e.g. features.lite0.batch_size=64), got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    *parents, last = [k.strip() for k in key.split(".")]
    node = doc
    for k in parents:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {k!r} is not a table")
    node[last] = value


def parse_job(doc: dict[str, Any], base: Path, source: str, workspace: Path | None) -> JobSpec:
    _check_keys(doc, SECTIONS, "the job file")
    run = doc.get("run", {})
    _check_keys(run, RUN_KEYS, "[run]")
    ws_text = str(workspace) if workspace else run.get("workspace")
    datasets = {
        check_name("dataset", name): _resolve_paths(dict(opts), base, ws_text)
        for name, opts in _tables(doc, "datasets").items()
    }
    features = tuple(_feature_job(n, o, datasets) for n, o in _tables(doc, "features").items())
    heads = tuple(_head_job(n, o, datasets, features) for n, o in _tables(doc, "heads").items())
    executor = run.get("executor", "local")
    if executor not in EXECUTORS:
        raise ConfigError(f"[run] executor {executor!r} is not one of {', '.join(EXECUTORS)}")
    rate = run.get("max_error_rate")
    if rate is not None and not (isinstance(rate, (int, float)) and 0 <= rate <= 1):
        raise ConfigError(f"[run] max_error_rate must be a number from 0 to 1, got {rate!r}")
    options = {EXECUTOR_FIELDS.get(k, k): run[k] for k in EXECUTOR_KEYS if k in run}
    return JobSpec(source, datasets, features, heads, rate, executor, run.get("wait"), ws_text,
                   executor_options=options)


def _tables(doc: dict[str, Any], section: str) -> dict[str, dict[str, Any]]:
    tables = doc.get(section, {})
    if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
        raise ConfigError(f"[{section}] must hold one table per name, e.g. [{section}.NAME]")
    return tables


def _check_keys(table: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")


def _resolve_paths(opts: dict[str, Any], base: Path, workspace: str | None) -> dict[str, Any]:
    for key in PATH_KEYS:
        if isinstance(opts.get(key), str):
            text = opts[key].replace("{workspace}", workspace or "data")
            opts[key] = Path(text).expanduser() if Path(text).expanduser().is_absolute() else base / text
    return opts


def _names(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{where} must be a name or a list of names, got {value!r}")


def _must_exist(names: tuple[str, ...], known: list[str], what: str, where: str) -> None:
    for n in names:
        if n not in known:
            raise ConfigError(f"{where} names {what} {n!r}, which the job file does not define "
                              f"(defined: {', '.join(known) or 'none'})")


def _feature_job(name: str, opts: dict[str, Any], datasets: dict) -> FeatureJob:
    opts = dict(opts)
    where = f"[features.{name}]"
    chosen = _names(opts.pop("datasets", list(datasets)), f"{where} datasets")
    _must_exist(chosen, list(datasets), "dataset", where)
    if "dataset" in opts:
        raise ConfigError(f"{where}: use 'datasets = [...]', not 'dataset'")
    return FeatureJob(check_name("features", name), opts, chosen)


def _head_job(name: str, opts: dict[str, Any], datasets: dict, features: tuple) -> HeadJob:
    opts = dict(opts)
    where = f"[heads.{name}]"
    for key in ("dataset", "features"):
        if key not in opts:
            raise ConfigError(f"{where} needs '{key} = ...'")
    dataset, feats = opts.pop("dataset"), opts.pop("features")
    _must_exist((dataset,), list(datasets), "dataset", where)
    _must_exist((feats,), [f.name for f in features], "features", where)
    fjob = next(f for f in features if f.name == feats)
    if dataset not in fjob.datasets:
        raise ConfigError(f"{where}: features {feats!r} are not extracted for dataset {dataset!r}")
    predict = _names(opts.pop("predict", [dataset]), f"{where} predict")
    _must_exist(predict, list(fjob.datasets), "dataset", f"{where} predict (features {feats!r})")
    report = opts.pop("report", True)
    return HeadJob(check_name("head", name), dataset, feats, opts, predict, bool(report))


def build_config(cls: type, values: dict[str, Any], where: str, **fixed: Any) -> Any:
    """Make a stage's frozen config from job-file values, naming any key it does not have."""
    allowed = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in allowed or key in fixed:
            raise ConfigError(
                f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed - set(fixed)))})"
            )
    try:
        return cls(**{**values, **fixed})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
