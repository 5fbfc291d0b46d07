"""`imgfeat bench --backbone B --images DIR`: extract's throughput against the input and forward limits and the tutorial path."""

from __future__ import annotations

import argparse
from pathlib import Path

from imgfeat.cli.common import JobContext, Summary, add_command, ranged

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

exit codes: 0 measured, 2 bad flag or no images, 1 a measured process failed
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "bench", handle, help="throughput of extract vs the input and forward limits and the tutorial path",
                    description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--backbone", required=True, metavar="NAME", help="e.g. mobilenet_v2, resnet50")
    p.add_argument("--images", required=True, metavar="DIR", help="a folder of image files (searched recursively)")
    p.add_argument("--batch-size", type=ranged("batch_size"), default=32, metavar="N", help="images per model call")
    p.add_argument("--limit", type=ranged("limit"), default=None, metavar="N",
                   help="use the first N images (sorted by path)")
    p.add_argument("--weights", default="none", metavar="imagenet|none|PATH", help="weights to build with")
    p.add_argument("--input-size", type=ranged("input_size"), default=None, metavar="N", help="square input side")
    p.add_argument("--precision", default="float32", metavar="float32|bfloat16|float16", help="compute precision")
    p.add_argument("--fast-decode", action="store_true", help="pass --fast-decode to extract")
    p.add_argument("--workers", type=ranged("workers"), default=None, metavar="N",
                   help="decoders of extract and of the input path (default: the CPU count)")
    p.add_argument("--decode", default="auto", metavar="auto|threads|processes|gpu",
                   help="extract's --decode, also used by the input path")
    p.add_argument("--repeat", type=ranged("repeat"), default=1, metavar="N",
                   help="rounds of all paths, interleaved; each path's fastest round counts "
                        "(use 3+ on a shared machine)")
    p.add_argument("--skip", action="append", default=[], choices=("input", "forward", "extract", "tutorial"),
                   help="leave out a path (repeatable)")


def handle(args: argparse.Namespace, ctx: JobContext) -> Summary:
    from imgfeat.tools.bench import PATHS, BenchConfig, run_bench

    cfg = BenchConfig(
        backbone=args.backbone, images=Path(args.images).expanduser(), batch_size=args.batch_size,
        limit=args.limit, weights=args.weights, input_size=args.input_size, fast_decode=args.fast_decode,
        precision=args.precision, workers=args.workers, decode=args.decode, repeat=args.repeat,
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
        lines.append(f"  extract / min(forward, input) = {s['end_to_end_over_limit']:.2f}x "
                     f"(limited by {s['limited_by']})")
    if "end_to_end_over_forward" in s:
        lines.append(f"  extract / forward  = {s['end_to_end_over_forward']:.2f}x")
    if "end_to_end_over_tutorial" in s:
        lines.append(f"  extract / tutorial = {s['end_to_end_over_tutorial']:.2f}x")
    return "\n".join(lines)
