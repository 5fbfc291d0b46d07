"""Ray executor: the local executor's featureset, a killed actor survived, resume across executors."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from tiny_images import corrupt_png, noise_image

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError
from imgfeat.core.workspace import Workspace
from imgfeat.extract.executors import ExecutorConfig
from imgfeat.extract.executors.local import Fault
from imgfeat.extract.executors.ray import (
    MAX_BATCH_ATTEMPTS,
    NEEDS_RAY,
    attempts_dir,
    count_attempt,
    import_ray,
)
from imgfeat.extract.extract import ExtractConfig, featureset_name, run_extract
from imgfeat.extract.featureset import feature_shards, load_features, read_errors, sidecar_of
from imgfeat.scan.scan import ScanConfig, run_scan

N_IMAGES = 40
# Tiny and seeded: random weights, 32x32 inputs, 8-image batches, 16-row shards (3 shards).
# Lite0's random features are O(0.1-1) and differ per image; a random-init MobileNetV2's are
# ~1e-12, against which a 1e-5 tolerance would accept any bug.
CFG = ExtractConfig(
    dataset="tiny",
    backbone="efficientnet_lite0",
    weights="none",
    input_size=32,
    batch_size=8,
    shard_size=16,
    dtype="float32",
)


def RayConfig(**kwargs) -> ExecutorConfig:
    return ExecutorConfig(name="ray", **kwargs)


def run_extract_ray(
    ws: Workspace, cfg: ExtractConfig, executor: ExecutorConfig, run_id: str, fault: Fault | None = None
) -> dict:
    """The one extract driver, over the Ray executor (``fault``: the shard task's test seam)."""
    return run_extract(ws, cfg, run_id, executor, seam=fault).to_json()


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")  # the optional extra; CI installs it
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """40 noise PNGs of varied sizes, one PNG whose pixel data is corrupt (a decode error, not a
    scan error) and one file that is not an image (a scan error)."""
    root = tmp_path_factory.mktemp("images")
    for i in range(N_IMAGES):
        folder = root / f"class{i % 2}"
        folder.mkdir(exist_ok=True)
        noise_image(i, (30, 20 + i)).save(folder / f"{i:02d}.png")
    (root / "class0" / "corrupt.png").write_bytes(corrupt_png(N_IMAGES, (64, 64), at=36, length=64))
    (root / "class1" / "notes.png").write_bytes(b"not an image at all")
    return root


def _workspace(tmp: Path, images: Path) -> Workspace:
    ws = Workspace(tmp)
    run_scan(ws, ScanConfig(root=images, dataset=CFG.dataset), run_id="scan")
    return ws


@pytest.fixture(scope="module")
def reference(tmp_path_factory, images):
    """The local executor's featureset: ids, features and error rows every Ray run must match."""
    ws = _workspace(tmp_path_factory.mktemp("ref"), images)
    summary = run_extract(ws, CFG, "local").to_json()
    ids, X = load_features(ws, summary["featureset"])
    order = np.argsort(ids.astype(str))
    return {
        "summary": summary,
        "ids": ids[order],
        "X": X[order],
        "errors": _error_codes(ws, summary["featureset"]),
        "ws": ws,
    }


def _error_codes(ws: Workspace, fs: str) -> dict[str | None, tuple[str, str]]:
    return {(r[S.IMAGE_ID] or r[S.PATH]): (r[S.STAGE], r[S.ERROR_CODE]) for r in read_errors(ws, fs).to_pylist()}


def _feature_rows(ws: Workspace, fs: str) -> list[str]:
    """Every image_id row in every committed feature shard (duplicates included)."""
    return [v for p in feature_shards(ws, fs) for v in pq.read_table(p, columns=[S.IMAGE_ID]).column(0).to_pylist()]


def _assert_matches_reference(ws: Workspace, reference) -> None:
    fs = reference["summary"]["featureset"]
    rows = _feature_rows(ws, fs)
    assert len(rows) == len(set(rows)), "an image has two feature rows"
    ids, X = load_features(ws, fs)
    order = np.argsort(ids.astype(str))
    assert list(ids[order]) == list(reference["ids"])
    assert reference["X"].std(axis=0).mean() > 1e-3  # real signal behind the tolerance
    np.testing.assert_allclose(X[order], reference["X"], atol=1e-5, rtol=0)
    assert _error_codes(ws, fs) == reference["errors"]


@pytest.mark.ray
@pytest.mark.slow
def test_ray_featureset_equals_local_and_rerun_does_no_work(ray_cluster, images, reference, tmp_path):
    ws = _workspace(tmp_path, images)
    out = run_extract_ray(ws, CFG, RayConfig(), "r1")
    _assert_matches_reference(ws, reference)
    local = reference["summary"]
    assert set(local) <= set(out), "the Ray summary lacks keys of the local one"
    for key in ("featureset", "manifest_rows", "extracted", "reused", "errors", "error_rows", "error_rate"):
        assert out[key] == local[key], key
    assert out["executor"] == "ray" and out["duplicate_rows"] == 0
    assert out["build_seconds"] > 0 and out["model_seconds"] > 0  # the actors' timings reach the summary
    assert out["errors"]["by_code"] == {"not_an_image": 1, "unreadable": 1}
    # A shard written on Ray describes itself like a local one.
    assert all(p.name.startswith("part-r1-c000-ray-") for p in feature_shards(ws, out["featureset"]))
    meta = pq.read_schema(feature_shards(ws, out["featureset"])[0]).metadata[S.META_PROVENANCE]
    assert out["featureset"].encode() in meta

    again = run_extract_ray(ws, CFG, RayConfig(), "r2")
    assert (again["extracted"], again["reused"], again["model_built"]) == (0, N_IMAGES, False)
    assert (again["errors"]["new"], again["errors"]["known"]) == (0, 2)


@pytest.mark.ray
@pytest.mark.slow
def test_two_ray_calls_of_one_run_keep_both_calls_shards(ray_cluster, images, reference, tmp_path):
    """One featureset extracted for two datasets under one run id (as ``imgfeat run`` does): the
    second call's per-batch shard names start at todo position 0 again, and replaced the first's."""
    ws = Workspace(tmp_path)
    for name in ("class0", "class1"):  # the corrupt PNG (a decode error) is in one, the non-image in the other
        run_scan(ws, ScanConfig(root=images / name, dataset=name), run_id="scan")
    for name in ("class0", "class1"):
        out = run_extract_ray(ws, replace(CFG, dataset=name), RayConfig(), "same")
        assert out["extracted"] == N_IMAGES // 2 and out["duplicate_rows"] == 0
    _assert_matches_reference(ws, reference)  # every feature row and error row of both calls


@pytest.mark.ray
@pytest.mark.slow
def test_on_ray_an_unchanged_copy_gives_the_feature_its_changed_twin_could_not(ray_cluster, tmp_path):
    """Issue 23 F1b on Ray: the retry from the other path is a second Ray call with its own shard
    tag, so it replaces none of the first call's shards."""
    from imgfeat.core.hashing import content_id

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(6):
        noise_image(i, (30, 24)).save(root / f"{i:02d}.png")
    (root / "00_copy.png").write_bytes((root / "00.png").read_bytes())
    ws = Workspace(tmp_path / "ws")
    run_scan(ws, ScanConfig(root=root, dataset="tiny"), run_id="scan")
    shared = content_id((root / "00.png").read_bytes())
    noise_image(99, (30, 24)).save(root / "00.png")  # changed after the scan; its copy is not
    out = run_extract_ray(ws, CFG, RayConfig(), "r1")
    assert (out["extracted"], out["error_rows"]) == (6, 0)
    ids, X = load_features(ws, out["featureset"])
    assert shared in set(ids.tolist()) and len(ids) == 6 and np.abs(X).sum() > 0
    tags = {p.name.split("-ray-")[0] for p in feature_shards(ws, out["featureset"])}
    assert tags == {"part-r1-c000", "part-r1-c001"}


@pytest.mark.ray
def test_ray_data_reads_the_folder_as_exactly_its_feature_rows(ray_cluster, reference):
    """Issue 13 item 1: before, read_parquet(folder) gave rows of the errors table with null features."""
    ws, fs = reference["ws"], reference["summary"]["featureset"]
    assert reference["errors"], "the featureset must hold error rows for this test to mean anything"
    rows = ray_cluster.data.read_parquet(str(ws.featureset_dir(fs))).to_pandas()
    assert list(rows.columns) == [S.IMAGE_ID, S.FEATURE]
    assert sorted(rows[S.IMAGE_ID]) == list(reference["ids"])
    assert rows[S.FEATURE].notna().all()


@pytest.mark.ray
@pytest.mark.slow
def test_actor_killed_after_committing_is_restarted_without_duplicate_rows(ray_cluster, images, reference, tmp_path):
    # After its commit is the worst moment: the retried batch must overwrite its own shard, not add one.
    ws = _workspace(tmp_path / "ws", images)
    marker = tmp_path / "fault-struck"
    out = run_extract_ray(ws, replace(CFG, npy=True), RayConfig(), "crash", Fault("exit_after_commit", str(marker)))
    assert marker.exists(), "the actor never died: the test hook did not fire"
    _assert_matches_reference(ws, reference)
    assert out["extracted"] == reference["summary"]["extracted"] and out["duplicate_rows"] == 0
    assert not attempts_dir(ws, "crash").exists(), "the run left its attempt counters behind"
    for shard in feature_shards(ws, out["featureset"]):  # each NPY sidecar holds its shard's rows, in order
        table = pq.read_table(shard)
        rows = np.asarray(table.column(S.FEATURE).combine_chunks().flatten()).reshape(table.num_rows, -1)
        np.testing.assert_array_equal(np.load(sidecar_of(ws, out["featureset"], shard)), rows)


@pytest.mark.ray
@pytest.mark.slow
def test_local_run_interrupted_after_a_shard_is_finished_on_ray_despite_a_killed_actor(
    ray_cluster, images, reference, tmp_path
):
    ws = _workspace(tmp_path / "ws", images)
    with pytest.raises(Exception, match="the run stops after one shard"):  # the local shard task's seam
        run_extract(ws, CFG, "local", seam=Fault("stop_after_one_shard", str(tmp_path / "local-struck")))
    first = len(_feature_rows(ws, featureset_name(CFG)))
    assert 0 < first < N_IMAGES

    # The Ray run resumes it; one actor dies with computed but uncommitted rows: none may go missing.
    marker = tmp_path / "fault-struck"
    out = run_extract_ray(ws, CFG, RayConfig(), "ray", Fault("exit_before_commit", str(marker)))
    assert marker.exists()
    assert (out["reused"], out["extracted"]) == (first, N_IMAGES - first)
    _assert_matches_reference(ws, reference)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_run_interrupted_after_a_shard_is_finished_locally(ray_cluster, images, reference, tmp_path):
    ws = _workspace(tmp_path / "ws", images)
    with pytest.raises(Exception, match="the run stops after one shard"):
        run_extract_ray(ws, CFG, RayConfig(), "ray", Fault("stop_after_one_shard", str(tmp_path / "fault-struck")))
    first = len(_feature_rows(ws, featureset_name(CFG)))
    assert 0 < first < N_IMAGES

    out = run_extract(ws, CFG, "local").to_json()
    assert (out["reused"], out["extracted"]) == (first, N_IMAGES - first)
    _assert_matches_reference(ws, reference)


@pytest.mark.ray
@pytest.mark.parametrize(
    "ray_cfg, message",
    [
        (RayConfig(gpus_per_worker=1), "has 0 GPU"),
        (RayConfig(actors=2), "leave none for decoding"),
    ],
)
def test_a_pool_ray_cannot_schedule_fails_fast(ray_cluster, images, tmp_path, ray_cfg, message):
    ws = _workspace(tmp_path, images)
    with pytest.raises(ConfigError, match=message):
        run_extract_ray(ws, CFG, ray_cfg, "r")


@pytest.mark.ray
def test_unknown_dataset_is_a_usage_error_that_creates_nothing(ray_cluster, images, tmp_path):
    ws = _workspace(tmp_path, images)
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        run_extract_ray(ws, replace(CFG, dataset="tinny"), RayConfig(), "r")
    assert not (tmp_path / "features").exists()


def test_an_attempt_counter_never_writes_through_a_planted_link(tmp_path):
    """Issue 23 F2: the attempt counters live under .locks/; a link there is an error, not a write."""
    outside = tmp_path / "outside"
    outside.write_text("keep")
    folder = tmp_path / ".locks" / "ray-r"
    folder.mkdir(parents=True)
    (folder / "batch-0").symlink_to(outside)
    with pytest.raises(OSError):
        count_attempt(folder, 0)
    assert outside.read_text() == "keep"
    assert count_attempt(folder, 1) == 1 and count_attempt(folder, 1) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"address": "somewhere"}, "invalid Ray address 'somewhere'"),
        ({"workers": 0}, "workers must be a positive integer"),
        ({"gpus_per_worker": -1}, "gpus per worker"),
        ({"cpus_per_worker": 0}, "cpus per worker"),
    ],
)
def test_bad_ray_config_names_the_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RayConfig(**kwargs)
    for ok in (None, "auto", "local", "ray://head:10001", "10.0.0.1:6379"):
        RayConfig(address=ok)


def test_a_batch_is_counted_once_per_start_so_a_poison_batch_ends_the_run(tmp_path):
    folder = tmp_path / "attempts"
    counts = [count_attempt(folder, 32) for _ in range(MAX_BATCH_ATTEMPTS + 1)]
    assert counts == list(range(1, MAX_BATCH_ATTEMPTS + 2))  # the last start is over the limit
    assert count_attempt(folder, 0) == 1  # batches are counted apart


def test_without_ray_the_executor_is_a_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees when the extra is missing
    with pytest.raises(ConfigError) as exc:
        import_ray()
    assert str(exc.value) == NEEDS_RAY and exc.value.exit_code == 2


def test_cli_routes_executor_ray_to_the_ray_config(ws, capsys):
    """`imgfeat extract --executor ray` reaches the executor config: a bad address is a usage error."""
    from imgfeat.cli.main import main

    code = main(
        [
            "extract",
            "--dataset",
            "d",
            "--backbone",
            "efficientnet_lite0",
            "--weights",
            "none",
            "--executor",
            "ray",
            "--ray-address",
            "not an address",
        ]
    )
    assert code == 2
    assert "invalid Ray address 'not an address'" in capsys.readouterr().err
