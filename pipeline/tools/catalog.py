"""What a workspace holds (``imgfeat ls``) and what ``imgfeat prune`` may delete: superseded heads, unused featuresets."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imgfeat.core import names as N
from imgfeat.core import schemas as S
from imgfeat.core.commits import commits_dir, rejected_dir
from imgfeat.core.errors import ConfigError, ImgfeatError
from imgfeat.core.results import JsonObject
from imgfeat.core.storage import FileLock, column_values, linked_folder, remove_file, remove_tree
from imgfeat.core.workspace import Workspace
from imgfeat.extract.featureset import committed_ids, errored_ids, featureset_info
from imgfeat.heads.artifacts import HEAD_FILE, read_head_meta
from imgfeat.heads.versions import committed_heads, featureset_index, head_index, names_of
from imgfeat.index import list_indexes as lister
from imgfeat.index.files import read_indexes
from imgfeat.scan.manifest import manifest_info, read_manifest

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
    damaged: list[str] = field(default_factory=list)  # one line per unreadable file, naming it; listed without it

    def to_json(self) -> JsonObject:
        return asdict(self)


def list_workspace(ws: Workspace) -> Catalog:
    """Datasets, featuresets and heads (and nearest-neighbour indexes, once they exist).

    A damaged file leaves out only what it describes (a manifest its dataset, a head.json its head,
    a name index the names) and adds a line naming it to ``damaged``: the rest is still listed.
    """
    damaged: list[str] = []
    manifests = _manifest_ids(ws)
    datasets, featuresets = _datasets(ws, damaged), _featuresets(ws, manifests, damaged)
    heads, indexes = _heads(ws, damaged), _or_none(list_indexes, ws, damaged) or []
    return Catalog(str(ws.root), datasets, featuresets, heads, indexes, list(dict.fromkeys(damaged)))


def list_indexes(ws: Workspace) -> list[dict[str, Any]]:
    """Nearest-neighbour indexes (``imgfeat index``), as their provenance says; a damaged one is
    ``{name, error}`` (and a warning), so the rest are still listed."""
    infos, broken = read_indexes(ws)
    for message in broken.values():
        log.warning("%s", message)
    entries = [e.to_json() for e in infos] + [{"name": n, "error": m} for n, m in broken.items()]
    return sorted(entries, key=lambda e: e["name"])


def _strict_indexes(ws: Workspace) -> list:
    return lister(ws)


def _manifest_ids(ws: Workspace) -> dict[str, set[str]]:
    out = {}
    for d in ws.list_names("datasets"):
        if ws.manifest_path(d).is_file():
            with contextlib.suppress(ImgfeatError):  # _datasets names a damaged manifest
                out[d] = set(column_values([ws.manifest_path(d)], S.IMAGE_ID))
    return out


def _datasets(ws: Workspace, damaged: list[str]) -> list[DatasetEntry]:
    out = []
    for d in ws.list_names("datasets"):
        if not ws.manifest_path(d).is_file():
            continue
        try:
            t = read_manifest(ws, d, columns=[S.LABEL, S.STATUS]).to_pandas()
            created = manifest_info(ws, d).get("created_at")
        except ImgfeatError as exc:
            damaged.append(str(exc))
            continue
        out.append(
            DatasetEntry(
                d,
                len(t),
                int((t[S.STATUS] == S.STATUS_OK).sum()),
                int(t[S.LABEL].dropna().nunique()),
                created if isinstance(created, str) else None,
            )
        )
    return sorted(out, key=lambda e: e.created or "", reverse=True)


def _featuresets(ws: Workspace, manifests: dict[str, set[str]], damaged: list[str]) -> list[FeaturesetEntry]:
    index = _or_none(featureset_index, ws, damaged) or {}
    out = [e for fs in ws.list_names("features") if (e := _featureset(ws, fs, index, manifests, damaged))]
    return sorted(out, key=lambda e: e.created or "", reverse=True)


def _featureset(
    ws: Workspace, fs: str, index: N.Versions, manifests: dict[str, set[str]], damaged: list[str]
) -> FeaturesetEntry | None:
    try:
        info = featureset_info(ws, fs)
        ids, errors = committed_ids(ws, fs), len(errored_ids(ws, fs))
    except ConfigError:
        return None  # a folder without provenance is not a featureset (yet)
    except ImgfeatError as exc:
        damaged.append(str(exc))
        return None
    covered = {d: len(ids & m) for d, m in manifests.items() if ids & m}
    latest = sorted(n for n, v in N.latest(index).items() if v == fs)
    backbone, created = info.get("backbone"), info.get("created_at")
    return FeaturesetEntry(
        fs,
        names_of(index, fs),
        latest,
        backbone if isinstance(backbone, str) else None,
        len(ids),
        errors,
        covered,
        created if isinstance(created, str) else None,
    )


def _heads(ws: Workspace, damaged: list[str]) -> list[HeadEntry]:
    heads = committed_heads(ws)
    named = _or_none(N.read_index, ws, damaged, N.HEADS)
    index = head_index(ws, heads, named=named if named is not None else {})  # heads.json damaged: head.json names
    latest = set(N.latest(index).values())
    out = []
    for name, entries in index.items():
        for e in entries:
            m = heads[e[N.ID]]
            if not m:
                _or_none(read_head_meta, ws, damaged, e[N.ID])  # says what is wrong with it
                continue
            accuracy = (m.get("metrics") or {}).get("test_accuracy")
            out.append(
                HeadEntry(
                    e[N.ID],
                    name,
                    m.get("head") or "-",
                    m.get("model_kind") or "-",
                    m.get("dataset") or "-",
                    m["featureset"],
                    accuracy if isinstance(accuracy, (int, float)) else None,
                    m.get("created_at"),
                    e[N.ID] in latest,
                )
            )
    return sorted(out, key=lambda e: (e.name, e.created or ""), reverse=False)


def _or_none(read: Callable[..., Any], ws: Workspace, damaged: list[str], *args: Any) -> Any:
    """``read(ws, *args)``, or None with its error's line added to ``damaged``."""
    try:
        return read(ws, *args)
    except ImgfeatError as exc:
        damaged.append(str(exc))
        return None


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

    def to_json(self) -> JsonObject:
        return asdict(self)


def plan_prune(ws: Workspace) -> PrunePlan:
    """Heads that are not the latest of any name (their predictions and reports with them), and
    featuresets that no kept head or index uses and that are not the latest of any recipe name."""
    heads = committed_heads(ws)
    keep_heads = set(N.latest(head_index(ws, heads)).values())
    drop_heads = sorted(set(heads) - keep_heads)
    for h in sorted(keep_heads):
        if not heads[h]:  # damaged: which featureset it needs is unknown, so nothing is pruned
            read_head_meta(ws, h)
    used = {heads[h]["featureset"] for h in keep_heads} | set(N.latest(featureset_index(ws)).values())
    used |= {i.featureset for i in _strict_indexes(ws)}  # a damaged one stops prune: its featureset is unknown
    all_fs = ws.list_names("features")
    drop_fs = sorted(set(all_fs) - used)
    folders = [p for h in drop_heads for p in _head_folders(ws, h)]
    folders += [p for f in drop_fs for p in _featureset_folders(ws, f)]
    # Predictions and reports of heads that are gone already.
    for kind in ("predictions", "file_predictions", "reports"):
        folders += [ws.root / kind / h for h in ws.list_names(kind) if h not in heads]
    folders = [p for p in dict.fromkeys(folders) if p.exists() or p.is_symlink()]
    return PrunePlan(
        drop_heads,
        drop_fs,
        [str(p) for p in folders],
        sum(_size(p) for p in folders),
        sorted(keep_heads),
        sorted(set(all_fs) & used),
    )


def run_prune(ws: Workspace, yes: bool = False) -> PrunePlan:
    """A dry run unless ``yes``; deleting holds every lock of the workspace, failing fast if one is held."""
    plan = plan_prune(ws)
    if not yes or not plan.folders:
        return plan
    with _all_locks(ws):
        plan = plan_prune(ws)  # again, under the locks: nothing changes while we delete
        # Deletion never follows a link out of the workspace: a linked folder goes itself.
        for h in plan.heads:
            remove_tree(
                ws.head_dir(h) / HEAD_FILE, ws.root
            )  # first: a head without head.json does not exist (a damaged
            # one, even a folder, goes too)
        for f in plan.featuresets:  # likewise a featureset without its provenance
            remove_file(ws.featureset_provenance(f), ws.root)
        for folder in plan.folders:
            log.info("removing %s", folder)
            remove_tree(Path(folder), ws.root)
        N.forget(ws, N.HEADS, plan.heads)
        N.forget(ws, N.FEATURESETS, plan.featuresets)
    return PrunePlan(**{**asdict(plan), "deleted": True})


def _head_folders(ws: Workspace, head_id: str) -> list[Path]:
    tables = [ws.predictions_dir(head_id), ws.file_predictions_dir(head_id)]
    return (
        [ws.head_dir(head_id)]
        + tables
        + [f(d) for d in tables for f in (commits_dir, rejected_dir)]
        + [ws.report_dir(head_id)]
    )


def _featureset_folders(ws: Workspace, featureset: str) -> list[Path]:
    tables = [ws.featureset_dir(featureset), ws.featureset_errors_dir(featureset)]
    return tables + [ws.featureset_npy_dir(featureset)] + [f(d) for d in tables for f in (commits_dir, rejected_dir)]


def _size(path: Path) -> int:
    if path.is_symlink():  # what a link points to is not the workspace's, and is not deleted
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _lock_files(ws: Workspace) -> list[Path]:
    """Every lock a writer may hold: workspace stages, datasets, heads, names, each featureset's."""
    found = list(ws.locks_dir.glob("*.lock")) if ws.locks_dir.is_dir() else []
    features = ws.root / "features"
    if features.is_dir():  # an old layout's lock; never one inside a linked folder (we write to locks)
        found += [p for p in features.glob("*/.lock") if linked_folder(p, ws.root) is None]
    return sorted(p for p in found if not p.name.startswith("names-"))  # forget() takes those itself


@contextlib.contextmanager
def _all_locks(ws: Workspace) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for path in _lock_files(ws):
            stack.enter_context(FileLock(path, f"{path.relative_to(ws.root)} (prune waits for no writer)"))
        yield
