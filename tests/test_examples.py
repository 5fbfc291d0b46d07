"""The job files shipped in jobs/examples/ parse, build valid stage configs, and the demo runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgfeat.cli.main import main
from imgfeat.run.jobfile import load_job
from imgfeat.run.run import check_job

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "jobs" / "examples").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_job_files_are_valid(path, tmp_path):
    job = load_job(path, workspace=tmp_path)
    check_job(job)  # every [datasets], [features] and [heads] table makes a valid stage config
    assert job.datasets and job.features and job.heads


@pytest.mark.slow
def test_demo_runs_every_stage_then_does_nothing_on_a_rerun(ws, keras_home, capsys):
    assert main(["demo", "--per-class", "8", "--json"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (ex,) = first["extract"].values()
    assert ex["extracted"] == 48 and ex["featureset"] == "efficientnet_lite0-224-avg-float32-f4c77963"
    (tr,) = first["train"].values()
    assert tr["metrics"]["test_accuracy"] >= 0.9  # random-init features score ~0.7 on this set
    (rep,) = first["report"].values()
    assert Path(rep["report"]).is_file()

    assert main(["demo", "--per-class", "8"]) == 0
    out = capsys.readouterr().out
    assert "0 extracted, 48 reused" in out and "(reused)" in out and "0 new rows" in out
    assert "select count(*)" in out and "Open the report" in out
