"""`imgfeat dedup --featureset FS --dataset D`: near-duplicate groups, split leaks and their HTML page."""

from __future__ import annotations

import argparse

from imgfeat.cli.common import JobContext, Summary, add_command, add_config_flags, config_values
from imgfeat.heads.versions import resolve_featureset
from imgfeat.index.dedup import DedupConfig, criterion_text, run_dedup

DESCRIPTION = """\
Find near-duplicates in a dataset, held-out images that leak from the training split, and
copies carrying different labels. Writes under dedup/<name>/ (name: --name, else the
dataset), one table per folder:

  groups/     image_id, group_id, nearest_id, similarity, path, label, split, label_conflict
              one row per file in a group of two or more files; exact copies (one image_id
              under several paths) are groups too, with similarity 1; label_conflict: the
              group's files carry two or more labels
  leaks/      image_id, path, split, nearest_id, nearest_path, nearest_split, similarity
              held-out files (split other than train) grouped with a training image
  index.html  the groups (label conflicts first) and leaks as thumbnails, one file
  _dedup.json the run's summary, with the criterion and its calibration

By default each image's --neighbours nearest by features are candidates, and a candidate
is a copy when the two images look alike: their luminance detail at 32 x 32 (blind to
colour, size, brightness, re-encoding, letterbox bars and slight turns) has a cosine of at
least 0.8. The look is checked on synthetic copies of the dataset's own images (the
summary's criterion.calibration). --threshold T uses a fixed cosine of the features instead.
"""

EPILOG = """\
examples:
  imgfeat dedup --featureset efficientnet_lite0-224-avg-float16-1a2b3c4d --dataset photos
  imgfeat dedup --featureset FS --dataset photos --json
  imgfeat dedup --featureset FS --dataset photos --threshold 0.9      # features only
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "dedup",
        handle,
        help="near-duplicate groups and train/test leaks of a dataset",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    add_config_flags(p, DedupConfig)


def handle(args: argparse.Namespace, ctx: JobContext) -> Summary:
    values = config_values(DedupConfig, args)
    cfg = DedupConfig(**{**values, "featureset": resolve_featureset(ctx.ws, args.featureset)})
    out = run_dedup(ctx.ws, cfg, ctx.run_id)
    if not args.json:
        print(
            f"{out.groups} near-duplicate groups ({out.grouped_paths} files, {out.exact_duplicate_paths} exact "
            f"copies) among {out.paths} files ({criterion_text(out.criterion)}); {out.leaks} split leaks; "
            f"{out.label_conflicts} groups with conflicting labels ({out.label_conflict_paths} files)"
        )
        if not out.written:
            print("nothing changed since the last run: its results stand")
        print(f"groups: {out.groups_table}\nleaks:  {out.leaks_table}\npage:   {out.page}")
    return out.to_json()
