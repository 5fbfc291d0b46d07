"""The typed recipe and provenance: today's featureset names, every field in the fingerprint, JSON round trips."""

from __future__ import annotations

import dataclasses
import json

import pytest

from imgfeat.core.errors import ConfigError
from imgfeat.core.hashing import canonical_json, content_id, file_digests
from imgfeat.extract.recipe import Provenance, Recipe, WeightsId, WeightsSource

SHA = "ab" * 32
KNOWN = Recipe("mobilenet_v2", WeightsId(SHA), 224, "avg", None, "bilinear", False, "rotate", "float32", "float16")
TAP = Recipe(
    "mobilenet_v2",
    WeightsId(None, 3, "tensorflow"),
    96,
    "max",
    "block_13_expand_relu",
    "bicubic",
    True,
    "ignore",
    "bfloat16",
    "float32",
)
# A different value for every field of Recipe and of WeightsId (random weights: seed and backend count).
CHANGES = {
    "backbone": "resnet50",
    "weights": WeightsId("cd" * 32),
    "input_size": 225,
    "pooling": "max",
    "layer": "block_1_expand",
    "interpolation": "nearest",
    "fast_decode": True,
    "exif": "ignore",
    "precision": "bfloat16",
    "dtype": "float32",
    "decoder": "nvimgcodec",
    "crop": "centre",
    "antialias": False,
}
WEIGHT_CHANGES = {"sha256": "ef" * 32, "seed": 4, "backend": "jax"}


@pytest.mark.quick
def test_known_recipes_keep_the_names_they_had():
    """Names computed by the code before the typed recipe: existing workspaces stay valid."""
    assert KNOWN.name() == "mobilenet_v2-224-avg-float16-29c7afb0"
    assert TAP.name() == "mobilenet_v2-96-block_13_expand_relu.max-float32-8f0a8eee"


@pytest.mark.quick
def test_every_recipe_field_changes_the_fingerprint():
    assert set(CHANGES) == {f.name for f in dataclasses.fields(Recipe)}, "a new field needs a case here"
    for name, value in CHANGES.items():
        assert dataclasses.replace(KNOWN, **{name: value}).fingerprint() != KNOWN.fingerprint(), name
    assert set(WEIGHT_CHANGES) == {f.name for f in dataclasses.fields(WeightsId)}
    for name, value in WEIGHT_CHANGES.items():
        changed = dataclasses.replace(TAP, weights=dataclasses.replace(TAP.weights, **{name: value}))
        assert changed.fingerprint() != TAP.fingerprint(), name


@pytest.mark.quick
def test_the_gpu_decoder_is_named_in_the_fingerprint_and_round_trips():
    """GPU-decoded numbers differ from Pillow's: another featureset, recorded in the provenance."""
    from imgfeat.extract.batches import decode_mode_of
    from imgfeat.extract.extract import ExtractConfig

    gpu = dataclasses.replace(TAP, decoder="nvimgcodec")
    assert gpu.name() != TAP.name() and "decoder" not in TAP.canonical()
    prov = Provenance(gpu, WeightsSource("none", None, 3), 576, "3.15", "jax", None, gpu.name())
    back = Provenance.from_json(json.loads(json.dumps(prov.to_json())))
    assert back.recipe.decoder == "nvimgcodec" and back.matches_name()
    assert decode_mode_of("nvimgcodec") == "gpu" and decode_mode_of("pillow") == "auto"
    # a provenance written before the field existed reads as Pillow's
    old = {
        k: v
        for k, v in Provenance(TAP, WeightsSource("none", None, 3), 576, None, None, None, TAP.name()).to_json().items()
        if k != "decoder"
    }
    assert Provenance.from_json(old).recipe.decoder == "pillow"
    assert ExtractConfig(dataset="d", backbone="mobilenet_v2", decode="processes").decode == "processes"


@pytest.mark.quick
def test_provenance_round_trips_through_json():
    prov = Provenance(
        TAP, WeightsSource("none", None, 3), 576, "3.15", "tensorflow", "2026-01-01T00:00:00+00:00", TAP.name()
    )
    obj = json.loads(json.dumps(prov.to_json()))
    assert Provenance.from_json(obj) == prov and prov.matches_name()
    assert obj["fingerprint"] == TAP.fingerprint() and obj["weights"] == "none:seed=3:backend=tensorflow"
    edited = dict(obj, dtype="float16")  # someone edits _featureset.json by hand
    assert not Provenance.from_json(edited).matches_name()


@pytest.mark.quick
@pytest.mark.parametrize("obj", [{}, {"weights": "md5:xyz"}])
def test_malformed_provenance_is_a_clear_error(obj):
    base = Provenance(KNOWN, WeightsSource("file", "/w.h5", 0), 8, None, None, None, KNOWN.name()).to_json()
    with pytest.raises(ConfigError, match="provenance"):
        Provenance.from_json({**base, **obj} if obj else obj)


@pytest.mark.quick
def test_one_hashing_helper(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    d = file_digests(f, ("md5", "sha256"))
    assert d["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert d["md5"] == "900150983cd24fb0d6963f7d28e17f72"
    assert content_id(b"abc") == "cf4ab791c62b8d2b2109c90275287816"
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'


@pytest.mark.quick
def test_the_crop_rule_is_named_in_the_fingerprint_and_round_trips():
    """A keras-hub converter's centre crop changes the numbers; names made before the field hold."""
    cropped = dataclasses.replace(TAP, crop="centre")
    assert cropped.name() != TAP.name() and "crop" not in TAP.canonical()
    prov = Provenance(cropped, WeightsSource("none", None, 3), 576, "3.15", "jax", None, cropped.name())
    back = Provenance.from_json(json.loads(json.dumps(prov.to_json())))
    assert back.recipe.crop == "centre" and back.matches_name()
    assert back.recipe.decode_config().crop == "centre"
    old = {
        k: v
        for k, v in Provenance(TAP, WeightsSource("none", None, 3), 576, None, None, None, TAP.name()).to_json().items()
        if k != "crop"
    }
    assert Provenance.from_json(old).recipe.crop == "none"
