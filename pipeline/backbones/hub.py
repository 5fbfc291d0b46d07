"""keras-hub presets as backbones: resolve a name or directory offline, pin its content, build its image embedding.

A hub backbone is a keras-hub preset: a name (``dinov2_small``, ``clip_vit_base_patch32``,
``siglip2_base_patch16_224``, ...) found in the local kagglehub cache, or a directory as
``save_to_preset`` writes it. Everything about it comes from the preset's own files, never from
a table of names: the input size and feature width from ``config.json``, the input transform
from ``image_converter.json`` (size, centre crop or squash, interpolation, scale and offset).

The feature is the family's canonical image embedding, stored raw (not normalised):

* ``dinov2``: the CLS token of the final normed sequence (registers excluded), ``cls``;
* ``clip``: the projected vision embedding (``get_vision_embeddings``), ``proj``;
* ``siglip`` (SigLIP and SigLIP2): the attention-pooled vision output, ``pool``.

Input: files are decoded on the host into uint8 at the input size (Pillow, with the converter's
crop rule and interpolation; Pillow antialiases when it shrinks, and a converter that does not
is followed by extract/resample.py instead), and the converter's
``x * scale + offset`` runs inside the compiled model call, as the CNNs' preprocess_input does.
At the preset's exact size there is no resize, so features equal keras-hub's own path.

keras-hub is imported only when a hub model is built or a name is looked up; reading a preset
directory's JSON needs nothing but the standard library.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgfeat.backbones.spec import BackboneSpec
from imgfeat.backbones.weights import WeightsRef, file_digests
from imgfeat.core import hashing
from imgfeat.core.errors import ConfigError, ImgfeatError, unknown_value
from imgfeat.core.results import JsonObject

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

EXTRA_HINT = "keras-hub backbones need the hub extra: pip install 'imgfeat[hub]'"
# keras-hub backbone class -> (our family, the embedding the feature is)
FAMILIES: dict[str, tuple[str, str]] = {
    "DINOV2Backbone": ("dinov2", "cls"),
    "CLIPBackbone": ("clip", "proj"),
    "SigLIPBackbone": ("siglip", "pool"),
}
EMBEDDINGS = tuple(sorted({emb for _, emb in FAMILIES.values()}))
FAMILY_NOTES = {
    "dinov2": "DINOv2 (with or without registers): CLS token of the final normed sequence",
    "clip": "CLIP: projected vision embedding; has a text tower",
    "siglip": "SigLIP / SigLIP2: attention-pooled vision output; has a text tower",
}
# Preset names we hand to keras-hub: the prefixes of its DINOv2, CLIP and SigLIP presets.
NAME_PREFIXES = ("dinov2_", "clip_", "siglip_", "siglip2_", "metaclip_")
SKIPPED_FILES = ("metadata.json",)  # the keras(-hub) version and the save date: not the numbers
CROPS = ("none", "centre")
# keras interpolation names -> Pillow's (imgfeat.extract.decode.INTERPOLATIONS)
PIL_INTERPOLATIONS = {
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "nearest": "nearest",
    "lanczos3": "lanczos",
    "lanczos5": "lanczos",
    "area": "box",
}


@dataclass(frozen=True)
class Converter:
    """The preset's image converter: what turns a decoded image into the backbone's input."""

    size: int
    crop: str  # "centre" (crop_to_aspect_ratio) or "none" (squash)
    interpolation: str  # a Pillow interpolation name
    antialias: bool  # False: decode resizes as keras does without antialiasing (extract/resample.py)
    scale: tuple[float, ...] | None
    offset: tuple[float, ...] | None

    @classmethod
    def from_json(cls, obj: dict[str, Any], size: int) -> Converter:
        cfg = obj.get("config", {})
        interp = str(cfg.get("interpolation", "bilinear"))
        if interp not in PIL_INTERPOLATIONS:
            raise ConfigError(
                f"image converter interpolation {interp!r} has no Pillow equivalent "
                f"(known: {', '.join(PIL_INTERPOLATIONS)})"
            )
        if cfg.get("pad_to_aspect_ratio"):
            raise ConfigError("image converters that pad to the aspect ratio are not supported")
        return cls(
            size,
            "centre" if cfg.get("crop_to_aspect_ratio", True) else "none",
            PIL_INTERPOLATIONS[interp],
            bool(cfg.get("antialias", False)),
            _floats(cfg.get("scale")),
            _floats(cfg.get("offset")),
        )


def _floats(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),)


@dataclass(frozen=True)
class HubSpec(BackboneSpec):
    """A keras-hub preset as a BackboneSpec: built from its directory, weights pinned by content."""

    preset_dir: str = ""
    backbone_class: str = ""
    embedding: str = "cls"
    converter: Converter | None = None
    has_text: bool = False
    content_sha256: str = ""
    resizable: bool = False  # DINOv2 interpolates its position embeddings; CLIP and SigLIP do not
    config: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def check_input_size(self, input_size: int | None) -> int:
        if input_size is None or input_size == self.input_size:
            return self.input_size
        if not self.resizable:
            raise ConfigError(
                f"{self.name} ({self.backbone_class}) is built for {self.input_size} px only; "
                f"--input-size {input_size} needs a backbone that interpolates its position "
                f"embeddings (DINOv2)"
            )
        patch = int(self.config.get("patch_size", 14))
        if not isinstance(input_size, int) or input_size < patch or input_size % patch:
            raise ConfigError(
                f"input size {input_size!r} for {self.name} must be a positive multiple of "
                f"its patch size {patch} (default {self.input_size})"
            )
        return input_size

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
        """(batch, s, s, 3) float32 0..255 pixels -> (batch, dim) embeddings, the converter's
        scale and offset inside; build_model is its only caller. ``weights``: the preset's own
        ("imagenet" or "preset") or "none" (seeded random init); ``pooling`` is not used."""
        if layer is not None or include_top:
            raise ConfigError(f"{self.name} is a keras-hub backbone: no --layer taps or ImageNet classifier")
        kind = resolved_weights.kind if resolved_weights is not None else hub_weights_kind(weights)
        size = self.check_input_size(input_size)
        keras, keras_hub = import_hub()
        keras.utils.set_random_seed(seed)
        kwargs = {"image_shape": (size, size, 3)} if size != self.input_size else {}
        backbone = keras_hub.models.Backbone.from_preset(self.preset_dir, load_weights=kind == "preset", **kwargs)
        return embedding_model(backbone, self, size)

    def preprocess_input(self, x):  # the CNN path's host preprocessing; hub models hold theirs
        raise ConfigError(f"{self.name}: a keras-hub backbone's preprocessing is inside its model")

    def load_text(self) -> tuple[Any, Any]:
        """(backbone, preprocessor) for text: the preset's tokenizer at its default sequence length."""
        if not self.has_text:
            raise ConfigError(f"{self.name} ({self.backbone_class}) has no text tower")
        return load_text(self.preset_dir, self.backbone_class)


def hub_weights_kind(weights: str | None) -> str:
    """--weights for a hub backbone: the preset's own ("imagenet", the default, or "preset") or none."""
    text = "none" if weights is None else str(weights).strip().lower()
    if text in ("imagenet", "preset", ""):
        return "preset"
    if text == "none":
        return "none"
    raise ConfigError(
        f"weights {weights!r} for a keras-hub backbone: use the preset's own "
        f"(default; 'preset') or 'none' (random, seeded); for other weights, save a preset "
        f"with them (save_to_preset) and pass its directory as --backbone"
    )


def import_hub() -> tuple[Any, Any]:
    """(keras, keras_hub), or a ConfigError naming the extra."""
    import keras

    try:
        import keras_hub
    except ImportError as exc:
        raise ConfigError(f"{EXTRA_HINT} ({exc})") from None
    return keras, keras_hub


def embedding_model(backbone: Any, spec: HubSpec, size: int) -> keras.Model:
    """A functional model: pixels -> converter scale/offset -> the family's canonical embedding."""
    import keras
    from keras import ops

    pixels = keras.Input((size, size, 3), dtype="float32", name="pixels")
    x = pixels
    conv = spec.converter
    if conv is not None and conv.scale is not None:
        x = ops.multiply(x, ops.convert_to_tensor(list(conv.scale), "float32"))
    if conv is not None and conv.offset is not None:
        x = ops.add(x, ops.convert_to_tensor(list(conv.offset), "float32"))
    if spec.embedding == "cls":  # the sequence is [CLS, registers..., patches...]
        out = backbone({"images": x})[:, 0, :]
    else:  # CLIP: projected pooled output; SigLIP: the attention-pooling head's output
        out = backbone.get_vision_embeddings(x)
    return keras.Model(pixels, out, name=f"{spec.family}_embedding")


def load_text(preset_dir: str, backbone_class: str) -> tuple[Any, Any]:
    """(backbone, preprocessor) from a preset directory; the preprocessor is built from the
    directory's tokenizer (real presets have no preprocessor.json, and asking keras-hub for one by
    name goes to the network)."""
    _, keras_hub = import_hub()
    backbone = keras_hub.models.Backbone.from_preset(preset_dir)
    tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(preset_dir)
    cls = {"CLIPBackbone": keras_hub.models.CLIPPreprocessor, "SigLIPBackbone": keras_hub.models.SigLIPPreprocessor}[
        backbone_class
    ]
    return backbone, cls(tokenizer=tokenizer)


def text_embeddings(backbone: Any, preprocessor: Any, texts: list[str]):
    """(n, dim) float32 text embeddings as keras-hub computes them: the preprocessor's lower-casing
    (and SigLIP's canonicalisation), tokenizer and packing at its default sequence length, then
    ``get_text_embeddings``."""
    import numpy as np

    token_ids = preprocessor({"prompts": list(texts), "images": None})["token_ids"]
    return np.asarray(backbone.get_text_embeddings(token_ids), dtype=np.float32)


# ------------------------------------------------------------------------------ resolve


def looks_like_hub(name: str) -> bool:
    """Whether ``--backbone`` names a keras-hub preset (by name prefix) or a preset directory."""
    text = str(name).strip()
    return text.lower().startswith(NAME_PREFIXES) or os.sep in text or Path(text).expanduser().is_dir()


def hub_spec(name: str) -> HubSpec:
    """The spec of a preset name (from the kagglehub cache) or a preset directory."""
    text = str(name).strip()
    path = Path(text).expanduser()
    if path.is_dir():
        return spec_from_dir(path, label_of_dir(path))
    if os.sep in text:
        raise ConfigError(f"backbone {text!r}: no such preset directory")
    return spec_from_dir(cached_preset_dir(text.lower()), text.lower())


def label_of_dir(path: Path) -> str:
    """A featureset-name-safe label for a preset directory: ``preset_<folder name>``."""
    stem = re.sub(r"[^a-z0-9]+", "_", path.resolve().name.lower()).strip("_") or "dir"
    return f"preset_{stem}"


def spec_from_dir(path: Path, label: str) -> HubSpec:
    """Read a preset directory's JSON (no keras import) into a HubSpec."""
    config = _read_json(path / "config.json")
    cls = str(config.get("class_name", ""))
    if cls not in FAMILIES:
        raise ConfigError(f"preset {path} is a {cls or 'unknown'} backbone; supported: {', '.join(FAMILIES)}")
    family, embedding = FAMILIES[cls]
    inner = _inner_config(config, path / "config.json")
    size, dim = _size_and_dim(cls, inner)
    conv_file = path / "image_converter.json"
    converter = Converter.from_json(_read_json(conv_file), size) if conv_file.is_file() else None
    weights = sum(p.stat().st_size for p in path.glob("*.weights.h5"))
    return HubSpec(
        name=label,
        family=family,
        input_size=size,
        dims={embedding: dim},
        imagenet_top=False,
        weights_mb=round(weights / 1e6, 1),
        constructor=f"keras_hub.models.{cls}",
        preprocess="",
        min_size=1,
        preset_dir=str(path.resolve()),
        backbone_class=cls,
        embedding=embedding,
        converter=converter,
        has_text=cls != "DINOV2Backbone" and (path / "tokenizer.json").is_file(),
        content_sha256=preset_digest(path),
        resizable=cls == "DINOV2Backbone",
        config=inner,
    )


def _size_and_dim(cls: str, cfg: dict[str, Any]) -> tuple[int, int]:
    if cls == "DINOV2Backbone":
        return int(cfg["image_shape"][0]), int(cfg["hidden_dim"])
    vision = cfg["vision_encoder"]["config"]
    if cls == "CLIPBackbone":
        return int(vision["image_shape"][0]), int(cfg["projection_dim"])
    return int(vision["image_shape"][0]), int(vision["hidden_dim"])


def _inner_config(config: JsonObject, path: Path) -> JsonObject:
    """config.json's ``config``: the backbone's arguments (ConfigError if it is not an object)."""
    inner = config.get("config", {})
    if not isinstance(inner, dict):
        raise ConfigError(f"{path} has no 'config' object: not a keras-hub preset's config.json")
    return inner


def _read_json(path: Path) -> JsonObject:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing: not a keras-hub preset directory (save_to_preset writes one)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable: {exc}") from None


def preset_digest(path: Path) -> str:
    """sha256 over every file of the preset (relative path + content hash), metadata.json aside:
    the same weights, config and converter give the same digest wherever the folder lives."""
    lines = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel in SKIPPED_FILES or rel.startswith(".") or "/." in rel:
            continue
        lines.append(f"{rel}\t{file_digests(f)['sha256']}")  # cached on disk by path, size and mtime
    return hashing.sha256_text("\n".join(lines))


# ------------------------------------------------------------------------------ the kagglehub cache


def kagglehub_cache() -> Path:
    """Where kagglehub keeps downloads: $KAGGLEHUB_CACHE, else ~/.cache/kagglehub."""
    env = os.environ.get("KAGGLEHUB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kagglehub"


def preset_handles() -> dict[str, str]:
    """keras-hub's preset name -> Kaggle handle, for the supported families."""
    import_hub()  # keras-hub installed, or the ConfigError that says how
    from keras_hub.src.utils.preset_utils import BUILTIN_PRESETS_FOR_BACKBONE

    out = {}
    for cls, presets in BUILTIN_PRESETS_FOR_BACKBONE.items():
        if cls.__name__ in FAMILIES:
            for name, entry in presets.items():
                out[name] = str(entry.get("kaggle_handle", ""))
    return out


def handle_dir(handle: str) -> tuple[Path, str | None]:
    """The cache folder of ``kaggle://owner/model/framework/variation[/version]`` (version may be None)."""
    parts = handle.removeprefix("kaggle://").split("/")
    base = kagglehub_cache().joinpath("models", *parts[:4])
    return base, parts[4] if len(parts) > 4 else None


def cached_preset_dir(name: str) -> Path:
    """The cached directory of a preset name, or a ConfigError saying how to stage it."""
    handles = preset_handles()
    if name not in handles:
        raise unknown_value("keras-hub preset", name, sorted(handles), hint="imgfeat backbones --hub lists them")
    base, version = handle_dir(handles[name])
    found = _version_dir(base, version)
    if found is None:
        want = base / (version or "<version>")
        raise ConfigError(
            f"keras-hub preset {name} is not cached: {want} is missing (KAGGLEHUB_CACHE={kagglehub_cache()}). "
            f"On a machine with internet run 'imgfeat weights fetch {name}' and copy that folder here, "
            f"or copy a preset directory here and run 'imgfeat weights import DIR --backbone {name}'; "
            f"or pass a preset directory as --backbone"
        )
    return found


def _version_dir(base: Path, version: str | None) -> Path | None:
    candidates = (
        [base / version]
        if version
        else sorted(
            (p for p in base.glob("*") if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name), reverse=True
        )
    )
    return next((p for p in candidates if (p / "config.json").is_file()), None)


def cached_presets() -> list[dict[str, Any]]:
    """Every supported preset name with whether (and where) it is cached; imports keras-hub."""
    rows = []
    for name, handle in sorted(preset_handles().items()):
        base, version = handle_dir(handle)
        found = _version_dir(base, version)
        rows.append({"name": name, "cached": found is not None, "path": str(found) if found else None})
    return rows


def import_preset(source: Path, name: str) -> Path:
    """Copy a preset directory into the kagglehub cache under ``name``'s path (offline staging)."""
    import shutil

    source = Path(source).expanduser()
    spec_from_dir(source, name)  # a folder that is no supported preset fails before anything is copied
    handles = preset_handles()
    if name not in handles:
        raise unknown_value("keras-hub preset", name, sorted(handles))
    base, version = handle_dir(handles[name])
    dest = base / (version or "1")
    if dest.exists():
        raise ConfigError(f"{dest} exists already; remove it first to replace it")
    tmp = dest.with_name(dest.name + ".importing")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    tmp.rename(dest)  # the preset appears whole or not at all
    log.info("imported %s as %s", source, dest)
    return dest


def fetch_preset(name: str) -> Path:
    """Download a preset through kagglehub into its cache (machines with internet only)."""
    handles = preset_handles()
    if name not in handles:
        raise unknown_value("keras-hub preset", name, sorted(handles))
    base, version = handle_dir(handles[name])
    found = _version_dir(base, version)
    if found is not None:
        return found
    try:
        import kagglehub

        return Path(kagglehub.model_download(handles[name].removeprefix("kaggle://")))
    except Exception as exc:  # network, auth, missing package: all mean "not fetched"
        raise ImgfeatError(
            f"could not download {name}: {type(exc).__name__}: {exc}. This machine may be "
            f"offline: fetch it elsewhere and run 'imgfeat weights import DIR --backbone {name}'"
        ) from None


def cached_hub_rows() -> list[dict[str, Any]]:
    """The supported presets found in the kagglehub cache, as ``imgfeat backbones`` rows: read from
    each folder's config.json (models/OWNER/MODEL/keras/NAME/VERSION), without importing keras-hub."""
    rows: dict[str, dict[str, Any]] = {}
    for config in sorted(kagglehub_cache().glob("models/*/*/keras/*/*/config.json")):
        folder = config.parent
        if not folder.name.isdigit():
            continue
        try:
            spec = _light_spec(folder)
        except ConfigError:
            continue  # another model family, or a half-copied folder
        name = folder.parent.name
        if name in rows and int(rows[name]["version"]) > int(folder.name):
            continue
        rows[name] = {
            "name": name,
            "family": spec[0],
            "input_size": spec[1],
            "dim": spec[2],
            "dims": {spec[3]: spec[2]},
            "imagenet_top": False,
            "weights_mb": spec[4],
            "min_size": spec[1],
            "cached": True,
            "version": folder.name,
            "path": str(folder),
        }
    return list(rows.values())


def _light_spec(folder: Path) -> tuple[str, int, int, str, float]:
    """(family, input size, dim, embedding, weights MB) from config.json alone (no content hash)."""
    config = _read_json(folder / "config.json")
    cls = str(config.get("class_name", ""))
    if cls not in FAMILIES:
        raise ConfigError(f"{folder} holds a {cls} backbone")
    size, dim = _size_and_dim(cls, _inner_config(config, folder / "config.json"))
    mb = round(sum(p.stat().st_size for p in folder.glob("*.weights.h5")) / 1e6, 1)
    return FAMILIES[cls][0], size, dim, FAMILIES[cls][1], mb
