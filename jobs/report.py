"""`imgfeat report --head HEAD`: a self-contained HTML page about one head."""

from __future__ import annotations

import argparse

from imgfeat.cli.common import JobContext, Summary, add_command, add_config_flags, add_trust_pickle, config_values
from imgfeat.heads.report import ReportConfig, run_report

DESCRIPTION = """\
Write reports/<head_id>/index.html for a trained head, titled by the head's name: its metrics,
a per-class precision/recall/F1/support table, the confusion matrix, the most confident
mistakes as thumbnails, a 2-D projection of the features coloured by class (t-SNE for up
to 300 points, else PCA), the training curves of a dense-net head, and for an 'auto'
head every kind's cross-validated score with the winner marked. One self-contained file:
every image is inline (data URIs), no JavaScript, no network; copy it anywhere.
"""

EPILOG = """\
examples:
  imgfeat report --head photos-logreg                  # the latest version of that name
  imgfeat report --head photos-logreg@1a2b3c4d         # one pinned version
  imgfeat report --head photos-mlp-0f9e8d7c --mistakes 48 --projection pca
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "report", handle, help="write an HTML report for a trained head", description=DESCRIPTION, epilog=EPILOG
    )
    add_config_flags(p, ReportConfig, ["head_id", "max_mistakes", "projection", "max_points", "memory_budget", "wait"])
    add_trust_pickle(p)


def handle(args: argparse.Namespace, ctx: JobContext) -> Summary:
    cfg = ReportConfig(**config_values(ReportConfig, args), trust_pickle=args.trust_pickle)
    out = run_report(ctx.ws, cfg, ctx.run_id)
    if not args.json:
        print(out.report)
    return out
