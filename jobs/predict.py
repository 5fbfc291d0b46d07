"""`imgfeat predict --head HEAD (--dataset NAME | IMAGE...)`: a head's predictions into the predictions table."""

from __future__ import annotations

import argparse

from imgfeat.cli.common import JobContext, add_command, add_trust_pickle, add_wait, positive_int, require

DESCRIPTION = """\
Apply a trained head to a dataset's features, or to image files, and append the rows to
predictions/<head_id>/part-<run>-<seq>.parquet:

  image_id, path, label, split, pred_label, pred_score, topk_labels, topk_scores,
  head_id, featureset, run_id

Incremental: images this head already predicted are skipped, so a rerun with nothing new
writes nothing. For a dataset, images without features are counted (run 'imgfeat extract'
first). Image files get their features extracted on the fly into the head's featureset
(cached by content) and one line each is printed: 'photo.jpg: cat (97.3%)'.
"""

EPILOG = """\
examples:
  imgfeat predict --head photos-logreg-1a2b3c4d --dataset photos
  imgfeat predict --head photos-logreg-1a2b3c4d new/*.jpg --top-k 3
  duckdb -c "select pred_label, count(*) from 'data/predictions/HEAD/*.parquet' group by 1"
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "predict", handle, help="predict with a trained head (dataset or image files)",
                    description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--head", required=True, metavar="HEAD", help="a head id from 'imgfeat train'")
    p.add_argument("--dataset", default=None, metavar="NAME", help="predict every image of this dataset")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files to predict (instead of --dataset)")
    p.add_argument("--top-k", type=positive_int, default=5, metavar="K", help="labels kept per image")
    add_wait(p, "this head's predictions (or its featureset, for image files)")
    add_trust_pickle(p)


def handle(args: argparse.Namespace, ctx: JobContext) -> dict:
    from imgfeat.heads import PredictConfig, run_predict

    require(bool(args.dataset) != bool(args.images), "give either --dataset NAME or image files, not both")
    cfg = PredictConfig(head_id=args.head, dataset=args.dataset, paths=tuple(args.images), top_k=args.top_k,
                        wait=args.wait, trust_pickle=args.trust_pickle)
    out = run_predict(ctx.ws, cfg, ctx.run_id)
    if not args.json:
        print_predict(out)
    return out


def print_predict(out: dict) -> None:
    for line in out.get("predictions", []):
        if "error_code" in line:
            print(f"{line['path']}: error {line['error_code']}: {line['error_message']}")
        else:
            print(f"{line['path']}: {line['pred_label']} ({line['pred_score']:.1%})")
    if "dataset" in out:
        rate = f" at {out['rows_per_s']:.0f} rows/s" if out["written"] and out.get("rows_per_s") else ""
        print(f"{out['written']} rows written{rate}, {out['skipped']} already predicted, "
              f"{out['missing_features']} without features"
              + (" (run 'imgfeat extract' first)" if out["missing_features"] else ""))
        if not out["written"]:
            print("nothing new to predict")
