"""Dedup from job files: [dedup.NAME] parsed and checked, and `imgfeat run` keeping it current."""

from __future__ import annotations

import json

import pytest
from jobtext import BASE, parse

from imgfeat.core.errors import ConfigError


@pytest.mark.quick
def test_dedup_section_names_a_recipe_and_its_dataset():
    job = parse(BASE + '[dedup.near]\nfeatures = "tiny"\nneighbours = 30\n')
    (djob,) = job.dedups
    assert (djob.name, djob.features, djob.dataset, djob.options) == ("near", "tiny", "photos", {"neighbours": 30})
    job = parse(BASE + '[dedup.strict]\nfeatures = "tiny"\ndataset = "photos"\nthreshold = 0.95\n')
    assert job.dedups[0].options == {"threshold": 0.95}


@pytest.mark.quick
@pytest.mark.parametrize(
    "table, message",
    [
        ("neighbours = 5", r"\[dedup.near\] needs 'features = ...'"),
        ('features = "big"', "names features 'big', which the job file does not define"),
        ('features = "tiny"\ndataset = "other"', "names dataset 'other'"),
        ('features = "tiny"\nthreshold = 1.5', "dedup.near.threshold = 1.5: expected a number from 0 to 1"),
        ('features = "tiny"\nneighbours = 0', "dedup.near.neighbours = 0: expected an integer from 1 to 1000"),
        (
            'features = "tiny"\ncalibration_images = -1',
            "dedup.near.calibration_images = -1: expected an integer from 0 to 10000",
        ),
        ('features = "tiny"\nmetric = "l2"', r"\[dedup.near\]: unknown key 'metric'"),
        ('features = "tiny"\nname = "x"', "'name' is set by the job file"),
    ],
)
def test_bad_dedup_tables_name_the_key(table, message):
    with pytest.raises(ConfigError, match=message):
        parse(BASE + "[dedup.near]\n" + table + "\n")


@pytest.mark.slow
def test_run_keeps_dedup_current(tmp_path, keras_home, capsys):
    """A first run finds the planted copy, a rerun writes nothing, a new copy costs one look."""
    from PIL import Image

    from imgfeat.cli.main import main
    from imgfeat.tools.nearcopies import distinct_photos

    scenes = {"astronaut", "chelsea", "coffee", "rocket", "china", "flower", "motorcycle_left", "camera"}
    photos = [p for p in distinct_photos(grids=(1,), max_side=96) if p.label in scenes]
    for k, p in enumerate(photos):
        split = "test" if k % 4 == 3 else "train"
        (tmp_path / "images" / split / p.label).mkdir(parents=True, exist_ok=True)
        p.image.save(tmp_path / "images" / split / p.label / f"{p.name}.jpg", quality=90)
    first_train = next((tmp_path / "images" / "train").rglob("*.jpg"))
    (tmp_path / "images" / "test" / first_train.parent.name).mkdir(parents=True, exist_ok=True)
    with Image.open(first_train) as im:
        im.convert("L").save(tmp_path / "images" / "test" / first_train.parent.name / "grey.png")
    job = tmp_path / "job.toml"
    job.write_text(BASE.replace('[datasets.other]\nroot = "other"\n', "") + '[dedup.near]\nfeatures = "tiny"\n')

    def run() -> dict:
        assert main(["run", str(job), "--workspace", str(tmp_path / "ws"), "--json"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dedup"]["near"]

    first = run()
    assert (first["groups"], first["leaks"], first["written"]) == (1, 1, True)
    assert first["criterion"]["looks_computed"] == 9
    second = run()
    assert (second["groups"], second["leaks"], second["written"]) == (1, 1, False)
    with Image.open(first_train) as im:
        im.resize((im.width // 2, im.height // 2)).save(first_train.parent / "half.png")
    third = run()
    assert (third["groups"], third["grouped_paths"], third["written"]) == (1, 3, True)
    assert third["criterion"]["looks_computed"] == 1 and third["criterion"]["calibration"]["reused"] is True
