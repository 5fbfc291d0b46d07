"""Tiny random-init keras-hub presets written with save_to_preset: DINOv2 with registers, CLIP, SigLIP2.

Built from explicit configs (no download), seeded, a few hundred kB each, so tests can check
imgfeat's features, text search and zero-shot heads against keras-hub's own computation.
"""

from __future__ import annotations

import io
from pathlib import Path

DINO_SIZE = 56  # 4 x 4 patches of 14 px
CLIP_SIZE = 32  # 4 x 4 patches of 8 px
SIGLIP_SIZE = 32
WORDS = ["a", "photo", "of", "the", "red", "blue", "green", "car", "dog", "cat", "circle", "square", "stripes"]
CORPUS = [
    f"a photo of a {c} {t}"
    for c in ("red", "blue", "green")
    for t in ("car", "dog", "cat", "circle", "square", "stripes")
]


def imagenet_converter_args() -> dict:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return {"scale": [1 / (255 * s) for s in std], "offset": [-m / s for m, s in zip(mean, std)]}


def dinov2_preset(folder: Path, seed: int = 0, registers: int = 4, interpolation: str = "bicubic") -> Path:
    """DINOv2 with registers, 2 layers, hidden 32, patch 14 at 56 px; centre crop, bicubic, ImageNet norm."""
    import keras
    from keras_hub.layers import DINOV2ImageConverter
    from keras_hub.models import DINOV2Backbone

    keras.utils.set_random_seed(seed)
    shape = (DINO_SIZE, DINO_SIZE, 3)
    DINOV2Backbone(
        patch_size=14,
        num_layers=2,
        hidden_dim=32,
        num_heads=2,
        intermediate_dim=64,
        num_register_tokens=registers,
        image_shape=shape,
        position_embedding_shape=shape,
    ).save_to_preset(str(folder))
    DINOV2ImageConverter(
        image_size=(DINO_SIZE, DINO_SIZE),
        crop_to_aspect_ratio=True,
        interpolation=interpolation,
        antialias=True,
        **imagenet_converter_args(),
    ).save_to_preset(str(folder))
    return folder


def clip_tokenizer():
    from keras_hub.models import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(letters) + [c + "</w>" for c in letters]
    merges = []
    for word in WORDS:  # merge each word letter by letter into one token
        acc = word[0]
        for i, ch in enumerate(word[1:], 1):
            right = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{acc} {right}")
            acc = acc + right
            tokens.append(acc)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocabulary=vocab, merges=list(dict.fromkeys(merges)))


def clip_preset(folder: Path, seed: int = 0, antialias: bool = True) -> Path:
    """CLIP: vision patch 8 at 32 px, text 2 layers, projection 16; centre crop, bicubic (+ antialias)."""
    import keras
    from keras_hub.layers import CLIPImageConverter
    from keras_hub.models import CLIPBackbone
    from keras_hub.src.models.clip.clip_text_encoder import CLIPTextEncoder
    from keras_hub.src.models.clip.clip_vision_encoder import CLIPVisionEncoder

    keras.utils.set_random_seed(seed)
    tokenizer = clip_tokenizer()
    vision = CLIPVisionEncoder(
        patch_size=8,
        hidden_dim=32,
        num_layers=2,
        num_heads=2,
        intermediate_dim=64,
        intermediate_activation="quick_gelu",
        image_shape=(CLIP_SIZE, CLIP_SIZE, 3),
    )
    text = CLIPTextEncoder(
        vocabulary_size=tokenizer.vocabulary_size(),
        embedding_dim=32,
        hidden_dim=32,
        num_layers=2,
        num_heads=2,
        intermediate_dim=64,
        intermediate_activation="quick_gelu",
        max_sequence_length=77,
    )
    CLIPBackbone(vision_encoder=vision, text_encoder=text, projection_dim=16).save_to_preset(str(folder))
    tokenizer.save_to_preset(str(folder))
    mean, std = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)
    CLIPImageConverter(
        image_size=(CLIP_SIZE, CLIP_SIZE),
        crop_to_aspect_ratio=True,
        interpolation="bicubic",
        antialias=antialias,
        scale=[1 / (255 * s) for s in std],
        offset=[-m / s for m, s in zip(mean, std)],
    ).save_to_preset(str(folder))
    return folder


def siglip_tokenizer():
    import sentencepiece as spm
    from keras_hub.models import SigLIPTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 10),
        model_writer=buf,
        vocab_size=15,
        model_type="word",
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=2,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        minloglevel=2,
    )
    return SigLIPTokenizer(proto=buf.getvalue())


def siglip2_preset(folder: Path, seed: int = 0) -> Path:
    """SigLIP2-style: vision patch 8 at 32 px, text 2 layers; squash, bilinear + antialias, x/127.5 - 1."""
    import keras
    from keras_hub.layers import SigLIPImageConverter
    from keras_hub.models import SigLIPBackbone
    from keras_hub.src.models.siglip.siglip_text_encoder import SigLIPTextEncoder
    from keras_hub.src.models.siglip.siglip_vision_encoder import SigLIPVisionEncoder

    keras.utils.set_random_seed(seed)
    tokenizer = siglip_tokenizer()
    vision = SigLIPVisionEncoder(
        patch_size=8,
        hidden_dim=32,
        num_layers=2,
        num_heads=2,
        intermediate_dim=64,
        image_shape=(SIGLIP_SIZE, SIGLIP_SIZE, 3),
    )
    text = SigLIPTextEncoder(
        vocabulary_size=tokenizer.vocabulary_size(),
        embedding_dim=32,
        hidden_dim=32,
        num_layers=2,
        num_heads=2,
        intermediate_dim=64,
        projection_dim=32,
        max_sequence_length=64,
    )
    SigLIPBackbone(vision_encoder=vision, text_encoder=text).save_to_preset(str(folder))
    tokenizer.save_to_preset(str(folder))
    SigLIPImageConverter(
        image_size=(SIGLIP_SIZE, SIGLIP_SIZE),
        crop_to_aspect_ratio=False,
        interpolation="bilinear",
        antialias=True,
        scale=1 / 127.5,
        offset=-1.0,
    ).save_to_preset(str(folder))
    return folder


def reference_features(preset: Path, images) -> object:
    """keras-hub's own path: its converter on the decoded images, the backbone, the canonical embedding."""
    import numpy as np
    from keras_hub.layers import ImageConverter
    from keras_hub.models import Backbone

    converter = ImageConverter.from_preset(str(preset))
    backbone = Backbone.from_preset(str(preset))
    out = []
    for img in images:  # one at a time: the converter takes any size
        x = converter(np.asarray(img, dtype="float32")[None])
        if type(backbone).__name__ == "DINOV2Backbone":
            out.append(np.asarray(backbone({"images": x}))[:, 0])
        else:
            out.append(np.asarray(backbone.get_vision_embeddings(x)))
    return np.concatenate(out).astype(np.float32)
