"""A job file's text for the job-file stage tests (indexes, dedup): two datasets, one recipe; parsed and checked as `imgfeat run` does: test-only code."""

from __future__ import annotations

from pathlib import Path

BASE = """
[datasets.photos]
root = "images"

[datasets.other]
root = "other"

[features.tiny]
backbone = "efficientnet_lite0"
weights = "imagenet"
input_size = 64
datasets = ["photos"]
"""


def parse(text: str):
    import tomllib

    from imgfeat.run.jobfile import parse_job
    from imgfeat.run.run import check_job

    job = parse_job(tomllib.loads(text), base=Path("/jobs"), source="job.toml", workspace=None)
    check_job(job)
    return job
