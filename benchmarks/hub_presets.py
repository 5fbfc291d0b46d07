"""Write random-init keras-hub presets with real architectures (no download), for timing hub backbones.

Weights do not change speed, so a GPU host without network times DINOv2 and CLIP from presets
built here from their published configs:

    python3 benchmarks/hub_presets.py /tmp/presets      # writes dinov2_with_registers_base/, clip_vit_base_patch32/

Vision towers only (no tokenizer: text search is not timed), at 224 px.
"""

from __future__ import annotations

import sys
from pathlib import Path


def dinov2_base(folder: Path, size: int = 224) -> None:
    """DINOv2-B/14 with 4 registers (dinov2_with_registers_base's architecture), centre crop, bicubic."""
    from keras_hub.layers import DINOV2ImageConverter
    from keras_hub.models import DINOV2Backbone

    DINOV2Backbone(
        patch_size=14,
        num_layers=12,
        hidden_dim=768,
        num_heads=12,
        intermediate_dim=3072,
        num_register_tokens=4,
        image_shape=(size, size, 3),
        position_embedding_shape=(518, 518, 3),
        antialias_in_interpolation=True,
    ).save_to_preset(str(folder))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    DINOV2ImageConverter(
        image_size=(size, size),
        crop_to_aspect_ratio=True,
        interpolation="bicubic",
        antialias=True,
        scale=[1 / (255 * s) for s in std],
        offset=[-m / s for m, s in zip(mean, std)],
    ).save_to_preset(str(folder))


def clip_b32(folder: Path, size: int = 224) -> None:
    """CLIP ViT-B/32 (clip_vit_base_patch32's architecture): vision 12 x 768, projection 512."""
    from keras_hub.layers import CLIPImageConverter
    from keras_hub.models import CLIPBackbone
    from keras_hub.src.models.clip.clip_text_encoder import CLIPTextEncoder
    from keras_hub.src.models.clip.clip_vision_encoder import CLIPVisionEncoder

    vision = CLIPVisionEncoder(
        patch_size=32,
        hidden_dim=768,
        num_layers=12,
        num_heads=12,
        intermediate_dim=3072,
        intermediate_activation="quick_gelu",
        image_shape=(size, size, 3),
    )
    text = CLIPTextEncoder(
        vocabulary_size=49408,
        embedding_dim=512,
        hidden_dim=512,
        num_layers=12,
        num_heads=8,
        intermediate_dim=2048,
        intermediate_activation="quick_gelu",
        max_sequence_length=77,
    )
    CLIPBackbone(vision_encoder=vision, text_encoder=text, projection_dim=512).save_to_preset(str(folder))
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    CLIPImageConverter(
        image_size=(size, size),
        crop_to_aspect_ratio=True,
        interpolation="bicubic",
        antialias=True,
        scale=[1 / (255 * s) for s in std],
        offset=[-m / s for m, s in zip(mean, std)],
    ).save_to_preset(str(folder))


def main(out: str) -> None:
    root = Path(out)
    for name, make in (("dinov2_with_registers_base", dinov2_base), ("clip_vit_base_patch32", clip_b32)):
        if not (root / name / "config.json").is_file():
            make(root / name)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/presets")
