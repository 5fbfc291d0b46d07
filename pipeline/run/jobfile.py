"""Job files: a TOML document parsed and checked into frozen stage configs for `imgfeat run`."""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgfeat.core.errors import ConfigError
from imgfeat.core.ranges import RANGES
from imgfeat.core.sizes import parse_size
from imgfeat.core.stores import is_uri
from imgfeat.core.workspace import check_name

EXECUTORS = ("local", "ray")
SECTIONS = ("run", "storage", "datasets", "finetune", "features", "heads", "indexes", "dedup")
# [run] keys that configure the extract executor (ExecutorConfig fields, after EXECUTOR_FIELDS).
EXECUTOR_KEYS = ("workers", "ray_actors", "ray_address", "gpus_per_worker", "in_flight")
EXECUTOR_FIELDS = {"ray_actors": "actors", "ray_address": "address"}
# Config fields holding paths: relative values are resolved against the job file's folder.
PATH_KEYS = ("root", "labels_csv")


@dataclass(frozen=True)
class KeyType:
    """What a job-file key accepts: a name for messages and the check a TOML value must pass."""

    name: str
    accepts: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


BOOL = KeyType("a boolean (true or false)", lambda v: isinstance(v, bool))
INT = KeyType("an integer", _is_int)
NUMBER = KeyType("a number", lambda v: _is_int(v) or isinstance(v, float))
SECONDS = KeyType("a number of seconds", NUMBER.accepts)  # its range: core/ranges.py "wait"
TEXT = KeyType("a string", lambda v: isinstance(v, str))
PATH = KeyType("a path (a string)", lambda v: isinstance(v, (str, os.PathLike)))
NUMBERS = KeyType("a list of numbers", lambda v: isinstance(v, list) and all(NUMBER.accepts(x) for x in v))
SIZE = KeyType(
    'a size such as "256MB" or a number of bytes', lambda v: _is_int(v) or isinstance(v, str)
)  # its units and range: core/sizes.py
SIZE_KEYS = ("memory_budget",)
NAMES = KeyType(
    "a name or a list of names",
    lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
)

# Config field annotations -> the KeyType a job-file value for that field must pass.
FIELD_TYPES: dict[Any, KeyType] = {
    bool: BOOL,
    int: INT,
    float: NUMBER,
    str: TEXT,
    os.PathLike: PATH,
    tuple[float, ...]: NUMBERS,
}

# Keys that are not fields of a stage config, per section (extend here for new sections/keys).
JOB_KEY_TYPES: dict[str, dict[str, KeyType]] = {
    "run": {
        "max_error_rate": NUMBER,
        "executor": TEXT,
        "wait": SECONDS,
        "workspace": PATH,
        "workers": INT,
        "ray_actors": INT,
        "ray_address": TEXT,
        "gpus_per_worker": NUMBER,
        "in_flight": INT,
        "memory_budget": SIZE,
    },
    "features": {"datasets": NAMES, "finetune": TEXT},
    "finetune": {"dataset": TEXT},
    "heads": {"dataset": TEXT, "features": TEXT, "predict": NAMES, "report": BOOL},
    "indexes": {"features": TEXT, "datasets": NAMES},
    "dedup": {"features": TEXT, "dataset": TEXT},
}


@dataclass(frozen=True)
class FeatureJob:
    """A featureset recipe (ExtractConfig without a dataset) and the datasets it runs on."""

    name: str
    options: dict[str, Any]
    datasets: tuple[str, ...]
    finetune: str | None = None  # a [finetune.NAME]: extract with its tuned weights


@dataclass(frozen=True)
class FinetuneJob:
    """A fine-tune (FinetuneConfig options) of a backbone on one dataset; features may use its weights."""

    name: str
    dataset: str
    options: dict[str, Any]


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
class IndexJob:
    """A nearest-neighbour index over one featureset recipe's rows of some datasets, kept current."""

    name: str
    features: str
    datasets: tuple[str, ...]
    options: dict[str, Any]


@dataclass(frozen=True)
class DedupJob:
    """Near-duplicates, leaks and label conflicts of one dataset by one featureset recipe, kept current."""

    name: str
    features: str
    dataset: str
    options: dict[str, Any]


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
    indexes: tuple[IndexJob, ...] = ()
    trust_pickle: bool = False  # --trust-pickle: old joblib heads may be loaded (never from the file)
    executor_options: dict[str, Any] = field(default_factory=dict)  # ExecutorConfig fields from [run]
    finetunes: tuple[FinetuneJob, ...] = ()
    dedups: tuple[DedupJob, ...] = ()
    memory_budget: int | None = None  # [run] memory_budget: every stage's unless its own table sets one
    storage: dict[str, str] = field(default_factory=dict, repr=False)  # [storage]: object-store options (secrets)


def load_job(path: Path, overrides: tuple[str, ...] = (), workspace: Path | None = None) -> JobSpec:
    """Read a job file, apply ``--set section.name.key=value`` overrides, check it."""
    path = Path(path)
    doc = _read_toml(path)
    for item in overrides:
        apply_override(doc, item)
    return parse_job(doc, base=path.parent.absolute(), source=str(path), workspace=workspace)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"job file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"job file {path} is a folder; give the path of a .toml file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"job file {path} is not UTF-8 text (byte {exc.start}); a job file is a TOML document"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read job file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


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
    if not isinstance(run, dict):
        raise ConfigError(f"run = {toml_text(run)}: [run] must be a table (e.g. [run] then wait = 60)")
    _check_keys(run, tuple(JOB_KEY_TYPES["run"]), "[run]")
    check_types(run, JOB_KEY_TYPES["run"], "run")
    ws_text = str(workspace) if workspace else run.get("workspace")
    datasets = {
        check_name("dataset", name): _resolve_paths(dict(opts), base, ws_text)
        for name, opts in _tables(doc, "datasets").items()
    }
    finetunes = tuple(_finetune_job(n, o, datasets) for n, o in _tables(doc, "finetune").items())
    features = tuple(_feature_job(n, o, datasets) for n, o in _tables(doc, "features").items())
    for fjob in features:
        if fjob.finetune is not None:
            _must_exist((fjob.finetune,), [f.name for f in finetunes], "finetune", f"[features.{fjob.name}]")
    heads = tuple(_head_job(n, o, datasets, features) for n, o in _tables(doc, "heads").items())
    executor = run.get("executor", "local")
    if executor not in EXECUTORS:
        raise ConfigError(f"[run] executor {executor!r} is not one of {', '.join(EXECUTORS)}")
    rate = run.get("max_error_rate")
    if rate is not None and not (isinstance(rate, (int, float)) and 0 <= rate <= 1):
        raise ConfigError(f"[run] max_error_rate must be a number from 0 to 1, got {rate!r}")
    indexes = tuple(_index_job(n, o, features) for n, o in _tables(doc, "indexes").items())
    dedups = tuple(_dedup_job(n, o, features) for n, o in _tables(doc, "dedup").items())
    options = {EXECUTOR_FIELDS.get(k, k): run[k] for k in EXECUTOR_KEYS if k in run}
    return JobSpec(
        source,
        datasets,
        features,
        heads,
        rate,
        executor,
        run.get("wait"),
        ws_text,
        indexes=indexes,
        executor_options=options,
        finetunes=finetunes,
        dedups=dedups,
        memory_budget=None if "memory_budget" not in run else parse_size(run["memory_budget"], "run.memory_budget"),
        storage=_storage(doc.get("storage", {})),
    )


def _storage(table: Any) -> dict[str, str]:
    """[storage]: object-store options (``region = "eu-west-1"``), each a string, number or boolean."""
    if not isinstance(table, dict):
        raise ConfigError('[storage] must be a table of KEY = VALUE options, e.g. [storage] then region = "eu-west-1"')
    for key, value in table.items():
        if not isinstance(value, (str, int, float, bool)):
            raise ConfigError(
                f"[storage] {key} = {toml_text(value)}: a storage option must be a string, number or boolean"
            )
    return {str(k).lower(): (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in table.items()}


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
        if isinstance(opts.get(key), str) and not is_uri(opts[key]):  # s3://... stays as written
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
            raise ConfigError(
                f"{where} names {what} {n!r}, which the job file does not define "
                f"(defined: {', '.join(known) or 'none'})"
            )


def _pop_required(opts: dict[str, Any], key: str, where: str, hint: str = "") -> Any:
    """Take a key a section must have out of its options, or say which section lacks it."""
    if key not in opts:
        raise ConfigError(f"{where} needs '{key} = ...'" + (f" ({hint})" if hint else ""))
    return opts.pop(key)


def _features_named(feats: str, features: tuple, where: str) -> FeatureJob:
    """The job file's [features.NAME] a section refers to, or an error listing the defined ones."""
    _must_exist((feats,), [f.name for f in features], "features", where)
    return next(f for f in features if f.name == feats)


def _feature_job(name: str, opts: dict[str, Any], datasets: dict) -> FeatureJob:
    opts = dict(opts)
    where = f"[features.{name}]"
    check_types(opts, JOB_KEY_TYPES["features"], f"features.{name}")
    chosen = _names(opts.pop("datasets", list(datasets)), f"{where} datasets")
    _must_exist(chosen, list(datasets), "dataset", where)
    if "dataset" in opts:
        raise ConfigError(f"{where}: use 'datasets = [...]', not 'dataset'")
    finetune = opts.pop("finetune", None)
    return FeatureJob(check_name("features", name), opts, chosen, finetune)


def _finetune_job(name: str, opts: dict[str, Any], datasets: dict) -> FinetuneJob:
    opts = dict(opts)
    where = f"[finetune.{name}]"
    check_types(opts, JOB_KEY_TYPES["finetune"], f"finetune.{name}")
    dataset = _pop_required(opts, "dataset", where)
    _must_exist((dataset,), list(datasets), "dataset", where)
    return FinetuneJob(check_name("finetune", name), dataset, opts)


def _head_job(name: str, opts: dict[str, Any], datasets: dict, features: tuple) -> HeadJob:
    opts = dict(opts)
    where = f"[heads.{name}]"
    check_types(opts, JOB_KEY_TYPES["heads"], f"heads.{name}")
    dataset, feats = _pop_required(opts, "dataset", where), _pop_required(opts, "features", where)
    _must_exist((dataset,), list(datasets), "dataset", where)
    fjob = _features_named(feats, features, where)
    if dataset not in fjob.datasets:
        raise ConfigError(f"{where}: features {feats!r} are not extracted for dataset {dataset!r}")
    predict = _names(opts.pop("predict", [dataset]), f"{where} predict")
    _must_exist(predict, list(fjob.datasets), "dataset", f"{where} predict (features {feats!r})")
    report = opts.pop("report", True)
    return HeadJob(check_name("head", name), dataset, feats, opts, predict, report)


def _index_job(name: str, opts: dict[str, Any], features: tuple) -> IndexJob:
    opts = dict(opts)
    where = f"[indexes.{name}]"
    check_types(opts, JOB_KEY_TYPES["indexes"], f"indexes.{name}")
    feats = _pop_required(opts, "features", where, "a [features.NAME] of this job file")
    fjob = _features_named(feats, features, where)
    chosen = _names(opts.pop("datasets", list(fjob.datasets)), f"{where} datasets")
    _must_exist(chosen, list(fjob.datasets), "dataset", f"{where} datasets (features {feats!r})")
    for key in ("name", "featureset"):
        if key in opts:
            raise ConfigError(f"{where}: {key!r} is set by the job file (the table name and 'features')")
    return IndexJob(check_name("index", name), feats, chosen, opts)


def _dedup_job(name: str, opts: dict[str, Any], features: tuple) -> DedupJob:
    opts = dict(opts)
    where = f"[dedup.{name}]"
    check_types(opts, JOB_KEY_TYPES["dedup"], f"dedup.{name}")
    feats = _pop_required(opts, "features", where, "a [features.NAME] of this job file")
    fjob = _features_named(feats, features, where)
    if "dataset" not in opts and len(fjob.datasets) != 1:
        raise ConfigError(f"{where} needs 'dataset = ...' (features {feats!r} run on {', '.join(fjob.datasets)})")
    dataset = opts.pop("dataset", fjob.datasets[0])
    _must_exist((dataset,), list(fjob.datasets), "dataset", f"{where} dataset (features {feats!r})")
    for key in ("name", "featureset"):
        if key in opts:
            raise ConfigError(f"{where}: {key!r} is set by the job file (the table name and 'features')")
    return DedupJob(check_name("dedup", name), feats, dataset, opts)


def build_config(cls: type, values: dict[str, Any], where: str, **fixed: Any) -> Any:
    """Make a stage's frozen config from job-file values, naming any key it does not have.

    ``where`` is the dotted table (``features.lite0``); every value is checked against the
    type of the config field it sets before the config is built.
    """
    allowed = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in allowed or key in fixed:
            raise ConfigError(f"[{where}]: unknown key {key!r} (allowed: {', '.join(sorted(allowed - set(fixed)))})")
    check_types(values, field_types(cls), where)
    try:
        return cls(**{**values, **fixed})
    except (TypeError, ValueError, ConfigError) as exc:
        said = str(exc)
        if said.startswith((f"[{where}]", f"{where}.")):  # it names the table already
            raise
        raise ConfigError(f"[{where}]: {said}") from None


def field_types(cls: type) -> dict[str, KeyType]:
    """The KeyType of each field of a config dataclass whose annotation FIELD_TYPES knows."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        kind = SIZE if name in SIZE_KEYS else _key_type(hint)
        if kind is not None:
            out[name] = kind
    return out


def _key_type(hint: Any) -> KeyType | None:
    parts = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = {FIELD_TYPES.get(p) or FIELD_TYPES.get(typing.get_origin(p)) for p in parts if p is not type(None)}
    if len(kinds) == 2 and kinds == {TEXT, PATH}:  # ``str | os.PathLike``
        return PATH
    return kinds.pop() if len(kinds) == 1 else None


def check_types(values: dict[str, Any], expected: dict[str, KeyType], where: str) -> None:
    """Raise a ConfigError naming ``where.key``, the value and the type it should have, or the
    range (core/ranges.py, shared with the flags) a number must be in."""
    for key, value in values.items():
        kind = expected.get(key)
        if kind is not None and not kind.accepts(value):
            raise ConfigError(f"{where}.{key} = {toml_text(value)}: expected {kind.name}, got {_toml_type(value)}")
        if kind is SIZE:
            parse_size(value, f"{where}.{key}")
            continue
        rng = RANGES.get(key)
        if kind is not None and rng is not None and not rng.allows(value):
            raise ConfigError(f"{where}.{key} = {toml_text(value)}: expected {rng.text()}")


def toml_text(value: Any) -> str:
    """A value as it would be written in TOML (strings quoted, booleans lower-case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float, list, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _toml_type(value: Any) -> str:
    for kind, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (list, "an array"),
        (dict, "a table"),
    ):
        if isinstance(value, kind):
            return name
    return f"a {type(value).__name__}"
