"""`imgfeat train --dataset NAME --featureset FS --head KIND`: a light head on a featureset's features."""

from __future__ import annotations

import argparse

from imgfeat.cli.common import JobContext, Summary, add_command, add_config_flags, config_values
from imgfeat.core.errors import ConfigError
from imgfeat.heads.train import TrainConfig, check_c_grid, run_train

DESCRIPTION = """\
Train a light classifier ("head") on bottleneck features: the dataset's manifest gives
the labels and splits, the featureset the features, joined on image_id (one row per
image; images without a label or without features are counted and left out).

It trains on split 'train' and evaluates on 'test' (or 'val'); a dataset without splits
holds out a seeded stratified --test-fraction. Hyper-parameters are chosen by stratified
k-fold cross-validation on the training rows.

  logreg  standard scaling + logistic regression, C by cross-validation
  svm     standard scaling + linear SVM (or --kernel rbf), C by cross-validation,
          probabilities calibrated (sigmoid)
  mlp     Dense(256, relu) -> Dropout(0.5) -> softmax in Keras, early stopping on a
          validation split; training curves saved as PNG
  auto    cross-validates all three on the same folds and keeps the best

The head goes to heads/<head_id>/ (model file, head.json, metrics.json, rows.parquet,
left_out.parquet: duplicate files and images under several labels, by path).
head_id = <dataset>-<head>-<hash8> of the featureset, head kind, parameters and the
training ids and labels: training the same thing again reuses it (reused: true).

Every head also has a stable name (--name, default <dataset>-<head>): the name always
means its latest version, so 'imgfeat predict --head photos-logreg' and 'imgfeat report
--head photos-logreg' follow retraining; NAME@ID pins one version. 'imgfeat ls' lists them.
--featureset takes a featureset's full name or its recipe name (a job file's
[features.NAME], or 'imgfeat extract --name'), which means the recipe's latest featureset.
"""

EPILOG = """\
examples:
  imgfeat train --dataset photos --featureset FS --head logreg
  imgfeat train --dataset photos --featureset FS --head svm --kernel rbf --class-weight balanced
  imgfeat train --dataset photos --featureset FS --head auto --cv 3 --json
  imgfeat train --dataset photos --featureset CLIP_FS --head zero-shot --prompt "a photo of a {label}"
  imgfeat train --dataset photos --featureset lite0 --name photos-nightly   # names, not hashes

exit codes: 0 trained or reused, 2 bad flag, unknown dataset/featureset, or labels a
classifier cannot learn from (one class, a class with a single image, no labels), 1 other
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "train", handle, help="train a classifier head on a featureset", description=DESCRIPTION, epilog=EPILOG
    )
    add_config_flags(
        p,
        TrainConfig,
        [
            "dataset",
            "featureset",
            "name",
            "head",
            "prompt",
            "kernel",
            "cv",
            "class_weight",
            "random_state",
            "test_fraction",
            "cv_max_rows",
            "c_grid",
            "epochs",
            "hidden",
            "memory_budget",
            "wait",
        ],
        types={"c_grid": c_grid},
    )


def handle(args: argparse.Namespace, ctx: JobContext) -> Summary:
    cfg = TrainConfig(**config_values(TrainConfig, args))
    out = run_train(ctx.ws, cfg, ctx.run_id).to_json()
    if not args.json:
        print_train(out)
    return out


def c_grid(text: str) -> tuple[float, ...]:
    """``0.01,0.1,1`` -> (0.01, 0.1, 1.0), checked as a job file's c_grid is (argparse: exit 2)."""
    try:
        return check_c_grid([float(v) for v in text.split(",") if v.strip()])
    except (ValueError, ConfigError) as exc:
        why = str(exc).split(", got")[0] if isinstance(exc, ConfigError) else "expected comma-separated numbers"
        raise argparse.ArgumentTypeError(f"{why}, got {text!r}") from None


def print_train(out: dict) -> None:
    m = out["metrics"]
    acc = m.get("test_accuracy")
    state = "reused" if out["reused"] else "trained"
    print(
        f"{state} {out['name']} = {out['head_id']} ({out['model_kind']}, "
        f"{out['n_train']} train / {out['n_test']} test images)"
    )
    if acc is not None:
        print(f"test accuracy {acc:.1%}, macro F1 {m['macro_f1']:.3f}")
    for kind, cv in (m.get("cv") or {}).items():
        print(f"cv {kind:<7} {cv['mean']:.3f} +- {cv['std']:.3f}")
    print_left_out(out.get("left_out") or {}, out.get("left_out_files") or [])
    print(f"-> {out['head_dir']}")


def print_left_out(counts: dict, files: list[dict]) -> None:
    """Duplicates and label conflicts, counted and named (all of them are in left_out.parquet)."""
    said = {k: v for k, v in counts.items() if v}
    if said:
        print("left out: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in said.items()))
    conflicts: dict[str, list[dict]] = {}  # one line per image: its paths, the used label first
    for f in files:
        if f["reason"] == "conflicting_labels":
            conflicts.setdefault(f["kept_path"], []).append(f)
    for kept, group in list(conflicts.items())[:10]:
        group.sort(key=lambda f: f["path"] != kept)
        paths = ", ".join(f"{f['path']} ({f['label']}{', used' if f['path'] == kept else ''})" for f in group)
        print(f"  one image, several labels: {paths}")
    dups = [f for f in files if f["reason"] == "duplicate"]
    for f in dups[:5]:
        print(f"  duplicate: {f['path']} = {f['kept_path']}")
    if len(conflicts) > 10 or len(dups) > 5:
        print(f"  ... {len(files)} files in all (--json lists them)")
