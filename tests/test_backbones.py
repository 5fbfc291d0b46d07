"""The backbone registry against Keras itself: every backbone builds with its dims, sizes and files."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import numpy as np
import pytest

from imgfeat.backbones import NAME_RE, build_model, get_backbone, list_backbones
from imgfeat.backbones.lite import VARIANTS
from imgfeat.backbones.weights import resolve_weights
from imgfeat.core.errors import ConfigError

SPECS = list_backbones()
KERAS_SPECS = [s for s in SPECS if s.keras_weights is not None]
FAMILY_FIRSTS = {next(s.name for s in SPECS if s.family == f) for f in {s.family for s in SPECS}}


def _smallest(spec) -> int:
    return spec.min_size  # the dim does not depend on the input size, so build as small as allowed


@pytest.fixture
def fresh_keras():
    """Drop Keras' global state after a test: 40+ backbones in one process would otherwise pile up.

    No forced garbage collection (seconds per test once many models were built): the builds here
    leave their variables uninitialised, so what waits for Python's own collector is small.
    """
    yield
    import keras

    keras.backend.clear_session(free_memory=False)


def _forward(model, size: int, seed: int = 0) -> np.ndarray:
    # An eager call, not predict_on_batch: the same numbers on CPU without tracing a graph per model.
    x = np.random.default_rng(seed).uniform(-1, 1, (2, size, size, 3)).astype("float32")
    return np.asarray(model(x, training=False))


def _build_uninitialised(spec, **kwargs):
    """build_model with the variables' random fill deferred and skipped (keras.StatelessScope).

    The constructor runs whole (every layer built, every shape computed); only drawing the random
    initial values, most of the cost for the large models and irrelevant to shapes, is left out.
    fresh_keras's clear_session drops the never-initialised variables.
    """
    import keras

    with keras.StatelessScope(initialize_variables=False):
        return build_model(spec, **kwargs)


# ----------------------------------------------------------------------------- the table


def test_names_are_unique_lower_snake_and_cover_keras_applications():
    import keras

    names = [s.name for s in SPECS]
    assert len(names) == len(set(names))
    assert all(NAME_RE.match(n) for n in names), [n for n in names if not NAME_RE.match(n)]
    constructors = {name for name in dir(keras.applications) if name[0].isupper()}
    registered = {s.constructor.rsplit(".", 1)[1] for s in KERAS_SPECS}
    assert registered == constructors  # all 40 in Keras 3.15, no more, no fewer
    for spec in SPECS:
        assert spec.dims["avg"] == spec.dims["max"] > 0 and spec.weights_mb > 0


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_backbone_builds_with_its_dims_and_sizes(spec, monkeypatch, fresh_keras):
    from keras.src.applications import imagenet_utils

    # Record what the Keras constructor itself declares as its default and smallest input size.
    seen: dict[str, int] = {}
    original = imagenet_utils.obtain_input_shape

    def recording(*args, **kwargs):
        seen.update(default=kwargs["default_size"], min=kwargs["min_size"])
        return original(*args, **kwargs)

    monkeypatch.setattr(imagenet_utils, "obtain_input_shape", recording)
    size = _smallest(spec)
    avg = _build_uninitialised(spec, weights="none", input_size=size, pooling="avg")
    assert tuple(avg.output.shape) == (None, spec.dims["avg"])  # no forward pass: tracing costs more than building
    if spec.name in FAMILY_FIRSTS:  # pooling is applied by family code: one build per family says it
        mx = _build_uninitialised(spec, weights="none", input_size=size, pooling="max")
        assert tuple(mx.output.shape) == (None, spec.dims["max"])
    if spec.family in ("mobilenet", "mobilenet_v2"):
        seen.pop("default")  # these pick their default from the requested size; the file name says 224
    if spec.family == "efficientnet_lite":
        seen.update(default=VARIANTS[spec.name].size)
    if spec.family == "mobilenet_v3":  # no obtain_input_shape: its weights are the 224 ones
        assert "_224_" in spec.keras_weights.file_name
    assert spec.input_size == seen.get("default", spec.input_size)
    assert spec.min_size == seen.get("min", spec.min_size)
    with pytest.raises(ConfigError, match=str(spec.min_size)):
        spec.check_input_size(spec.min_size - 1)


def test_weights_hashes_are_the_ones_keras_pins():
    from keras.src.applications import imagenet_utils

    folder = Path(inspect.getsourcefile(imagenet_utils)).parent
    sources = {p.stem: p.read_text() for p in folder.glob("*.py") if not p.stem.endswith("_test")}
    everything = "\n".join(sources.values())
    for spec in KERAS_SPECS:
        for entry in (spec.keras_weights, spec.keras_top_weights):
            assert entry.file_hash is None or f'"{entry.file_hash}"' in everything, spec.name
            assert entry.origin.startswith("https://storage.googleapis.com/")
        if spec.keras_weights.file_hash is None:  # Keras pins none for MobileNet V1/V2 only
            module = spec.constructor_fn().__module__.rpartition(".")[2]
            assert spec.family in ("mobilenet", "mobilenet_v2") and "file_hash" not in sources[module]


# Families whose file names Keras computes (the others are literals, covered above): the cheapest
# member of each, checked against the get_file call the Keras constructor itself makes.
COMPUTED_NAMES = [
    "resnet50",
    "resnet50_v2",
    "mobilenet",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "efficientnet_v2_b0",
    "convnext_tiny",
]


class _Asked(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPUTED_NAMES)
def test_weights_table_matches_the_file_keras_downloads(name, monkeypatch, fresh_keras):
    import keras
    from keras.src.utils import file_utils

    spec = get_backbone(name)
    asked = {}

    def fake_get_file(fname, origin=None, **kwargs):
        asked.update(fname=fname, origin=origin, file_hash=kwargs.get("file_hash"))
        raise _Asked

    monkeypatch.setattr(file_utils, "get_file", fake_get_file)
    size = 160 if spec.family == "mobilenet" else 96  # MobileNet V1 has a file per size: use one
    with pytest.raises(_Asked), keras.StatelessScope(initialize_variables=False):  # no random fill: see above
        spec.constructor_fn()(include_top=False, weights="imagenet", input_shape=(size, size, 3))
    fname, url = spec.keras_weights.for_size(size)
    assert (fname, url, spec.keras_weights.file_hash) == (asked["fname"], asked["origin"], asked["file_hash"])


# ------------------------------------------------------------------------------ behaviour


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'resnet50'") as info:
        get_backbone("resnt50")
    assert "imgfeat backbones" in str(info.value)
    assert get_backbone("ResNet50").name == "resnet50"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"pooling": "mean"}, ["pooling", "avg", "max"]),
        ({"input_size": 20}, ["20", "32"]),
    ],
)
def test_bad_build_options_are_config_errors(kwargs, words):
    with pytest.raises(ConfigError) as info:
        build_model(get_backbone("mobilenet_v2"), weights="none", **kwargs)
    assert all(w in str(info.value) for w in words)


def test_inception_refuses_inputs_below_75():
    with pytest.raises(ConfigError, match="75"):
        build_model(get_backbone("inception_v3"), weights="none", input_size=64)


def test_layer_taps_an_inner_layer_and_pools_it():
    spec = get_backbone("mobilenet_v2")
    avg = build_model(spec, weights="none", input_size=64, layer="block_6_expand_relu", pooling="avg")
    mx = build_model(spec, weights="none", input_size=64, layer="block_6_expand_relu", pooling="max")
    assert tuple(avg.output.shape) == (None, 192) == tuple(mx.output.shape)
    # Same seed, same weights: avg and max are two poolings of the same feature map.
    a, m = _forward(avg, 64), _forward(mx, 64)
    assert (m >= a - 1e-6).all() and not np.allclose(a, m)
    with pytest.raises(ConfigError, match="did you mean 'block_6_expand_relu'"):
        build_model(spec, weights="none", input_size=64, layer="block_6_expand_rel")


def test_build_model_builds_under_a_precision_policy_and_restores_the_one_in_force():
    """extract's --precision reaches the model through build_model's dtype_policy, and only that model."""
    import keras

    spec = get_backbone("mobilenet_v3_small")
    before = keras.config.dtype_policy().name
    mixed = build_model(spec, weights="none", input_size=32, dtype_policy="mixed_bfloat16")
    assert keras.config.dtype_policy().name == before
    assert mixed.layers[-1].compute_dtype == "bfloat16" and mixed.layers[-1].variable_dtype == "float32"
    assert build_model(spec, weights="none", input_size=32).layers[-1].compute_dtype == before


def test_spec_build_still_builds_with_a_deprecation_warning():
    spec = get_backbone("mobilenet_v3_small")
    with pytest.warns(DeprecationWarning, match="build_model"):
        old = spec.build(weights="none", input_size=32, seed=7)
    np.testing.assert_array_equal(_forward(old, 32), _forward(build_model(spec, "none", 32, seed=7), 32))


def test_seeded_random_weights_are_deterministic():
    spec = get_backbone("mobilenet_v3_small")
    first = _forward(build_model(spec, weights="none", input_size=64, seed=7), 64)
    again = _forward(build_model(spec, weights="none", input_size=64, seed=7), 64)
    other = _forward(build_model(spec, weights=None, input_size=64, seed=8), 64)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other, rtol=1e-3, atol=0)  # random-init outputs are tiny: compare relatively


def test_weights_file_round_trip_and_mismatch(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # where the digest cache goes
    spec = get_backbone("mobilenet_v2")
    saved = build_model(spec, weights="none", input_size=48, seed=3)
    path = tmp_path / "mine.weights.h5"
    saved.save_weights(path)
    loaded = build_model(spec, weights=str(path), input_size=48, seed=99)  # the seed must not matter now
    np.testing.assert_array_equal(_forward(saved, 48), _forward(loaded, 48))
    ref = resolve_weights(spec, str(path))
    assert ref.kind == "file" and ref.path == path.resolve() and len(ref.sha256) == 64
    # The same file also feeds a tapped layer (weights load into the whole no-top model first).
    tapped = build_model(spec, weights=str(path), input_size=48, layer="out_relu")
    np.testing.assert_allclose(_forward(tapped, 48), _forward(saved, 48), atol=1e-6)
    with pytest.raises(ConfigError, match="does not fit mobilenet_v3_small"):
        build_model(get_backbone("mobilenet_v3_small"), weights=str(path), input_size=48)
    junk = tmp_path / "junk.weights.h5"
    junk.write_text("not hdf5")
    with pytest.raises(ConfigError, match="does not fit"):
        build_model(spec, weights=str(junk), input_size=48)
    with pytest.raises(ConfigError, match="'imagenet', 'none' or an existing file"):
        build_model(spec, weights=str(tmp_path / "missing.weights.h5"))


def test_offline_imagenet_without_cached_file_fails_fast_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))
    spec = get_backbone("resnet50")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        build_model(spec, weights="imagenet")
    assert time.perf_counter() - t0 < 5
    msg = str(info.value)
    for part in (
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "https://storage.googleapis.com/",
        "imgfeat weights fetch resnet50",
        "imgfeat weights import",
        "KERAS_HOME",
        str(tmp_path),
    ):
        assert part in msg


def test_imagenet_loads_the_cached_file_without_the_network(tmp_path, monkeypatch):
    """A file in the cache under Keras' name is what weights='imagenet' loads (MobileNet pins no hash)."""
    import h5py
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    spec = get_backbone("mobilenet")
    donor = build_model(spec, weights="none", input_size=128, seed=5, pooling="avg")
    target, _ = spec.keras_weights.for_size(128)
    (tmp_path / "models").mkdir()
    with h5py.File(tmp_path / "models" / target, "w") as f:  # Keras' legacy .h5 layout, as it ships
        save_weights_to_hdf5_group(f, donor)
    built = build_model(spec, weights="imagenet", input_size=128, seed=123)
    np.testing.assert_array_equal(_forward(donor, 128), _forward(built, 128))
    assert resolve_weights(spec, "imagenet", 128).path == (tmp_path / "models" / target).resolve()


def test_cached_file_with_the_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    spec = get_backbone("resnet50")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / spec.keras_weights.file_name).write_bytes(b"damaged download")
    with pytest.raises(ConfigError, match="does not match the hash Keras pins"):
        build_model(spec, weights="imagenet")


def test_preprocess_input_leaves_its_input_alone_and_matches_keras():
    import keras

    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    before = x.copy()
    for name in ("resnet50", "inception_v3", "densenet121", "efficientnet_b0"):
        spec = get_backbone(name)
        out = spec.preprocess_input(x)
        np.testing.assert_array_equal(x, before)  # Keras' own function edits float32 input in place
        family = getattr(keras.applications, spec.family)
        np.testing.assert_array_equal(out, family.preprocess_input(x.copy()))
        assert out.dtype == np.float32


def test_include_top_gives_the_imagenet_classifier(fresh_keras):
    spec = get_backbone("mobilenet_v3_small")
    model = build_model(spec, weights="none", include_top=True)
    assert tuple(model.input.shape) == (None, spec.input_size, spec.input_size, 3)
    assert tuple(model.output.shape) == (None, 1000)
    probs = _forward(model, spec.input_size)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
