"""Job files under attack: every key has a type, checked in TOML and --set alike, before any work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgfeat.core.errors import ConfigError
from imgfeat.run.jobfile import load_job

GOOD = """
[run]
max_error_rate = 0.5

[datasets.photos]
root = "images"

[features.lite0]
backbone = "efficientnet_lite0"
weights = "none"
input_size = 32

[heads.photos-logreg]
dataset = "photos"
features = "lite0"
head = "logreg"
"""

# (dotted key, TOML value, words of the expected type): each changed the recipe silently or
# failed late (after scan or extract ran) with a message that named no key.
BAD = [
    ("features.lite0.fast_decode", '"no"', "a boolean"),
    ("features.lite0.npy", '"false"', "a boolean"),
    ("datasets.photos.follow_links", '"no"', "a boolean"),
    ("heads.photos-logreg.report", '"no"', "a boolean"),
    ("datasets.photos.max_pixels", "true", "an integer"),
    ("datasets.photos.root", "5", "a path"),
    ("features.lite0.weights", "5", "a string"),
    ("run.wait", '"soon"', "a number of seconds"),
    ("run.wait", "-5", "a number from 0 to 604800"),
    ("features.lite0.seed", '"abc"', "an integer"),
    ("heads.photos-logreg.cv", '"4"', "an integer"),
    ("features.lite0.input_size", '"224"', "an integer"),
    ("heads.photos-logreg.dropout", '"0.5"', "a number"),
    ("features.lite0.datasets", "5", "a name or a list of names"),
    ("heads.photos-logreg.c_grid", '["0.1"]', "a list of numbers"),
    ("heads.photos-logreg.c_grid", "0.1", "a list of numbers"),
]


def _with_value(key: str, value: str) -> str:
    """GOOD with ``key = value`` set in its table (replacing the line when the key is there)."""
    *table, leaf = key.split(".")
    header = f"[{'.'.join(table)}]\n"
    start = GOOD.index(header) + len(header)
    end = GOOD.find("\n[", start)
    end = len(GOOD) if end == -1 else end + 1
    body = re.sub(rf"(?m)^{leaf} = .*\n", "", GOOD[start:end])
    return GOOD[:start] + f"{leaf} = {value}\n" + body + GOOD[end:]


def _check(job) -> None:
    from imgfeat.run.run import check_job

    check_job(job)


@pytest.mark.parametrize("key,value,expected", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
@pytest.mark.parametrize("via", ["toml", "set"])
def test_a_value_of_the_wrong_type_names_key_value_and_type(tmp_path, key, value, expected, via):
    path = tmp_path / "job.toml"
    if via == "toml":
        path.write_text(_with_value(key, value))
        overrides: tuple[str, ...] = ()
    else:
        path.write_text(GOOD)
        overrides = (f"{key}={value}",)
    with pytest.raises(ConfigError) as err:
        _check(load_job(path, overrides))
    msg = str(err.value)
    assert f"{key} = {value}" in msg and expected in msg, msg
    assert err.value.exit_code == 2


@pytest.mark.quick
def test_set_bare_words_are_strings_and_checked_like_toml(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(GOOD)
    with pytest.raises(ConfigError, match=r'features\.lite0\.fast_decode = "no": expected a boolean'):
        _check(load_job(path, ("features.lite0.fast_decode=no",)))
    job = load_job(path, ("features.lite0.fast_decode=true", "run.wait=2.5"))
    _check(job)
    assert job.features[0].options["fast_decode"] is True and job.wait == 2.5


@pytest.mark.quick
def test_a_section_that_is_not_a_table_is_a_config_error(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("run = 5\n" + GOOD.replace("[run]\nmax_error_rate = 0.5\n", ""))
    with pytest.raises(ConfigError, match=r"run = 5: \[run\] must be a table"):
        load_job(path)


@pytest.mark.quick
def test_a_job_file_that_is_a_folder_or_not_utf8_is_a_config_error(tmp_path):
    folder = tmp_path / "job.toml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        load_job(folder)
    latin = tmp_path / "latin.toml"
    latin.write_bytes("[datasets.caf\xe9]\nroot = 'x'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_job(latin)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError):
        load_job(binary)


def _images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(2):
        (root / "cat").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "cat" / f"{i}.jpg")


@pytest.mark.parametrize(
    "key,value",
    [("features.lite0.seed", '"abc"'), ("heads.photos-logreg.cv", '"4"'), ("datasets.photos.max_pixels", "true")],
)
def test_imgfeat_run_rejects_a_bad_type_with_exit_2_before_any_stage(ws, tmp_path, capsys, key, value):
    from imgfeat.cli.main import main

    _images(tmp_path / "images")
    job = tmp_path / "job.toml"
    job.write_text(_with_value(key, value))
    assert main(["run", str(job), "--json"]) == 2
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert key in out["error"] and "Traceback" not in captured.err
    written = {p.name for p in ws.root.iterdir()} - {"runs"}
    assert written == set(), f"a rejected job wrote {written}"


@pytest.mark.parametrize("value", ["-5", "4294967296"])
def test_a_seed_numpy_cannot_take_fails_before_any_stage(tmp_path, value):
    path = tmp_path / "job.toml"
    path.write_text(GOOD)
    with pytest.raises(ConfigError, match=r"random_state = -?[0-9]+: expected an integer from 0 to 4294967295"):
        _check(load_job(path, (f"heads.photos-logreg.random_state={value}",)))


@pytest.mark.parametrize(
    "key,value,words",
    [
        ("datasets.photos.root", '"missing"', "does not exist"),
        ("datasets.photos.labels_csv", '"nope.csv"', "is not a file"),
    ],
)
def test_a_missing_root_or_labels_file_fails_before_any_stage_takes_a_lock(ws, tmp_path, capsys, key, value, words):
    from imgfeat.cli.main import main

    _images(tmp_path / "images")
    job = tmp_path / "job.toml"
    job.write_text(_with_value(key, value))
    assert main(["run", str(job), "--json"]) == 2
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert words in out["error"]
    assert {p.name for p in ws.root.iterdir()} - {"runs"} == set(), "a rejected job took a lock or wrote data"


def test_a_job_file_sets_the_c_grid_cross_validation_chooses_from(tmp_path):
    from imgfeat.run.run import train_config

    path = tmp_path / "job.toml"
    path.write_text(_with_value("heads.photos-logreg.c_grid", "[2, 0.5, 0.5]"))
    job = load_job(path)
    cfg = train_config(job, job.heads[0], featureset="fs")
    assert cfg.c_grid == (0.5, 2.0) and cfg.params()["c_grid"] == (0.5, 2.0)
    path.write_text(_with_value("heads.photos-logreg.c_grid", "[0.1, -1]"))
    with pytest.raises(
        ConfigError,
        match=r"^\[heads.photos-logreg\]: c_grid must be a list of 1 to 100 numbers, each number from 1e-12 to \d+, got \[0.1, -1\]",
    ):
        _check(load_job(path))
