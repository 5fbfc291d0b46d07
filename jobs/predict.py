"""`imgfeat predict --head HEAD (--dataset NAME | IMAGE...)`: a head's predictions into the predictions table."""

from __future__ import annotations

import argparse

from imgfeat.cli.common import (
    JobContext,
    Summary,
    add_command,
    add_config_flags,
    add_trust_pickle,
    config_values,
    require,
)
from imgfeat.heads.predict import PredictConfig, run_predict

DESCRIPTION = """\
Apply a trained head to a dataset's features, or to image files, folders and glob patterns.

--head takes a head name (its latest version, e.g. photos-logreg), NAME@ID for one
pinned version, or a head id. Dataset rows go to predictions/<head_id>/, rows for image
files to file_predictions/<head_id>/ (apart, so a dataset's table holds only its images):

  image_id, path, label, split, pred_label, pred_score, topk_labels, topk_scores,
  head_id, featureset, run_id, dataset (the dataset's name, or 'files')

Incremental: images this head already predicted are skipped, so a rerun with nothing new
writes nothing. For a dataset, images without features are counted (run 'imgfeat extract'
first). Folders are walked like 'imgfeat scan' (hidden files skipped); quote a glob to let
imgfeat expand it ('photos/**/*.jpg'). Image files get their features extracted on the fly
into the head's featureset (cached by content) and one line each is printed:
'photo.jpg: cat (97.3%)'; a file that cannot be read is a line with its error, not a crash.
"""

EPILOG = """\
examples:
  imgfeat predict --head photos-logreg --dataset photos
  imgfeat predict --head photos-logreg new/*.jpg --top-k 3
  imgfeat predict --head photos-logreg incoming/ 'archive/**/*.png'
  imgfeat predict --head photos-logreg@1a2b3c4d --dataset photos      # one pinned version

exit codes: 0 done (unreadable files are lines, not failures), 2 unknown head or dataset, 1 other
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "predict",
        handle,
        help="predict with a trained head (dataset, files, folders)",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    add_config_flags(p, PredictConfig, ["head_id", "dataset"])
    p.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help="image files, folders or glob patterns to predict (instead of --dataset)",
    )
    add_config_flags(p, PredictConfig, ["top_k", "memory_budget", "wait"])
    add_trust_pickle(p)


def handle(args: argparse.Namespace, ctx: JobContext) -> Summary:
    require(bool(args.dataset) != bool(args.images), "give either --dataset NAME or image files, not both")
    cfg = PredictConfig(**config_values(PredictConfig, args), paths=tuple(args.images), trust_pickle=args.trust_pickle)
    out = run_predict(ctx.ws, cfg, ctx.run_id).to_json()
    if not args.json:
        print_predict(out)
    return out


def print_predict(out: dict) -> None:
    for line in out.get("predictions", []):
        if "error_code" in line:
            print(f"{line['path']}: error {line['error_code']}: {line['error_message']}")
        else:
            print(f"{line['path']}: {line['pred_label']} ({line['pred_score']:.1%})")
    rate = f" at {out['rows_per_s']:.0f} rows/s" if out["written"] and out.get("rows_per_s") else ""
    if "dataset" in out:
        print(
            f"{out['written']} rows written{rate}, {out['skipped']} already predicted, "
            f"{out['missing_features']} without features"
            + (" (run 'imgfeat extract' first)" if out["missing_features"] else "")
        )
        if out.get("duplicates"):
            print(f"{out['duplicates']} duplicate files predicted once, under their first path")
    else:
        codes = ", ".join(f"{c} {n}" for c, n in sorted((out.get("errors_by_code") or {}).items()))
        ok = out["files"] - out["errors"]
        print(
            f"{out['files']} files: {ok} predicted, {out['errors']} errors"
            + (f" ({codes})" if codes else "")
            + f"; {out['written']} new rows{rate} -> {out['predictions_dir']}"
        )
    if not out["written"] and "dataset" in out:
        print("nothing new to predict")
