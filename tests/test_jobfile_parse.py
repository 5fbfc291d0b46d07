"""Job-file parsing on in-memory documents: names, defaults, paths and references (no TOML file, no work)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from imgfeat.core.errors import ConfigError
from imgfeat.run.jobfile import apply_override, parse_job

pytestmark = pytest.mark.quick

BASE = Path("/jobs/nightly")


def doc(**sections) -> dict:
    """A valid two-dataset job, with ``sections`` replacing or adding whole sections."""
    out = {
        "datasets": {"photos": {"root": "images"}, "extra": {"root": "/srv/extra"}},
        "features": {"lite0": {"backbone": "efficientnet_lite0"}},
        "heads": {"photos-logreg": {"dataset": "photos", "features": "lite0"}},
    }
    out.update(sections)
    return out


def parse(d: dict, workspace: Path | None = None):
    return parse_job(d, base=BASE, source="job.toml", workspace=workspace)


def test_defaults_features_on_every_dataset_heads_predict_their_own_and_report():
    job = parse(doc())
    (fjob,) = job.features
    assert fjob.datasets == ("photos", "extra") and fjob.options == {"backbone": "efficientnet_lite0"}
    (hjob,) = job.heads
    assert (hjob.dataset, hjob.features, hjob.predict, hjob.report) == ("photos", "lite0", ("photos",), True)
    assert (job.executor, job.max_error_rate, job.wait) == ("local", None, None)


def test_relative_roots_are_under_the_job_files_folder_and_absolute_ones_stay():
    job = parse(doc())
    assert job.datasets["photos"]["root"] == BASE / "images"
    assert job.datasets["extra"]["root"] == Path("/srv/extra")


def test_workspace_placeholder_expands():
    job = parse(doc(datasets={"photos": {"root": "{workspace}/incoming"}}), workspace=Path("/ws"))
    assert job.datasets["photos"]["root"] == Path("/ws/incoming")


def test_run_section_values():
    job = parse(doc(run={"executor": "ray", "max_error_rate": 0.05, "wait": 60}))
    assert (job.executor, job.max_error_rate, job.wait) == ("ray", 0.05, 60)


@pytest.mark.parametrize(
    "sections, words",
    [
        ({"jobs": {}}, "unknown key 'jobs'"),
        ({"run": {"executor": "slurm"}}, "executor 'slurm'"),
        ({"run": {"max_error_rate": 2}}, "max_error_rate"),
        ({"features": {"lite0": {"backbone": "b", "datasets": ["nope"]}}}, "dataset 'nope'"),
        ({"features": {"lite0": {"backbone": "b", "dataset": "photos"}}}, "datasets = [...]"),
        ({"heads": {"h": {"dataset": "photos", "features": "missing"}}}, "features 'missing'"),
        ({"heads": {"h": {"features": "lite0"}}}, "needs 'dataset = ...'"),
        ({"heads": {"h": {"dataset": "photos", "features": "lite0", "predict": ["ghost"]}}}, "dataset 'ghost'"),
        ({"datasets": {"bad/name": {"root": "x"}}}, "invalid dataset name"),
        ({"heads": {"h": "not a table"}}, "one table per name"),
    ],
)
def test_bad_documents_name_what_is_wrong(sections, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        parse(doc(**sections))


def test_overrides_set_typed_values_and_create_tables():
    d = doc()
    apply_override(d, "features.lite0.batch_size=64")
    apply_override(d, "features.lite0.weights=none")  # not TOML: kept as a string
    apply_override(d, "run.wait=30")
    assert d["features"]["lite0"] == {"backbone": "efficientnet_lite0", "batch_size": 64, "weights": "none"}
    assert parse(d).wait == 30
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override(d, "no-equals-sign")
