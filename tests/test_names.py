"""Names people use: a head's name means its latest version, NAME@ID pins one; ls lists, prune removes the rest."""

from __future__ import annotations

import json

import pytest
from synthetic import BlobSpec, blob_features, fake_image_id, write_blob_dataset, write_featureset

from imgfeat.cli.main import main
from imgfeat.core import names as N
from imgfeat.core.errors import ConfigError
from imgfeat.core.storage import FileLock
from imgfeat.heads import PredictConfig, ReportConfig, TrainConfig, run_predict, run_report, run_train
from imgfeat.heads.versions import resolve_featureset, resolve_head

SPEC = BlobSpec(classes=("cat", "dog"), per_class=12, dim=8, separation=6.0)


@pytest.mark.quick
@pytest.mark.parametrize(
    "ref,want",
    [
        ("nightly", "toy-logreg-bbbbbbbb"),  # a name: its latest
        ("nightly@toy-logreg-aaaaaaaa", "toy-logreg-aaaaaaaa"),  # pinned by id
        ("nightly@aaaaaaaa", "toy-logreg-aaaaaaaa"),  # pinned by the id's hash
        ("toy-logreg-aaaaaaaa", "toy-logreg-aaaaaaaa"),  # an id is itself
    ],
)
def test_resolve_names_ids_and_pins(ref, want):
    index = {"nightly": [{N.ID: "toy-logreg-aaaaaaaa"}, {N.ID: "toy-logreg-bbbbbbbb"}]}
    assert N.resolve(index, N.HEADS, ref, {"toy-logreg-aaaaaaaa", "toy-logreg-bbbbbbbb"}) == want


@pytest.mark.quick
@pytest.mark.parametrize(
    "ref,message",
    [
        ("nightlx", "did you mean 'nightly'"),
        ("nightly@cccccccc", "unknown version of head 'nightly'"),
        ("nope@aaaaaaaa", "unknown head name 'nope'"),
        ("bad/name", "invalid head name"),
    ],
)
def test_unknown_references_exit_2_naming_the_choices(ref, message):
    index = {"nightly": [{N.ID: "toy-logreg-aaaaaaaa"}]}
    with pytest.raises(ConfigError, match=message):
        N.resolve(index, N.HEADS, ref, {"toy-logreg-aaaaaaaa"})


@pytest.mark.quick
def test_record_moves_a_version_to_latest_and_forget_drops_names(ws):
    for v in ("fs-a", "fs-b", "fs-a"):
        N.record(ws, N.FEATURESETS, "lite0", v)
    assert [e[N.ID] for e in N.read_index(ws, N.FEATURESETS)["lite0"]] == ["fs-b", "fs-a"]
    N.forget(ws, N.FEATURESETS, ["fs-a", "fs-b"])
    assert N.read_index(ws, N.FEATURESETS) == {}
    assert not list(N.index_path(ws, N.FEATURESETS).parent.glob("*.tmp"))


def _second_featureset(ws, name: str) -> None:
    """The same images with other features: training on them makes a new version of a head."""
    _, X, _ = blob_features(BlobSpec(**{**SPEC.__dict__, "seed": 1}))
    write_featureset(ws, name, [fake_image_id("toy", k) for k in range(len(X))], X)


@pytest.fixture
def two_versions(ws):
    write_blob_dataset(ws, "toy", "fs1", SPEC)
    _second_featureset(ws, "fs2")
    _second_featureset(ws, "fs-unused")
    N.record(ws, N.FEATURESETS, "lite0", "fs1")
    first = run_train(ws, TrainConfig("toy", "lite0", cv=2, name="nightly"), "t1")
    N.record(ws, N.FEATURESETS, "lite0", "fs2")  # the recipe's next featureset
    second = run_train(ws, TrainConfig("toy", "lite0", cv=2, name="nightly"), "t2")
    assert first.featureset == "fs1" and second.featureset == "fs2" and first.head_id != second.head_id
    assert first.name == second.name == "nightly"
    for out in (first, second):
        run_predict(ws, PredictConfig(out.head_id, dataset="toy"), f"p-{out.head_id}")
    return first.head_id, second.head_id


def test_a_name_resolves_to_its_latest_version_everywhere(ws, two_versions):
    old, new = two_versions
    assert old.startswith("nightly-") and new.startswith("nightly-")  # the name leads its versions' ids
    assert resolve_head(ws, "nightly") == new
    assert resolve_head(ws, f"nightly@{old.rsplit('-', 1)[1]}") == old
    assert resolve_featureset(ws, "lite0") == "fs2" and resolve_featureset(ws, "lite0@fs1") == "fs1"
    assert run_predict(ws, PredictConfig("nightly", dataset="toy"), "p9").head_id == new
    assert run_report(ws, ReportConfig("nightly", projection="pca"), "r1").head_id == new
    # Retraining the first version's data makes it the latest again (reused, not retrained).
    again = run_train(ws, TrainConfig("toy", "fs1", cv=2, name="nightly"), "t3")
    assert again.reused and resolve_head(ws, "nightly") == old


def test_heads_from_before_names_resolve_by_their_default_name(ws, two_versions):
    old, new = two_versions
    N.index_path(ws, N.HEADS).unlink()  # a workspace made before names existed: no index, no "name"
    created = {}
    for h in (old, new):
        meta = json.loads((ws.head_dir(h) / "head.json").read_text())
        del meta["name"]
        (ws.head_dir(h) / "head.json").write_text(json.dumps(meta))
        created[h] = meta["created_at"]
    assert resolve_head(ws, "toy-logreg") == max((old, new), key=lambda h: (created[h], h))
    assert resolve_head(ws, old) == old


def test_ls_lists_datasets_featuresets_and_heads(ws, two_versions, capsys):
    old, new = two_versions
    assert main(["ls", "--workspace", str(ws.root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert [(d["name"], d["rows"], d["labels"]) for d in out["datasets"]] == [("toy", 24, 2)]
    fs = {f["featureset"]: f for f in out["featuresets"]}
    assert set(fs) == {"fs1", "fs2", "fs-unused"}
    assert fs["fs2"]["recipes"] == ["lite0"] and fs["fs2"]["latest_of"] == ["lite0"]
    assert fs["fs1"]["latest_of"] == [] and fs["fs1"]["rows"] == 24 and fs["fs1"]["datasets"] == {"toy": 24}
    heads = {h["head_id"]: h for h in out["heads"]}
    assert heads[new]["latest"] and not heads[old]["latest"] and heads[new]["name"] == "nightly"
    assert heads[new]["kind"] == "logreg" and 0.5 < heads[new]["accuracy"] <= 1.0 and heads[new]["created"]
    assert out["indexes"] == []
    assert main(["ls", "--workspace", str(ws.root)]) == 0
    text = capsys.readouterr().out
    assert "nightly" in text and "latest" in text and "recipe lite0" in text
    # An index reads as a line for people, not as the provenance's raw dicts.
    assert main(["index", "--workspace", str(ws.root), "--featureset", "fs2", "--name", "ix"]) == 0
    capsys.readouterr()
    assert main(["ls", "--workspace", str(ws.root)]) == 0
    text = capsys.readouterr().out
    (line,) = [ln for ln in text.splitlines() if ln.startswith("  ix ")]
    assert "24 rows" in line and "flat" in line and "featureset fs2" in line
    assert "{" not in text and "params=" not in text and "=" not in line


def test_prune_is_a_dry_run_then_removes_only_what_nothing_uses(ws, two_versions, capsys):
    old, new = two_versions
    assert main(["prune", "--workspace", str(ws.root), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.splitlines()[-1])
    # fs1 goes too: only the superseded head used it, and the recipe's latest is fs2.
    assert plan["heads"] == [old] and plan["featuresets"] == ["fs-unused", "fs1"] and not plan["deleted"]
    assert plan["kept_heads"] == [new] and plan["kept_featuresets"] == ["fs2"] and plan["bytes"] > 0
    assert ws.head_dir(old).is_dir() and ws.predictions_dir(old).is_dir()  # a dry run deletes nothing

    assert main(["prune", "--workspace", str(ws.root), "--yes"]) == 0
    assert "removed head " + old in capsys.readouterr().out
    assert not ws.head_dir(old).exists() and not ws.predictions_dir(old).exists()
    assert ws.head_dir(new).is_dir() and ws.predictions_dir(new).is_dir() and ws.featureset_dir("fs2").is_dir()
    assert not ws.featureset_dir("fs-unused").exists() and not ws.featureset_dir("fs1").exists()
    assert not ws.featureset_provenance("fs1").exists() and ws.featureset_provenance("fs2").is_file()
    assert resolve_head(ws, "nightly") == new
    assert [e[N.ID] for e in N.read_index(ws, N.HEADS)["nightly"]] == [new]
    assert main(["prune", "--workspace", str(ws.root)]) == 0
    assert "nothing to prune" in capsys.readouterr().out


def test_prune_removes_a_linked_folder_itself_never_what_it_points_to(ws, two_versions, tmp_path, capsys):
    """Issue 23 F2b: a head folder replaced by a link to a folder outside the workspace: prune
    --yes deleted head.json (and would delete the rest) in the outside folder."""
    import shutil

    old, _ = two_versions
    outside = tmp_path / "outside"
    shutil.move(ws.head_dir(old), outside)
    ws.head_dir(old).symlink_to(outside, target_is_directory=True)
    provenance_outside = tmp_path / "prov-outside"
    shutil.move(ws.featureset_dir("fs-unused"), provenance_outside)
    ws.featureset_dir("fs-unused").symlink_to(provenance_outside, target_is_directory=True)
    (provenance_outside / ".lock").write_text("keep")  # an old layout's lock: prune takes those
    before = sorted(p.name for p in outside.rglob("*")), sorted(p.name for p in provenance_outside.rglob("*"))
    assert "head.json" in before[0] and before[1]
    assert main(["prune", "--workspace", str(ws.root), "--yes"]) == 0
    assert (sorted(p.name for p in outside.rglob("*")), sorted(p.name for p in provenance_outside.rglob("*"))) == before
    assert not ws.head_dir(old).is_symlink() and not ws.head_dir(old).exists()  # the links went
    assert not ws.featureset_dir("fs-unused").is_symlink()
    assert (provenance_outside / ".lock").read_text() == "keep"  # no lock record written through the link


def test_prune_never_deletes_while_a_writer_holds_a_lock(ws, two_versions, capsys):
    old, _ = two_versions
    with FileLock(ws.locks_dir / "extract.lock", "the extract stage"):
        assert main(["prune", "--workspace", str(ws.root), "--yes"]) == 1
    assert "extract.lock" in capsys.readouterr().err
    assert ws.head_dir(old).is_dir() and ws.featureset_dir("fs-unused").is_dir()
