"""One run extracting into a featureset more than once: no call replaces another call's shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from synthetic import synthetic_provenance
from tiny_images import noise_image

from imgfeat.core import schemas as S
from imgfeat.core.schemas import ErrorRow
from imgfeat.core.workspace import Workspace
from imgfeat.extract.shards import FeaturesetDirs, FeaturesetWriter, next_shard_tag

RUN = "20260101T000000Z-aaaaaa"


def _dirs(tmp_path: Path) -> FeaturesetDirs:
    return FeaturesetDirs(tmp_path / "fs", tmp_path / "errors", tmp_path / "npy")


def _ids(folder: Path) -> list[str]:
    return [i for p in sorted(folder.glob("part-*.parquet")) for i in pq.read_table(p)[S.IMAGE_ID].to_pylist()]


def _write_call(dirs: FeaturesetDirs, prov, ids: list[str], bad: list[str]) -> FeaturesetWriter:
    """One extract call's writes, under the tag the driver would pick for it."""
    w = FeaturesetWriter(dirs, next_shard_tag(dirs, RUN), prov, shard_size=2, npy=True)
    w.add_errors([ErrorRow(b, f"/img/{b}", "decode", "truncated", "cut short", RUN) for b in bad])
    w.add_features(ids, np.arange(len(ids) * 4, dtype=np.float32).reshape(len(ids), 4) + 1)
    w.flush()
    return w


@pytest.mark.quick
def test_two_calls_of_one_run_keep_both_calls_rows(tmp_path):
    dirs, prov = _dirs(tmp_path), synthetic_provenance("fs", 4, "float32")
    first = _write_call(dirs, prov, ["a", "b", "c"], ["x"])
    second = _write_call(dirs, prov, ["d", "e", "f"], ["y"])
    assert not set(first.written) & set(second.written)
    assert sorted(_ids(dirs.features)) == ["a", "b", "c", "d", "e", "f"]
    assert sorted(_ids(dirs.errors)) == ["x", "y"]
    assert len(list(dirs.npy.glob("part-*.npy"))) == len(first.feature_shards) + len(second.feature_shards)
    runs = {r for p in dirs.errors.glob("part-*.parquet") for r in pq.read_table(p)[S.RUN_ID].to_pylist()}
    assert runs == {RUN}, "the rows keep the real run id, not the shard tag"


@pytest.mark.quick
def test_the_tag_counts_past_this_runs_calls_in_every_folder_only(tmp_path):
    dirs = _dirs(tmp_path)
    assert next_shard_tag(dirs, RUN) == f"{RUN}-c000"  # no folder yet
    dirs.errors.mkdir(parents=True)
    (dirs.errors / f"part-{RUN}-c004-00000.parquet").write_bytes(b"")  # only an error shard of call 4
    dirs.features.mkdir()
    (dirs.features / "part-20251231T000000Z-bbbbbb-c009-00000.parquet").write_bytes(b"")  # another run
    (dirs.features / f"part-{RUN}-00000.parquet").write_bytes(b"")  # this run, the old naming
    assert next_shard_tag(dirs, RUN) == f"{RUN}-c005"


# ------------------------------------------------------------------------------- the driver (slow)


def _two_datasets(tmp_path: Path, ws: Workspace) -> dict[str, list[str]]:
    from imgfeat.scan.manifest import read_manifest
    from imgfeat.scan.scan import ScanConfig, run_scan

    for k, name in enumerate(("one", "two")):
        root = tmp_path / name
        root.mkdir()
        for i in range(5):
            noise_image(100 * k + i, (36, 30)).save(root / f"{i}.jpg", quality=90)
        (root / "junk.jpg").write_bytes(f"not an image {k}".encode())
        run_scan(ws, ScanConfig(root=root, dataset=name), "scan")
    return {
        name: [r[S.IMAGE_ID] for r in read_manifest(ws, name).to_pylist() if r[S.STATUS] == S.STATUS_OK]
        for name in ("one", "two")
    }


@pytest.mark.slow
def test_extract_twice_in_one_run_then_files_keeps_every_row(ws, tmp_path):
    from imgfeat.extract.extract import ExtractConfig, extract_files, run_extract
    from imgfeat.extract.featureset import committed_ids, load_features, read_errors

    ids = _two_datasets(tmp_path, ws)
    base = dict(backbone="efficientnet_lite0", weights="none", input_size=32, batch_size=4, shard_size=3)
    out = [run_extract(ws, ExtractConfig(dataset=d, **base), RUN).to_json() for d in ("one", "two")]
    fs = out[0]["featureset"]
    assert out[1]["featureset"] == fs and out[1]["extracted"] == 5
    extra = tmp_path / "extra.jpg"
    noise_image(999, (36, 30)).save(extra, quality=90)
    [res] = extract_files(ws, fs, [extra], RUN)

    have, X = load_features(ws, fs)
    assert X.std(axis=0).mean() > 1e-3, "random Lite0 features must carry signal"
    assert len(have) == 11 and set(have) == set(ids["one"]) | set(ids["two"]) | {res.image_id}
    assert committed_ids(ws, fs) == set(have)
    errors = read_errors(ws, fs).to_pylist()
    assert sorted(Path(r[S.PATH]).parent.name for r in errors) == ["one", "two"]  # both junk files
    assert {r[S.RUN_ID] for r in errors} == {RUN}


JOB = """
[datasets.one]
root = "one"

[datasets.two]
root = "two"

[features.lite]
backbone = "efficientnet_lite0"
weights = "none"
input_size = 32

[heads.one-logreg]
dataset = "one"
features = "lite"
cv = 2

[heads.two-logreg]
dataset = "two"
features = "lite"
cv = 2
"""


@pytest.mark.slow
def test_run_with_one_recipe_over_two_datasets_trains_both_heads(ws, tmp_path, capsys):
    from tiny_images import write_noise_images

    from imgfeat.cli.main import main
    from imgfeat.extract.featureset import committed_ids
    from imgfeat.scan.manifest import read_manifest

    write_noise_images(tmp_path / "one", 8, classes=("cat", "dog"))
    write_noise_images(tmp_path / "two", 8, seed=100, classes=("cat", "dog"))
    job = tmp_path / "job.toml"
    job.write_text(JOB)
    code = main(["run", str(job), "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, summary.get("error")
    assert set(summary["train"]) == {"one-logreg", "two-logreg"}
    assert set(summary["extract"]) == {"lite/one", "lite/two"}
    [fs] = {s["featureset"] for s in summary["extract"].values()}
    have = committed_ids(ws, fs)
    for name in ("one", "two"):
        ids = [r[S.IMAGE_ID] for r in read_manifest(ws, name).to_pylist() if r[S.STATUS] == S.STATUS_OK]
        assert len(ids) == 8 and set(ids) <= have, f"images of {name} lost their feature rows"
