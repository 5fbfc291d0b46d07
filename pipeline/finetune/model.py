"""The fine-tune model: on-device augmentation -> family preprocessing -> backbone (BN in inference) -> head."""

from __future__ import annotations

from typing import Any

import keras

from imgfeat.backbones import BackboneSpec, get_backbone
from imgfeat.backbones.preprocess import ops_preprocess

# --augment names -> a Keras preprocessing layer (active only while training).
AUGMENTATIONS: dict[str, Any] = {
    "flip": lambda seed: keras.layers.RandomFlip("horizontal", seed=seed, name="aug_flip"),
    "rotate": lambda seed: keras.layers.RandomRotation(0.05, seed=seed, name="aug_rotate"),
    "zoom": lambda seed: keras.layers.RandomZoom(0.15, seed=seed, name="aug_zoom"),
    "contrast": lambda seed: keras.layers.RandomContrast(0.2, seed=seed, name="aug_contrast"),
}


@keras.saving.register_keras_serializable(package="imgfeat")
class FamilyPreprocess(keras.layers.Layer):
    """The backbone family's preprocess_input as a layer, so the saved model takes RGB 0..255."""

    def __init__(self, backbone: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.backbone = backbone
        self.spec = get_backbone(backbone)

    def call(self, x):
        return ops_preprocess(self.spec.family)(x)  # the same ops extract's model function runs

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "backbone": self.backbone}


def build_finetune_model(
    spec: BackboneSpec, backbone: keras.Model, n_classes: int, augment: tuple[str, ...], dropout: float, seed: int
) -> keras.Model:
    """RGB 0..255 in, class probabilities out; the backbone runs with training=False (BN stays frozen)."""
    size = backbone.input_shape[1:3]
    inputs = keras.Input((*size, 3), name="image")
    x = inputs
    for name in augment:
        x = AUGMENTATIONS[name](seed)(x)
    x = FamilyPreprocess(spec.name, name="preprocess")(x)
    x = backbone(x, training=False)
    x = keras.layers.Dropout(dropout, seed=seed, name="head_dropout")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name="head")(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_finetune")


def load_finetuned_model(path: str) -> keras.Model:
    """Load a fine-tune's model.keras in safe mode (importing this module registers FamilyPreprocess)."""
    return keras.saving.load_model(str(path), safe_mode=True)
