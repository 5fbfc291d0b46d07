"""`imgfeat report --head HEAD`: a self-contained HTML page about one head."""

from __future__ import annotations

import argparse

from imgfeat.cli.common import JobContext, add_command, add_memory_budget, add_trust_pickle, add_wait, ranged

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
    p = add_command(sub, "report", handle, help="write an HTML report for a trained head",
                    description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--head", required=True, metavar="HEAD", help="a head name (its latest version), NAME@ID, or a head id")
    p.add_argument("--mistakes", type=ranged("max_mistakes"), default=24, metavar="N",
                   help="most confident mistakes to show")
    p.add_argument("--projection", default="auto", choices=("auto", "pca", "tsne"), help="2-D projection")
    p.add_argument("--max-points", type=ranged("max_points"), default=2000, metavar="N", help="points in the projection")
    add_memory_budget(p)
    add_wait(p, "this head's report")
    add_trust_pickle(p)


def handle(args: argparse.Namespace, ctx: JobContext) -> dict:
    from imgfeat.heads import ReportConfig, run_report

    cfg = ReportConfig(head_id=args.head, max_mistakes=args.mistakes, projection=args.projection,
                       max_points=args.max_points, wait=args.wait, trust_pickle=args.trust_pickle, memory_budget=args.memory_budget)
    out = run_report(ctx.ws, cfg, ctx.run_id)
    if not args.json:
        print(out["report"])
    return out
