"""The recipe of a keras-hub backbone: its embedding, input size, crop and interpolation come from the preset."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from imgfeat.backbones.hub import HubSpec, hub_weights_kind
from imgfeat.backbones.weights import WeightsRef
from imgfeat.core.errors import ConfigError
from imgfeat.extract.recipe import Recipe, Resolved, WeightsId, WeightsSource

if TYPE_CHECKING:
    from imgfeat.extract.extract import ExtractConfig


def resolve_hub_recipe(cfg: ExtractConfig, spec: HubSpec) -> Resolved:
    """ExtractConfig + HubSpec -> Resolved. The preset's content digest is the weights identity, so
    a directory re-saved with other weights (or another converter) is another featureset; the
    input transform is the converter's (``--interpolation`` does not apply)."""
    if cfg.layer is not None:
        raise ConfigError(f"--layer does not apply to keras-hub backbone {spec.name}: its feature is the "
                          f"{spec.family} {spec.embedding} embedding")
    if cfg.pooling not in ("avg", spec.embedding):
        raise ConfigError(f"--pooling {cfg.pooling} does not apply to keras-hub backbone {spec.name}: its "
                          f"feature is the {spec.family} {spec.embedding} embedding")
    size = spec.check_input_size(cfg.input_size)
    kind = hub_weights_kind(cfg.weights)
    conv = spec.converter
    crop, interp, antialias = (conv.crop, conv.interpolation, conv.antialias) if conv else ("none", "bilinear", True)
    from imgfeat.extract.batches import decoder_of

    decoder = decoder_of(cfg.decode)
    if decoder != "pillow":
        raise ConfigError(f"keras-hub backbones decode with Pillow (the converter's crop rule); "
                          f"--decode {cfg.decode} is for keras.applications backbones")
    ref = WeightsRef("preset", Path(spec.preset_dir), spec.content_sha256) if kind == "preset" else WeightsRef("none", None, None)
    weights = WeightsId(spec.content_sha256) if kind == "preset" else _random_init_id(spec, cfg.seed)
    recipe = Recipe(spec.name, weights, size, spec.embedding, None, interp, bool(cfg.fast_decode), cfg.exif,
                    cfg.precision, cfg.dtype, decoder, crop, antialias)
    source = WeightsSource(kind, spec.preset_dir, cfg.seed)
    return Resolved(recipe, source, spec, ref)


def _random_init_id(spec: HubSpec, seed: int) -> WeightsId:
    """A seeded random init of the preset's architecture: what it builds (the preset's content,
    its converter's scale and offset included), the seed and the backend (each draws its own numbers)."""
    from imgfeat.core.hashing import sha256_text
    from imgfeat.extract.recipe import keras_backend

    return WeightsId(sha256_text(f"random-init:{spec.content_sha256}:seed={seed}:backend={keras_backend()}"))
