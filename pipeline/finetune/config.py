"""The finetune stage's config and files: `FinetuneConfig`, where a fine-tune lives and what it writes,
its checkpoint check and data hash; shared by the stage (train.py) and the loop (loop.py)."""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from imgfeat.core.errors import ConfigError, unknown_value
from imgfeat.core.hashing import sha256_bytes, sha256_lines
from imgfeat.core.names import HEADS, check_ref
from imgfeat.core.options import opt
from imgfeat.core.ranges import check_fields
from imgfeat.core.results import JsonObject
from imgfeat.core.storage import write_bytes_atomic
from imgfeat.core.workspace import Workspace, check_name
from imgfeat.extract.decode import DecodeConfig

if TYPE_CHECKING:  # finetune.data imports keras: for the annotation only
    from imgfeat.finetune.data import FinetuneRows

META_FILE, MODEL_FILE, WEIGHTS_FILE, CURVES_FILE = "finetune.json", "model.keras", "backbone.weights.h5", "curves.png"
CKPT_WEIGHTS, CKPT_BEST, CKPT_STATE = "checkpoint.weights.h5", "best.weights.h5", "checkpoint.json"
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
AUGMENT_NAMES = ("flip", "rotate", "zoom", "contrast")  # the layers are in model.AUGMENTATIONS
# Fields that do not change the result (so they stay out of the finetune id).
_NOT_PARAMS = ("name", "tensorboard", "wait", "precision", "workers")


@dataclass(frozen=True)
class FinetuneConfig:
    """What to fine-tune: a backbone's top blocks plus a new head, on one dataset's labelled images."""

    dataset: str = opt(metavar="NAME", help="dataset whose labels to learn")
    backbone: str = opt(metavar="NAME", help="backbone to tune (imgfeat backbones)")
    weights: str = opt("imagenet", metavar="W", help="starting weights: imagenet, none or PATH")
    input_size: int | None = opt(
        None, metavar="N", help="input side (default: the backbone's); extract the tuned features at the same size"
    )
    unfreeze_blocks: int | None = opt(2, metavar="N", help="top blocks to train")
    unfreeze_from: str | None = opt(
        None,
        metavar="LAYER",  # wins over unfreeze_blocks
        help="train every layer from LAYER on",
    )
    epochs: int = opt(3, metavar="N", help="fine-tune epochs (most)")  # after the warm-start epochs
    warmup_epochs: int = opt(1, metavar="N", help="head-only epochs first")  # backbone frozen: the warm start
    # a logreg head (ID, NAME or NAME@ID) on this recipe's frozen features
    warm_start_head: str | None = opt(
        None,
        flag="--warm-start",
        metavar="HEAD",
        help="start the head from this logreg head (a name, its latest; NAME@ID or an id), trained on features "
        "of the same backbone, weights and input size; then --warmup-epochs 0 skips the head-only epochs",
    )
    learning_rate: float = opt(1e-4, metavar="LR", help="fine-tune learning rate")
    warmup_learning_rate: float = opt(1e-3, metavar="LR", help="warm-start learning rate")
    batch_size: int = opt(16, metavar="N", help="images per step")
    augment: tuple[str, ...] = opt(
        AUGMENT_NAMES, metavar="LIST", help="comma-separated: flip,rotate,zoom,contrast, or none (default: all four)"
    )
    dropout: float = 0.2
    patience: int = opt(
        2,
        metavar="N",  # early stopping on validation loss
        help="stop after N fine-tune epochs without a better validation loss",
    )
    val_fraction: float = opt(0.15, metavar="F", help="share of the training images held out for early stopping")
    test_fraction: float = opt(0.2, metavar="F", help="held-out fraction when the dataset has no test/val split")
    random_state: int = opt(0, metavar="N", help="seed for splits, order and init")
    interpolation: str = "bilinear"
    exif: str = "rotate"
    precision: str = opt("auto", choices=PRECISIONS, help="auto: mixed_float16 on a GPU, else float32")
    name: str | None = opt(None, metavar="NAME", help="name of the result (default: the dataset)")
    tensorboard: str | None = opt(
        None, metavar="DIR", help="also write TensorBoard logs to DIR (needs the tensorboard package)"
    )
    workers: int = opt(2, metavar="N", help="threads decoding training batches ahead of the model")
    wait: float | None = opt(
        None,
        metavar="SECONDS",
        help="wait up to this long for another process writing the same fine-tune, instead of exiting at once",
    )

    def __post_init__(self) -> None:
        check_name("dataset", self.dataset)
        check_fields(self)  # epochs, batch size, rates, seed: the ranges of their flags and keys
        if self.warm_start_head is not None:
            check_ref(HEADS, self.warm_start_head)
        if isinstance(self.augment, str) or not all(isinstance(a, str) for a in self.augment):
            raise ConfigError(f"augment must be a list of names, got {self.augment!r}")
        object.__setattr__(self, "augment", tuple(self.augment))  # a job file gives a list
        if self.name is not None:
            check_name("finetune", self.name)
        for name in self.augment:
            if name not in AUGMENT_NAMES:
                raise unknown_value("augmentation", name, AUGMENT_NAMES)
        for key in ("epochs", "batch_size", "patience", "workers"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)!r}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs must be 0 or more, got {self.warmup_epochs!r}")
        if self.unfreeze_from is None and (self.unfreeze_blocks is None or self.unfreeze_blocks < 1):
            raise ConfigError(f"unfreeze_blocks must be at least 1, got {self.unfreeze_blocks!r}")
        for key in ("learning_rate", "warmup_learning_rate"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be above 0, got {getattr(self, key)!r}")
        if not 0.0 < self.val_fraction < 1.0 or not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(
                f"val_fraction must be in (0, 1) and test_fraction in [0, 1), got "
                f"{self.val_fraction!r} and {self.test_fraction!r}"
            )
        if self.tensorboard is not None and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(
                f"tensorboard = {self.tensorboard!r}: TensorBoard logs need the tensorboard "
                "package (pip install tensorboard), which is not installed"
            )
        if self.precision not in PRECISIONS:
            raise unknown_value("precision", self.precision, PRECISIONS)

    def params(self) -> JsonObject:
        values = asdict(self)
        return {k: v for k, v in values.items() if k not in _NOT_PARAMS}

    @property
    def total_epochs(self) -> int:
        return self.warmup_epochs + self.epochs


def finetune_dir(ws: Workspace, finetune_id: str) -> Path:
    """finetune/<id>/ in the workspace (next to heads/; kept here so this stage stays self-contained)."""
    return ws.root / "finetune" / check_name("finetune", finetune_id)


def data_hash(rows: FinetuneRows) -> str:
    """sha256 of every (role, id, label) of train, val and test: the data's identity."""
    return sha256_lines(
        f"{role}\t{i}\t{rows.classes[y]}"
        for role, split in (("train", rows.train), ("val", rows.val), ("test", rows.test))
        for i, y in zip(split.ids.tolist(), split.y.tolist())
    )


def checkpoint_problem(state: object, identity: dict[str, Any], total_epochs: int) -> str | None:
    """Pure: why a parsed checkpoint state cannot continue the run ``identity`` names (None: it can)."""
    if not isinstance(state, dict):
        return f"expected a JSON object, got {type(state).__name__}"
    for key, want in identity.items():
        if state.get(key) != want:
            return f"it continues another run ({key} {state.get(key)!r:.80}, this run's {want!r:.80})"
    epoch = state.get("epoch")
    if not (_is_int(epoch) and 1 <= epoch <= total_epochs):
        return f"epoch {epoch!r:.40} is not one of this run's epochs 1-{total_epochs}"
    history, seconds = state.get("history"), state.get("seconds_per_epoch")
    if not (
        isinstance(history, dict) and all(_numbers(v, epoch) for v in history.values()) and _numbers(seconds, epoch)
    ):
        return f"its history does not hold {epoch} epochs of numbers"
    best, bad, best_epoch = state.get("best_val_loss"), state.get("bad_epochs"), state.get("best_epoch")
    if not (
        (best is None or _is_number(best))
        and _is_int(bad)
        and 0 <= bad <= epoch
        and (best_epoch is None or (_is_int(best_epoch) and 1 <= best_epoch <= epoch))
    ):
        return "its best-epoch tracking is malformed"
    skipped, warm = state.get("skipped"), state.get("warm_metrics")
    if not (
        isinstance(skipped, list)
        and all(isinstance(p, str) for p in skipped)
        and (warm is None or isinstance(warm, dict))
        and isinstance(state.get("stopped", False), bool)
    ):
        return "its skipped images, warm-start metrics or stop flag are malformed"
    return None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(values: object, n: int) -> bool:
    return isinstance(values, list) and len(values) == n and all(map(_is_number, values))


def save_keras_atomic(save: Callable[[str], object], final: Path) -> str:
    """Keras writes only to names ending in .keras/.weights.h5: write to a scratch file, then commit
    its bytes with the commit protocol. Returns the file's sha256."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".scratch-") as scratch:
        tmp = Path(scratch) / final.name
        save(str(tmp))
        data = tmp.read_bytes()
    write_bytes_atomic(data, final)
    return sha256_bytes(data)


def decode_config(cfg: FinetuneConfig, size: int) -> DecodeConfig:
    return DecodeConfig(size=(size, size), interpolation=cfg.interpolation, exif=cfg.exif)
