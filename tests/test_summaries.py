"""Typed summaries keep the JSON keys that --json and runs/<id>.json had as dicts."""

from __future__ import annotations

import dataclasses
import json

import pytest

from imgfeat.run.summary import ErrorRate, RunSummary, stage_json, stage_value
from imgfeat.scan.scan import ScanConfig, ScanPlan, ScanSummary, plan_scan, run_scan
from tiny_images import write_noise_images

pytestmark = pytest.mark.quick

SCAN_KEYS = ["dataset", "root", "manifest", "files", "added", "changed", "unchanged", "removed", "retried",
             "hashed", "ok", "errors", "status", "labels", "splits", "skipped", "skipped_total",
             "labels_csv_missing", "seconds", "files_per_s"]
PLAN_KEYS = ["dataset", "root", "new", "changed", "unchanged", "removed", "skipped"]
RUN_KEYS = ["job", "scan", "extract", "train", "predict", "report", "timings", "model_work", "error_rates",
            "items_per_s"]


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


def test_run_summary_json_has_todays_keys_and_reads_typed_or_dict_results():
    class Typed:
        extracted, reused = 0, True

        def to_json(self):
            return {"extracted": 0}

    summary = RunSummary("job.toml", extract={"a/d": Typed(), "b/d": {"extracted": 5}},
                         train={"h": {"reused": True, "metrics": {"test_accuracy": None}}})
    summary.no_accuracy["h"] = "no evaluation rows: why"
    summary.error_rates["a/d"] = ErrorRate(errors=1, images=4)
    out = summary.to_json()
    assert list(out) == RUN_KEYS and out["job"] == "job.toml"
    assert out["extract"] == {"a/d": {"extracted": 0}, "b/d": {"extracted": 5}}
    assert out["train"]["h"]["no_accuracy"] == "no evaluation rows: why"
    assert out["error_rates"]["a/d"] == {"errors": 1, "images": 4, "rate": 0.25}
    assert out["model_work"] is True  # b/d extracted 5 images
    assert RunSummary("j", train={"h": {"reused": True}}).model_work is False


def test_run_summary_gives_each_timed_stage_its_items_per_second(tmp_path, capsys):
    from imgfeat.cli.report_lines import print_run_summary
    from imgfeat.core.workspace import Workspace

    summary = RunSummary("j", extract={"a/d": {"extracted": 30}, "b/d": {"extracted": 10}},
                         predict={"h/d": {"written": 0}}, train={"h": {"reused": False}},
                         timings={"extract": 4.0, "predict": 1.0, "train": 2.0})
    # extract: both featuresets over the stage's time; nothing predicted, and train has no items
    assert summary.items_per_s == {"extract": 10.0} == summary.to_json()["items_per_s"]
    print_run_summary(Workspace(tmp_path), RunSummary("j", predict={"h/d": {"written": 30}}, timings={"predict": 4.0}))
    assert capsys.readouterr().out.splitlines()[-1] == "speed    predict 7.5 rows/s"


def test_the_adapter_reads_attributes_and_keys_alike():
    @dataclasses.dataclass
    class Typed:
        head_id: str

        def to_json(self):
            return {"head_id": self.head_id}

    assert stage_value(Typed("h1"), "head_id") == stage_value({"head_id": "h1"}, "head_id") == "h1"
    assert stage_json(Typed("h1")) == stage_json({"head_id": "h1"}) == {"head_id": "h1"}
    assert ErrorRate(0, 0).rate == 0.0
