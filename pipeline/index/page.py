"""The dedup HTML page: near-duplicate groups and split leaks as inline thumbnails, one self-contained file."""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

import pyarrow as pa

from imgfeat.core import schemas as S

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
figure{margin:0;width:136px;font-size:11px;color:#444}
figure img{width:128px;height:128px;object-fit:contain;background:#eee;border:1px solid #ccc;display:block}
figcaption{word-break:break-all;margin-top:3px}
.sim{font-weight:600;color:#0a5}
.missing{width:128px;height:128px;display:flex;align-items:center;justify-content:center;background:#eee;color:#999}
.leak{display:flex;gap:10px;align-items:center}
"""


def thumbnail(path: Path) -> str | None:
    """A 128 px JPEG of the image as a data URI; None when it cannot be read any more."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=THUMB_QUALITY)
    except (OSError, ValueError) as exc:
        log.warning("no thumbnail for %s: %s", path, exc)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(root: Path, rel: str, caption: str) -> str:
    uri = thumbnail(root / rel)
    img = f'<img src="{uri}" alt="{html.escape(rel)}">' if uri else '<div class="missing">unreadable</div>'
    return f"<figure>{img}<figcaption>{caption}<br>{html.escape(rel)}</figcaption></figure>"


def _groups_html(groups: pa.Table, root: Path, limit: int) -> str:
    by_group: dict[str, list[dict]] = {}
    for row in groups.to_pylist():
        by_group.setdefault(row[S.GROUP_ID], []).append(row)
    parts = []
    for n, (gid, rows) in enumerate(by_group.items()):
        if n >= limit:
            parts.append(f"<p>{len(by_group) - limit} more groups are in groups.parquet.</p>")
            break
        figs = "".join(_figure(root, r[S.PATH], f'<span class="sim">{r[S.SIMILARITY]:.3f}</span>')
                       for r in rows[:PATHS_PER_GROUP])
        more = f"<p>and {len(rows) - PATHS_PER_GROUP} more</p>" if len(rows) > PATHS_PER_GROUP else ""
        parts.append(f'<div class="group"><h3>group {n + 1}: {len(rows)} files '
                     f'<small>({html.escape(gid[:12])}…)</small></h3><div class="row">{figs}</div>{more}</div>')
    return "".join(parts) or "<p>No near-duplicate groups.</p>"


def _leaks_html(leaks: pa.Table, root: Path, limit: int) -> str:
    parts = []
    for n, r in enumerate(leaks.to_pylist()):
        if n >= limit:
            parts.append(f"<p>{leaks.num_rows - limit} more leaks are in leaks.parquet.</p>")
            break
        parts.append('<div class="group leak">'
                     + _figure(root, r[S.PATH], f"{html.escape(r[S.SPLIT])}")
                     + f'<span class="sim">{r[S.SIMILARITY]:.3f} &harr;</span>'
                     + _figure(root, r[S.NEAREST_PATH], f"{html.escape(r[S.NEAREST_SPLIT])}") + "</div>")
    return "".join(parts) or "<p>No held-out image is that close to a training image.</p>"


def render_page(groups: pa.Table, leaks: pa.Table, root: Path, cfg, run_id: str) -> str:
    """The whole page as one string (thumbnails inline, no external files)."""
    n_groups = len(set(groups[S.GROUP_ID].to_pylist()))
    title = f"Near-duplicates in {cfg.dataset}"
    meta = (f"featureset {html.escape(cfg.featureset)} · cosine similarity ≥ {cfg.threshold:g} · "
            f"{n_groups} groups ({groups.num_rows} files) · {leaks.num_rows} split leaks · run {html.escape(run_id)}")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><div class=\"meta\">{meta}</div>"
            "<h2>Split leaks: held-out images close to a training image</h2>"
            f"{_leaks_html(leaks, root, cfg.page_groups)}"
            f"<h2>Groups</h2><p class=\"meta\">Each group is a set of files whose features are this similar "
            f"(exact copies show 1.000); the number under a file is its similarity to its nearest in the group.</p>"
            f"{_groups_html(groups, root, cfg.page_groups)}</body></html>")
