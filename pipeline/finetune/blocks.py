"""Per-family top blocks from layer names, and which backbone layers a fine-tune unfreezes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imgfeat.core.errors import ConfigError, unknown_value
from imgfeat.core.results import JsonObject

if TYPE_CHECKING:
    import keras

    from imgfeat.backbones import BackboneSpec

# family -> a pattern whose first group names the block a layer belongs to. A block starts at the
# first layer carrying its name; unfreezing N blocks unfreezes every layer from the start of the
# N-th block from the top to the output (so the head convolution after the last block is included).
FAMILY_BLOCKS: dict[str, str | None] = {
    "efficientnet": r"^(block\d+[a-z])_",
    "efficientnet_v2": r"^(block\d+[a-z])_",
    "efficientnet_lite": r"^(block\d+[a-z])_",
    "resnet": r"^(conv\d_block\d+)_",
    "resnet_v2": r"^(conv\d_block\d+)_",
    "densenet": r"^(conv\d_block\d+)_",
    "mobilenet": r"^conv_(?:pad|dw|pw)_(\d+)",  # blocks are named by number: 1..13
    "mobilenet_v2": r"^(block_\d+|expanded_conv)_",
    "mobilenet_v3": r"^(expanded_conv(?:_\d+)?)_",
    "vgg16": r"^(block\d+)_",
    "vgg19": r"^(block\d+)_",
    "xception": r"^(block\d+)_",
    "convnext": r"_(stage_\d+_block_\d+)_",
    # Their blocks are made of layers with generated names (conv2d_57, ...), so no name marks
    # where one starts: use --unfreeze-from LAYER with a layer from 'imgfeat backbones --layers'.
    "inception_v3": None,
    "inception_resnet_v2": None,
    "nasnet": None,
}
NORM_LAYERS = ("BatchNormalization",)  # kept frozen and in inference mode


@dataclass(frozen=True)
class Block:
    """One block of a backbone: its name, the index of its first layer, and how many layers it spans."""

    name: str
    start: int
    n_layers: int

    def to_json(self) -> JsonObject:
        return {"block": self.name, "start": self.start, "layers": self.n_layers}


def family_pattern(spec: BackboneSpec) -> re.Pattern[str]:
    """The block pattern of the spec's family; ConfigError for a family without named blocks."""
    pattern = FAMILY_BLOCKS.get(spec.family)
    if pattern is None:
        raise ConfigError(
            f"{spec.name} ({spec.family}) has no named blocks, so --unfreeze-blocks cannot find its top: "
            f"use --unfreeze-from LAYER (imgfeat backbones --layers {spec.name} lists them)"
        )
    return re.compile(pattern)


def block_key(name: str, pattern: re.Pattern[str]) -> str | None:
    m = pattern.search(name)
    return m.group(1) if m else None


def list_blocks(layer_names: list[str], pattern: re.Pattern[str]) -> list[Block]:
    """Blocks in layer order (pure): each starts where its name first appears."""
    starts: dict[str, int] = {}
    for i, name in enumerate(layer_names):
        key = block_key(name, pattern)
        if key is not None and key not in starts:
            starts[key] = i
    ordered = sorted(starts.items(), key=lambda kv: kv[1])
    ends = [s for _, s in ordered[1:]] + [len(layer_names)]
    return [Block(k, s, e - s) for (k, s), e in zip(ordered, ends)]


def backbone_blocks(model: keras.Model, spec: BackboneSpec) -> list[Block]:
    return list_blocks([lyr.name for lyr in model.layers], family_pattern(spec))


def unfreeze_start(model: keras.Model, spec: BackboneSpec, blocks: int | None, from_layer: str | None) -> int:
    """Index of the first layer to train: the start of the N-th block from the top, or a named layer."""
    names = [lyr.name for lyr in model.layers]
    if from_layer is not None:
        if from_layer not in names:
            raise unknown_value(
                f"layer of {spec.name}", from_layer, names, hint=f"imgfeat backbones --layers {spec.name} lists them"
            )
        return names.index(from_layer)
    found = backbone_blocks(model, spec)
    if blocks is None or not 1 <= blocks <= len(found):
        raise ConfigError(
            f"--unfreeze-blocks {blocks}: {spec.name} has {len(found)} blocks, so it must be from 1 to "
            f"{len(found)} (imgfeat backbones --blocks {spec.name} lists them)"
        )
    return found[-blocks].start


def apply_unfreeze(model: keras.Model, start: int) -> list[str]:
    """Train layers[start:] except normalisation layers; freeze the rest. Returns the trained layers."""
    model.trainable = True
    trained = []
    for i, lyr in enumerate(model.layers):
        lyr.trainable = i >= start and type(lyr).__name__ not in NORM_LAYERS
        if lyr.trainable and lyr.weights:
            trained.append(lyr.name)
    return trained
