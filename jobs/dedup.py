"""`imgfeat dedup --featureset FS --dataset D`: near-duplicate groups, split leaks and their HTML page."""

from __future__ import annotations

import argparse

from imgfeat.cli.common import JobContext, add_command, ranged

DESCRIPTION = """\
Find near-duplicates in a dataset by the cosine similarity of its features, and held-out
images that leak from the training split. Writes under dedup/<name>/ (name: --name, else
the dataset):

  groups.parquet  image_id, group_id, nearest_id, similarity, path
                  one row per file in a group of two or more files; exact copies (one
                  image_id under several paths) are groups too, with similarity 1
  leaks.parquet   image_id, path, split, nearest_id, nearest_path, nearest_split, similarity
                  held-out files (split other than train) whose nearest training image is
                  at or above the threshold
  index.html      the groups and leaks as thumbnails, one self-contained file

Groups are connected components of 'similarity >= threshold' among each image's nearest
neighbours (exact search up to 20,000 images, IVF beyond).
"""

EPILOG = """\
examples:
  imgfeat dedup --featureset efficientnet_lite0-224-avg-float16-1a2b3c4d --dataset photos
  imgfeat dedup --featureset FS --dataset photos --threshold 0.9 --json
"""


def register(sub: argparse._SubParsersAction) -> None:
    from imgfeat.index.dedup import DEFAULT_THRESHOLD

    p = add_command(sub, "dedup", handle, help="near-duplicate groups and train/test leaks of a dataset",
                    description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--featureset", required=True, metavar="FS", help="the featureset to compare images by: its name, a recipe name or RECIPE@ID")
    p.add_argument("--dataset", required=True, metavar="NAME", help="the dataset to look into")
    p.add_argument("--threshold", type=ranged("threshold"), default=DEFAULT_THRESHOLD, metavar="T",
                   help="cosine similarity at or above which two images are near-duplicates")
    p.add_argument("--neighbours", type=ranged("neighbours"), default=10, metavar="K",
                   help="candidate neighbours looked at per image")
    p.add_argument("--name", default=None, metavar="NAME",
                   help="output folder name under dedup/ (default: the dataset)")


def handle(args: argparse.Namespace, ctx: JobContext) -> dict:
    from imgfeat.heads.versions import resolve_featureset
    from imgfeat.index.dedup import DedupConfig, run_dedup

    cfg = DedupConfig(featureset=resolve_featureset(ctx.ws, args.featureset), dataset=args.dataset, threshold=args.threshold,
                      neighbours=args.neighbours, name=args.name)
    out = run_dedup(ctx.ws, cfg, ctx.run_id)
    if not args.json:
        print(f"{out.groups} near-duplicate groups ({out.grouped_paths} files, {out.exact_duplicate_paths} exact "
              f"copies) among {out.paths} files at similarity >= {out.threshold:g}; {out.leaks} split leaks")
        print(f"groups: {out.groups_table}\nleaks:  {out.leaks_table}\npage:   {out.page}")
    return out.to_json()
