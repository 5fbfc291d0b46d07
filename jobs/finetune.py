"""`imgfeat finetune --dataset D --backbone B`: train a backbone's top blocks with a head; a tuned weights file."""

from __future__ import annotations

import argparse

from imgfeat.cli.common import JobContext, Summary, add_command, add_wait, ranged

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
    from imgfeat.finetune.train import AUGMENT_NAMES

    names = tuple(n.strip() for n in text.split(",") if n.strip()) if text.strip().lower() != "none" else ()
    bad = [n for n in names if n not in AUGMENT_NAMES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown augmentation {bad[0]!r} (allowed: {', '.join(AUGMENT_NAMES)}, or none)")
    return names


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "finetune", handle, help="fine-tune a backbone's top blocks; a tuned weights file",
                    description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--dataset", required=True, metavar="NAME", help="dataset whose labels to learn")
    p.add_argument("--backbone", required=True, metavar="NAME", help="backbone to tune (imgfeat backbones)")
    p.add_argument("--weights", default="imagenet", metavar="W", help="starting weights: imagenet, none or PATH")
    p.add_argument("--input-size", type=ranged("input_size"), default=None, metavar="N",
                   help="input side (default: the backbone's); extract the tuned features at the same size")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--unfreeze-blocks", type=ranged("unfreeze_blocks"), default=2, metavar="N",
                   help="top blocks to train")
    g.add_argument("--unfreeze-from", default=None, metavar="LAYER", help="train every layer from LAYER on")
    p.add_argument("--epochs", type=ranged("epochs"), default=3, metavar="N", help="fine-tune epochs (most)")
    p.add_argument("--warmup-epochs", type=ranged("warmup_epochs"), default=1, metavar="N",
                   help="head-only epochs first")
    p.add_argument("--warm-start", default=None, metavar="HEAD",
                   help="start the head from this logreg head (a name, its latest; NAME@ID or an id), "
                        "trained on features of the same backbone, weights and input size; then "
                        "--warmup-epochs 0 skips the head-only epochs")
    p.add_argument("--augment", type=augment_list, default=("flip", "rotate", "zoom", "contrast"),
                   metavar="LIST", help="comma-separated: flip,rotate,zoom,contrast, or none "
                                        "(default: all four)")
    p.add_argument("--learning-rate", type=ranged("learning_rate"), default=1e-4, metavar="LR",
                   help="fine-tune learning rate")
    p.add_argument("--warmup-learning-rate", type=ranged("warmup_learning_rate"), default=1e-3, metavar="LR",
                   help="warm-start learning rate")
    p.add_argument("--batch-size", type=ranged("batch_size"), default=16, metavar="N", help="images per step")
    p.add_argument("--patience", type=ranged("patience"), default=2, metavar="N",
                   help="stop after N fine-tune epochs without a better validation loss")
    p.add_argument("--val-fraction", type=ranged("val_fraction"), default=0.15, metavar="F",
                   help="share of the training images held out for early stopping")
    p.add_argument("--test-fraction", type=ranged("test_fraction"), default=0.2, metavar="F",
                   help="held-out fraction when the dataset has no test/val split")
    p.add_argument("--random-state", type=ranged("random_state"), default=0, metavar="N",
                   help="seed for splits, order and init")
    p.add_argument("--precision", default="auto", choices=("auto", "float32", "mixed_float16", "mixed_bfloat16"),
                   help="auto: mixed_float16 on a GPU, else float32")
    p.add_argument("--name", default=None, metavar="NAME", help="name of the result (default: the dataset)")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also write TensorBoard logs to DIR (needs the tensorboard package)")
    p.add_argument("--workers", type=ranged("workers"), default=2, metavar="N",
                   help="threads decoding training batches ahead of the model")
    add_wait(p, "the same fine-tune")


def handle(args: argparse.Namespace, ctx: JobContext) -> Summary:
    from imgfeat.finetune import FinetuneConfig, run_finetune

    cfg = FinetuneConfig(
        dataset=args.dataset, backbone=args.backbone, weights=args.weights, input_size=args.input_size,
        unfreeze_blocks=None if args.unfreeze_from else args.unfreeze_blocks, unfreeze_from=args.unfreeze_from,
        epochs=args.epochs, warmup_epochs=args.warmup_epochs, warm_start_head=args.warm_start,
        learning_rate=args.learning_rate,
        warmup_learning_rate=args.warmup_learning_rate, batch_size=args.batch_size, augment=args.augment,
        patience=args.patience, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        random_state=args.random_state, precision=args.precision, name=args.name,
        tensorboard=args.tensorboard, workers=args.workers, wait=args.wait)
    out = run_finetune(ctx.ws, cfg, ctx.run_id).to_json()
    if not args.json:
        print_finetune(out)
    return out


def print_finetune(out: dict) -> None:
    m = out["metrics"]
    state = "reused" if out["reused"] else "fine-tuned"
    print(f"{state} {out['finetune_id']} ({out['backbone']}, {out['n_train']} train / {out['n_val']} val / "
          f"{out['n_test']} test images, {out['epochs_run']} epochs)")
    if m.get("test_accuracy") is not None:
        warm = m.get("warm_start_test_accuracy")
        extra = f" (frozen-backbone head: {warm:.1%})" if warm is not None else ""
        print(f"test accuracy {m['test_accuracy']:.1%}{extra}")
    if out["skipped_images"]:
        print(f"skipped {out['skipped_images']} image(s) that failed to decode")
    print(f"-> {out['weights']}")
