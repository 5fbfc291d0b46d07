"""The Python API: the README's example runs as written; Featureset readers agree; the transformer works in sklearn and on Ray-style batches."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_api_example() -> str:
    section = (ROOT / "README.md").read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_import_imgfeat_is_fast_and_loads_no_heavy_library():
    code = "import sys, imgfeat; print(sorted(m for m in ('sklearn', 'tensorflow', 'keras', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.quick
def test_stage_packages_stay_importable_and_are_callable():
    import imgfeat
    import imgfeat.extract.extract as ex
    import imgfeat.scan.scan as sc

    assert callable(imgfeat.scan) and callable(imgfeat.extract)
    assert sc.run_scan and ex.run_extract and imgfeat.scan.scan is sc
    assert {"scan", "extract", "train", "predict", "Featureset", "FeatureTransformer"} <= set(dir(imgfeat))


@pytest.fixture(scope="module")
def example(tmp_path_factory, keras_home):
    """The README block, run in a folder holding a small generated photo set."""
    from imgfeat.tools.samples import PhotoSetSpec, make_photo_set

    base = tmp_path_factory.mktemp("api")
    spec = PhotoSetSpec(classes=(("cat", "chelsea"), ("rocket", "rocket")), per_class=6, min_side=48, max_side=64)
    make_photo_set(base / "photos", spec)
    namespace: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        exec(compile(readme_api_example(), "README.md", "exec"), namespace)
    return base, namespace


def test_readme_example_runs_and_its_results_agree(example, monkeypatch):
    base, ns = example
    monkeypatch.chdir(base)  # the example's workspace is "data", relative to where it ran
    ids, X, df, table = ns["ids"], ns["X"], ns["df"], ns["table"]
    assert X.shape == (12, 1280) and X.dtype == np.float32 and np.ptp(X, axis=0).max() > 0  # signal
    assert list(df.index) == list(ids) and np.allclose(df.to_numpy(), X)
    assert table.num_rows == 12 and set(table.column("image_id").to_pylist()) == set(ids)
    assert ns["head"].name == "photos-logreg" and ns["head"].featureset == ns["fs"].featureset
    assert ns["preds"].files == 12 and ns["preds"].errors == 0
    assert ns["model"].score(ns["paths"], ns["labels"]) >= 0.75


FOREIGN = re.compile(
    r"^[IWEF]\d{4} |absl::InitializeLog|oneDNN|cudart|cpu_feature_guard|cuInit|"
    r"To enable the following instructions"
)
OUR_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) ")


def test_the_api_writes_only_its_own_lines_to_stderr(example, tmp_path):
    """The README example in a fresh process: TensorFlow's nine start-up lines (absl, oneDNN,
    cudart, cpu_feature_guard, cuInit) stay out of stderr, as they do for the command; a user who
    sets TF_CPP_MIN_LOG_LEVEL gets what that asks for."""
    base, _ = example
    shutil.copytree(base / "photos", tmp_path / "photos")
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "IMGFEAT_PROGRESS")}
    proc = subprocess.run(
        [sys.executable, "-c", readme_api_example()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert [ln for ln in lines if FOREIGN.search(ln)] == []
    assert [ln for ln in lines if not OUR_LINE.match(ln)] == [], lines
    assert any("building efficientnet_lite0" in ln for ln in lines)  # our own lines still show


def test_transformer_rows_match_the_featureset_and_bad_files_are_nan(example, tmp_path):
    base, ns = example
    import imgfeat

    fs = imgfeat.Featureset("lite0", workspace=base / "data")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    paths = [str(base / p) for p in ns["paths"][:3]] + [str(bad)]
    t = imgfeat.FeatureTransformer("lite0", workspace=str(base / "data"), on_error="nan")
    got = t.fit_transform(paths)
    assert got.shape == (4, 1280) and np.isnan(got[3]).all() and not np.isnan(got[:3]).any()
    _, want = fs.to_numpy([r for r in _ids(paths[:3])])
    np.testing.assert_array_equal(got[:3], want)
    batch = t({"path": np.array(paths[:2])})  # what Ray Data's map_batches hands a function
    np.testing.assert_array_equal(batch["feature"], got[:2])
    assert list(batch["path"]) == paths[:2]


def test_transformer_raises_or_drops_instead_of_handing_nan_to_scikit_learn(example, tmp_path):
    base, ns = example
    import imgfeat
    from imgfeat.core.errors import ConfigError, ImgfeatError

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    paths = [str(base / p) for p in ns["paths"][:3]] + [str(bad)]
    ws = str(base / "data")
    with pytest.raises(ImgfeatError, match=r"1 of 4 images have no features: .*bad\.jpg \(not_an_image\)"):
        imgfeat.FeatureTransformer("lite0", workspace=ws).fit_transform(paths)  # the default: raise
    drop = imgfeat.FeatureTransformer("lite0", workspace=ws, on_error="drop")
    kept = drop.fit_transform(paths)
    assert kept.shape == (3, 1280) and not np.isnan(kept).any()
    batch = drop({"path": np.array(paths), "label": np.array(["a", "b", "c", "d"])})
    assert list(batch["label"]) == ["a", "b", "c"] and batch["feature"].shape == (3, 1280)
    with pytest.raises(ConfigError, match="on_error"):
        imgfeat.FeatureTransformer("lite0", workspace=ws, on_error="skip").fit(paths)


def _ids(paths: list[str]) -> list[str]:
    import hashlib

    return [hashlib.blake2b(Path(p).read_bytes(), digest_size=16).hexdigest() for p in paths]


@pytest.mark.ray
@pytest.mark.slow
def test_transformer_is_a_ray_data_map_batches_function(example):
    ray = pytest.importorskip("ray")  # the optional extra; CI installs it
    base, ns = example
    import imgfeat

    paths = [str(base / p) for p in ns["paths"][:6]]
    t = imgfeat.FeatureTransformer("lite0", workspace=str(base / "data"))
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        rows = ray.data.from_items([{"path": p} for p in paths]).map_batches(t, batch_size=4).take_all()
    finally:
        ray.shutdown()
    got = {r["path"]: np.asarray(r["feature"]) for r in rows}
    want = t.transform(paths)
    assert sorted(got) == sorted(paths)
    for k, p in enumerate(paths):
        np.testing.assert_array_equal(got[p], want[k])
