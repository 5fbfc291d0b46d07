"""Typed stage results keep the JSON keys --json and runs/<id>.json had as dicts, and come back from them."""

from __future__ import annotations

import dataclasses
import json

import pytest
from tiny_images import write_noise_images

from imgfeat.extract.extract import ExtractSummary
from imgfeat.finetune.train import FinetuneSummary
from imgfeat.heads.predict import PredictSummary
from imgfeat.heads.report import ReportSummary
from imgfeat.heads.train import TrainSummary
from imgfeat.index.build import IndexSummary
from imgfeat.index.dedup import DedupSummary
from imgfeat.run.summary import ErrorRate, RunSummary
from imgfeat.scan.scan import ScanConfig, ScanPlan, ScanSummary, plan_scan, run_scan

pytestmark = pytest.mark.quick

SCAN_KEYS = [
    "dataset",
    "root",
    "manifest",
    "files",
    "added",
    "changed",
    "unchanged",
    "removed",
    "retried",
    "hashed",
    "ok",
    "errors",
    "status",
    "labels",
    "splits",
    "skipped",
    "skipped_total",
    "labels_csv_missing",
    "seconds",
    "files_per_s",
]
PLAN_KEYS = ["dataset", "root", "new", "changed", "unchanged", "removed", "skipped"]
RUN_KEYS = [
    "job",
    "scan",
    "extract",
    "train",
    "predict",
    "report",
    "timings",
    "model_work",
    "error_rates",
    "items_per_s",
]


def test_scan_summary_and_plan_are_frozen_with_todays_keys(ws, tmp_path):
    write_noise_images(tmp_path / "r", 3, classes=("cat",))
    plan = plan_scan(ws, ScanConfig(tmp_path / "r", "d"))
    assert isinstance(plan, ScanPlan) and list(plan.to_json()) == PLAN_KEYS and plan.new == 3
    summary = run_scan(ws, ScanConfig(tmp_path / "r", "d"), "r1")
    assert isinstance(summary, ScanSummary) and list(summary.to_json()) == SCAN_KEYS
    assert (summary.files, summary.added, summary.ok, summary.status) == (3, 3, 3, {"ok": 3})
    json.dumps(summary.to_json())  # plain JSON all the way down
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.files = 4


VALUES = {"str": "x", "int": 3, "float": 1.5, "bool": True, "list[str]": ["a", "b"], "list[float]": [0.5]}


def _value(annotation: str) -> object:
    kind = annotation.split(" | ")[0]  # never None: a round trip must carry the value
    if kind in VALUES:
        return VALUES[kind]
    return [{"k": 1}] if kind.startswith("list[dict") else {"k": 1}


def sample(cls: type) -> object:
    """An instance with every field set, so a round trip carries each one."""
    return cls(**{f.name: _value(f.type) for f in dataclasses.fields(cls)})


RESULTS = [
    ScanSummary,
    ScanPlan,
    TrainSummary,
    PredictSummary,
    FinetuneSummary,
    DedupSummary,
    IndexSummary,
    ReportSummary,
]


@pytest.mark.parametrize("cls", RESULTS, ids=lambda c: c.__name__)
def test_every_stage_result_comes_back_from_its_json(cls):
    result = sample(cls)
    out = json.loads(json.dumps(result.to_json()))
    assert cls.from_json(out) == result and cls.from_json(out).to_json() == out
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(result, dataclasses.fields(cls)[0].name, None)


def _run_summary() -> RunSummary:
    extract = ExtractSummary(
        "fs",
        "d",
        4,
        3,
        1,
        0,
        1,
        {"empty": 1},
        0,
        1,
        True,
        1,
        32,
        2.0,
        loop_seconds=1.0,
        commit_records={"recorded": 0, "adopted": 0, "set_aside": 0},
    )
    train = dataclasses.replace(sample(TrainSummary), metrics={"test_accuracy": None}, reused=True)
    summary = RunSummary(
        "job.toml",
        scan={"d": sample(ScanSummary)},
        extract={"lite0/d": extract},
        train={"h": train},
        predict={"h/d": sample(PredictSummary)},
        report={"h": sample(ReportSummary)},
        timings={"scan": 0.5},
    )
    summary.no_accuracy["h"] = "no evaluation rows: why"
    summary.error_rates["lite0/d"] = ErrorRate(errors=1, images=4)
    return summary


def test_run_summary_json_has_todays_keys():
    out = _run_summary().to_json()
    assert list(out) == RUN_KEYS and out["job"] == "job.toml"
    assert out["extract"]["lite0/d"]["errors"] == {"new": 1, "by_code": {"empty": 1}, "known": 0}
    assert out["train"]["h"]["no_accuracy"] == "no evaluation rows: why"
    assert out["error_rates"]["lite0/d"] == {"errors": 1, "images": 4, "rate": 0.25}
    assert out["model_work"] is True  # lite0/d extracted 3 images


def test_run_summary_comes_back_from_its_json_typed():
    summary = _run_summary()
    out = json.loads(json.dumps(summary.to_json()))
    back = RunSummary.from_json(out)
    assert back == summary and back.to_json() == out
    assert isinstance(back.extract["lite0/d"], ExtractSummary) and back.train["h"].metrics["test_accuracy"] is None
    assert back.no_accuracy == {"h": "no evaluation rows: why"}


def test_run_summary_gives_each_timed_stage_its_items_per_second(tmp_path, capsys):
    from imgfeat.cli.report_lines import print_run_summary
    from imgfeat.core.workspace import Workspace

    extract = _run_summary().extract["lite0/d"]
    predicted = sample(PredictSummary)
    summary = RunSummary(
        "j",
        extract={"a/d": dataclasses.replace(extract, extracted=30), "b/d": dataclasses.replace(extract, extracted=10)},
        predict={"h/d": dataclasses.replace(predicted, written=0)},
        train={"h": sample(TrainSummary)},
        timings={"extract": 4.0, "predict": 1.0, "train": 2.0},
    )
    # extract: both featuresets over the stage's time; nothing predicted, and train has no items
    assert summary.items_per_s == {"extract": 10.0} == summary.to_json()["items_per_s"]
    print_run_summary(
        Workspace(tmp_path),
        RunSummary("j", predict={"h/d": dataclasses.replace(predicted, written=30)}, timings={"predict": 4.0}),
    )
    assert capsys.readouterr().out.splitlines()[-1] == "speed    predict 7.5 rows/s"


def test_model_work_reads_the_typed_results():
    train = dataclasses.replace(sample(TrainSummary), reused=True)
    assert RunSummary("j", train={"h": train}).model_work is False
    assert RunSummary("j", train={"h": dataclasses.replace(train, reused=False)}).model_work is True
    assert ErrorRate(0, 0).rate == 0.0
