"""`imgfeat scan ROOT --dataset NAME`: an image folder into a dataset manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from imgfeat.cli.common import JobContext, Summary, add_command, add_config_flags, config_values
from imgfeat.scan.scan import ScanConfig, plan_scan, run_scan

DESCRIPTION = """\
Walk ROOT and write datasets/NAME/manifest.parquet: one row per image file with its
content hash (image_id), relative path, label, split, size, header (width, height, format,
mode) and a status. Bad files are rows with a status (empty, not_an_image, truncated,
too_large, unreadable), never a failed scan. A rescan reads only files whose size or
mtime changed; unchanged rows are carried over.

Layouts (labels and splits come from folder names):
  ROOT/<label>/...                 label from the top folder; deeper folders keep it
  ROOT/<split>/<label>/...         split folders train, test, val, validation (any case)
  ROOT/*.jpg                       flat: no labels
--labels FILE.csv (columns path,label; paths relative to ROOT) overrides folder labels.
Without split folders, --test-fraction F puts a deterministic fraction of the images in
the test split, chosen from the image's content, so it never moves between rescans.

Files with an image extension (jpg, png, gif, webp, tif, bmp, ...) are probed; others are
skipped and counted (or probed too with --keep-non-images). Hidden files and folders are
skipped. Symlinked folders inside ROOT are not entered (their files are scanned where they
are); symlinks leaving ROOT are followed only with --follow-links; loops never hang.
"""

EPILOG = """\
examples:
  imgfeat scan ~/photos --dataset photos
  imgfeat scan /data/flowers --dataset flowers --test-fraction 0.2
  imgfeat scan /data/shots --dataset shots --labels labels.csv --json
  imgfeat scan ~/photos --dataset photos --dry-run      # new/changed/removed counts only

exit codes: 0 done (bad images are rows), 2 bad ROOT or flag, 1 other failure
(e.g. another scan of the same dataset is running: see --wait)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "scan", handle, help="scan an image folder into a dataset manifest", description=DESCRIPTION, epilog=EPILOG
    )
    p.add_argument("root", metavar="ROOT", help="the image folder")
    add_config_flags(p, ScanConfig)
    p.add_argument(
        "--dry-run", action="store_true", help="only stat the files and print new/changed/removed/unchanged counts"
    )


def handle(args: argparse.Namespace, ctx: JobContext) -> Summary:
    values = config_values(ScanConfig, args)
    if values["labels_csv"]:
        values["labels_csv"] = Path(values["labels_csv"])
    cfg = ScanConfig(root=args.root, **values)
    summary = (plan_scan(ctx.ws, cfg) if args.dry_run else run_scan(ctx.ws, cfg, ctx.run_id)).to_json()
    if not args.json:
        print(_human(summary, args.dry_run))
    return summary


def _human(s: dict, dry_run: bool) -> str:
    if dry_run:
        return (
            f"{s['dataset']}: {s['new']} new, {s['changed']} changed, {s['removed']} removed, "
            f"{s['unchanged']} unchanged (dry run: nothing written)"
        )
    statuses = ", ".join(f"{k} {v}" for k, v in s["status"].items()) or "no files"
    return (
        f"{s['dataset']}: {s['files']} files ({statuses}); {s['added']} added, "
        f"{s['changed']} changed, {s['removed']} removed, {s['unchanged']} unchanged; "
        f"{s['skipped_total']} skipped; {s['files_per_s']} files/s\nmanifest: {s['manifest']}"
    )
