"""`imgfeat run` on heads without evaluation rows: exit 0, and say why there is no accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_images import write_noise_images

from imgfeat.cli.main import main
from imgfeat.cli.report_lines import print_run_summary
from imgfeat.core.workspace import Workspace
from imgfeat.heads.train import TrainSummary
from imgfeat.run.summary import RunSummary

# 'flat' has no split folders and its head holds out nothing (test_fraction 0); 'split' has a
# test folder whose only class never appears in train, so no row can be scored. (Two recipes,
# one per dataset; one recipe over two datasets in one run is tests/test_shard_tags.py's case.)
JOB = """
[datasets.flat]
root = "flat"

[datasets.split]
root = "split"

[features.avg]
datasets = ["flat"]
backbone = "efficientnet_lite0"
weights = "none"
input_size = 32

[features.max]
datasets = ["split"]
backbone = "efficientnet_lite0"
weights = "none"
input_size = 32
pooling = "max"

[heads.flat-logreg]
dataset = "flat"
features = "avg"
test_fraction = 0.0
cv = 2

[heads.split-logreg]
dataset = "split"
features = "max"
cv = 2
"""


@pytest.fixture
def job(tmp_path) -> Path:
    write_noise_images(tmp_path / "flat", 8, classes=("cat", "dog"))
    write_noise_images(tmp_path / "split" / "train", 8, seed=100, classes=("cat", "dog"))
    write_noise_images(tmp_path / "split" / "test", 2, seed=200, classes=("bird",))
    path = tmp_path / "job.toml"
    path.write_text(JOB)
    return path


@pytest.mark.slow
def test_heads_without_evaluation_rows_exit_0_and_say_why(ws, job, capsys):
    code = main(["run", str(job), "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert code == 0, summary.get("error")
    flat, split = summary["train"]["flat-logreg"], summary["train"]["split-logreg"]
    assert flat["metrics"]["test_accuracy"] is None and split["metrics"]["test_accuracy"] is None
    assert "test_fraction is 0" in flat["no_accuracy"]
    assert "labels the training rows do not have" in split["no_accuracy"]
    assert len(summary["predict"]) == 2 and all(p["written"] for p in summary["predict"].values())

    code = main(["run", str(job)])  # the text summary: same run again, heads reused
    text = capsys.readouterr().out
    assert code == 0
    assert "flat-logreg" in text and "no test accuracy: no evaluation rows" in text


def train_summary(accuracy, unseen: int = 0) -> TrainSummary:
    return TrainSummary(
        head_id="d-logreg-00000000",
        name="h",
        reused=False,
        head="logreg",
        model_kind="sklearn",
        dataset="d",
        featureset="fs",
        classes=["a", "b"],
        metrics={"test_accuracy": accuracy},
        chosen=None,
        n_train=4,
        n_test=0,
        eval_split=None,
        left_out={"unseen_test_labels": unseen},
    )


@pytest.mark.quick
@pytest.mark.parametrize(
    "entry, words",
    [
        (train_summary(0.5), "test accuracy 50.0% -> "),
        (
            train_summary(None),
            "no test accuracy: no evaluation rows: the dataset has no test or val split and test_fraction is 0",
        ),
        (train_summary(None, unseen=3), "no test accuracy: no evaluation rows: the 3 test rows all have labels"),
    ],
)
def test_the_text_and_json_summaries_give_an_accuracy_or_why_there_is_none(entry, words, capsys, tmp_path):
    from imgfeat.run.run import no_accuracy_reason

    summary = RunSummary("job.toml", train={"h": entry})
    reason = no_accuracy_reason(entry)
    if reason:
        summary.no_accuracy["h"] = reason
    print_run_summary(Workspace(tmp_path), summary)
    assert words in capsys.readouterr().out
    assert summary.to_json()["train"]["h"].get("no_accuracy") == reason
