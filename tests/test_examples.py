"""The job files shipped in jobs/examples/ parse, build valid stage configs, and the demo runs."""

from __future__ import annotations

import json
import subprocess
import sys
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
    assert "Open the report" in out
    # The query lines run as printed, right after the demo, with what the install has.
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith(sys.executable)]
    assert len(lines) == 2
    results = [subprocess.run(line, shell=True, capture_output=True, text=True, timeout=120) for line in lines]
    assert all(r.returncode == 0 for r in results), [r.stderr[-800:] for r in results]
    assert "48 features of dim 1280" in results[0].stdout
    assert "pred_label" in results[1].stdout and "cat" in results[1].stdout
