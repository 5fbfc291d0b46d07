"""keras-hub backbones: features equal keras-hub's own path, presets pinned by content, cached names offline."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from imgfeat import api
from imgfeat.core.errors import ConfigError
from imgfeat.core.hashing import content_id
from imgfeat.core.workspace import Workspace
from imgfeat.tools.samples import load_photo

import hub_presets as H

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4  # float32 on CPU, max abs, at the preset's own input size
MIN_COSINE = 0.999  # other sizes: our Pillow resize against keras-hub's converter on the same pixels
KINDS = {"dinov2": (H.dinov2_preset, H.DINO_SIZE), "clip": (H.clip_preset, H.CLIP_SIZE),
         "siglip2": (H.siglip2_preset, H.SIGLIP_SIZE)}


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("presets")
    return {kind: make(folder / kind) for kind, (make, _) in KINDS.items()}


@pytest.fixture(scope="module")
def mws(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubws")
    return Workspace(root)


def smooth_image(size: tuple[int, int], seed: int) -> Image.Image:
    """Gradients and a little noise: structure a random network's features tell apart."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    phase = rng.uniform(0, 6.28, 3)
    a = np.stack([127 + 120 * np.sin(xx / w * 6 + phase[0]), 127 + 120 * np.cos(yy / h * 5 + phase[1]),
                  127 + 120 * np.sin((xx + yy) / (w + h) * 7 + phase[2])], -1)
    a += rng.normal(0, 8, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def image_folder(tmp_path, size: int) -> list[Image.Image]:
    """Four images at the preset's exact size, then photos of other sizes and aspect ratios."""
    images = [smooth_image((size, size), k) for k in range(4)]
    images += [load_photo("chelsea"), load_photo("rocket").resize((3 * size + 5, 2 * size)),
               smooth_image((size + 13, 2 * size + 3), 7)]
    for i, im in enumerate(images):
        im.convert("RGB").save(tmp_path / f"im{i}.png")
    return [im.convert("RGB") for im in images]


def extracted(ws, tmp_path, dataset, backbone, images):
    """(featureset, X in the order of ``images``) after scan + extract of tmp_path."""
    api.scan(tmp_path, dataset, workspace=ws)
    result = api.extract(dataset, backbone, workspace=ws, dtype="float32", batch_size=4)
    ids, X = result.open().to_numpy()
    pos = {k: i for i, k in enumerate(ids)}
    order = [pos[content_id((tmp_path / f"im{i}.png").read_bytes())] for i in range(len(images))]
    return result.featureset, X[order]


@pytest.mark.parametrize("kind", list(KINDS))
def test_features_equal_keras_hub(kind, presets, ws, tmp_path):
    images = image_folder(tmp_path, KINDS[kind][1])
    fs, X = extracted(ws, tmp_path, "d", str(presets[kind]), images)
    want = H.reference_features(presets[kind], images)
    assert X.shape == want.shape and np.abs(want).max() > 0.1  # features carry signal
    assert np.abs(X[:4] - X[:4].mean(axis=0)).max() > 1e-3  # and tell the images apart
    assert np.abs(X[:4] - want[:4]).max() < TOLERANCE
    cos = (X[4:] * want[4:]).sum(1) / np.linalg.norm(X[4:], axis=1) / np.linalg.norm(want[4:], axis=1)
    assert cos.min() >= MIN_COSINE, cos
    family = {"dinov2": "cls", "clip": "proj", "siglip2": "pool"}[kind]
    assert fs.startswith(f"preset_{kind}-{KINDS[kind][1]}-{family}-float32-")


def test_recipe_pins_the_preset_content(presets, ws, tmp_path, tmp_path_factory):
    """Same content elsewhere: same featureset; re-saved with other weights: another featureset."""
    images = image_folder(tmp_path, H.CLIP_SIZE)
    fs, X = extracted(ws, tmp_path, "d", str(presets["clip"]), images)
    moved = tmp_path_factory.mktemp("elsewhere") / "clip"
    shutil.copytree(presets["clip"], moved)
    assert extracted(ws, tmp_path, "d", str(moved), images)[0] == fs
    other = H.clip_preset(tmp_path_factory.mktemp("resaved") / "clip", seed=1)
    fs2, X2 = extracted(ws, tmp_path, "d", str(other), images)
    assert fs2 != fs and np.abs(X2 - X).max() > 1e-3


def test_dinov2_input_size_override(presets, ws, tmp_path):
    """--input-size rebuilds DINOv2 at another size (position embeddings interpolated), recorded in the name."""
    images = image_folder(tmp_path, H.DINO_SIZE)
    api.scan(tmp_path, "d", workspace=ws)
    result = api.extract("d", str(presets["dinov2"]), workspace=ws, dtype="float32", input_size=28)
    assert result.featureset.startswith("preset_dinov2-28-cls-")
    assert result.open().to_numpy()[1].shape == (len(images), 32)
    with pytest.raises(ConfigError, match="multiple of its patch size 14"):
        api.extract("d", str(presets["dinov2"]), workspace=ws, input_size=30)
    with pytest.raises(ConfigError, match="built for 32 px only"):
        api.extract("d", str(presets["clip"]), workspace=ws, input_size=64)
