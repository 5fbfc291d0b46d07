"""The pipeline's features equal the Keras tutorial path (load_img -> preprocess_input -> predict) to 1e-4."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from PIL import Image

from imgfeat.backbones import build_model, get_backbone
from imgfeat.extract.decode import INTERPOLATIONS, DecodeConfig, decode_image
from imgfeat.tools.samples import load_photo, photo_path

TOLERANCE = 1e-4  # float32 on CPU, max abs: the fidelity the README promises

# One backbone per family: (name, the Keras constructor, the Keras preprocess module, input size),
# by name in keras.applications, so that collecting this file does not import Keras.
# Sizes are small (64, or the family's minimum where that is larger): decoding, resizing and
# preprocess_input run the same code at any size, and the model's cost grows with it.
FAMILIES = [
    ("vgg16", "VGG16", "vgg16", 64),
    ("resnet50", "ResNet50", "resnet", 64),
    ("resnet50_v2", "ResNet50V2", "resnet_v2", 64),
    ("inception_v3", "InceptionV3", "inception_v3", 75),
    ("inception_resnet_v2", "InceptionResNetV2", "inception_resnet_v2", 75),
    ("xception", "Xception", "xception", 71),
    ("mobilenet", "MobileNet", "mobilenet", 64),
    ("mobilenet_v2", "MobileNetV2", "mobilenet_v2", 64),
    ("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", 64),
    ("densenet121", "DenseNet121", "densenet", 64),
    ("nasnet_mobile", "NASNetMobile", "nasnet", 64),
    ("efficientnet_b0", "EfficientNetB0", "efficientnet", 64),
    ("efficientnet_v2_b0", "EfficientNetV2B0", "efficientnet_v2", 64),
    ("convnext_tiny", "ConvNeXtTiny", "convnext", 64),
]

PHOTOS = ["chelsea", "coffee", "china", "flower", "rocket", "camera"]  # camera.png is grayscale


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list:
    """The shipped photos plus an RGBA PNG and a palette GIF made from them."""
    folder = tmp_path_factory.mktemp("fidelity")
    rgba = load_photo("coffee").convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(folder / "coffee_rgba.png")
    load_photo("chelsea").convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(folder / "chelsea.gif")
    return [photo_path(n) for n in PHOTOS] + [folder / "coffee_rgba.png", folder / "chelsea.gif"]


def tutorial_inputs(paths, size: int, module, interpolation: str = "bilinear") -> np.ndarray:
    """What the Keras docs teach: load_img -> img_to_array -> the family's preprocess_input."""
    import keras

    arrays = [
        keras.utils.img_to_array(keras.utils.load_img(p, target_size=(size, size), interpolation=interpolation))
        for p in paths
    ]
    return module.preprocess_input(np.stack(arrays))


def pipeline_inputs(paths, size: int, spec, interpolation: str = "bilinear", exif: str = "rotate") -> np.ndarray:
    cfg = DecodeConfig((size, size), interpolation=interpolation, exif=exif)
    return spec.preprocess_input(np.stack([decode_image(p, cfg) for p in paths]).astype(np.float32))


def features(model, x: np.ndarray) -> np.ndarray:
    """The model on a batch: an eager call, the same numbers as model.predict on CPU without tracing a graph."""
    return np.asarray(model(x, training=False))


def assert_same_features(got: np.ndarray, want: np.ndarray) -> None:
    """Max abs difference within TOLERANCE of the features' scale.

    Randomly initialised networks output features anywhere from 1e-12 to 1e3, so an absolute 1e-4
    would pass anything on some families; relative to the largest feature it means what the README's 1e-4
    means for ImageNet features, which are of order 1.
    """
    scale = float(np.abs(want).max())
    assert scale > 0 and np.isfinite(scale)  # a dead network would match anything
    spread = float(np.abs(want - want.mean(axis=0)).max()) / scale
    assert spread > 1e-3  # different images give different features: the inputs matter
    assert float(np.abs(got - want).max()) <= TOLERANCE * scale


@pytest.mark.slow
@pytest.mark.parametrize("name, constructor, module, size", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_pipeline_features_match_the_keras_tutorial_path(images, name, constructor, module, size):
    import keras

    module = getattr(keras.applications, module)
    spec = get_backbone(name)
    model = build_model(spec, weights="none", input_size=size, pooling="avg", seed=0)
    tutorial = tutorial_inputs(images, size, module)
    ours = pipeline_inputs(images, size, spec)
    np.testing.assert_array_equal(ours, tutorial)  # the model sees bit-identical inputs
    out = features(model, np.concatenate([tutorial, ours]))  # one call for both paths
    want, got = out[: len(images)], out[len(images) :]
    assert got.shape == (len(images), spec.dims["avg"]) and got.dtype == np.float32
    assert_same_features(got, want)
    del model
    keras.backend.clear_session(free_memory=True)
    gc.collect()


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0"])
def test_seeded_build_is_the_keras_constructor_with_that_seed(name):
    """build_model(spec, weights='none', seed=s) is keras.applications.X(weights=None) after set_random_seed(s)."""
    import keras

    spec = get_backbone(name)
    ours = build_model(spec, weights="none", input_size=64, seed=3)
    keras.utils.set_random_seed(3)
    theirs = spec.constructor_fn()(include_top=False, weights=None, input_shape=(64, 64, 3), pooling="avg")
    for a, b in zip(ours.get_weights(), theirs.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("interpolation", sorted(INTERPOLATIONS))
def test_every_interpolation_decodes_exactly_like_load_img(images, interpolation):
    import keras

    for size in ((96, 96), (75, 130)):
        for path in images:
            want = keras.utils.img_to_array(keras.utils.load_img(path, target_size=size, interpolation=interpolation))
            got = decode_image(path, DecodeConfig(size, interpolation=interpolation))
            np.testing.assert_array_equal(got.astype(np.float32), want)


@pytest.fixture(scope="module")
def small_model():
    spec = get_backbone("mobilenet_v2")
    return spec, build_model(spec, weights="none", input_size=96, seed=0)


@pytest.mark.parametrize("interpolation", ["nearest", "bicubic"])
def test_interpolation_variants_give_the_tutorial_features(images, small_model, interpolation):
    import keras

    spec, model = small_model
    tutorial = tutorial_inputs(images, 96, keras.applications.mobilenet_v2, interpolation)
    ours = pipeline_inputs(images, 96, spec, interpolation)
    bilinear = pipeline_inputs(images, 96, spec)
    got, plain = np.split(features(model, np.concatenate([ours, bilinear])), 2)
    want = model.predict(tutorial, verbose=0)  # the tutorial's own call, literally: one graph trace per file
    assert_same_features(got, want)
    # The option really changes the numbers (by far more than the tolerance).
    assert np.abs(got - plain).max() > 10 * TOLERANCE * np.abs(plain).max()


def test_exif_rotated_photo_rotate_versus_ignore(tmp_path, small_model):
    import keras

    spec, model = small_model
    upright = load_photo("chelsea")
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned 90 degrees clockwise; a viewer turns it back
    stored = tmp_path / "rotated.jpg"
    upright.transpose(Image.Transpose.ROTATE_270).save(stored, exif=exif, quality=95)
    plain = tmp_path / "plain.jpg"
    upright.transpose(Image.Transpose.ROTATE_270).save(plain, quality=95)  # same pixels, no tag
    # ignore == load_img, which does not rotate.
    ignored = pipeline_inputs([stored], 96, spec, exif="ignore")
    np.testing.assert_array_equal(ignored, tutorial_inputs([stored], 96, keras.applications.mobilenet_v2))
    # rotate == load_img of the photo turned upright; on an untagged photo both modes agree.
    with Image.open(stored) as img:
        turned = tmp_path / "turned.png"
        img.transpose(Image.Transpose.ROTATE_90).save(turned)
    rotated = pipeline_inputs([stored], 96, spec, exif="rotate")
    np.testing.assert_array_equal(rotated, tutorial_inputs([turned], 96, keras.applications.mobilenet_v2))
    np.testing.assert_array_equal(
        pipeline_inputs([plain], 96, spec, exif="rotate"), pipeline_inputs([plain], 96, spec, exif="ignore")
    )
    f_rot, f_ign = features(model, np.concatenate([rotated, ignored]))
    assert np.abs(f_rot - f_ign).max() > 0.01 * np.abs(f_ign).max()


def test_fast_decode_features_are_close_by_cosine(small_model):
    spec, model = small_model
    jpegs = [photo_path(n) for n in ("china", "flower", "rocket")]  # large enough for a reduced decode
    cfg = DecodeConfig((96, 96), fast_decode=True)
    fast_inputs = spec.preprocess_input(np.stack([decode_image(p, cfg) for p in jpegs]).astype(np.float32))
    full, fast = np.split(features(model, np.concatenate([pipeline_inputs(jpegs, 96, spec), fast_inputs])), 2)
    cos = (full * fast).sum(1) / (np.linalg.norm(full, axis=1) * np.linalg.norm(fast, axis=1))
    assert (cos > 0.99).all(), cos
    assert not np.array_equal(full, fast)
