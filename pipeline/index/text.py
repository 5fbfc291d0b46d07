"""Text queries: a featureset's preset text tower embeds words into its image space (CLIP, SigLIP)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imgfeat.backbones.hub import HubSpec, text_embeddings
from imgfeat.core.errors import ConfigError
from imgfeat.core.workspace import Workspace
from imgfeat.extract.extract import ExtractConfig
from imgfeat.extract.featureset import read_provenance
from imgfeat.extract.recipe import resolve_recipe


def text_tower(ws: Workspace, featureset: str):
    """(spec, backbone, preprocessor) of the keras-hub preset that made ``featureset``, found from
    its provenance and checked to still hold the same content; ConfigError (exit 2) without one."""
    prov = read_provenance(ws, featureset)
    if prov.source.kind != "preset":
        raise ConfigError(
            f"featureset {featureset} ({prov.recipe.backbone}) has no text tower: text queries "
            f"need a CLIP or SigLIP keras-hub backbone"
        )
    resolved = resolve_recipe(ExtractConfig.from_provenance(prov))
    spec = resolved.spec
    if not (isinstance(spec, HubSpec) and spec.has_text):
        raise ConfigError(
            f"featureset {featureset} ({spec.name}, {spec.family}) has no text tower: text "
            f"queries need a CLIP or SigLIP keras-hub backbone"
        )
    if resolved.recipe.weights != prov.recipe.weights:
        raise ConfigError(
            f"the preset of featureset {featureset} ({prov.source.path}) no longer holds the "
            f"weights it was made with; its text tower would not match the images"
        )
    backbone, preprocessor = spec.load_text()
    return spec, backbone, preprocessor


def embed_texts(ws: Workspace, featureset: str, texts: Sequence[str]) -> np.ndarray:
    """(len(texts), dim) float32: each text through the featureset's preset text tower."""
    texts = [str(t) for t in texts]
    if not texts or any(not t.strip() for t in texts):
        raise ConfigError("a text query must be a non-empty string")
    _, backbone, preprocessor = text_tower(ws, featureset)
    return text_embeddings(backbone, preprocessor, texts)
