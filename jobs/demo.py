"""`imgfeat demo`: the whole pipeline, offline, on a photo set generated from shipped photos."""

from __future__ import annotations

import argparse
import importlib.resources
import json
import logging
import shlex
import sys
import time

from imgfeat.cli.common import JobContext, Summary, add_command, ranged
from imgfeat.cli.report_lines import _rel, print_run_summary
from imgfeat.run.jobfile import load_job
from imgfeat.run.run import run_job_spec
from imgfeat.run.summary import RunSummary
from imgfeat.tools.samples import demo_photo_set

log = logging.getLogger(__name__)

DESCRIPTION = """\
Build a small labelled photo set (crops, flips, scales and colour jitter of real photos that
ship with scikit-image and scikit-learn; deterministic, no download) under
WORKSPACE/demo_images, then run the whole pipeline on it with jobs/examples/demo.toml:
scan -> extract (EfficientNet-Lite0, ImageNet weights from a pip package) -> train a
logistic-regression head -> predict -> HTML report. Run it again: nothing is redone.
"""

EPILOG = """\
examples:
  imgfeat demo
  imgfeat demo --workspace /tmp/demo --per-class 100
  imgfeat demo --backbone mobilenet_v2 --weights none     # any backbone; 'none' = random init
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "demo",
        handle,
        help="run the whole pipeline on a generated photo set (offline)",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    p.add_argument(
        "--per-class",
        type=ranged("per_class"),
        default=60,
        metavar="N",
        help="images per class (6 classes, a quarter held out for test)",
    )
    p.add_argument("--backbone", default=None, metavar="NAME", help="backbone (default: efficientnet_lite0)")
    p.add_argument("--weights", default=None, metavar="W", help="imagenet, none, or a weights file")


def handle(args: argparse.Namespace, ctx: JobContext) -> Summary:
    t0 = time.perf_counter()
    images, n = demo_photo_set(ctx.ws.root / "demo_images", args.per_class)
    log.info("demo photo set: %d images in %s", n, images)
    overrides = [
        f"features.lite0.{k}={json.dumps(v)}" for k, v in (("backbone", args.backbone), ("weights", args.weights)) if v
    ]
    job_file = importlib.resources.files("imgfeat.cli") / "examples" / "demo.toml"
    with importlib.resources.as_file(job_file) as path:
        job = load_job(path, tuple(overrides), workspace=ctx.ws.root)
    summary = ctx.record.summary
    summary["demo_images"] = str(images)
    run = RunSummary(job.source)
    try:
        run_job_spec(ctx.ws, job, ctx.run_id, run)
    finally:  # a failed run still reports the stages it finished
        summary.update(run.to_json())
    summary["seconds_total"] = round(time.perf_counter() - t0, 2)
    if not args.json:
        print_demo(ctx, summary, n, run)
    return summary


def print_demo(ctx: JobContext, summary: dict, n_images: int, run: RunSummary) -> None:
    ws = ctx.ws
    print(f"\nimgfeat demo: {n_images} generated photos, 6 classes, in {summary['seconds_total']:.0f} s\n")
    print_run_summary(ws, run)
    print("\nQuery the tables (the lines run as they are; pandas, pyarrow, Polars and DuckDB read them):")
    for line in query_lines(ws, summary):
        print(f"  {line}")
    ((head_name, _),) = list(summary["train"].items())[:1]
    report = summary.get("report", {}).get(head_name, {})
    if report:
        print(f"\nOpen the report: {_rel(report['report'])}")


def query_lines(ws, summary: dict) -> list[str]:
    """Shell lines that read the demo's featureset and predictions with what the install has.

    The venv's own Python by absolute path (a bare ``python`` may be another one without
    imgfeat), the featureset by its recipe name, the predictions folder as it is.
    """
    python = shlex.quote(sys.executable)
    workspace = _rel(ws.root)
    ((fs_key, _),) = list(summary["extract"].items())[:1]
    ((_, tr),) = list(summary["train"].items())[:1]
    recipe = fs_key.split("/", 1)[0]
    predictions = _rel(ws.predictions_dir(tr["head_id"]))
    return [
        f"{python} -c \"import imgfeat; ids, X = imgfeat.Featureset('{recipe}', workspace='{workspace}')"
        f".to_numpy(); print(len(ids), 'features of dim', X.shape[1])\"",
        f"{python} -c \"import pandas as pd; p = pd.read_parquet('{predictions}'); "
        f'print(pd.crosstab(p.label, p.pred_label))"',
    ]
