"""The report stage: one self-contained HTML page per head (metrics, confusion, mistakes, projection, curves)."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from imgfeat import __version__
from imgfeat.core import names as N
from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError, unknown_value
from imgfeat.core.hashing import canonical_digest
from imgfeat.core.keys import KeyIndex
from imgfeat.core.options import opt
from imgfeat.core.progress import progress
from imgfeat.core.ranges import check_fields
from imgfeat.core.results import JsonResult
from imgfeat.core.sizes import memory_budget
from imgfeat.core.storage import WAIT_HINT, FileLock, remove_file, remove_stale_tmp, write_bytes_atomic
from imgfeat.core.stores import image_source
from imgfeat.core.workspace import Workspace
from imgfeat.extract.featureset import iter_features, load_features
from imgfeat.heads import artifacts as A
from imgfeat.heads.artifacts import LoadedHead, load_head
from imgfeat.heads.predict import prediction_shards
from imgfeat.heads.train import params_for
from imgfeat.heads.versions import default_head_name, resolve_head
from imgfeat.scan.manifest import dataset_root, manifest_file
from imgfeat.scan.rows import manifest_groups

log = logging.getLogger(__name__)

PROJECTIONS = ("auto", "pca", "tsne")
TSNE_MAX_POINTS = 300  # exact t-SNE (see _embed) is O(n^2): above this PCA tells the same story faster
CONFUSION_PNG, PROJECTION_PNG = "confusion.png", "projection.png"


@dataclass(frozen=True)
class ReportConfig:
    """Which head to report on (id, name or name@id), and how much to show."""

    head_id: str = opt(flag="--head", metavar="HEAD", help="a head name (its latest version), NAME@ID, or a head id")
    max_mistakes: int = opt(24, flag="--mistakes", metavar="N", help="most confident mistakes to show")
    max_points: int = opt(2000, metavar="N", help="points in the projection")  # projection sample size
    # t-SNE up to TSNE_MAX_POINTS points, PCA above
    projection: str = opt("auto", choices=PROJECTIONS, help="2-D projection")
    thumb_size: int = 128
    wait: float | None = opt(
        None,
        metavar="SECONDS",
        help="wait up to this long for another process writing this head's report, instead of exiting at once",
    )
    trust_pickle: bool = False  # load an old joblib (pickle) head; only for files you trust
    memory_budget: int | None = opt(
        None, metavar="SIZE", help="memory for features held at once, e.g. 256MB or 2GiB (default: a quarter of RAM)"
    )

    def __post_init__(self) -> None:
        N.check_ref(N.HEADS, self.head_id)
        if self.projection not in PROJECTIONS:
            raise unknown_value("projection", self.projection, PROJECTIONS)
        for name in ("max_points", "thumb_size"):
            if int(getattr(self, name)) < 2:
                raise ConfigError(f"{name} must be at least 2, got {getattr(self, name)!r}")
        if self.max_mistakes < 0:
            raise ConfigError(f"max_mistakes must be 0 or more, got {self.max_mistakes!r}")
        check_fields(self)  # the ranges its flags and job-file keys have (core/ranges.py)


@dataclass(frozen=True)
class Mistake:
    image_id: str
    path: Path | None
    label: str
    pred_label: str
    score: float


@dataclass(frozen=True)
class ReportSummary(JsonResult):
    """What one `imgfeat report` did: the page, the plots and mistakes it shows, whether it was kept as it was."""

    head_id: str
    name: str
    report: str  # the page's path
    plots: list[str]
    mistakes_shown: int
    reused: bool
    seconds: float
    run_id: str


def run_report(ws: Workspace, cfg: ReportConfig, run_id: str) -> ReportSummary:
    """Write ``reports/<head_id>/index.html``, every image inline; returns the page path and counts.

    A page made from the same inputs (``report_inputs``) is kept as it is: nothing is loaded or written.
    """
    t0 = time.perf_counter()
    head_id = resolve_head(ws, cfg.head_id)
    head = load_head(ws, head_id, trust_pickle=cfg.trust_pickle, lazy=True)
    inputs = report_inputs(ws, cfg, head)
    with FileLock(ws.locks_dir / f"report-{head_id}.lock", f"the report of head {head_id}", cfg.wait, hint=WAIT_HINT):
        current = _current_page(ws.report_dir(head_id) / "index.html", inputs)
        if current is not None:
            name = head_name(head, cfg.head_id)
            log.info("report for %s (%s) is up to date: %s", name, head_id, ws.report_dir(head_id) / "index.html")
            return ReportSummary(
                head_id,
                name,
                str(ws.report_dir(head_id) / "index.html"),
                current.plots,
                current.mistakes_shown,
                reused=True,
                seconds=round(time.perf_counter() - t0, 3),
                run_id=run_id,
            )
        return _write_report(ws, cfg, head, head_id, run_id, t0, inputs)


def report_inputs(ws: Workspace, cfg: ReportConfig, head: LoadedHead) -> str:
    """A digest of everything the page is made of: the head, the options, the manifest, the predictions."""
    manifest = ws.manifest_path(head.meta["dataset"])
    try:
        st = manifest.stat()
        manifest_id = [st.st_size, st.st_mtime_ns]
    except OSError:
        manifest_id = None
    options = {k: v for k, v in asdict(cfg).items() if k not in ("wait", "trust_pickle")}
    key = {
        "head": head.meta.get("model_sha256"),
        "head_id": head.head_id,
        "options": options,
        "manifest": manifest_id,
        "predictions": [p.name for p in prediction_shards(ws.predictions_dir(head.head_id))],
        "imgfeat": __version__,
    }
    return canonical_digest(key, 16)


_STAMP = "imgfeat-report"  # <meta name=...> near the top of the page: its inputs and what it shows


@dataclass(frozen=True)
class _Shown:
    plots: list[str]
    mistakes_shown: int


def _current_page(page: Path, inputs: str) -> _Shown | None:
    """What the existing page shows (plots, mistakes_shown) when it was made from ``inputs``; else None."""
    try:
        with page.open("rb") as f:
            top = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return None
    start = top.find(f"<meta name='{_STAMP}' content='")
    if start < 0:
        return None
    raw = top[start:].split("content='", 1)[1].split("'", 1)[0]
    try:
        stamp = json.loads(html.unescape(raw))
    except ValueError:
        return None
    if not isinstance(stamp, dict) or stamp.get("inputs") != inputs:
        return None
    return _Shown(stamp.get("plots", []), stamp.get("mistakes_shown", 0))


def _write_report(
    ws: Workspace, cfg: ReportConfig, head: LoadedHead, head_id: str, run_id: str, t0: float, inputs: str = ""
) -> ReportSummary:
    folder = ws.report_dir(head_id)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(folder)
    name = head_name(head, cfg.head_id)
    # a bar by step (rows, mistakes, plots, page): at a million rows each takes a while
    with progress(total=4, desc=f"report {name}", unit="step") as bar:
        eval_role, sub = _evaluation_rows(ws, head_id)
        bar.update()
        mistakes = _mistakes(ws, head, sub, cfg.max_mistakes, memory_budget(cfg.memory_budget))
        del sub
        mistakes = _with_paths(ws, head.meta["dataset"], mistakes)
        bar.update()
        plots_png = _plots(ws, head, head_id, cfg)
        bar.update()
        stamp = {"inputs": inputs, "plots": sorted(plots_png), "mistakes_shown": len(mistakes)}
        page = render_page(
            head, name, eval_role, mistakes, plots_png, _prediction_rows(ws, head_id), cfg.thumb_size, stamp
        )
        index = write_bytes_atomic(page.encode("utf-8"), folder / "index.html")
        bar.update()
    for stale in (CONFUSION_PNG, PROJECTION_PNG, A.CURVES_FILE):  # beside pages of older versions
        remove_file(folder / stale, ws.root)
    log.info("report for %s (%s): %s", name, head_id, index)
    return ReportSummary(
        head_id,
        name,
        str(index),
        sorted(plots_png),
        len(mistakes),
        reused=False,
        seconds=round(time.perf_counter() - t0, 3),
        run_id=run_id,
    )


def head_name(head: LoadedHead, ref: str) -> str:
    """The name the page is titled by: the one asked for, else the head's recorded or default name."""
    asked = ref.partition(N.PIN)[0]
    if asked != head.head_id:
        return asked
    return head.meta.get("name") or default_head_name(head.meta["dataset"], head.meta["head"])


def _with_paths(ws: Workspace, dataset: str, mistakes: list[Mistake]) -> list[Mistake]:
    """The mistakes with their image files (an id's first manifest path), read a row group of the
    manifest at a time for the few ids shown; no paths when the dataset is gone."""
    if not mistakes:
        return mistakes
    try:
        root = dataset_root(ws, dataset)
        manifest_file(ws, dataset)  # (the dataset is still here)
    except ConfigError:
        log.warning("dataset %s is no longer in the workspace: the report has no thumbnails", dataset)
        return mistakes
    wanted = pa.array(sorted({m.image_id for m in mistakes}), pa.string())
    found: dict[str, Path] = {}
    for t in manifest_groups(ws, dataset, [S.IMAGE_ID, S.PATH], ok_only=False):
        t = t.filter(pc.fill_null(pc.is_in(t[S.IMAGE_ID], value_set=wanted), False))
        for i, p in zip(t[S.IMAGE_ID].to_pylist(), t[S.PATH].to_pylist()):
            if p is not None and i not in found:
                found[i] = root / p
        if len(found) == len(wanted):
            break
    return [replace(m, path=found.get(m.image_id)) for m in mistakes]


def _evaluation_rows(ws: Workspace, head_id: str) -> tuple[str, pa.Table]:
    """The head's evaluation role (``test``, or ``train`` when it has no test rows) and those rows'
    ids and labels, in the head's row order, read a row group at a time: the others never held."""
    has_test = any(pc.any(pc.equal(t[A.ROLE], "test")).as_py() for _, t in A.row_groups(ws, head_id, [A.ROLE]))
    role = "test" if has_test else "train"
    parts = [
        t.filter(pc.fill_null(pc.equal(t[A.ROLE], role), False)).select([S.IMAGE_ID, S.LABEL])
        for _, t in A.row_groups(ws, head_id, [S.IMAGE_ID, S.LABEL, A.ROLE])
    ]
    return role, pa.concat_tables(parts).combine_chunks() if parts else pa.table({S.IMAGE_ID: [], S.LABEL: []})


def _mistakes(ws: Workspace, head: LoadedHead, sub: pa.Table, limit: int, budget: int) -> list[Mistake]:
    """The evaluation images (``sub``) the head got wrong, most confident first; the features are
    streamed, and only the ``limit`` most confident mistakes so far are kept.

    The evaluation rows stay Arrow columns, looked up by compact keys (``core/keys.py``)."""
    where = KeyIndex(sub[S.IMAGE_ID])  # id -> its row in sub: the head's row order breaks ties
    labels = sub[S.LABEL]
    kept: list[Mistake] = []
    dim = max(1, int(head.meta.get("dim") or 1))
    batch_rows = int(min(65_536, max(64, budget // (16 * 4 * dim))))  # as heads/stream.py's batches
    classes = np.asarray(head.estimator.classes_, dtype=object)
    for ids, X in iter_features(ws, head.featureset, ids=where, batch_rows=batch_rows):
        proba = head.estimator.predict_proba(X)
        pred, conf = classes[proba.argmax(axis=1)], proba.max(axis=1)
        at = where.positions(ids)
        truth = labels.take(pa.array(at, pa.int64())).to_numpy(zero_copy_only=False)
        wrong = np.flatnonzero(pred != truth)
        wrong = wrong[np.lexsort((at[wrong], -conf[wrong]))[:limit]]  # this batch's best candidates
        kept += [Mistake(ids[k], None, truth[k], pred[k], float(conf[k])) for k in wrong]
        # most confident first, equal scores in the head's row order: the page the whole matrix made
        order = {m.image_id: int(p) for m, p in zip(kept, where.positions([m.image_id for m in kept]))}
        kept = sorted(kept, key=lambda m: (-m.score, order[m.image_id]))[:limit]
    return kept


def _plots(ws: Workspace, head: LoadedHead, head_id: str, cfg: ReportConfig) -> dict[str, bytes]:
    """The page's PNGs by name: confusion matrix, 2-D projection, training curves (what applies)."""
    from imgfeat.heads import plots  # matplotlib: only when a page is drawn

    out: dict[str, bytes] = {}
    confusion = head.meta["metrics"].get("confusion")
    if confusion:
        out[CONFUSION_PNG] = plots.confusion_png(np.asarray(confusion["matrix"]), confusion["labels"])
    xy, labels, method = project(ws, head, head_id, cfg)
    if len(xy):
        out[PROJECTION_PNG] = plots.projection_png(xy, labels, method)
    if head.meta.get("history"):
        out[A.CURVES_FILE] = plots.training_curves_png(head.meta["history"])
    return out


def project(ws: Workspace, head: LoadedHead, head_id: str, cfg: ReportConfig) -> tuple[np.ndarray, np.ndarray, str]:
    """A seeded sample of the head's images in 2-D: t-SNE for small samples, else PCA."""
    sample = _sample_rows(ws, head_id, cfg.max_points)
    take = sample.to_pandas()
    ids, X = load_features(ws, head.featureset, take[S.IMAGE_ID].tolist())
    labels = take.set_index(S.IMAGE_ID).loc[ids.tolist(), S.LABEL].to_numpy(dtype=object)
    if len(ids) < 3:
        return np.zeros((0, 2)), labels, "none"
    xy, method = _embed(X, cfg.projection)
    return xy, labels, method


def _sample_rows(ws: Workspace, head_id: str, size: int) -> pa.Table:
    """A seeded sample of ``size`` of the head's rows (ids and labels; all when there are no more), in
    row order, taken from each row group as it is read."""
    n = A.rows_count(ws, head_id)
    keep = None if n <= size else np.sort(np.random.default_rng(0).choice(n, size, False))
    parts = []
    for start, t in A.row_groups(ws, head_id, [S.IMAGE_ID, S.LABEL]):
        if keep is not None:
            mine = keep[(keep >= start) & (keep < start + t.num_rows)] - start
            t = t.take(pa.array(mine, pa.int64()))
        parts.append(t)
    return pa.concat_tables(parts) if parts else pa.table({S.IMAGE_ID: [], S.LABEL: []})


def _embed(X: np.ndarray, how: str) -> tuple[np.ndarray, str]:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    Xs = StandardScaler().fit_transform(X)
    if not np.any(Xs.std(axis=0) > 0):  # constant features (e.g. a random-init backbone): nothing to show
        return np.zeros((len(X), 2)), "none (the features are constant)"
    method = how if how != "auto" else ("tsne" if len(X) <= TSNE_MAX_POINTS else "pca")
    if method == "pca":
        return PCA(n_components=2, random_state=0).fit_transform(Xs), "PCA"
    # t-SNE on a 50-d PCA is the usual recipe: faster and less noisy than on raw features.
    reduced = PCA(n_components=min(50, *Xs.shape), random_state=0).fit_transform(Xs)
    perplexity = float(min(30, max(2, (len(X) - 1) // 3)))
    # method="exact": the Barnes-Hut gradient runs OpenMP code that segfaults when TensorFlow's
    # own OpenMP runtime is loaded in the same process (as in `imgfeat run`); for the few hundred
    # points shown here the exact gradient is as fast.
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0, method="exact")
    return tsne.fit_transform(reduced), "t-SNE"


def _prediction_rows(ws: Workspace, head_id: str) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in prediction_shards(ws.predictions_dir(head_id)))


# --- the page: plain HTML and CSS, every image inlined, no JavaScript ---

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2733;
       max-width: 1100px; margin: 2rem auto; padding: 0 1.2rem; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { font-size: 1.15rem; margin-top: 2.2rem;
       border-bottom: 1px solid #dde3ea; padding-bottom: .3rem; }
.sub { color: #5b6b7c; margin-top: 0; }
.cards { display: flex; flex-wrap: wrap; gap: .8rem; margin: 1rem 0; }
.card { border: 1px solid #dde3ea; border-radius: 6px; padding: .6rem .9rem; min-width: 120px; }
.card b { display: block; font-size: 1.35rem; } .card span { color: #5b6b7c; font-size: .85rem; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: .3rem .8rem; border-bottom: 1px solid #e8edf2; text-align: right; }
th:first-child, td:first-child { text-align: left; } thead th { background: #f4f6f9; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; font-size: .9rem; }
dt { color: #5b6b7c; } dd { margin: 0; font-family: ui-monospace, monospace; overflow-wrap: break-word; }
img.plot { max-width: 100%; border: 1px solid #e8edf2; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: .8rem; }
.gallery figure { margin: 0; border: 1px solid #e8edf2; border-radius: 6px; padding: .4rem; }
.gallery img { width: 100%; height: 130px; object-fit: contain; background: #f4f6f9; }
.gallery figcaption { font-size: .8rem; } .bad { color: #b42318; } .muted { color: #5b6b7c; }
tr.win td { background: #eef7ee; }
.missing { height: 130px; display: flex; align-items: center; justify-content: center; background: #f4f6f9; }
"""


def render_page(
    head: LoadedHead,
    name: str,
    eval_role: str,
    mistakes: list[Mistake],
    pngs: dict[str, bytes],
    n_predictions: int,
    thumb_size: int,
    stamp: dict[str, Any] | None = None,
) -> str:
    """The whole page as one string: every image a data URI, so the file alone is the report."""
    m = head.meta
    parts = [
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>",
        f"<meta name='{_STAMP}' content='{_e(json.dumps(stamp or {}, sort_keys=True))}'>",
        f"<title>{_e(name)} · imgfeat report</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(name)}</h1>",
        f"<p class='sub'>{_e(_kind(m))} head on <b>{_e(m['dataset'])}</b> · version "
        f"{_e(m['head_id'])} · featureset {_e(m['featureset'])}</p>",
        _cards(m, n_predictions),
        kinds_compared(m),
        _details(m),
        _class_table(m),
        _img_section("Confusion matrix", CONFUSION_PNG, pngs),
        _gallery(mistakes, eval_role, thumb_size),
        _img_section("Features in two dimensions", PROJECTION_PNG, pngs),
        _img_section("Training curves (dense net)", A.CURVES_FILE, pngs),
        "</body></html>\n",
    ]
    return "\n".join(p for p in parts if p)


def _kind(m: dict[str, Any]) -> str:
    """``svm``, or ``auto: svm`` for an auto head that chose it."""
    return m["model_kind"] if m["head"] == m["model_kind"] else f"{m['head']}: {m['model_kind']}"


def kinds_compared(m: dict[str, Any]) -> str:
    """For an ``auto`` head: every kind's cross-validated score, the winner marked."""
    cv = m.get("cv") or {}
    if len(cv) < 2:
        return ""
    rows = "".join(
        f"<tr{' class=win' if k == m['model_kind'] else ''}><td>{_e(k)}"
        f"{' <b>winner</b>' if k == m['model_kind'] else ''}</td><td>{v['mean']:.3f}</td>"
        f"<td>{v['std']:.3f}</td><td>{_e(', '.join(f'{x:.3f}' for x in v.get('folds', [])))}</td></tr>"
        for k, v in sorted(cv.items(), key=lambda kv: -kv[1]["mean"])
    )
    head = "<tr><th>kind</th><th>CV accuracy</th><th>std</th><th>folds</th></tr>"
    return (
        f"<h2>Kinds compared ({_e(m['head'])}): {_e(m['model_kind'])} won</h2>"
        f"<table class='kinds'><thead>{head}</thead><tbody>{rows}</tbody></table>"
    )


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "–"


def _cards(m: dict[str, Any], n_predictions: int) -> str:
    metrics = m["metrics"]
    cv = m.get("cv", {}).get(m["model_kind"], {})
    items = [
        (_pct(metrics.get("test_accuracy")), f"test accuracy ({m.get('eval_split') or 'no test set'})"),
        (_pct(metrics.get("macro_f1")), "macro F1"),
        (_pct(cv.get("mean")), f"CV accuracy ({len(cv.get('folds', []))} folds)"),
        (f"{m['n_train']:,}", "training images"),
        (f"{m['n_test']:,}", "test images"),
        (str(len(m["classes"])), "classes"),
        (f"{n_predictions:,}", "prediction rows"),
    ]
    cards = "".join(f"<div class='card'><b>{_e(v)}</b><span>{_e(k)}</span></div>" for v, k in items)
    return f"<div class='cards'>{cards}</div>"


def _details(m: dict[str, Any]) -> str:
    items = [
        ("backbone", m.get("backbone")),
        ("chosen", m.get("chosen") or "fixed parameters"),
        ("parameters", params_for(m["model_kind"], m.get("params") or {})),
        ("left out", {k: v for k, v in (m.get("left_out") or {}).items() if v} or "nothing"),
        ("trained by", _trained_by(m.get("trained_by"))),
        ("created", m.get("created_at")),
        ("model file", f"{m['model_file']} sha256 {m['model_sha256'][:16]}…"),
        ("versions", ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v)),
    ]
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(_plain(v))}</dd>" for k, v in items if v)
    return f"<h2>Head</h2><dl>{rows}</dl>"


def _trained_by(t: Any) -> str:
    """``streamed (15 epochs): training in memory would take about 20 GiB (...): that would exceed ...``."""
    if not isinstance(t, dict):
        return ""
    epochs = f" ({t['epochs']} epochs)" if t.get("epochs") else ""
    return f"{str(t.get('path', '')).replace('_', ' ')}{epochs}: {t.get('why', '')}"


def _plain(value: Any) -> str:
    """``{'C': 0.01, 'cv': 5}`` reads as ``C=0.01, cv=5`` on the page."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
    return str(value)


def _class_table(m: dict[str, Any]) -> str:
    per = m["metrics"].get("per_class") or {}
    if not per:
        return "<h2>Per-class metrics</h2><p class='muted'>No evaluation images.</p>"
    body = "".join(
        f"<tr><td>{_e(c)}</td><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td>"
        f"<td>{v['f1']:.3f}</td><td>{v['support']}</td></tr>"
        for c, v in per.items()
    )
    total = sum(v["support"] for v in per.values())
    macro = m["metrics"].get("macro_f1")
    foot = f"<tr><th>macro avg</th><td></td><td></td><td>{macro:.3f}</td><td>{total}</td></tr>"
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
    return f"<h2>Per-class metrics</h2><table><thead>{head}</thead><tbody>{body}{foot}</tbody></table>"


def _img_section(title: str, name: str, pngs: dict[str, bytes]) -> str:
    if name not in pngs:
        return ""
    uri = f"data:image/png;base64,{base64.b64encode(pngs[name]).decode()}"
    return f"<h2>{_e(title)}</h2><img class='plot' src='{uri}' alt='{_e(title)}'>"


def _gallery(mistakes: list[Mistake], role: str, thumb_size: int) -> str:
    where = "test" if role == "test" else "training (there is no test set)"
    title = f"<h2>Most confident mistakes on {where} images</h2>"
    if not mistakes:
        return title + "<p class='muted'>No mistakes to show.</p>"
    figs = []
    for mk in mistakes:
        img = _thumb_tag(mk.path, thumb_size)
        name = mk.path.name if mk.path else mk.image_id[:12]
        figs.append(
            f"<figure>{img}<figcaption><span class='bad'>{_e(mk.pred_label)}</span> "
            f"({mk.score:.1%})<br>true: {_e(mk.label)}<br><span class='muted'>{_e(name)}</span>"
            "</figcaption></figure>"
        )
    return title + f"<div class='gallery'>{''.join(figs)}</div>"


def _thumb_tag(path: Path | None, size: int) -> str:
    data = thumbnail_jpeg(path, size) if path else None
    if data is None:
        return "<div class='missing muted'>image not found</div>"
    return f"<img alt='' src='data:image/jpeg;base64,{base64.b64encode(data).decode()}'>"


def thumbnail_jpeg(path: Path, size: int) -> bytes | None:
    """A small JPEG of the image (EXIF-rotated), or None if it cannot be read any more."""
    try:
        with Image.open(image_source(path)) as opened:
            im = ImageOps.exif_transpose(opened).convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=82)
            return buf.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
