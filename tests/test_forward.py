"""The model function: every family's preprocessing as ops equals Keras' numpy preprocess_input; uint8 in
on TensorFlow and JAX equals the float32 tutorial call; batches in flight keep order, depth and buffers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from imgfeat.backbones import build_model, list_backbones
from imgfeat.backbones.preprocess import MODES, mode_of, ops_preprocess
from imgfeat.extract.batches import Batch
from imgfeat.extract.forward import in_flight

FAMILIES = sorted({spec.family for spec in list_backbones()})


def test_every_registered_family_has_a_mode():
    assert set(FAMILIES) <= set(MODES), set(FAMILIES) - set(MODES)
    with pytest.raises(KeyError, match="no on-device preprocessing"):
        mode_of("not_a_family")


@pytest.mark.parametrize("family", FAMILIES)
def test_ops_preprocessing_equals_the_family_preprocess_input(family):
    """Same pixels, two paths: Keras' numpy preprocess_input on float32, ours as ops on uint8."""
    spec = next(s for s in list_backbones() if s.family == family)
    raw = np.random.default_rng(7).integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)
    raw[0, 0, 0] = (0, 128, 255)  # the ends of the range and a channel order check
    want = spec.preprocess_input(raw.astype(np.float32))
    got = np.asarray(ops_preprocess(family)(raw), dtype=np.float32)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    if mode_of(family) != "none":
        assert not np.allclose(got, raw), "the mode must change the pixels"


# ------------------------------------------------------------------------------ in flight (logic only)


class FakeForward:
    """Records the order of submits and fetches; results are the batch's first pixel per row."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self.outstanding = 0
        self.most_outstanding = 0

    def submit(self, raw):
        self.outstanding += 1
        self.most_outstanding = max(self.most_outstanding, self.outstanding)
        self.log.append(("submit", int(raw[0, 0, 0, 0])))
        return raw.copy()

    def fetch(self, handle):
        self.outstanding -= 1
        self.log.append(("fetch", int(handle[0, 0, 0, 0])))
        return handle[:, 0, 0, :1].astype(np.float32)


def _batches(n_rows, released):
    out = []
    for k, rows in enumerate(n_rows):
        raw = np.full((4, 2, 2, 3), k, dtype=np.uint8)
        out.append(Batch([f"{k}-{i}" for i in range(rows)], raw, [], 0.0, release=lambda k=k: released.append(k)))
    return out


@pytest.mark.quick
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_in_flight_keeps_order_and_depth_and_releases_after_fetch(depth):
    fwd, released = FakeForward(), []
    rows = [4, 0, 3, 4, 0, 0, 1]  # batches of only errors (0 rows) are never sent to the model
    landed = list(in_flight(fwd, _batches(rows, released), depth))
    assert [len(x.batch.ids) for x in landed] == rows
    assert [x.features is None for x in landed] == [r == 0 for r in rows]
    for k, x in enumerate(landed):
        if x.features is not None:
            assert x.features.shape == (rows[k], 1) and (x.features == k).all()
    assert released == list(range(len(rows))), "every buffer back, in order"
    assert fwd.most_outstanding == min(depth, 4)
    # a batch's result is never fetched before the next batches are submitted (up to depth)
    submits = [k for op, k in fwd.log if op == "submit"]
    assert submits == [k for k, r in enumerate(rows) if r]
    if depth >= 2:
        assert fwd.log[:2] == [("submit", 0), ("submit", 2)]


@pytest.mark.quick
def test_in_flight_stopped_early_releases_what_it_holds_and_closes_the_source():
    fwd, released, closed = FakeForward(), [], []

    def source():
        try:
            yield from _batches([4, 4, 4, 4], released)
        finally:
            closed.append(True)

    gen = in_flight(fwd, source(), depth=3)
    next(gen)
    gen.close()
    assert sorted(released) == [0, 1, 2] and closed == [True]


@pytest.mark.quick
def test_in_flight_rejects_a_depth_below_one():
    with pytest.raises(ValueError, match="depth"):
        list(in_flight(FakeForward(), [], 0))


# ------------------------------------------------------------------------------ real models


def test_uint8_forward_equals_the_float32_tutorial_call_on_tensorflow():
    """Lite0 (seeded random weights carry signal) and VGG16 (caffe mode: BGR and means)."""
    from imgfeat.backbones import get_backbone
    from imgfeat.extract.forward import Forward

    raw = np.random.default_rng(3).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    for name in ("efficientnet_lite0", "vgg16"):
        spec = get_backbone(name)
        model = build_model(spec, "none", 64, "avg", seed=1)
        want = np.asarray(model.predict_on_batch(spec.preprocess_input(raw.astype(np.float32))))
        got = Forward(model, spec.family, raw.shape)(raw)
        assert np.abs(want).max() > 1e-3 and np.std(want, axis=0).max() > 1e-4, "features must carry signal"
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        with pytest.raises(ValueError, match="shape"):
            Forward(model, spec.family, raw.shape).submit(raw[:2])


JAX_SCRIPT = textwrap.dedent("""
    import json, numpy as np, jax
    from imgfeat.backbones import build_model, get_backbone
    from imgfeat.extract.batches import Batch
    from imgfeat.extract.forward import Forward, in_flight
    raw = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    out = {}
    for name in ("efficientnet_lite0",):  # random Lite0 carries signal; every mode's ops are checked above
        spec = get_backbone(name)
        m = build_model(spec, "none", 32, "avg", seed=1)
        tv, ntv = [v.value for v in m.trainable_variables], [v.value for v in m.non_trainable_variables]
        call = jax.jit(lambda tv, ntv, x: m.stateless_call(tv, ntv, x, training=False)[0])
        want = np.asarray(call(tv, ntv, spec.preprocess_input(raw.astype(np.float32))))
        fwd = Forward(m, spec.family, raw.shape)
        got = [x.features for x in in_flight(fwd, [Batch(["a"] * 4, raw, [], 0.0)] * 3, 2)]
        out[name] = {"backend": fwd.backend, "scale": float(np.abs(want).max()),
                     "diff": max(float(np.abs(g - want).max()) for g in got)}
    print(json.dumps(out))
""")


def test_uint8_forward_equals_the_float32_call_on_jax():
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", JAX_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, r in out.items():
        assert r["backend"] == "jax" and r["scale"] > 1e-3, (name, r)
        assert r["diff"] <= 1e-4 * r["scale"], (name, r)
