"""What a workspace holds (``imgfeat ls``) and what ``imgfeat prune`` may delete: superseded heads, unused featuresets."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imgfeat.core import names as N
from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError
from imgfeat.core.storage import FileLock, column_values
from imgfeat.core.workspace import Workspace
from imgfeat.heads.artifacts import HEAD_FILE
from imgfeat.heads.versions import committed_heads, featureset_index, head_index, names_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    rows: int
    ok: int
    labels: int  # distinct labels
    created: str | None


@dataclass(frozen=True)
class FeaturesetEntry:
    featureset: str
    recipes: list[str]  # the recipe names it was recorded under (job file [features.NAME], --name)
    latest_of: list[str]  # the recipe names it is the latest version of
    backbone: str | None
    rows: int
    errors: int
    datasets: dict[str, int]  # dataset -> its images with a feature row here
    created: str | None


@dataclass(frozen=True)
class HeadEntry:
    head_id: str
    name: str
    kind: str
    model_kind: str
    dataset: str
    featureset: str
    accuracy: float | None
    created: str | None
    latest: bool


@dataclass(frozen=True)
class Catalog:
    """Everything ``imgfeat ls`` shows, newest first within each kind."""

    root: str
    datasets: list[DatasetEntry]
    featuresets: list[FeaturesetEntry]
    heads: list[HeadEntry]
    indexes: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def list_workspace(ws: Workspace) -> Catalog:
    """Datasets, featuresets and heads (and nearest-neighbour indexes, once they exist)."""
    manifests = _manifest_ids(ws)
    return Catalog(str(ws.root), _datasets(ws), _featuresets(ws, manifests), _heads(ws), list_indexes(ws))


def list_indexes(ws: Workspace) -> list[dict[str, Any]]:
    """Nearest-neighbour indexes (``imgfeat index``), as their provenance says."""
    from imgfeat.index import list_indexes as lister

    return [e.to_json() for e in lister(ws)]


def _manifest_ids(ws: Workspace) -> dict[str, set[str]]:
    return {d: set(column_values([ws.manifest_path(d)], S.IMAGE_ID)) for d in ws.list_names("datasets")
            if ws.manifest_path(d).is_file()}


def _datasets(ws: Workspace) -> list[DatasetEntry]:
    from imgfeat.scan.manifest import manifest_info, read_manifest

    out = []
    for d in ws.list_names("datasets"):
        if not ws.manifest_path(d).is_file():
            continue
        t = read_manifest(ws, d, columns=[S.LABEL, S.STATUS]).to_pandas()
        out.append(DatasetEntry(d, len(t), int((t[S.STATUS] == S.STATUS_OK).sum()),
                                int(t[S.LABEL].dropna().nunique()), manifest_info(ws, d).get("created_at")))
    return sorted(out, key=lambda e: e.created or "", reverse=True)


def _featuresets(ws: Workspace, manifests: dict[str, set[str]]) -> list[FeaturesetEntry]:
    from imgfeat.extract.featureset import committed_ids, errored_ids, featureset_info

    index = featureset_index(ws)
    latest = N.latest(index)
    out = []
    for fs in ws.list_names("features"):
        try:
            info = featureset_info(ws, fs)
        except ConfigError:
            continue  # a folder without provenance is not a featureset (yet)
        ids = committed_ids(ws, fs)
        covered = {d: len(ids & m) for d, m in manifests.items() if ids & m}
        out.append(FeaturesetEntry(fs, names_of(index, fs), sorted(n for n, v in latest.items() if v == fs),
                                   info.get("backbone"), len(ids), len(errored_ids(ws, fs)), covered,
                                   info.get("created_at")))
    return sorted(out, key=lambda e: e.created or "", reverse=True)


def _heads(ws: Workspace) -> list[HeadEntry]:
    heads = committed_heads(ws)
    index = head_index(ws, heads)
    latest = set(N.latest(index).values())
    out = []
    for name, entries in index.items():
        for e in entries:
            m = heads[e[N.ID]]
            out.append(HeadEntry(e[N.ID], name, m["head"], m["model_kind"], m["dataset"], m["featureset"],
                                 (m.get("metrics") or {}).get("test_accuracy"), m.get("created_at"),
                                 e[N.ID] in latest))
    return sorted(out, key=lambda e: (e.name, e.created or ""), reverse=False)


# --- prune ---


@dataclass(frozen=True)
class PrunePlan:
    """What prune deletes (or, in a dry run, would delete) and what it keeps, with sizes."""

    heads: list[str]
    featuresets: list[str]
    folders: list[str]
    bytes: int
    kept_heads: list[str]
    kept_featuresets: list[str]
    deleted: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def plan_prune(ws: Workspace) -> PrunePlan:
    """Heads that are not the latest of any name (their predictions and reports with them), and
    featuresets that no kept head or index uses and that are not the latest of any recipe name."""
    heads = committed_heads(ws)
    keep_heads = set(N.latest(head_index(ws, heads)).values())
    drop_heads = sorted(set(heads) - keep_heads)
    used = {heads[h]["featureset"] for h in keep_heads} | set(N.latest(featureset_index(ws)).values())
    used |= {i["featureset"] for i in list_indexes(ws)}
    all_fs = ws.list_names("features")
    drop_fs = sorted(set(all_fs) - used)
    folders = [p for h in drop_heads for p in _head_folders(ws, h)]
    folders += [p for f in drop_fs for p in _featureset_folders(ws, f)]
    # Predictions and reports of heads that are gone already.
    for kind in ("predictions", "file_predictions", "reports"):
        folders += [ws.root / kind / h for h in ws.list_names(kind) if h not in heads]
    folders = [p for p in dict.fromkeys(folders) if p.exists()]
    return PrunePlan(drop_heads, drop_fs, [str(p) for p in folders], sum(_size(p) for p in folders),
                     sorted(keep_heads), sorted(set(all_fs) & used))


def run_prune(ws: Workspace, yes: bool = False) -> PrunePlan:
    """A dry run unless ``yes``; deleting holds every lock of the workspace, failing fast if one is held."""
    plan = plan_prune(ws)
    if not yes or not plan.folders:
        return plan
    with _all_locks(ws):
        plan = plan_prune(ws)  # again, under the locks: nothing changes while we delete
        for h in plan.heads:
            with contextlib.suppress(FileNotFoundError):
                (ws.head_dir(h) / HEAD_FILE).unlink()  # first: a head without head.json does not exist
        for f in plan.featuresets:  # likewise a featureset without its provenance
            ws.featureset_provenance(f).unlink(missing_ok=True)
        for folder in plan.folders:
            log.info("removing %s", folder)
            shutil.rmtree(folder, ignore_errors=True)
        N.forget(ws, N.HEADS, plan.heads)
        N.forget(ws, N.FEATURESETS, plan.featuresets)
    return PrunePlan(**{**asdict(plan), "deleted": True})


def _head_folders(ws: Workspace, head_id: str) -> list[Path]:
    return [ws.head_dir(head_id), ws.predictions_dir(head_id), ws.file_predictions_dir(head_id),
            ws.report_dir(head_id)]


def _featureset_folders(ws: Workspace, featureset: str) -> list[Path]:
    from imgfeat.core.commits import commits_dir, rejected_dir

    tables = [ws.featureset_dir(featureset), ws.featureset_errors_dir(featureset)]
    return tables + [ws.featureset_npy_dir(featureset)] + [f(d) for d in tables for f in (commits_dir, rejected_dir)]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _lock_files(ws: Workspace) -> list[Path]:
    """Every lock a writer may hold: workspace stages, datasets, heads, names, each featureset's."""
    found = list(ws.locks_dir.glob("*.lock")) if ws.locks_dir.is_dir() else []
    features = ws.root / "features"
    if features.is_dir():
        found += [p for p in features.glob("*/.lock")]
    return sorted(p for p in found if not p.name.startswith("names-"))  # forget() takes those itself


@contextlib.contextmanager
def _all_locks(ws: Workspace) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for path in _lock_files(ws):
            stack.enter_context(FileLock(path, f"{path.relative_to(ws.root)} (prune waits for no writer)"))
        yield
