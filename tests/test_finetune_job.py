"""[finetune.NAME] in job files: parsing and checks, and `imgfeat run` chaining finetune -> extract -> train -> predict."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from imgfeat.core.errors import ConfigError
from imgfeat.run.jobfile import parse_job

JOB = """
[datasets.d]
root = "imgs"

[finetune.ft]
dataset = "d"
backbone = "efficientnet_lite0"
weights = "none"
input_size = 32
epochs = 1
batch_size = 4
augment = ["flip"]

[features.tuned]
finetune = "ft"
batch_size = 8

[heads.h]
dataset = "d"
features = "tuned"
head = "logreg"
cv = 2
report = false
"""


def parse(text: str):
    return parse_job(tomllib.loads(text), base=Path("/tmp"), source="job.toml", workspace=None)


@pytest.mark.quick
def test_finetune_section_is_parsed_and_features_point_at_it():
    job = parse(JOB)
    (ft,) = job.finetunes
    assert (ft.name, ft.dataset, ft.options["epochs"]) == ("ft", "d", 1)
    (fjob,) = job.features
    assert fjob.finetune == "ft" and "finetune" not in fjob.options


@pytest.mark.quick
@pytest.mark.parametrize(
    "edit,message",
    [
        (('finetune = "ft"', 'finetune = "nope"'), "names finetune 'nope'"),
        (('dataset = "d"\nbackbone', "backbone"), r"\[finetune.ft\] needs 'dataset = ...'"),
        (('dataset = "d"\nbackbone', 'dataset = "e"\nbackbone'), "names dataset 'e'"),
        (('finetune = "ft"', "finetune = 3"), "features.tuned.finetune = 3: expected a string"),
    ],
)
def test_bad_finetune_sections_are_clear_errors(edit, message):
    with pytest.raises(ConfigError, match=message):
        parse(JOB.replace(*edit, 1))


@pytest.mark.quick
@pytest.mark.parametrize(
    "edit,message",
    [
        (("epochs = 1", 'epochs = "1"'), 'finetune.ft.epochs = "1": expected an integer'),
        (("epochs = 1", "epoch = 1"), r"\[finetune.ft\]: unknown key 'epoch'"),
        (('augment = ["flip"]', 'augment = ["blur"]'), "unknown augmentation 'blur'"),
    ],
)
def test_finetune_options_are_checked_before_any_work(edit, message):
    from imgfeat.run.run import check_job

    with pytest.raises(ConfigError, match=message):
        check_job(parse(JOB.replace(*edit, 1)))


@pytest.mark.slow
def test_run_chains_finetune_extract_train_predict(ws, tmp_path, capsys):
    from test_finetune import make_set

    from imgfeat.cli.main import main

    make_set(tmp_path / "imgs", {"train": 8, "test": 3})
    job = tmp_path / "job.toml"
    job.write_text(JOB)

    def run() -> dict:
        assert main(["run", str(job), "--json"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    first = run()
    ft = first["finetune"]["ft"]
    assert not ft["reused"] and Path(ft["weights"]).is_file()
    (ex,) = first["extract"].values()
    from imgfeat.extract.featureset import featureset_info

    assert ft["weights_sha256"] in json.dumps(featureset_info(ws, ex["featureset"]))  # the tuned file is the recipe
    assert ex["extracted"] == 22 and first["train"]["h"]["metrics"]["test_accuracy"] is not None
    assert "h/d" in first["predict"]
    second = run()
    assert second["finetune"]["ft"]["reused"] and not second["model_work"]


@pytest.mark.quick
def test_tensorboard_without_the_package_is_a_config_error(monkeypatch):
    import importlib.util

    from imgfeat.finetune import FinetuneConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        FinetuneConfig(dataset="d", backbone="efficientnet_lite0", tensorboard="tb")
    assert FinetuneConfig(dataset="d", backbone="efficientnet_lite0").tensorboard is None


def test_dry_run_lists_the_finetune_and_builds_nothing(ws, tmp_path, capsys):
    from imgfeat.cli.main import main

    (tmp_path / "imgs" / "train" / "a").mkdir(parents=True)
    job = tmp_path / "job.toml"
    job.write_text(JOB)
    assert main(["run", str(job), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["finetune"]["ft"]["dataset"] == "d" and "tuned weights" in plan["extract"]["tuned/d"]["note"]
    assert not (ws.root / "finetune").exists()
