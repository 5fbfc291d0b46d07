"""Indexes from job files and the command line: [indexes.NAME], `imgfeat run` keeping them current, --json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from jobtext import BASE, parse
from synthetic import fake_image_id, write_featureset

from imgfeat.core.errors import ConfigError


@pytest.mark.quick
def test_indexes_section_names_a_recipe_and_its_datasets():
    job = parse(BASE + '[indexes.near]\nfeatures = "tiny"\nkind = "hnsw"\n')
    (ijob,) = job.indexes
    assert (ijob.name, ijob.features, ijob.datasets, ijob.options) == ("near", "tiny", ("photos",), {"kind": "hnsw"})


@pytest.mark.quick
@pytest.mark.parametrize(
    "table, message",
    [
        ('kind = "flat"', r"\[indexes.near\] needs 'features = ...'"),
        ('features = "big"', "names features 'big', which the job file does not define"),
        ('features = "tiny"\ndatasets = ["other"]', "names dataset 'other'"),
        ('features = "tiny"\nkind = "annoy"', "unknown index kind 'annoy'"),
        ('features = "tiny"\nnprobe = 0', "nprobe = 0: expected an integer from 1 to 1048576"),
        ('features = "tiny"\nmetric = "l2"', r"\[indexes.near\]: unknown key 'metric'"),
        ('features = "tiny"\nname = "x"', "'name' is set by the job file"),
    ],
)
def test_bad_indexes_tables_name_the_key(table, message):
    with pytest.raises(ConfigError, match=message):
        parse(BASE + "[indexes.near]\n" + table + "\n")


@pytest.mark.quick
def test_index_and_similar_commands_json(ws, capsys):
    from imgfeat.cli.main import main

    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 16)).astype(np.float32)
    ids = [fake_image_id("fs", k) for k in range(40)]
    write_featureset(ws, "fs", ids, X, dtype="float32")
    assert main(["index", "--featureset", "fs", "--name", "ix", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["index"], out["rows"], out["added"], out["kind"]) == ("ix", 40, 40, "flat")
    assert main(["similar", "--index", "ix", "--image-id", ids[0], "--top", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    expect = np.argsort(-(X[1:] @ X[0] / np.linalg.norm(X[1:], axis=1)))[:3] + 1
    assert [n["image_id"] for n in res[0]["neighbours"]] == [ids[k] for k in expect]
    assert main(["similar", "--index", "ix", "--image-id", ids[0]]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{ids[0]}: ") and line.count(", ") == 9
    assert main(["similar", "--index", "ix", "--image-id", ids[0], "--top", "41"]) == 2
    assert "top 41 is more than the 40 images in index ix" in capsys.readouterr().err
    assert main(["similar", "--index", "ix", "--image-id", ids[0], "--featureset", "other"]) == 2
    assert "index ix was built on featureset fs" in capsys.readouterr().err


@pytest.mark.quick
def test_similar_takes_a_unique_id_prefix_like_git(ws, capsys):
    from imgfeat.cli.main import main

    rng = np.random.default_rng(1)
    twins = ["deadbeef" + "0" * 24, "deadbeef" + "1" * 24]  # two ids that share 8 digits
    ids = [fake_image_id("fs", k) for k in range(20)] + twins
    X = rng.standard_normal((len(ids), 8)).astype(np.float32)
    write_featureset(ws, "fs", ids, X, dtype="float32")
    assert main(["index", "--featureset", "fs", "--name", "ix"]) == 0
    capsys.readouterr()
    assert main(["similar", "--index", "ix", "--image-id", ids[0], "--top", "3", "--json"]) == 0
    full = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"][0]
    assert main(["similar", "--index", "ix", "--image-id", ids[0][:8].upper(), "--top", "3", "--json"]) == 0
    short = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"][0]
    assert short["image_id"] == ids[0] and short["neighbours"] == full["neighbours"]
    # Ambiguous: exit 2 listing the candidates; too short or unknown: exit 2 saying so.
    assert main(["similar", "--index", "ix", "--image-id", "deadbeef"]) == 2
    err = capsys.readouterr().err
    assert "ambiguous" in err and twins[0] in err and twins[1] in err
    assert main(["similar", "--index", "ix", "--image-id", "deadbeef1"]) == 0
    assert capsys.readouterr().out.startswith("deadbeef1: ")
    assert main(["similar", "--index", "ix", "--image-id", ids[0][:7]]) == 2
    assert "at least 8 of its 32 hex digits" in capsys.readouterr().err
    missing = next(p for p in ("0123abcd", "fedc9876", "abab1212") if not any(i.startswith(p) for i in ids))
    assert main(["similar", "--index", "ix", "--image-id", missing]) == 2
    assert "no image id in featureset fs starts with it" in capsys.readouterr().err


@pytest.mark.slow
def test_run_keeps_the_index_current(tmp_path, keras_home, capsys):
    from imgfeat.cli.main import main
    from imgfeat.tools.samples import PhotoSetSpec, make_photo_set

    spec = PhotoSetSpec(classes=(("cat", "chelsea"), ("coffee", "coffee")), per_class=6, min_side=64, max_side=96)
    make_photo_set(tmp_path / "images", spec)
    job = tmp_path / "job.toml"
    job.write_text(BASE.replace('[datasets.other]\nroot = "other"\n', "") + '[indexes.near]\nfeatures = "tiny"\n')

    def run() -> dict:
        assert main(["run", str(job), "--workspace", str(tmp_path / "ws"), "--json"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    first = run()["index"]["near"]
    assert (first["rows"], first["added"], first["written"]) == (12, 12, True)
    second = run()["index"]["near"]
    assert (second["rows"], second["added"], second["written"]) == (12, 0, False)
    make_photo_set(
        tmp_path / "more", PhotoSetSpec(classes=(("cat", "chelsea"),), per_class=3, min_side=64, max_side=96, seed=9)
    )
    for p in (tmp_path / "more").rglob("*.*"):
        target = tmp_path / "images" / "new" / p.name
        target.parent.mkdir(parents=True, exist_ok=True)
        p.rename(target)
    third = run()["index"]["near"]
    assert (third["rows"], third["added"]) == (15, 3)
