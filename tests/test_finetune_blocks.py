"""Which backbone layers a fine-tune trains: blocks from layer names, per family; BatchNorm stays frozen."""

from __future__ import annotations

import re

import pytest

from imgfeat.backbones import build_model, get_backbone
from imgfeat.core.errors import ConfigError
from imgfeat.finetune.blocks import FAMILY_BLOCKS, family_pattern, list_blocks


@pytest.mark.quick
def test_blocks_start_where_their_name_first_appears():
    names = [
        "input",
        "stem_conv",
        "block1a_dwconv",
        "block1a_bn",
        "block2a_expand_conv",
        "block2a_add",
        "block2b_expand_conv",
        "top_conv",
        "avg_pool",
    ]
    blocks = list_blocks(names, re.compile(FAMILY_BLOCKS["efficientnet"]))
    assert [(b.name, b.start, b.n_layers) for b in blocks] == [
        ("block1a", 2, 2),
        ("block2a", 4, 2),
        ("block2b", 6, 3),
    ]  # the last block runs to the output


@pytest.mark.quick
@pytest.mark.parametrize("name", ["inception_v3", "inception_resnet_v2", "nasnet_mobile"])
def test_families_without_named_blocks_say_to_use_unfreeze_from(name):
    with pytest.raises(ConfigError, match="--unfreeze-from LAYER"):
        family_pattern(get_backbone(name))


@pytest.mark.quick
def test_every_registered_family_has_a_row():
    from imgfeat.backbones import list_backbones

    assert {s.family for s in list_backbones()} <= set(FAMILY_BLOCKS)


# backbone, --unfreeze-blocks, first trained layer, number of blocks: one backbone per family.
CASES = [
    ("efficientnet_b0", 2, "block6d_expand_conv", 16),
    ("efficientnet_lite0", 1, "block7a_expand_conv", 16),
    ("efficientnet_v2_b0", 1, None, None),
    ("resnet50", 1, "conv5_block3_1_conv", 16),
    ("mobilenet_v2", 2, "block_15_expand", 17),
    ("mobilenet_v3_small", 1, "expanded_conv_10_expand", 11),
    ("mobilenet", 2, "conv_pad_12", 13),
    ("vgg16", 1, "block5_conv1", 5),
    ("densenet121", 1, "conv5_block16_0_bn", 58),
    ("convnext_tiny", 1, "convnext_tiny_stage_3_block_2_depthwise_conv", 18),
]


@pytest.mark.parametrize("name,n,first,n_blocks", CASES, ids=[c[0] for c in CASES])
def test_unfreeze_blocks_trains_exactly_the_top(name, n, first, n_blocks):
    from imgfeat.finetune.blocks import apply_unfreeze, backbone_blocks, unfreeze_start

    spec = get_backbone(name)
    model = build_model(spec, weights="none", input_size=32)
    blocks = backbone_blocks(model, spec)
    if n_blocks is not None:
        assert len(blocks) == n_blocks
    start = unfreeze_start(model, spec, n, None)
    assert start == blocks[-n].start
    if first is not None:
        assert model.layers[start].name == first
    trained = apply_unfreeze(model, start)
    assert trained, "some layers with weights must train"
    for i, lyr in enumerate(model.layers):
        is_bn = type(lyr).__name__ == "BatchNormalization"
        assert lyr.trainable == (i >= start and not is_bn), (i, lyr.name)
    late = {id(v) for lyr in model.layers[start:] for v in lyr.weights}
    assert model.trainable_weights and all(id(v) in late for v in model.trainable_weights)
    bn_vars = {id(v) for lyr in model.layers if type(lyr).__name__ == "BatchNormalization" for v in lyr.weights}
    assert not bn_vars & {id(v) for v in model.trainable_weights}
    with pytest.raises(ConfigError, match=rf"has {len(blocks)} blocks.*imgfeat backbones --blocks {name}"):
        unfreeze_start(model, spec, len(blocks) + 1, None)


def test_unfreeze_from_a_layer_and_a_wrong_layer_name():
    from imgfeat.finetune.blocks import apply_unfreeze, unfreeze_start

    spec = get_backbone("efficientnet_lite0")
    model = build_model(spec, weights="none", input_size=32)
    start = unfreeze_start(model, spec, None, "top_conv")
    assert apply_unfreeze(model, start) == ["top_conv"]  # top_bn stays frozen
    with pytest.raises(ConfigError, match="did you mean 'top_conv'"):
        unfreeze_start(model, spec, None, "top_con")


def test_backbones_blocks_lists_the_top_last(capsys):
    from imgfeat.cli.main import main

    assert main(["backbones", "--blocks", "efficientnet_lite0", "--json"]) == 0
    rows = __import__("json").loads(capsys.readouterr().out.strip().splitlines()[-1])["blocks"]
    assert (rows[-1]["block"], rows[-1]["first_layer"], rows[-1]["unfreeze_blocks"]) == (
        "block7a",
        "block7a_expand_conv",
        1,
    )
    assert [r["unfreeze_blocks"] for r in rows] == list(range(16, 0, -1))


@pytest.mark.quick
def test_backbones_blocks_of_a_family_without_named_blocks_exits_2(capsys):
    from imgfeat.cli.main import main

    assert main(["backbones", "--blocks", "inception_v3"]) == 2
    assert "--unfreeze-from LAYER" in capsys.readouterr().err


def test_every_augment_name_has_a_layer():
    from imgfeat.finetune.model import AUGMENTATIONS
    from imgfeat.finetune.train import AUGMENT_NAMES

    assert tuple(AUGMENTATIONS) == AUGMENT_NAMES
    assert all(AUGMENTATIONS[n](0).name == f"aug_{n}" for n in AUGMENT_NAMES)


@pytest.mark.quick
@pytest.mark.parametrize("n_classes", [2, 3])
def test_a_logreg_head_folds_into_one_dense_softmax(n_classes):
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from imgfeat.finetune.warm import fold_logreg

    rng = np.random.default_rng(0)
    X = rng.normal(3.0, 2.0, (60, 5))
    y = rng.integers(0, n_classes, 60)
    pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression())]).fit(X + y[:, None], y)
    kernel, bias = fold_logreg(pipe.named_steps["scale"], pipe.named_steps["clf"])
    z = X @ kernel.astype(np.float64) + bias
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert kernel.shape == (5, n_classes)
    np.testing.assert_allclose(p, pipe.predict_proba(X), atol=1e-5)


@pytest.mark.quick
def test_a_warm_start_names_what_differs_from_the_heads_featureset():
    """Weights, size, pooling, tap and decode must match; storage dtype and precision need not."""
    import dataclasses

    from imgfeat.extract.recipe import Recipe, WeightsId
    from imgfeat.finetune.warm import WarmRecipe

    trained = Recipe(
        "mobilenet_v2",
        WeightsId("ab" * 32),
        224,
        "avg",
        "block_1_expand",
        "bilinear",
        False,
        "rotate",
        "float32",
        "float16",
    )
    tuned = WarmRecipe("mobilenet_v2", WeightsId(None, 0, "tensorflow").identity(), 224, "bilinear", "rotate")
    assert tuned.differences(WarmRecipe.of(trained)) == {
        "weights": ("sha256:" + "ab" * 32, "none:seed=0:backend=tensorflow"),
        "layer": ("block_1_expand", None),
    }
    same = dataclasses.replace(
        trained, weights=WeightsId(None, 0, "tensorflow"), layer=None, precision="bfloat16", dtype="float32"
    )
    assert tuned.differences(WarmRecipe.of(same)) == {}
