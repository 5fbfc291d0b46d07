"""Job files: parsing, overrides, path resolution and the errors a typo gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgfeat.core.errors import ConfigError
from imgfeat.run.jobfile import apply_override, load_job

pytestmark = pytest.mark.quick

GOOD = """
[run]
max_error_rate = 0.1

[datasets.photos]
root = "images"
test_fraction = 0.2

[datasets.extra]
root = "{workspace}/more"

[features.lite0]
backbone = "efficientnet_lite0"
batch_size = 16

[heads.photos-logreg]
dataset = "photos"
features = "lite0"
head = "logreg"
predict = ["photos", "extra"]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.toml"
    p.write_text(text)
    return p


def test_good_job_resolves_paths_and_defaults(tmp_path):
    job = load_job(write(tmp_path, GOOD), workspace=tmp_path / "ws")
    assert job.datasets["photos"]["root"] == tmp_path / "images"
    assert job.datasets["extra"]["root"] == tmp_path / "ws" / "more"
    (fjob,) = job.features
    assert fjob.datasets == ("photos", "extra")  # default: every dataset
    (head,) = job.heads
    assert (head.dataset, head.features, head.predict, head.report) == ("photos", "lite0", ("photos", "extra"), True)
    assert head.options == {"head": "logreg"}
    assert job.max_error_rate == 0.1


def test_overrides_parse_toml_values(tmp_path):
    job = load_job(
        write(tmp_path, GOOD), ("features.lite0.batch_size=64", "run.executor=ray", "features.lite0.backbone=resnet50")
    )
    assert job.features[0].options["batch_size"] == 64
    assert job.features[0].options["backbone"] == "resnet50"  # bare words stay strings
    assert job.executor == "ray"


@pytest.mark.parametrize(
    "edit, message",
    [
        ("[bogus]\nx = 1\n", "unknown key 'bogus'"),
        ("[run]\nexecutor = 'spark'\n", "executor 'spark' is not one of local, ray"),
        ("[run]\nmax_error_rate = 2\n", "max_error_rate = 2: expected a number from 0 to 1"),
        ("[heads.h]\ndataset = 'nope'\nfeatures = 'lite0'\n", "dataset 'nope'"),
        ("[heads.h]\ndataset = 'photos'\nfeatures = 'vit'\n", "features 'vit'"),
        ("[heads.h]\nfeatures = 'lite0'\n", "needs 'dataset = ...'"),
        ("[features.f]\ndatasets = ['ghost']\n", "dataset 'ghost'"),
        ("[datasets.'bad name']\nroot = 'x'\n", "invalid dataset name 'bad name'"),
    ],
)
def test_bad_job_files_name_the_problem(tmp_path, edit, message):
    base = GOOD.replace("[run]\nmax_error_rate = 0.1\n", "") if edit.startswith("[run]") else GOOD
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_job(write(tmp_path, base + "\n" + edit))


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="job file not found"):
        load_job(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_job(write(tmp_path, "[datasets.x\nroot="))


def test_override_needs_key_value():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override({}, "features.lite0.batch_size")
