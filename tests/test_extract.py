"""The extract stage on tiny generated images: shards, provenance, resume, caching, fidelity, locks, disk errors."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from tiny_images import corrupt_png, noise_image

from imgfeat.backbones import BackboneSpec, build_model, get_backbone
from imgfeat.cli.main import main
from imgfeat.core import schemas as S
from imgfeat.core.errors import LockBusyError
from imgfeat.core.storage import FileLock, list_shards
from imgfeat.core.workspace import Workspace
from imgfeat.extract.extract import ExtractConfig, extract_files, featureset_name, plan_extract, run_extract
from imgfeat.extract.featureset import featureset_info, load_features, read_errors, sidecar_of
from imgfeat.scan.manifest import read_manifest
from imgfeat.scan.scan import ScanConfig, run_scan

# Lite0 with seeded random weights: its features at 32 px are O(0.1-1) and differ per image.
# (A random-init MobileNetV2 gives ~1e-12, which float16 stores as zeros: every equality check
# below would pass on all-zero arrays.)
BACKBONE, SIZE = "efficientnet_lite0", 32
N_GOOD = 11


def make_tree(root: Path) -> None:
    """11 distinct JPEGs (one also copied to a second path), a decode failure, an empty and a non-image file."""
    for i in range(N_GOOD):
        noise_image(i, (40, 30)).save(root / f"img{i:02d}.jpg", quality=90)
    shutil.copyfile(root / "img00.jpg", root / "copy_of_img00.jpg")
    (root / "broken.png").write_bytes(corrupt_png(99, (40, 30)))
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_bytes(b"this is not an image at all")


def cfg(dataset: str = "d", **kw) -> ExtractConfig:
    base = dict(
        backbone=BACKBONE, weights="none", input_size=SIZE, batch_size=4, shard_size=5, workers=2, dtype="float16"
    )
    return ExtractConfig(dataset=dataset, **{**base, **kw})


@pytest.fixture(scope="module")
def mod_ws(tmp_path_factory) -> Workspace:
    base = tmp_path_factory.mktemp("extract")
    (base / "imgs").mkdir()
    make_tree(base / "imgs")
    ws = Workspace(base / "ws")
    run_scan(ws, ScanConfig(root=base / "imgs", dataset="d"), "scan1")
    return ws


@pytest.fixture(scope="module")
def first(mod_ws):
    """One extract of dataset d with npy sidecars, float16 storage, 5-row shards."""
    c = cfg(npy=True)
    return c, run_extract(mod_ws, c, "run1").to_json()


def test_plan_is_the_todo_list_without_model_work(mod_ws, monkeypatch):
    monkeypatch.setattr(BackboneSpec, "construct", _no_build)
    plan = plan_extract(mod_ws, cfg(npy=True, seed=5))
    assert plan["featureset"] == featureset_name(cfg(seed=5))
    assert (plan["todo"], plan["done"], plan["duplicates"], plan["scan_errors"]) == (N_GOOD + 1, 0, 1, 2)


def test_featureset_name_follows_the_numbers():
    name = featureset_name(cfg())
    assert name.startswith(f"{BACKBONE}-{SIZE}-avg-float16-")
    assert featureset_name(cfg(batch_size=7, shard_size=3, workers=1)) == name  # speed knobs only
    for change in (
        {"seed": 1},
        {"pooling": "max"},
        {"interpolation": "nearest"},
        {"fast_decode": True},
        {"exif": "ignore"},
        {"precision": "bfloat16"},
        {"input_size": 48},
    ):
        assert featureset_name(cfg(**change)) != name, change
    assert featureset_name(cfg(dtype="float32")).startswith(f"{BACKBONE}-{SIZE}-avg-float32-")


def test_shards_have_the_schema_and_provenance(mod_ws, first):
    _c, summary = first
    fs = summary["featureset"]
    info = featureset_info(mod_ws, fs)
    dim = get_backbone(BACKBONE).dims["avg"]
    assert (info["featureset"], info["dim"], info["backbone"], info["weights"]) == (
        fs,
        dim,
        BACKBONE,
        "none:seed=0:backend=tensorflow",
    )
    shards = list_shards(mod_ws.featureset_dir(fs))
    assert len(shards) == summary["shards"] == 3  # 12 rows in 5-row shards
    for shard in shards:
        assert "run1" in shard.name
        schema = pq.read_schema(shard)
        assert schema.remove_metadata() == S.features_schema(dim, "float16")
        assert json.loads(schema.metadata[S.META_PROVENANCE]) == info


def test_every_manifest_row_is_a_feature_or_an_error_row(mod_ws, first):
    _, summary = first
    fs = summary["featureset"]
    manifest = read_manifest(mod_ws, "d").to_pylist()
    ids, _ = load_features(mod_ws, fs)
    errors = read_errors(mod_ws, fs).to_pylist()
    assert len(ids) == len(set(ids)) == N_GOOD  # the copy of img00 was extracted once
    by_id = {e[S.IMAGE_ID]: e for e in errors if e[S.IMAGE_ID]}
    for row in manifest:
        in_features = row[S.IMAGE_ID] in set(ids)
        assert in_features != (row[S.IMAGE_ID] in by_id), row[S.PATH]
    broken = next(r for r in manifest if r[S.PATH] == "broken.png")
    assert broken[S.STATUS] == S.STATUS_OK and by_id[broken[S.IMAGE_ID]][S.STAGE] == "decode"
    scan_codes = sorted(e[S.ERROR_CODE] for e in errors if e[S.STAGE] == "scan")
    assert scan_codes == ["empty", "not_an_image"]
    assert summary["extracted"] == N_GOOD and summary["duplicates"] == 1
    assert summary["errors"]["by_code"] == {"empty": 1, "not_an_image": 1, "unreadable": 1}
    assert summary["error_rows"] == 3 and summary["manifest_rows"] == len(manifest)


def _no_build(*args, **kwargs):
    raise AssertionError("the model was built")


def test_rerun_does_no_model_work(mod_ws, first, monkeypatch, capsys):
    _c, summary = first
    monkeypatch.setattr(BackboneSpec, "construct", _no_build)
    before = sorted(p.name for p in mod_ws.featureset_dir(summary["featureset"]).rglob("*"))
    code = main(
        [
            "extract",
            "--workspace",
            str(mod_ws.root),
            "--dataset",
            "d",
            "--backbone",
            BACKBONE,
            "--weights",
            "none",
            "--input-size",
            str(SIZE),
            "--dtype",
            "float16",
            "--npy",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    assert (out["extracted"], out["reused"], out["model_built"], out["shards"]) == (0, N_GOOD, False, 0)
    assert out["errors"]["new"] == 0 and out["errors"]["known"] == 3
    assert sorted(p.name for p in mod_ws.featureset_dir(summary["featureset"]).rglob("*")) == before


def test_new_images_in_another_dataset_extract_only_those(mod_ws, first, tmp_path):
    _, summary = first
    root = tmp_path / "more"
    root.mkdir()
    shutil.copyfile(Path(mod_ws.root).parent / "imgs" / "img03.jpg", root / "old.jpg")
    for i in range(3):
        noise_image(100 + i, (40, 30)).save(root / f"new{i}.jpg")
    run_scan(mod_ws, ScanConfig(root=root, dataset="more"), "scan2")
    out = run_extract(mod_ws, cfg("more", npy=True), "run2").to_json()
    assert out["featureset"] == summary["featureset"]
    assert (out["extracted"], out["reused"]) == (3, 1)
    ids, _ = load_features(mod_ws, summary["featureset"])
    assert len(ids) == len(set(ids)) == N_GOOD + 3


def test_npy_sidecar_equals_the_parquet_rows(mod_ws, first):
    _, summary = first
    for shard in list_shards(mod_ws.featureset_dir(summary["featureset"])):
        t = pq.read_table(shard)
        X = t.column(S.FEATURE).combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)
        sidecar = np.load(sidecar_of(mod_ws, summary["featureset"], shard))
        assert sidecar.dtype == np.float16 and np.array_equal(sidecar, X)
        assert np.count_nonzero(X) > X.size // 10 and len(np.unique(X, axis=0)) == len(X)


def test_float32_storage_equals_the_model_on_the_same_input(mod_ws):
    out = run_extract(mod_ws, cfg(dtype="float32", exif="ignore"), "run3").to_json()
    ids, X = load_features(mod_ws, out["featureset"])
    manifest = {r[S.IMAGE_ID]: r[S.PATH] for r in read_manifest(mod_ws, "d").to_pylist()}
    root = Path(mod_ws.root).parent / "imgs"
    spec = get_backbone(BACKBONE)
    model = build_model(spec, "none", SIZE, "avg", None, 0)
    import keras  # the reference path of the README's "Fidelity": load_img -> img_to_array -> preprocess -> predict

    batch = np.stack(
        [
            keras.utils.img_to_array(
                keras.utils.load_img(root / manifest[i], target_size=(SIZE, SIZE), interpolation="bilinear")
            )
            for i in ids
        ]
    )
    ref = model.predict(spec.preprocess_input(batch), verbose=0)
    assert ref.std(axis=0).mean() > 1e-3  # real signal, so the 1e-4 tolerance means something
    assert X.dtype == np.float32 and np.abs(X - ref).max() < 1e-4


def test_a_second_writer_fails_fast(mod_ws):
    c = cfg(seed=3)
    fs = featureset_name(c)
    with FileLock(mod_ws.featureset_lock(fs), "test holder"):
        with pytest.raises(LockBusyError, match="being written by another process"):
            run_extract(mod_ws, c, "run4")
    assert list_shards(mod_ws.featureset_dir(fs)) == []


def test_full_disk_is_a_clear_error_and_leaves_no_partial_shard(mod_ws, monkeypatch, capsys):
    import builtins

    from imgfeat.core import commits

    class FullDisk:  # what a full disk does to the shard writer: half the bytes land, then ENOSPC
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(
        commits,
        "open",
        lambda *a, **k: FullDisk(builtins.open(*a, **k)),  # noqa: SIM115 (a stand-in for open)
        raising=False,
    )
    code = main(
        [
            "extract",
            "--workspace",
            str(mod_ws.root),
            "--dataset",
            "d",
            "--backbone",
            BACKBONE,
            "--weights",
            "none",
            "--seed",
            "4",
            "--input-size",
            str(SIZE),
            "--dtype",
            "float16",
            "--npy",
            "--shard-size",
            "4",
        ]
    )
    assert code == 1
    assert "the disk is full" in capsys.readouterr().err
    folder = mod_ws.featureset_dir(featureset_name(cfg(seed=4)))
    left = sorted(p.name for p in folder.rglob("*") if p.is_file())
    assert left == []  # no shard, no sidecar, no .tmp (the lock and the provenance live elsewhere)
    assert mod_ws.featureset_provenance(folder.name).is_file()


@pytest.mark.quick
def test_default_storage_is_float32_which_spark_reads():
    c = ExtractConfig(dataset="d", backbone=BACKBONE, weights="none")
    assert c.dtype == "float32"


@pytest.mark.parametrize(
    "flag, value, expect",
    [
        ("--backbone", "mobilenetv2", "did you mean 'mobilenet_v2'"),
        ("--pooling", "foo", "allowed: avg, max"),
        ("--dtype", "int8", "allowed: float16, float32"),
        ("--precision", "int4", "allowed: bfloat16, float16, float32"),
    ],
)
def test_bad_flags_exit_2_naming_the_value(mod_ws, capsys, flag, value, expect):
    args = {"--backbone": BACKBONE, "--pooling": "avg", "--dtype": "float16", "--precision": "float32"}
    args[flag] = value
    argv = ["extract", "--workspace", str(mod_ws.root), "--dataset", "d", "--weights", "none"]
    for k, v in args.items():
        argv += [k, v]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert repr(value) in err and expect in err


def test_extract_files_caches_new_files_into_the_featureset(mod_ws, first, tmp_path):
    fs = first[1]["featureset"]
    old = Path(mod_ws.root).parent / "imgs" / "img05.jpg"
    new = tmp_path / "new.jpg"
    noise_image(500, (40, 30)).save(new)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    results = extract_files(mod_ws, fs, [old, new, bad], "files1")
    assert [r.error_code for r in results] == [None, None, "not_an_image"]
    ids, _ = load_features(mod_ws, fs, ids=[results[1].image_id])
    assert list(ids) == [results[1].image_id]
