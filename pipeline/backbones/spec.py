"""A backbone spec (name -> Keras constructor, preprocess_input, input size, feature dims, weights) and
`build_model`, the one model builder; the table of specs is registry.py, the lookups the package."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from imgfeat.backbones.dotted import resolve
from imgfeat.backbones.weights import WeightsRef, keras_offline, resolve_weights
from imgfeat.core.errors import ConfigError, unknown_value

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

POOLINGS = ("avg", "max")
NAME_RE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


@dataclass(frozen=True)
class KerasWeightsFile:
    """Where Keras fetches a backbone's no-top ImageNet weights (as pinned in keras/src/applications)."""

    file_name: str  # may hold "{rows}" when Keras picks the file by input size (MobileNet V1/V2)
    origin: str  # the URL, with the same "{rows}" placeholder
    file_hash: str | None  # md5 (32 hex) or sha256 (64 hex), as Keras checks it; None if Keras has none
    sizes: tuple[int, ...] = ()  # input sizes with their own file; any other size loads the 224 file

    def for_size(self, input_size: int) -> tuple[str, str]:
        """(file name, URL) Keras uses at this input size."""
        rows = input_size if input_size in self.sizes else 224
        return self.file_name.format(rows=rows), self.origin.format(rows=rows)


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: how to build it, how to preprocess for it, what it outputs."""

    name: str
    family: str
    input_size: int  # default square input side
    dims: dict[str, int]  # pooling -> feature dim
    imagenet_top: bool  # the ImageNet classifier is a function of the avg-pooled features
    weights_mb: float  # approximate size of the ImageNet no-top weights file
    constructor: str  # dotted path of a keras.applications-style constructor
    preprocess: str  # dotted path of the family's preprocess_input
    imagenet_weights: str | None = None  # dotted path of a () -> Path giving a local weights file
    imagenet_available: str | None = None  # dotted path of a (name) -> bool: can imagenet_weights work offline?
    keras_weights: KerasWeightsFile | None = None  # when Keras itself downloads the ImageNet file
    keras_top_weights: KerasWeightsFile | None = None  # the same, with the ImageNet classifier
    min_size: int = 32  # smallest input side the architecture accepts

    def check_input_size(self, input_size: int | None) -> int:
        """The input side to build at: the default, or a checked override."""
        if input_size is None:
            return self.input_size
        if not isinstance(input_size, int) or input_size < self.min_size:
            raise ConfigError(
                f"input size {input_size!r} is too small for {self.name}: "
                f"the smallest it accepts is {self.min_size} (default {self.input_size})"
            )
        return input_size

    def build(self, *args: Any, **kwargs: Any) -> keras.Model:
        """Deprecated: ``build_model(spec, ...)``, the one model builder, takes the same arguments."""
        warnings.warn(
            "BackboneSpec.build is deprecated; use imgfeat.backbones.build_model(spec, ...)",
            DeprecationWarning,
            stacklevel=2,
        )
        return build_model(self, *args, **kwargs)

    def construct(
        self,
        weights: str | None,
        input_size: int | None,
        pooling: str,
        layer: str | None,
        seed: int,
        include_top: bool,
        resolved_weights: WeightsRef | None,
    ) -> keras.Model:
        """This family's construction (a keras.applications constructor); build_model is its only caller."""
        return _construct_application(self, weights, input_size, pooling, layer, seed, include_top, resolved_weights)

    def preprocess_input(self, x: np.ndarray) -> np.ndarray:
        """float32 NHWC RGB 0..255 in, the family's preprocess_input applied, float32 out; x untouched."""
        # Keras' numpy path divides and subtracts in place on float32 input: work on a copy.
        out = self.preprocess_fn()(np.array(x, dtype=np.float32, copy=True))
        return np.asarray(out, dtype=np.float32)

    def preprocess_fn(self) -> Callable[[np.ndarray], Any]:
        return resolve(self.preprocess)

    def constructor_fn(self) -> Callable[..., keras.Model]:
        return resolve(self.constructor)


def build_model(
    spec: BackboneSpec,
    weights: str | None = "imagenet",
    input_size: int | None = None,
    pooling: str = "avg",
    layer: str | None = None,
    seed: int = 0,
    include_top: bool = False,
    resolved_weights: WeightsRef | None = None,
    dtype_policy: str | None = None,
) -> keras.Model:
    """The one model builder: (batch, s, s, 3) images to (batch, dim) features, for every backbone kind.

    ``weights``: "imagenet", "none"/None (random, seeded by ``seed``) or a ``.weights.h5``
    path saved from the same constructor. ``layer`` taps an inner layer and pools it.
    ``include_top=True`` returns the ImageNet classifier (batch, 1000) instead.
    ``resolved_weights``: ``weights`` already resolved (and hashed) by the caller.
    ``dtype_policy``: a Keras policy ("float32", "mixed_bfloat16", ...) to build under; the policy
    in force is restored afterwards (None: build under it).
    """
    args = (weights, input_size, pooling, layer, seed, include_top, resolved_weights)
    if dtype_policy is None:
        return spec.construct(*args)
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype_policy)
    try:
        return spec.construct(*args)
    finally:
        keras.config.set_dtype_policy(previous)


def _construct_application(
    spec: BackboneSpec,
    weights: str | None,
    input_size: int | None,
    pooling: str,
    layer: str | None,
    seed: int,
    include_top: bool,
    resolved_weights: WeightsRef | None,
) -> keras.Model:
    """Check every option first, then construct, load weights, cut and pool."""
    import keras

    if pooling not in POOLINGS:
        raise unknown_value("pooling", str(pooling), POOLINGS)
    size = spec.check_input_size(input_size)
    if include_top and size != spec.input_size:
        raise ConfigError(
            f"the ImageNet classifier of {spec.name} needs its default input size {spec.input_size}, not {size}"
        )
    ref = resolved_weights or resolve_weights(spec, weights, size, include_top=include_top)
    tap = layer is not None and not include_top
    kwargs = _constructor_kwargs(spec, ref, size, None if tap else pooling, include_top)
    # Seed even with pretrained weights: a few constructors draw random numbers for unused layers.
    keras.utils.set_random_seed(seed)
    keras_file = ref.kind == "imagenet" and not spec.imagenet_weights
    with keras_offline(ref.file) if keras_file else contextlib.nullcontext():
        model = spec.constructor_fn()(**kwargs)
    if ref.kind == "file":
        load_weights_file(model, ref.path, spec)
    return tap_layer(model, layer, pooling, spec) if tap and layer is not None else model  # (tap: a layer)


def _constructor_kwargs(spec: BackboneSpec, ref, size: int, pooling: str | None, include_top: bool) -> dict:
    kwargs: dict[str, Any] = {"include_top": include_top, "input_shape": (size, size, 3)}
    if not include_top:
        kwargs["pooling"] = pooling
    if ref.kind == "imagenet":
        # A file from the spec's own function goes in as a path; Keras' own file must be asked for
        # as "imagenet" (EfficientNet adds a layer for it), and keras_offline hands over our copy.
        kwargs["weights"] = str(ref.path) if spec.imagenet_weights else "imagenet"
    else:
        kwargs["weights"] = None  # a weights file is loaded afterwards, with a clear error on mismatch
    return kwargs


def load_weights_file(model: keras.Model, path, spec: BackboneSpec) -> None:
    """Load a .weights.h5 saved from the same constructor; a mismatch is a ConfigError, not a traceback."""
    import warnings

    try:
        with warnings.catch_warnings():
            # Keras warns and carries on when a file lacks some layers: that would be silently random.
            warnings.simplefilter("error")
            model.load_weights(str(path))
    except Exception as exc:  # Keras raises ValueError, KeyError, OSError... for a file that does not fit
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"weights file {path} does not fit {spec.name} ({model.name}): {first}. "
            f"It must be saved with model.save_weights() from the same backbone "
            f"({spec.constructor}, include_top=False)"
        ) from None


def tap_layer(model: keras.Model, layer: str, pooling: str, spec: BackboneSpec) -> keras.Model:
    """A model from the same inputs to ``layer``'s output, globally pooled to (batch, channels)."""
    import keras

    names = [lyr.name for lyr in model.layers]
    if layer not in names:
        raise unknown_value(
            f"layer of {spec.name}",
            layer,
            names,
            hint=f"{len(names)} layers; print them with: imgfeat backbones --layers " + spec.name,
        )
    out = model.get_layer(layer).output
    if len(out.shape) != 4:
        raise ConfigError(
            f"layer {layer!r} of {spec.name} outputs shape {tuple(out.shape)}; "
            "pick a convolutional layer with a (batch, h, w, channels) output"
        )
    pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
    x = pool(name=f"{layer}_{pooling}_pool")(out)
    return keras.Model(model.inputs, x, name=f"{model.name}_{layer}")
