"""Trust at extract (issue 14): content verified, read failures retried, no orphan sidecars,
foreign shards and edited provenance refused, no hangs, bad values rejected before any write."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_decode import hang_guard

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError
from imgfeat.core.storage import list_shards
from imgfeat.core.workspace import Workspace
from imgfeat.extract.featureset import (
    OLD_PROVENANCE_FILE,
    feature_shards,
    featureset_info,
    load_features,
    read_errors,
)
from imgfeat.scan.scan import ScanConfig, run_scan

BACKBONE, SIZE = "efficientnet_lite0", 32  # random-init Lite0: O(0.1-1) features that differ per image
REPO = Path(__file__).resolve().parents[1]


def noise(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def cfg(dataset: str, **kw):
    from imgfeat.extract.extract import ExtractConfig

    base = dict(backbone=BACKBONE, weights="none", input_size=SIZE, batch_size=4, shard_size=4, workers=1)
    return ExtractConfig(dataset=dataset, **{**base, **kw})


def scanned(ws: Workspace, root: Path, n: int, dataset: str) -> Workspace:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        noise(root / f"img{i}.jpg", i)
    run_scan(ws, ScanConfig(root=root, dataset=dataset), "scan")
    return ws


def errors_by_path(ws: Workspace, fs: str) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for r in read_errors(ws, fs).to_pylist():
        out.setdefault(Path(r[S.PATH]).name, []).append((r[S.STAGE], r[S.ERROR_CODE]))
    return out


def test_a_file_changed_since_the_scan_is_an_error_row_not_a_mislabelled_feature(ws, tmp_path):
    """Item 1: before, the new bytes' feature was stored under the old image_id."""
    from imgfeat.extract.extract import run_extract

    scanned(ws, tmp_path / "imgs", 3, "d")
    noise(tmp_path / "imgs" / "img0.jpg", 1000)  # overwritten after the scan
    out = run_extract(ws, cfg("d"), "r1").to_json()
    assert out["extracted"] == 2 and out["errors"]["by_code"] == {"changed_since_scan": 1}
    assert errors_by_path(ws, out["featureset"])["img0.jpg"] == [("read", "changed_since_scan")]
    ids, _ = load_features(ws, out["featureset"])
    assert len(ids) == 2


def test_read_failures_are_retried_by_the_next_run_and_keep_their_history(ws, tmp_path):
    """Item 2: before, a file missing for a moment stayed featureless for good ('known')."""
    from imgfeat.extract.extract import run_extract

    scanned(ws, tmp_path / "imgs", 3, "d")
    aside = tmp_path / "aside.jpg"
    (tmp_path / "imgs" / "img1.jpg").rename(aside)  # a folder renamed, a file restored later...
    first = run_extract(ws, cfg("d"), "r1").to_json()
    assert first["errors"]["by_code"] == {"vanished": 1} and first["extracted"] == 2
    aside.rename(tmp_path / "imgs" / "img1.jpg")
    again = run_extract(ws, cfg("d"), "r2").to_json()
    assert (again["extracted"], again["reused"], again["errors"]["known"]) == (1, 2, 0)
    assert again["error_rows"] == 0
    fs = again["featureset"]
    assert len(load_features(ws, fs)[0]) == 3
    assert errors_by_path(ws, fs)["img1.jpg"] == [("read", "vanished")]  # the history stays
    # a decode failure of the same bytes stays final: no retry, no model build
    (tmp_path / "imgs" / "bad.png").write_bytes(_broken_png())
    run_scan(ws, ScanConfig(root=tmp_path / "imgs", dataset="d"), "scan2")
    assert run_extract(ws, cfg("d"), "r3").to_json()["errors"]["new"] == 1
    final = run_extract(ws, cfg("d"), "r4").to_json()
    assert (final["errors"]["new"], final["errors"]["known"], final["model_built"]) == (0, 1, False)


def _broken_png() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = data.index(b"IDAT") + 4
    data[start + 2 : start + 40] = b"\x00" * 38
    return bytes(data)


def test_a_fifo_swapped_in_after_the_scan_is_an_error_row_not_a_hang(ws, tmp_path):
    """Item 7: before, extract blocked for ever in open() while holding the featureset lock."""
    from imgfeat.extract.extract import run_extract

    scanned(ws, tmp_path / "imgs", 2, "d")
    (tmp_path / "imgs" / "img1.jpg").unlink()
    os.mkfifo(tmp_path / "imgs" / "img1.jpg")
    with hang_guard(120):
        out = run_extract(ws, cfg("d"), "r1").to_json()
    assert out["errors"]["by_code"] == {"not_a_file": 1} and out["extracted"] == 1


def test_files_over_max_file_bytes_are_error_rows(ws, tmp_path):
    """Item 7: a huge file with a valid JPEG at its head is not read whole."""
    from imgfeat.extract.extract import run_extract

    scanned(ws, tmp_path / "imgs", 2, "d")
    limit = min(p.stat().st_size for p in (tmp_path / "imgs").iterdir()) - 1
    out = run_extract(ws, cfg("d", max_file_bytes=limit), "r1").to_json()
    assert out["errors"]["by_code"] == {"file_too_large": 2}
    # the limit changes no numbers: the same featureset, and the next run (default limit) retries
    again = run_extract(ws, cfg("d"), "r2").to_json()
    assert again["featureset"] == out["featureset"] and again["extracted"] == 2


def test_a_foreign_shard_never_overrides_features(ws, tmp_path):
    """Item 5: before, a shard with the right schema named to sort first won over the real one."""
    from imgfeat.extract.extract import run_extract
    from imgfeat.extract.shards import features_table

    scanned(ws, tmp_path / "imgs", 3, "d")
    out = run_extract(ws, cfg("d"), "r1").to_json()
    fs = out["featureset"]
    ids, X = load_features(ws, fs)
    fake = features_table(list(ids), np.zeros_like(X), "float32", json.dumps({"featureset": "other"}))
    import pyarrow.parquet as pq

    pq.write_table(fake, ws.featureset_dir(fs) / "part-0000-evil.parquet")
    assert len(list_shards(ws.featureset_dir(fs))) == len(feature_shards(ws, fs)) + 1
    ids2, X2 = load_features(ws, fs)
    assert list(ids2) == list(ids)
    np.testing.assert_array_equal(X2, X)


def test_extract_refuses_an_edited_provenance(ws, tmp_path):
    """Item 5: before, editing the provenance made extract write float32 shards into a float16 name."""
    from imgfeat.extract.extract import run_extract

    scanned(ws, tmp_path / "imgs", 2, "d")
    out = run_extract(ws, cfg("d", dtype="float16"), "r1").to_json()
    path = ws.featureset_provenance(out["featureset"])
    prov = json.loads(path.read_text())
    path.write_text(json.dumps({**prov, "dtype": "float32"}))
    noise(tmp_path / "imgs" / "new.jpg", 77)
    run_scan(ws, ScanConfig(root=tmp_path / "imgs", dataset="d"), "scan2")
    with pytest.raises(ConfigError, match="does not describe featureset"):
        run_extract(ws, cfg("d", dtype="float16"), "r2")
    assert all("r2" not in p.name for p in list_shards(ws.featureset_dir(out["featureset"])))


KILL_BEFORE_SHARD = textwrap.dedent("""
    import os, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from synthetic import synthetic_provenance
    from imgfeat.core import commits
    from imgfeat.extract import shards
    def killed(*args, **kw):
        os._exit(9)  # SIGKILL-like: no except, no finally
    if {after}:  # killed after the shard (and its sidecar), before its commit record
        commits.write_record = killed
    else:  # killed before the shard is written
        commits.pq.write_table = killed
    prov = synthetic_provenance("fs", 4, "float32")
    base = __import__("pathlib").Path({folder!r})
    dirs = shards.FeaturesetDirs(base / "features", base / "errors", base / "npy")
    w = shards.FeaturesetWriter(dirs, "run", prov, 2, npy=True)
    w.add_features(["a", "b"], np.ones((2, 4), np.float32))
""")


@pytest.mark.parametrize("after", [False, True])
def test_no_npy_sidecar_survives_without_its_shard(tmp_path, after):
    """Item 3: before, the sidecar was committed first, and a kill before the shard left an orphan."""
    folder = tmp_path / "fs"
    code = KILL_BEFORE_SHARD.format(tests=str(REPO / "tests"), folder=str(folder), after=after)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    shards = {p.stem for p in folder.rglob("part-*.parquet")}
    sidecars = {p.stem for p in folder.rglob("part-*.npy")}
    assert sidecars <= shards, f"orphan sidecars: {sidecars - shards}"
    assert bool(shards) == after


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["--seed", "-1"], "expected an integer from 0 to 4294967295"),
        (["--batch-size", "100000"], "expected an integer from 1 to 8192"),
        (["--batch-size", "4000", "--input-size", "512"], "GiB per batch"),
        (["--layer", "no_such_layer"], "no_such_layer"),
        (["--weights", "/etc/passwd"], "does not fit"),  # issue 23 F27
        (["--weights", "{junk}"], "does not fit"),  # a .pth for a Lite backbone: issue 23 F27
        (["--weights", "{junk}", "--layer", "no_such_layer"], "does not fit"),
    ],
)
def test_bad_values_exit_2_before_anything_is_written(ws, tmp_path, capsys, argv, expect):
    """Items 10/13: before, these exited 1 with a traceback and left a featureset folder behind.
    Issue 23 F27: a weights file that does not fit left a lock, a provenance and an empty folder;
    now the workspace is as it was (run records aside)."""
    from imgfeat.cli.main import main

    scanned(ws, tmp_path / "imgs", 1, "d")
    junk = tmp_path / "x.pth"
    junk.write_bytes(b"not a weights file")
    before = _tree(ws)
    try:
        code = main(
            [
                "extract",
                "--dataset",
                "d",
                "--backbone",
                BACKBONE,
                "--weights",
                "none",
                "--input-size",
                str(SIZE),
                *[a.format(junk=junk) for a in argv],
            ]
        )
    except SystemExit as exc:  # refused by the flag's own range
        code = exc.code
    assert code == 2 and expect in capsys.readouterr().err
    assert _tree(ws) == before


def _tree(ws: Workspace) -> list[str]:
    """Every path of the workspace but the run records."""
    return sorted(
        p.relative_to(ws.root).as_posix() for p in ws.root.rglob("*") if p.relative_to(ws.root).parts[0] != "runs"
    )


def test_an_old_layout_is_migrated_on_open(ws, tmp_path):
    """The provenance from <fs>/_featureset.json, error shards from <fs>/errors/ and sidecars from
    <fs>/ move beside the folder, the old .lock goes, orphan sidecars are dropped: the folder keeps
    only its feature shards."""
    from imgfeat.extract.extract import run_extract

    scanned(ws, tmp_path / "imgs", 5, "d")
    (tmp_path / "imgs" / "bad.jpg").write_bytes(b"not an image")
    run_scan(ws, ScanConfig(root=tmp_path / "imgs", dataset="d"), "scan2")
    out = run_extract(ws, cfg("d", npy=True), "r1").to_json()
    fs = out["featureset"]
    folder, errors, npy = ws.featureset_dir(fs), ws.featureset_errors_dir(fs), ws.featureset_npy_dir(fs)
    # put it back the way the first layout kept it
    shutil.move(errors, folder / "errors")
    for p in npy.iterdir():
        p.rename(folder / p.name)
    ws.featureset_provenance(fs).rename(folder / OLD_PROVENANCE_FILE)
    (folder / ".lock").write_text("{}")
    (folder / "part-gone-00000.npy").write_bytes(b"orphan")
    assert len(read_errors(ws, fs)) == 1  # readable before the migration too
    assert featureset_info(ws, fs)["featureset"] == fs and len(load_features(ws, fs)[0]) == 5
    again = run_extract(ws, cfg("d", npy=True), "r2").to_json()
    assert (again["reused"], again["errors"]["known"], again["model_built"]) == (5, 1, False)
    shards = sorted(p.name for p in list_shards(folder))
    assert sorted(p.name for p in folder.iterdir()) == shards
    assert json.loads(ws.featureset_provenance(fs).read_text())["featureset"] == fs
    assert sorted(p.name for p in npy.iterdir()) == sorted(s.replace(".parquet", ".npy") for s in shards)
    assert len(list_shards(errors)) == 1


def test_a_file_changed_then_restored_is_extracted_after_a_rescan(ws, tmp_path):
    """Issue 23 F1a: changed_since_scan was final for the content id: restoring the bytes and
    rescanning left the image featureless for ever ('known: 1')."""
    from imgfeat.extract.extract import run_extract

    scanned(ws, tmp_path / "imgs", 3, "d")
    path = tmp_path / "imgs" / "img0.jpg"
    original = path.read_bytes()
    noise(path, 1000)
    first = run_extract(ws, cfg("d"), "r1").to_json()
    assert first["errors"]["by_code"] == {"changed_since_scan": 1}
    path.write_bytes(original)
    run_scan(ws, ScanConfig(root=tmp_path / "imgs", dataset="d"), "scan2")
    again = run_extract(ws, cfg("d"), "r2").to_json()
    assert (again["extracted"], again["errors"]["known"], again["error_rows"]) == (1, 0, 0)
    assert len(load_features(ws, again["featureset"])[0]) == 3


def test_an_unchanged_copy_gets_the_feature_its_changed_twin_could_not_give(ws, tmp_path):
    """Issue 23 F1b: B, byte-identical to A at scan, got no feature because A changed after the
    scan and A's outcome was recorded against their shared content id as final."""
    from imgfeat.core.hashing import content_id
    from imgfeat.extract.extract import run_extract

    root = tmp_path / "imgs"
    scanned(ws, root, 2, "d")
    shutil.copyfile(root / "img0.jpg", root / "img0_copy.jpg")  # sorts after img0.jpg: tried second
    run_scan(ws, ScanConfig(root=root, dataset="d"), "scan2")
    shared = content_id((root / "img0.jpg").read_bytes())
    noise(root / "img0.jpg", 1000)
    out = run_extract(ws, cfg("d"), "r1").to_json()
    assert (out["extracted"], out["duplicates"], out["error_rows"]) == (2, 1, 0)
    ids, X = load_features(ws, out["featureset"])
    assert shared in set(ids) and len(ids) == 2
    assert np.abs(X).sum() > 0  # the features carry signal
    assert errors_by_path(ws, out["featureset"]) == {"img0.jpg": [("read", "changed_since_scan")]}
    again = run_extract(ws, cfg("d"), "r2").to_json()  # done: nothing to retry, nothing known as an error
    assert (again["extracted"], again["reused"], again["errors"]["known"], again["model_built"]) == (0, 2, 0, False)
