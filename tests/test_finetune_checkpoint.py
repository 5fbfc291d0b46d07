"""Fine-tune checkpoints: a damaged or foreign checkpoint is lost progress (one warning, a fresh start), never a crash."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from tiny_images import write_noise_images

from imgfeat.core.workspace import Workspace
from imgfeat.scan.scan import ScanConfig, run_scan

BACKBONE, SIZE = "mobilenet_v2", 32


def _config(**kw):
    from imgfeat.finetune import FinetuneConfig

    base = dict(
        dataset="d",
        backbone=BACKBONE,
        weights="none",
        input_size=SIZE,
        epochs=1,
        warmup_epochs=1,
        batch_size=4,
        augment=(),
        patience=5,
        workers=1,
    )
    return FinetuneConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def finished(tmp_path_factory, keras_home):
    """A finished two-epoch fine-tune of 18 tiny PNGs: its checkpoint holds both epochs."""
    from imgfeat.finetune import run_finetune

    base = tmp_path_factory.mktemp("ckpt")
    write_noise_images(base / "imgs", 18, size=(32, 32), fmt="PNG", classes=("a", "b"))
    ws = Workspace(base / "ws")
    run_scan(ws, ScanConfig(root=base / "imgs", dataset="d"), "scan")
    s = run_finetune(ws, _config(), "ft")
    assert s.epochs_run == 2 and s.resumed_from_epoch == 0
    return ws, s.finetune_id


@pytest.fixture
def unfinished(finished, tmp_path):
    """A copy whose fine-tune is not done yet (finetune.json gone): the rerun resumes from the checkpoint."""
    from imgfeat.finetune.train import META_FILE, finetune_dir

    ws, fid = finished
    copy = Workspace(tmp_path / "ws")
    shutil.copytree(ws.root, copy.root)
    (finetune_dir(copy, fid) / META_FILE).unlink()
    return copy, finetune_dir(copy, fid) / "checkpoint"


def _state(ckpt) -> dict:
    return json.loads((ckpt / "checkpoint.json").read_text())


def _edit_state(ckpt, **changes) -> None:
    (ckpt / "checkpoint.json").write_text(json.dumps({**_state(ckpt), **changes}))


def _foreign_weights(ckpt) -> None:
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.save_weights(str(ckpt / "other.weights.h5"))
    (ckpt / "other.weights.h5").replace(ckpt / "checkpoint.weights.h5")


def _warnings(caplog) -> list[str]:
    """Our warnings (TensorFlow's retracing notes are not about the checkpoint)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("imgfeat")]


def _cut(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# damage -> (what it does to the checkpoint folder, words the warning holds)
DAMAGE = {
    "truncated state": (lambda c: _cut(c / "checkpoint.json"), "cannot read"),
    "empty state": (lambda c: (c / "checkpoint.json").write_text(""), "cannot read"),
    "state is a folder": (
        lambda c: ((c / "checkpoint.json").unlink(), (c / "checkpoint.json").mkdir()),
        "expected a JSON object",
    ),
    "truncated weights": (lambda c: _cut(c / "checkpoint.weights.h5"), "cannot load"),
    "weights not HDF5": (lambda c: (c / "checkpoint.weights.h5").write_bytes(b"garbage" * 100), "cannot load"),
    "weights of another model": (_foreign_weights, "cannot load"),
    "epoch 999 of 2": (lambda c: _edit_state(c, epoch=999), "epoch 999 is not one of this run's epochs 1-2"),
    "another run's id": (lambda c: _edit_state(c, finetune_id="d-mobilenet_v2-00000000"), "another run"),
    "other parameters": (lambda c: _edit_state(c, params={**_state(c)["params"], "learning_rate": 0.5}), "another run"),
}


@pytest.fixture(scope="module")
def session(finished):
    """The fine-tune's Session, built once: each test points it at its own copy of the checkpoint."""
    from imgfeat.backbones import get_backbone
    from imgfeat.finetune.data import read_rows
    from imgfeat.finetune.loop import Session
    from imgfeat.finetune.train import finetune_dir

    ws, fid = finished
    cfg = _config()
    rows = read_rows(ws, "d", cfg.test_fraction, cfg.val_fraction, cfg.random_state)
    return Session(ws, cfg, get_backbone(BACKBONE), SIZE, rows, finetune_dir(ws, fid), fid)


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_or_foreign_checkpoint_is_dropped_with_one_warning(finished, session, tmp_path, caplog, damage):
    import numpy as np

    from imgfeat.finetune.train import finetune_dir

    ws, fid = finished
    session.ckpt = tmp_path / "checkpoint"
    shutil.copytree(finetune_dir(ws, fid) / "checkpoint", session.ckpt)
    spoil, words = DAMAGE[damage]
    spoil(session.ckpt)
    before = session.model.get_weights()
    caplog.set_level(logging.INFO, logger="imgfeat")
    assert session.resume() == 0
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "checkpoint" in warnings[0] and words in warnings[0], warnings
    assert not session.ckpt.exists()  # the next epoch writes a sound one; no stale best.weights.h5 is left
    assert all(np.array_equal(a, b) for a, b in zip(before, session.model.get_weights()))  # nothing half-loaded


def test_a_checkpoint_claiming_epoch_999_of_2_starts_the_run_fresh(unfinished, caplog):
    from imgfeat.finetune import run_finetune

    ws, ckpt = unfinished
    _edit_state(ckpt, epoch=999)
    caplog.set_level(logging.INFO, logger="imgfeat")
    s = run_finetune(ws, _config(), "again")
    assert s.resumed_from_epoch == 0 and s.epochs_run == 2  # every epoch run again, from the start
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "epoch 999 is not one of this run's epochs 1-2" in warnings[0]
    assert "resuming" not in caplog.text and _state(ckpt)["epoch"] == 2  # a sound checkpoint again
    from imgfeat.finetune.train import checkpoint_problem

    assert checkpoint_problem(_state(ckpt), {}, 2) is None


def test_an_intact_checkpoint_still_resumes(unfinished, caplog):
    from imgfeat.finetune import run_finetune

    ws, _ = unfinished
    caplog.set_level(logging.INFO, logger="imgfeat")
    s = run_finetune(ws, _config(), "again")
    assert s.resumed_from_epoch == 2 and s.epochs_run == 2
    assert "resuming from the checkpoint after epoch 2 of 2" in caplog.text
    assert not _warnings(caplog)


def test_damaged_best_weights_restart_the_best_epoch_tracking(unfinished, caplog):
    from imgfeat.finetune import run_finetune

    ws, ckpt = unfinished
    _cut(ckpt / "best.weights.h5")
    caplog.set_level(logging.INFO, logger="imgfeat")
    s = run_finetune(ws, _config(), "again")
    assert s.resumed_from_epoch == 2  # the epochs are kept; only the best-so-far weights are not trusted
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "best.weights.h5" in warnings[0]


GOOD = {
    "finetune_id": "f",
    "params": {"epochs": 1},
    "epoch": 2,
    "history": {"loss": [0.5, 0.4]},
    "seconds_per_epoch": [1.0, 1.2],
    "best_val_loss": 0.3,
    "bad_epochs": 0,
    "best_epoch": 2,
    "skipped": [],
    "warm_metrics": None,
    "stopped": False,
}


@pytest.mark.quick
@pytest.mark.parametrize(
    "change,message",
    [
        ({"epoch": 999}, "epoch 999 is not one of this run's epochs 1-2"),
        ({"epoch": 0}, "epoch 0 is not"),
        ({"epoch": -1}, "epoch -1 is not"),
        ({"epoch": "2"}, "epoch '2' is not"),
        ({"epoch": True}, "epoch True is not"),
        ({"finetune_id": "g"}, "another run (finetune_id 'g'"),
        ({"params": {"epochs": 9}}, "another run (params"),
        ({"history": {"loss": [0.5]}}, "history does not hold 2 epochs"),
        ({"history": {"loss": ["a", "b"]}}, "history does not hold 2 epochs"),
        ({"seconds_per_epoch": None}, "history does not hold 2 epochs"),
        ({"best_epoch": 3}, "best-epoch tracking"),
        ({"bad_epochs": -1}, "best-epoch tracking"),
        ({"best_val_loss": "low"}, "best-epoch tracking"),
        ({"skipped": [1]}, "skipped images"),
        ({"warm_metrics": 5}, "skipped images"),
        ({"stopped": "no"}, "stop flag"),
    ],
)
def test_checkpoint_problem_names_what_does_not_fit_the_run(change, message):
    from imgfeat.finetune.train import checkpoint_problem

    identity = {"finetune_id": "f", "params": {"epochs": 1}}
    assert checkpoint_problem(GOOD, identity, 2) is None
    assert message in checkpoint_problem({**GOOD, **change}, identity, 2)
    assert "expected a JSON object" in checkpoint_problem([GOOD], identity, 2)
