"""Backbones: the spec table (registry.py), keras-hub presets (hub.py), weights (weights.py) and the
one model builder (spec.py), looked up here by name."""

from __future__ import annotations

from imgfeat.backbones.dotted import resolve
from imgfeat.backbones.hub import hub_spec, looks_like_hub
from imgfeat.backbones.registry import BACKBONES, by_name
from imgfeat.backbones.spec import NAME_RE, POOLINGS, BackboneSpec, KerasWeightsFile, build_model
from imgfeat.core.errors import unknown_value


def list_backbones() -> list[BackboneSpec]:
    """Every registered backbone, in table order."""
    return list(BACKBONES)


def get_backbone(name: str) -> BackboneSpec:
    """The spec for ``name`` (or an alias), a keras-hub preset name or a preset directory
    (imgfeat.backbones.hub); ConfigError with a did-you-mean otherwise."""
    table = by_name()
    key = name.strip().lower() if isinstance(name, str) else name
    # a keras-hub preset name or directory (imports keras-hub only here)
    if key not in table and isinstance(name, str) and looks_like_hub(name):
        return hub_spec(name)
    if key not in table:
        raise unknown_value("backbone", str(name), table, hint="imgfeat backbones lists them")
    return table[key]


__all__ = [
    "NAME_RE",
    "POOLINGS",
    "BackboneSpec",
    "KerasWeightsFile",
    "build_model",
    "get_backbone",
    "list_backbones",
    "resolve",
]
