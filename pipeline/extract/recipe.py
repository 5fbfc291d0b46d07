"""A featureset's identity: the typed recipe of its numbers, its fingerprint and name, and its provenance."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgfeat.backbones import get_backbone
from imgfeat.backbones.hub import HubSpec, hub_weights_kind
from imgfeat.backbones.weights import WeightsRef, resolve_weights
from imgfeat.core.errors import ConfigError
from imgfeat.core.hashing import DEFAULT_SEPARATORS, canonical_digest, sha256_text
from imgfeat.core.results import JsonObject
from imgfeat.extract.batches import decoder_of
from imgfeat.extract.decode import DecodeConfig

if TYPE_CHECKING:
    from imgfeat.backbones import BackboneSpec
    from imgfeat.extract.extract import ExtractConfig

DEFAULT_DECODER = "pillow"
DEFAULT_CROP = "none"
# Fields added after featuresets existed: left out of the hash at their default, so old names hold.
OPTIONAL_FIELDS = {"decoder": DEFAULT_DECODER, "crop": DEFAULT_CROP, "antialias": True}
_UNSAFE = re.compile(r"[^A-Za-z0-9._]+")
SHA_PREFIX = "sha256:"
NONE_PREFIX = "none:"


@dataclass(frozen=True)
class WeightsId:
    """The weights' part of the recipe: a file's sha256, or (random init) the seed and the backend.

    A seeded random init draws different numbers on each Keras backend, so for random weights the
    backend is part of the identity; a weights file gives the same numbers everywhere, so with a
    file the seed and backend are None (they do not change its numbers).
    """

    sha256: str | None
    seed: int | None = None
    backend: str | None = None

    def identity(self) -> str:
        if self.sha256:
            return SHA_PREFIX + self.sha256
        return f"{NONE_PREFIX}seed={self.seed}:backend={self.backend}"

    @classmethod
    def of(cls, ref: WeightsRef, seed: int) -> WeightsId:
        """The identity of resolved weights: the file's sha256, else the seed and this backend."""
        return cls(ref.sha256) if ref.sha256 else cls(None, seed, keras_backend())

    @classmethod
    def parse(cls, identity: str) -> WeightsId:
        if identity.startswith(SHA_PREFIX):
            return cls(identity[len(SHA_PREFIX) :])
        fields = dict(part.split("=", 1) for part in identity[len(NONE_PREFIX) :].split(":") if "=" in part)
        if not identity.startswith(NONE_PREFIX) or set(fields) != {"seed", "backend"}:
            raise ConfigError(f"unreadable weights identity {identity!r} in a featureset's provenance")
        return cls(None, int(fields["seed"]), fields["backend"])


@dataclass(frozen=True)
class Recipe:
    """Everything that changes a featureset's numbers, resolved (canonical names, weights hash).

    The fingerprint hashes every field (``canonical()``), so a new field cannot be left out of it.
    """

    backbone: str
    weights: WeightsId
    input_size: int
    pooling: str
    layer: str | None
    interpolation: str
    fast_decode: bool  # the decode mode: full Pillow decode, or libjpeg's reduced-size draft
    exif: str
    precision: str
    dtype: str  # storage dtype
    decoder: str = DEFAULT_DECODER  # what decodes and resizes: Pillow, or nvImageCodec + a device resize
    crop: str = DEFAULT_CROP  # "centre" for keras-hub converters that crop to the aspect ratio
    antialias: bool = True  # False: resized as keras' antialias=False resize (keras-hub converters)

    def canonical(self) -> JsonObject:
        """The hashed form: every field, the weights as their identity string. A later field at its
        default (OPTIONAL_FIELDS) is left out, so every featureset made before it existed keeps its name."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["weights"] = self.weights.identity()
        for key, default in OPTIONAL_FIELDS.items():
            if out[key] == default:
                del out[key]
        return out

    def fingerprint(self) -> str:
        return canonical_digest(self.canonical(), separators=DEFAULT_SEPARATORS)

    def name(self) -> str:
        """``<backbone>-<size>-<pooling or layer>-<dtype>-<fingerprint8>``."""
        what = self.pooling if not self.layer else f"{_UNSAFE.sub('_', self.layer)}.{self.pooling}"
        return "-".join((self.backbone, str(self.input_size), what, self.dtype, self.fingerprint()[:8]))

    def decode_config(self) -> DecodeConfig:
        size = self.input_size
        return DecodeConfig((size, size), self.interpolation, self.fast_decode, self.exif, self.crop, self.antialias)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Recipe:
        kw = {f.name: obj[f.name] for f in dataclasses.fields(cls) if f.name not in OPTIONAL_FIELDS}
        kw.update({key: obj.get(key, default) for key, default in OPTIONAL_FIELDS.items()})
        kw["weights"] = WeightsId.parse(str(obj["weights"]))
        return cls(**kw)


@dataclass(frozen=True)
class WeightsSource:
    """How to build the weights (not their identity): imagenet, none (seeded) or a file path."""

    kind: str  # "imagenet" | "none" | "file" | "preset" (a keras-hub preset's own; path: its directory)
    path: str | None
    seed: int

    def build_arg(self) -> str:
        """The ``weights`` argument of build_model."""
        return self.path if self.kind == "file" and self.path else self.kind


@dataclass(frozen=True)
class Resolved:
    """A recipe resolved once at the edge, with what building its model needs."""

    recipe: Recipe
    source: WeightsSource
    spec: BackboneSpec
    ref: WeightsRef

    def spec_dim(self) -> int:
        """The feature width the registry knows (0 for a layer tap: only the built graph knows)."""
        return 0 if self.recipe.layer is not None else int(self.spec.dims.get(self.recipe.pooling, 0))


@dataclass(frozen=True)
class Provenance:
    """``features/_provenance/<fs>.json`` and every shard's footer: the recipe plus how and when it was made."""

    recipe: Recipe
    source: WeightsSource
    dim: int
    keras_version: str | None
    backend: str | None
    created_at: str | None
    featureset: str

    @classmethod
    def create(cls, resolved: Resolved, dim: int) -> Provenance:
        import keras

        return cls(
            resolved.recipe,
            resolved.source,
            int(dim),
            keras.__version__,
            keras.backend.backend(),
            _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            resolved.recipe.name(),
        )

    @property
    def fingerprint(self) -> str:
        return self.recipe.fingerprint()

    def matches_name(self) -> bool:
        """Whether the recipe hashes to the featureset's name (an edited file does not)."""
        return self.recipe.name() == self.featureset

    def to_json(self) -> JsonObject:
        out = self.recipe.canonical()
        out.update(
            weights_kind=self.source.kind,
            weights_source=self.source.path or self.source.kind,
            seed=self.source.seed,
            dim=self.dim,
            keras_version=self.keras_version,
            backend=self.backend,
            created_at=self.created_at,
            fingerprint=self.fingerprint,
            featureset=self.featureset,
        )
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Provenance:
        try:
            recipe = Recipe.from_json(obj)
            kind = obj.get("weights_kind") or ("none" if recipe.weights.sha256 is None else "file")
            path = obj.get("weights_source") if kind in ("file", "preset") else None
            source = WeightsSource(kind, path, int(obj.get("seed", 0)))
            return cls(
                recipe,
                source,
                int(obj["dim"]),
                obj.get("keras_version"),
                obj.get("backend"),
                obj.get("created_at"),
                str(obj["featureset"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"a featureset provenance is incomplete or malformed ({type(exc).__name__}: {exc})"
            ) from None

    def footer(self) -> str:
        """The JSON stored in every shard's Parquet metadata."""
        return json.dumps(self.to_json(), sort_keys=True)


def resolve_recipe(cfg: ExtractConfig) -> Resolved:
    """ExtractConfig -> Resolved: the backbone and the weights are looked up and hashed once, here."""
    spec = get_backbone(cfg.backbone)
    if isinstance(spec, HubSpec) and spec.preset_dir:
        return resolve_hub_recipe(cfg, spec)
    size = spec.check_input_size(cfg.input_size)
    ref = resolve_weights(spec, cfg.weights, size)
    weights = WeightsId.of(ref, cfg.seed)
    recipe = Recipe(
        spec.name,
        weights,
        size,
        cfg.pooling,
        cfg.layer,
        cfg.interpolation,
        bool(cfg.fast_decode),
        cfg.exif,
        cfg.precision,
        cfg.dtype,
        decoder_of(cfg.decode),
    )
    source = WeightsSource(ref.kind, str(ref.path) if ref.kind == "file" else None, cfg.seed)
    return Resolved(recipe, source, spec, ref)


def keras_backend() -> str:
    """The Keras backend in use, without importing Keras (which would import TensorFlow) when possible."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    config = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "keras.json"
    try:
        return json.loads(config.read_text()).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


# ------------------------------------------------------------------- a keras-hub backbone's recipe


def resolve_hub_recipe(cfg: ExtractConfig, spec: HubSpec) -> Resolved:
    """ExtractConfig + HubSpec -> Resolved. The preset's content digest is the weights identity, so
    a directory re-saved with other weights (or another converter) is another featureset; the
    input transform is the converter's (``--interpolation`` does not apply)."""
    if cfg.layer is not None:
        raise ConfigError(
            f"--layer does not apply to keras-hub backbone {spec.name}: its feature is the "
            f"{spec.family} {spec.embedding} embedding"
        )
    if cfg.pooling not in ("avg", spec.embedding):
        raise ConfigError(
            f"--pooling {cfg.pooling} does not apply to keras-hub backbone {spec.name}: its "
            f"feature is the {spec.family} {spec.embedding} embedding"
        )
    size = spec.check_input_size(cfg.input_size)
    kind = hub_weights_kind(cfg.weights)
    conv = spec.converter
    crop, interp, antialias = (conv.crop, conv.interpolation, conv.antialias) if conv else ("none", "bilinear", True)
    decoder = decoder_of(cfg.decode)
    if decoder != "pillow":
        raise ConfigError(
            f"keras-hub backbones decode with Pillow (the converter's crop rule); "
            f"--decode {cfg.decode} is for keras.applications backbones"
        )
    ref = (
        WeightsRef("preset", Path(spec.preset_dir), spec.content_sha256)
        if kind == "preset"
        else WeightsRef("none", None, None)
    )
    weights = WeightsId(spec.content_sha256) if kind == "preset" else _random_init_id(spec, cfg.seed)
    recipe = Recipe(
        spec.name,
        weights,
        size,
        spec.embedding,
        None,
        interp,
        bool(cfg.fast_decode),
        cfg.exif,
        cfg.precision,
        cfg.dtype,
        decoder,
        crop,
        antialias,
    )
    source = WeightsSource(kind, spec.preset_dir, cfg.seed)
    return Resolved(recipe, source, spec, ref)


def _random_init_id(spec: HubSpec, seed: int) -> WeightsId:
    """A seeded random init of the preset's architecture: what it builds (the preset's content,
    its converter's scale and offset included), the seed and the backend (each draws its own numbers)."""
    return WeightsId(sha256_text(f"random-init:{spec.content_sha256}:seed={seed}:backend={keras_backend()}"))
