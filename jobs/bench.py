"""`imgfeat bench --backbone B --images DIR`: extract's throughput against the input and forward limits and the tutorial path."""

from __future__ import annotations

import argparse
from pathlib import Path

from imgfeat.cli.common import JobContext, Summary, add_command, add_config_flags, config_values
from imgfeat.core.stores import is_uri
from imgfeat.tools.bench import PATHS, BenchConfig, run_bench

DESCRIPTION = """\
Measure, in one run and on this machine, four whole processes (start-up included) over
the same image files:

  input      extract's decode alone (read, content check, decode, resize) on every core,
             the same --decode mode, no model: the input limit
  forward    extract's model function alone on an in-memory uint8 batch (preprocessing on
             the device, batches in flight), as many calls as extract makes: the model limit
  extract    'imgfeat extract' on the files into a cold featureset (a temporary workspace)
  tutorial   keras.utils.image_dataset_from_directory + preprocess_input + model.predict

and print images/s for each with the ratios extract / min(forward, input) (how close the
pipeline gets to what this machine allows; end_to_end_over_limit in --json),
extract/forward and extract/tutorial. Throughput is a ratio measured in one run, never an
absolute time: compare ratios across machines, not images/s. The files are scanned into
the temporary workspace before the clock starts. Weights do not change speed, so the
bench uses --weights none unless told otherwise and needs no download.
"""

EPILOG = """\
examples:
  imgfeat bench --backbone mobilenet_v2 --images ~/photos --limit 1000
  imgfeat bench --backbone resnet50 --images ~/photos --batch-size 64 --json
  imgfeat bench --backbone mobilenet_v2 --images ~/big_jpegs --fast-decode --skip tutorial
  imgfeat bench --backbone mobilenet_v2 --images s3://photos/sample    # reads the objects where they are

exit codes: 0 measured, 2 bad flag or no images, 1 a measured process failed
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "bench",
        handle,
        help="throughput of extract vs the input and forward limits and the tutorial path",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    add_config_flags(
        p,
        BenchConfig,
        [
            "backbone",
            "images",
            "batch_size",
            "limit",
            "weights",
            "input_size",
            "precision",
            "fast_decode",
            "workers",
            "decode",
            "repeat",
            "logs",
        ],
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=("input", "forward", "extract", "tutorial"),
        help="leave out a path (repeatable)",
    )


def handle(args: argparse.Namespace, ctx: JobContext) -> Summary:
    values = config_values(BenchConfig, args)
    cfg = BenchConfig(
        **{**values, "images": args.images if is_uri(args.images) else Path(args.images).expanduser()},
        paths=tuple(p for p in PATHS if p not in args.skip),
    )
    summary = run_bench(cfg, ctx.run_id)
    if not args.json:
        print(_human(summary))
    return summary


def _human(s: dict) -> str:
    lines = [f"{s['backbone']} on {s['images']} images, batch {s['batch_size']} ({s['cpu_count']} CPUs):"]
    for path, rate in s["images_per_s"].items():
        lines.append(f"  {path:<9} {rate:>9.1f} img/s  ({s['process_seconds'][path]:.1f} s, whole process)")
    if "end_to_end_over_limit" in s:
        lines.append(
            f"  extract / min(forward, input) = {s['end_to_end_over_limit']:.2f}x (limited by {s['limited_by']})"
        )
    if "end_to_end_over_forward" in s:
        lines.append(f"  extract / forward  = {s['end_to_end_over_forward']:.2f}x")
    if "end_to_end_over_tutorial" in s:
        lines.append(f"  extract / tutorial = {s['end_to_end_over_tutorial']:.2f}x")
    return "\n".join(lines)
