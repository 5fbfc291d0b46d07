"""`imgfeat run JOB.toml`: every stage of a job file, incrementally."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from imgfeat.cli.common import JobContext, Summary, add_command, add_trust_pickle, ranged, seconds
from imgfeat.cli.report_lines import print_plan, print_run_summary
from imgfeat.core.stores import parse_storage_options, set_storage_options
from imgfeat.run.jobfile import load_job
from imgfeat.run.run import plan_job, run_job_spec
from imgfeat.run.summary import RunSummary

DESCRIPTION = """\
Run scan -> extract -> train -> predict -> report for the datasets, featuresets and heads
a TOML job file names. Every stage only does new work: with nothing changed a run does no
model work and ends in seconds; after 100 new images it extracts 100 images. A crashed run
resumes where it stopped. Two overlapping runs take turns per stage (see --wait).

Job file sections: [run] (max_error_rate, executor, wait; workers, ray_actors, ray_address,
gpus_per_worker as for 'imgfeat extract'), [datasets.NAME] (root plus scan
options), [features.NAME] (backbone plus extract options, datasets = [...]),
[heads.NAME] (dataset, features, head plus train options, predict = [...], report) and
[indexes.NAME] (features, datasets = [...], kind plus index options: kept current after extract).
Each value must have the type of the option it sets (true/false, an integer, a number, a
string): a wrong type exits 2 naming the key before any stage runs. --set values are read
as TOML values (a bare word is a string) and checked the same way.
"""

EPILOG = """\
examples:
  imgfeat run jobs/examples/nightly.toml
  imgfeat run nightly.toml --dry-run
  imgfeat run nightly.toml --set features.lite0.batch_size=64 --max-error-rate 0.02
  imgfeat run nightly.toml --json --log-format json --wait 3600     # from cron

exit codes: 0 done, 2 bad job file or flag, 3 finished but over --max-error-rate, 1 other failure
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "run",
        handle,
        help="run a TOML job file: all stages, only new work",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    p.add_argument("job", metavar="JOB.toml", type=Path, help="the job file")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be done (files to scan, images to extract, heads) and exit",
    )
    p.add_argument(
        "--max-error-rate",
        type=ranged("max_error_rate"),
        metavar="F",
        default=None,
        help="exit 3 when more than this fraction of images ended as error rows (overrides [run] max_error_rate)",
    )
    p.add_argument(
        "--executor", choices=("local", "ray"), default=None, help="where extract runs (overrides [run] executor)"
    )
    p.add_argument(
        "--wait",
        type=seconds,
        metavar="SECONDS",
        default=None,
        help="wait up to this long for a stage, head, predictions or report another process "
        "is writing, instead of exiting at once",
    )
    add_trust_pickle(p)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job-file value, e.g. features.lite0.batch_size=64 (repeatable)",
    )


def handle(args: argparse.Namespace, ctx: JobContext) -> Summary:
    job = load_job(args.job, tuple(args.overrides), workspace=ctx.ws.root)
    flags = {
        "max_error_rate": args.max_error_rate,
        "executor": args.executor,
        "wait": args.wait,
        "trust_pickle": args.trust_pickle or None,
    }
    job = dataclasses.replace(job, **{k: v for k, v in flags.items() if v is not None})
    # [storage] first, --storage-option over it
    set_storage_options({**job.storage, **parse_storage_options(args.storage_option)})
    if args.dry_run:
        plan = plan_job(ctx.ws, job)
        if not args.json:
            print_plan(plan)
        return plan
    summary = RunSummary(job.source)
    try:
        run_job_spec(ctx.ws, job, ctx.run_id, summary)
    finally:  # a failed run still reports the stages it finished
        ctx.record.summary.update(summary.to_json())
    if not args.json:
        print_run_summary(ctx.ws, summary)
    return summary
