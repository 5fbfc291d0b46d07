"""The ``imgfeat`` command: one subcommand per job module in ``jobs/``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from imgfeat import __version__

from imgfeat.cli.common import HelpFormatter, run_job

# Order here is the order in `imgfeat --help`: the stages first, then the tools.
JOB_MODULES = (
    "demo",
    "run",
    "scan",
    "extract",
    "train",
    "finetune",
    "predict",
    "report",
    "classify",
    "backbones",
    "weights",
    "bench",
)

DESCRIPTION = """\
Batch, offline image feature extraction with Keras backbones.

Stages: scan an image folder into a manifest, extract bottleneck features into
Parquet shards, train a light head on them, predict, and report. Each stage only
does new work, so a rerun is cheap and a crashed run resumes.
"""

EPILOG = """\
examples:
  imgfeat demo                                   # the whole pipeline on a generated photo set
  imgfeat scan ~/photos --dataset photos
  imgfeat extract --dataset photos --backbone efficientnet_lite0
  imgfeat run jobs/examples/nightly.toml         # all stages from a job file

Run 'imgfeat COMMAND --help' for a command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgfeat", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"imgfeat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in JOB_MODULES:
        if importlib.util.find_spec(f"imgfeat.cli.{name}") is not None:
            importlib.import_module(f"imgfeat.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # TensorFlow's C++ start-up chatter (oneDNN notes, "no CUDA driver") is not for people
    # running a batch job; Python-level warnings and errors still reach the log.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    return run_job(args)


if __name__ == "__main__":
    sys.exit(main())
