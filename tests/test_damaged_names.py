"""Damaged name indexes and head.json files: ls lists everything else and names the file; other commands exit 1 naming it."""

from __future__ import annotations

import json
import shutil

import pytest
from synthetic import BlobSpec, blob_features, fake_image_id, write_blob_dataset, write_featureset

from imgfeat.cli.main import main
from imgfeat.core import names as N
from imgfeat.core.workspace import Workspace
from imgfeat.heads import PredictConfig, TrainConfig, run_predict, run_train

SPEC = BlobSpec(classes=("cat", "dog"), per_class=12, dim=8, separation=6.0)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two versions of head 'nightly' (on fs1, then fs2 of recipe 'lite0') and head 'other'; copied per test."""
    ws = Workspace(tmp_path_factory.mktemp("damaged") / "ws")
    write_blob_dataset(ws, "toy", "fs1", SPEC)
    _, X, _ = blob_features(BlobSpec(**{**SPEC.__dict__, "seed": 1}))
    write_featureset(ws, "fs2", [fake_image_id("toy", k) for k in range(len(X))], X)
    N.record(ws, N.FEATURESETS, "lite0", "fs1")
    old = run_train(ws, TrainConfig("toy", "lite0", cv=2, name="nightly"), "t1").head_id
    N.record(ws, N.FEATURESETS, "lite0", "fs2")
    new = run_train(ws, TrainConfig("toy", "lite0", cv=2, name="nightly"), "t2").head_id
    other = run_train(ws, TrainConfig("toy", "fs1", head="svm", cv=2, name="other"), "t3").head_id
    run_predict(ws, PredictConfig(old, dataset="toy"), "p1")
    return ws, {"old": old, "new": new, "other": other}


@pytest.fixture
def copy(built, tmp_path, monkeypatch):
    ws, heads = built
    root = tmp_path / "ws"
    shutil.copytree(ws.root, root)
    monkeypatch.setenv("IMGFEAT_WORKSPACE", str(root))
    return Workspace(root), heads


# (what the file holds) -> text written in its place; None: a folder where the file belongs
DAMAGE = {
    "not JSON": "{garbage",
    "empty": "",
    "a list": '["nightly"]',
    "versions not a list": '{"nightly": 5}',
    "a version not an object": '{"nightly": ["toy-logreg-1"]}',
    "an id not a string": '{"nightly": [{"id": 5, "recorded_at": ""}]}',
    "an id that is a path": '{"nightly": [{"id": "../../etc", "recorded_at": ""}]}',
    "a folder": None,
}
HEAD_DAMAGE = {
    "not JSON": "{garb",
    "empty": "",
    "a list": "[]",
    "keys missing": '{"head_id": "x"}',
    "wrong types": "WRONG_TYPES",
    "another head's": "ANOTHER",
    "a folder": None,
}


def _damage(path, text) -> None:
    path.unlink()
    if text is None:
        path.mkdir()
    else:
        path.write_text(text)


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_clear_line(err: str, path) -> None:
    assert "Traceback" not in err and str(path) in err and "damaged" in err
    assert len([line for line in err.splitlines() if str(path) in line]) == 1


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_head_name_index(copy, capsys, damage):
    ws, heads = copy
    path = N.index_path(ws, N.HEADS)
    _damage(path, DAMAGE[damage])
    code, out, err = _cli(capsys, "ls", "--json")
    assert code == 0, err
    listing = json.loads(out.splitlines()[-1])
    assert {h["head_id"] for h in listing["heads"]} == set(heads.values())  # named by their head.json
    assert {h["name"] for h in listing["heads"]} == {"nightly", "other"}
    assert {f["featureset"] for f in listing["featuresets"]} == {"fs1", "fs2"} and listing["datasets"]
    assert len(listing["damaged"]) == 1 and str(path) in listing["damaged"][0]
    for argv in (
        ["prune", "--yes"],
        ["predict", "--head", "nightly", "--dataset", "toy"],
        ["train", "--dataset", "toy", "--featureset", "fs1", "--head", "svm", "--cv", "2"],
    ):
        code, _, err = _cli(capsys, *argv)
        assert code == 1, argv
        _one_clear_line(err, path)
    assert ws.head_dir(heads["old"]).is_dir() and ws.predictions_dir(heads["old"]).is_dir()  # nothing pruned
    assert len(ws.list_names("heads")) == 3  # train stopped before training
    path.unlink() if path.is_file() else path.rmdir()  # the way out the message gives
    code, _, err = _cli(capsys, "predict", "--head", "nightly", "--dataset", "toy")
    assert code == 0, err


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_featureset_name_index(copy, capsys, damage):
    ws, heads = copy
    path = N.index_path(ws, N.FEATURESETS)
    _damage(path, DAMAGE[damage].replace("nightly", "lite0") if DAMAGE[damage] else DAMAGE[damage])
    code, out, err = _cli(capsys, "ls", "--json")
    assert code == 0, err
    listing = json.loads(out.splitlines()[-1])
    assert {f["featureset"] for f in listing["featuresets"]} == {"fs1", "fs2"}  # by id, without recipe names
    assert {h["head_id"] for h in listing["heads"]} == set(heads.values())
    assert len(listing["damaged"]) == 1 and str(path) in listing["damaged"][0]
    for argv in (
        ["prune", "--yes"],
        ["index", "--featureset", "lite0"],
        ["index", "--featureset", "fs2"],
        ["train", "--dataset", "toy", "--featureset", "lite0", "--head", "svm", "--cv", "2"],
    ):
        code, _, err = _cli(capsys, *argv)
        assert code == 1, argv
        _one_clear_line(err, path)
    assert ws.featureset_dir("fs1").is_dir() and not (ws.root / "indexes").exists()


@pytest.mark.parametrize("damage", HEAD_DAMAGE)
def test_the_latest_heads_damaged_head_json(copy, capsys, damage):
    ws, heads = copy
    path = ws.head_dir(heads["new"]) / "head.json"
    meta = json.loads(path.read_text())
    text = HEAD_DAMAGE[damage]
    if text == "WRONG_TYPES":
        text = json.dumps({**meta, "featureset": 5, "metrics": "high"})
    elif text == "ANOTHER":
        text = (ws.head_dir(heads["other"]) / "head.json").read_text()
    _damage(path, text)
    code, out, err = _cli(capsys, "ls", "--json")
    assert code == 0, err
    listing = json.loads(out.splitlines()[-1])
    listed = {h["head_id"]: h for h in listing["heads"]}
    assert set(listed) == {heads["old"], heads["other"]} and not listed[heads["old"]]["latest"]
    assert len(listing["damaged"]) == 1 and str(path) in listing["damaged"][0]
    code, out, err = _cli(capsys, "ls")
    assert code == 0 and str(path) in out and heads["other"] in out
    # The name still means the damaged version: never silently the one before.
    for argv in (
        ["prune", "--yes"],
        ["predict", "--head", "nightly", "--dataset", "toy"],
        ["report", "--head", "nightly"],
    ):
        code, _, err = _cli(capsys, *argv)
        assert code == 1, argv
        _one_clear_line(err, path)
    assert ws.head_dir(heads["old"]).is_dir()
    code, _, err = _cli(capsys, "predict", "--head", "other", "--dataset", "toy")
    assert code == 0, err  # other heads work


@pytest.mark.parametrize("damage", ["not JSON", "a folder"])
def test_a_superseded_heads_damaged_head_json_is_listed_as_damaged_and_pruned(copy, capsys, damage):
    ws, heads = copy
    path = ws.head_dir(heads["old"]) / "head.json"
    _damage(path, HEAD_DAMAGE[damage])
    code, out, _ = _cli(capsys, "ls", "--json")
    listing = json.loads(out.splitlines()[-1])
    assert code == 0 and {h["head_id"] for h in listing["heads"]} == {heads["new"], heads["other"]}
    assert len(listing["damaged"]) == 1 and str(path) in listing["damaged"][0]
    code, out, err = _cli(capsys, "prune", "--yes")
    assert code == 0 and "Traceback" not in err and f"removed head {heads['old']}" in out
    assert not ws.head_dir(heads["old"]).exists() and not ws.predictions_dir(heads["old"]).exists()
    code, out, _ = _cli(capsys, "ls", "--json")
    assert json.loads(out.splitlines()[-1])["damaged"] == []


def test_ls_lists_around_a_damaged_manifest_provenance_and_shard(copy, capsys):
    ws, heads = copy
    shard = sorted(ws.featureset_dir("fs1").glob("part-*.parquet"))[0]
    damaged = [ws.manifest_path("toy"), ws.featureset_provenance("fs2"), shard]
    for path in damaged:
        path.write_bytes(b"garbage")
    code, out, err = _cli(capsys, "ls", "--json")
    assert code == 0 and "Traceback" not in err
    listing = json.loads(out.splitlines()[-1])
    assert listing["datasets"] == []
    # fs2's provenance is damaged: left out and named; fs1's damaged shard no longer matches its
    # commit record: fs1 lists without it and a warning names the shard
    assert [f["featureset"] for f in listing["featuresets"]] == ["fs1"]
    assert shard.name in err
    assert {h["head_id"] for h in listing["heads"]} == set(heads.values())
    assert len(listing["damaged"]) == 2
    assert all(sum(str(p) in line for line in listing["damaged"]) == 1 for p in damaged[:2])


@pytest.mark.quick
@pytest.mark.parametrize(
    "index,message",
    [
        ([], "expected a JSON object"),
        ({"a": {"id": "x"}}, "expected a list of versions"),
        ({"a": [{"id": "x", "recorded_at": 3}]}, "expected versions like"),
        ({"a": [{"recorded_at": ""}]}, "expected versions like"),
        ({"a b": [{"id": "x"}]}, "invalid head name 'a b'"),
        ({"a": [{"id": "x/../y"}]}, "invalid head name 'x/../y'"),
    ],
)
def test_index_problem_names_what_is_wrong(index, message):
    assert message in N.index_problem(index, N.HEADS)
    assert N.index_problem({"a": [{"id": "x", "recorded_at": "2026"}], "b": []}, N.HEADS) is None
