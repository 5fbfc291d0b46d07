"""The dedup and similar HTML pages: groups, leaks, label conflicts and neighbours as inline thumbnails, one file."""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

import pyarrow as pa

from imgfeat.core import schemas as S
from imgfeat.core.stores import ImageRoot, ObjectUri, image_source

log = logging.getLogger(__name__)

THUMB_PX = 128
THUMB_QUALITY = 80
PATHS_PER_GROUP = 12  # thumbnails drawn per group; the table has every path

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px}
.meta{color:#666;font-size:13px;margin-bottom:16px}
.group{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px;margin:0 0 12px}
.group h3{font-size:14px;margin:0 0 8px;font-weight:600}
.row{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:168px;font-size:11px;color:#444}
figure img{width:128px;height:128px;object-fit:contain;background:#eee;border:1px solid #ccc;display:block}
figcaption{margin-top:3px;line-height:1.3}
.path{display:block;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;direction:rtl;text-align:left}
.label{display:inline-block;background:#eef;border-radius:3px;padding:0 4px;margin-right:3px}
.conflict{border-color:#d33;border-width:2px} .conflict h3{color:#b00}
.flag{background:#d33;color:#fff;border-radius:3px;padding:1px 6px;font-size:12px;margin-left:6px}
.sim{font-weight:600;color:#0a5}
.missing{width:128px;height:128px;display:flex;align-items:center;justify-content:center;background:#eee;color:#999}
.leak{display:flex;gap:10px;align-items:center}
.leaks{display:flex;flex-wrap:wrap;gap:0 12px}
"""


def thumbnail(path: Path | ObjectUri) -> str | None:
    """A 128 px JPEG of the image as a data URI; None when it cannot be read any more."""
    from PIL import Image

    try:
        with Image.open(image_source(path)) as opened:
            im = opened.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=THUMB_QUALITY)
    except (OSError, ValueError) as exc:
        log.warning("no thumbnail for %s: %s", path, exc)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(root: ImageRoot | None, rel: str, caption: str) -> str:
    """A thumbnail with its caption; the path on one line, cut at the left (its end shows), whole on hover."""
    uri = thumbnail(root / rel if root is not None else Path(rel))
    img = f'<img src="{uri}" alt="{html.escape(rel)}">' if uri else '<div class="missing">unreadable</div>'
    # direction:rtl cuts the start; the bidi marks keep the path's own characters in order
    path = f'<span class="path" title="{html.escape(rel)}">&lrm;{html.escape(rel)}&lrm;</span>'
    return f"<figure>{img}<figcaption>{caption}{path}</figcaption></figure>"


def _label(label: str | None) -> str:
    return f'<span class="label">{html.escape(label)}</span>' if label is not None else ""


def _groups_html(groups: pa.Table, root: ImageRoot, limit: int, conflicts: bool) -> str:
    """The groups whose labels conflict (``conflicts``) or the others, numbered as in the table's order."""
    by_group: dict[str, list[dict]] = {}
    for row in groups.to_pylist():
        by_group.setdefault(row[S.GROUP_ID], []).append(row)
    chosen = [(n, g, rows) for n, (g, rows) in enumerate(by_group.items()) if rows[0][S.LABEL_CONFLICT] == conflicts]
    parts = []
    for shown, (n, gid, rows) in enumerate(chosen):
        if shown >= limit:
            parts.append(f"<p>{len(chosen) - limit} more groups are in the groups table.</p>")
            break
        figs = "".join(
            _figure(
                root,
                r[S.PATH],
                f'{_label(r[S.LABEL])}<span class="sim">{r[S.SIMILARITY]:.3f}</span> {html.escape(r[S.SPLIT] or "")}',
            )
            for r in rows[:PATHS_PER_GROUP]
        )
        more = f"<p>and {len(rows) - PATHS_PER_GROUP} more</p>" if len(rows) > PATHS_PER_GROUP else ""
        conflict = rows[0][S.LABEL_CONFLICT]
        flag = '<span class="flag">label conflict</span>' if conflict else ""
        parts.append(
            f'<div class="group{" conflict" if conflict else ""}"><h3>group {n + 1}: {len(rows)} files '
            f'<small>({html.escape(gid[:12])}…)</small>{flag}</h3><div class="row">{figs}</div>{more}</div>'
        )
    if conflicts:
        return "".join(parts) or "<p>No copies carry different labels.</p>"
    return "".join(parts) or "<p>No near-duplicate groups.</p>"


def _leaks_html(leaks: pa.Table, root: ImageRoot, limit: int, label_of: dict[str, str | None]) -> str:
    parts = []
    for n, r in enumerate(leaks.to_pylist()):
        if n >= limit:
            parts.append(f"<p>{leaks.num_rows - limit} more leaks are in the leaks table.</p>")
            break
        parts.append(
            '<div class="group leak">'
            + _figure(root, r[S.PATH], f"{_label(label_of.get(r[S.PATH]))}{html.escape(r[S.SPLIT])}")
            + f'<span class="sim">{r[S.SIMILARITY]:.3f} &harr;</span>'
            + _figure(
                root, r[S.NEAREST_PATH], f"{_label(label_of.get(r[S.NEAREST_PATH]))}{html.escape(r[S.NEAREST_SPLIT])}"
            )
            + "</div>"
        )
    body = "".join(parts) or "<p>No held-out image is that close to a training image.</p>"
    return f'<div class="leaks">{body}</div>'


def render_page(groups: pa.Table, leaks: pa.Table, root: ImageRoot, cfg, run_id: str, criterion: str) -> str:
    """The whole page as one string (thumbnails inline, no external files); label conflicts come first."""
    n_groups = len(set(groups[S.GROUP_ID].to_pylist()))
    n_conflicts = len({g for g, c in zip(groups[S.GROUP_ID].to_pylist(), groups[S.LABEL_CONFLICT].to_pylist()) if c})
    label_of = dict(zip(groups[S.PATH].to_pylist(), groups[S.LABEL].to_pylist()))
    title = f"Near-duplicates in {cfg.dataset}"
    meta = (
        f"featureset {html.escape(cfg.featureset)} · {html.escape(criterion)} · "
        f"{n_groups} groups ({groups.num_rows} files) · {n_conflicts} with conflicting labels · "
        f"{leaks.num_rows} split leaks · run {html.escape(run_id)}"
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><div class="meta">{meta}</div>'
        f"<h2>Label conflicts: copies carrying different labels ({n_conflicts})</h2>"
        f"{_groups_html(groups, root, cfg.page_groups, conflicts=True)}"
        f"<h2>Split leaks: held-out images that are copies of a training image ({leaks.num_rows})</h2>"
        f"{_leaks_html(leaks, root, cfg.page_groups, label_of)}"
        f'<h2>Groups</h2><p class="meta">Each group is a set of copies of one picture (exact copies show '
        f"1.000); under a file: its label, the cosine of its features to its nearest in the group, its split. "
        f"Groups whose files carry different labels are shown above.</p>"
        f"{_groups_html(groups, root, cfg.page_groups, conflicts=False)}</body></html>"
    )


def render_similar_page(index_name: str, featureset: str, results, path_of, run_id: str) -> str:
    """The `similar --html` page: each query's thumbnail, then its neighbours with their similarity.

    ``results`` are ``QueryResult``s; ``path_of(image_id)`` gives an indexed image's file (or None).
    """
    parts = []
    for r in results:
        query_path = path_of(r.image_id) if r.image_id and not Path(r.query).is_file() else r.query
        head = _figure(None, query_path or r.query, "query")
        if r.error:
            body = f"<p>error: {html.escape(r.error)}</p>"
        else:
            body = (
                "".join(
                    _figure(None, n.path or n.image_id, f'<span class="sim">{n.similarity:.3f}</span>')
                    for n in r.neighbours
                )
                or "<p>no neighbours</p>"
            )
        parts.append(
            f'<div class="group leak">{head}<span class="sim">&rarr;</span><div class="row">{body}</div></div>'
        )
    title = f"Similar images in {index_name}"
    meta = (
        f"index {html.escape(index_name)} · featureset {html.escape(featureset)} · {len(results)} quer{'y' if len(results) == 1 else 'ies'} · "
        f"cosine similarity of the features · run {html.escape(run_id)}"
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><div class="meta">{meta}</div>'
        f"{''.join(parts) or '<p>No queries.</p>'}</body></html>"
    )
