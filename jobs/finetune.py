"""`imgfeat finetune --dataset D --backbone B`: train a backbone's top blocks with a head; a tuned weights file."""

from __future__ import annotations

import argparse

from imgfeat.cli.common import JobContext, Summary, add_command, add_config_flags, config_values
from imgfeat.finetune.train import AUGMENT_NAMES, FinetuneConfig, run_finetune

DESCRIPTION = """\
Fine-tune a backbone on a labelled dataset, for when a head on frozen features is not enough:

  1. warm start: a softmax head trained on the frozen backbone (--warmup-epochs, at
     --warmup-learning-rate), so the unfrozen layers never see a random head's gradients;
  2. unfreeze the backbone's top --unfreeze-blocks N blocks (whole blocks, as
     'imgfeat backbones --blocks NAME' lists them) or every layer from --unfreeze-from LAYER,
     BatchNormalization layers kept frozen and in inference mode, and train them with the
     head at --learning-rate, with --augment as Keras layers on the device and early
     stopping on a validation split held out of 'train';
  3. write finetune/<id>/: model.keras (loads with safe_mode), backbone.weights.h5 (the tuned
     backbone: 'imgfeat extract --weights PATH' makes features from it, named by its sha256),
     finetune.json (base weights, unfrozen layers, data hash, curves, test metrics), curves.png.

Images are decoded from disk batch by batch with extract's decoder; a file that fails to
decode is skipped and counted. Every epoch is checkpointed: a killed run resumes from its
last complete epoch, and the same configuration on the same data is reused, not retrained.
Mixed precision (float16) is used when Keras sees a GPU.
"""

EPILOG = """\
examples:
  imgfeat finetune --dataset photos --backbone efficientnet_lite0 --unfreeze-blocks 2 --epochs 3
  imgfeat finetune --dataset photos --backbone resnet50 --unfreeze-from conv5_block1_1_conv --json
  imgfeat extract --dataset photos --backbone efficientnet_lite0 --weights data/finetune/ID/backbone.weights.h5

exit codes: 0 trained or reused, 2 bad flag, a dataset with one class or no training split,
a block count the backbone does not have, a backbone without named blocks; 1 other
"""


def augment_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip()) if text.strip().lower() != "none" else ()
    bad = [n for n in names if n not in AUGMENT_NAMES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown augmentation {bad[0]!r} (allowed: {', '.join(AUGMENT_NAMES)}, or none)"
        )
    return names


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "finetune",
        handle,
        help="fine-tune a backbone's top blocks; a tuned weights file",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    add_config_flags(p, FinetuneConfig, ["dataset", "backbone", "weights", "input_size"])
    add_config_flags(p.add_mutually_exclusive_group(), FinetuneConfig, ["unfreeze_blocks", "unfreeze_from"])
    add_config_flags(
        p,
        FinetuneConfig,
        [
            "epochs",
            "warmup_epochs",
            "warm_start_head",
            "augment",
            "learning_rate",
            "warmup_learning_rate",
            "batch_size",
            "patience",
            "val_fraction",
            "test_fraction",
            "random_state",
            "precision",
            "name",
            "tensorboard",
            "workers",
            "wait",
        ],
        types={"augment": augment_list},
    )


def handle(args: argparse.Namespace, ctx: JobContext) -> Summary:
    values = config_values(FinetuneConfig, args)
    if args.unfreeze_from:  # the flags are exclusive; the config's default of blocks gives way to a layer
        values["unfreeze_blocks"] = None
    out = run_finetune(ctx.ws, FinetuneConfig(**values), ctx.run_id).to_json()
    if not args.json:
        print_finetune(out)
    return out


def print_finetune(out: dict) -> None:
    m = out["metrics"]
    state = "reused" if out["reused"] else "fine-tuned"
    print(
        f"{state} {out['finetune_id']} ({out['backbone']}, {out['n_train']} train / {out['n_val']} val / "
        f"{out['n_test']} test images, {out['epochs_run']} epochs)"
    )
    if m.get("test_accuracy") is not None:
        warm = m.get("warm_start_test_accuracy")
        extra = f" (frozen-backbone head: {warm:.1%})" if warm is not None else ""
        print(f"test accuracy {m['test_accuracy']:.1%}{extra}")
    if out["skipped_images"]:
        print(f"skipped {out['skipped_images']} image(s) that failed to decode")
    print(f"-> {out['weights']}")
