"""The ``imgfeat`` command: one subcommand per job module in ``jobs/``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from imgfeat import __version__
from imgfeat.cli.common import HelpFormatter, run_job
from imgfeat.core.logs import capture_native_stderr, quiet_native_logs

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
    "ls",
    "prune",
    "index",
    "similar",
    "dedup",
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
    """The ``imgfeat`` command; ``argv=None`` is a real process (tests pass a list)."""
    args = build_parser().parse_args(argv)
    # TensorFlow's C++ start-up chatter ("no CUDA driver", "failed call to cuInit") is not for
    # people running a batch job, and breaks --log-format json: quiet it before TensorFlow is
    # imported (handlers import it lazily), and log what still reaches fd 2 at debug level.
    quiet_native_logs(args.log_level)
    if argv is None:
        capture_native_stderr()
    return run_job(args)


if __name__ == "__main__":
    sys.exit(main())
