"""The finetune stage on a small generated set: artifacts, safe_mode, BN frozen, tuned weights in extract, reuse, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgfeat.cli.main import main
from imgfeat.core.workspace import Workspace
from imgfeat.scan.scan import ScanConfig, run_scan

BACKBONE, SIZE = "efficientnet_lite0", 32  # Lite0's random init gives features with signal


def colour_image(seed: int, channel: int, size: int = 40) -> Image.Image:
    """Noise with one colour channel lifted: 'red' and 'blue' are learnable, no two images alike."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
    a[..., channel] += 120
    return Image.fromarray(a)


def make_set(root: Path, per_class: dict[str, int], classes=(("red", 0), ("blue", 2))) -> None:
    seed = 0
    for split, n in per_class.items():
        for label, channel in classes:
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed += 1
                colour_image(seed, channel).save(folder / f"{i}.png")


def ft_config(**kw):
    from imgfeat.finetune import FinetuneConfig

    base = dict(
        dataset="d", backbone=BACKBONE, weights="none", input_size=SIZE, epochs=1, warmup_epochs=1, batch_size=4
    )
    return FinetuneConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One fine-tune of a 2-class set; one training image is replaced by garbage after the scan."""
    from imgfeat.finetune import run_finetune

    base = tmp_path_factory.mktemp("finetune")
    make_set(base / "imgs", {"train": 10, "test": 4})
    ws = Workspace(base / "ws")
    run_scan(ws, ScanConfig(root=base / "imgs", dataset="d"), "scan1")
    (base / "imgs" / "train" / "red" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    return ws, run_finetune(ws, ft_config(), "ft1")


def test_summary_and_artifacts(tuned):
    from imgfeat.finetune.train import read_meta

    ws, s = tuned
    out = Path(s.dir)
    assert not s.reused and s.epochs_run == 2 and s.resumed_from_epoch == 0
    assert (s.n_train + s.n_val, s.n_test, s.skipped_images) == (20, 8, 1)
    assert 0.0 <= s.metrics["test_accuracy"] <= 1.0 and s.metrics["warm_start_test_accuracy"] is not None
    for name in ("model.keras", "backbone.weights.h5", "finetune.json", "curves.png"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob("*.tmp")) and not list(out.glob(".scratch-*"))
    meta = read_meta(ws, s.finetune_id)
    assert meta["unfreeze_from_layer"] == "block6d_expand_conv"  # the default: the top 2 blocks
    assert "top_conv" in meta["unfrozen_layers"] and not any(n.endswith("_bn") for n in meta["unfrozen_layers"])
    assert len(meta["history"]["loss"]) == 2 and meta["skipped"][0].endswith("train/red/3.png")
    assert json.loads(json.dumps(s.to_json()))["weights"] == str(out / "backbone.weights.h5")


def test_model_loads_in_safe_mode_and_scores_as_reported(tuned):
    import subprocess
    import sys

    from imgfeat.extract.decode import DecodeConfig
    from imgfeat.finetune.data import ImageBatches, read_rows
    from imgfeat.finetune.model import load_finetuned_model

    ws, s = tuned
    model = load_finetuned_model(s.model)
    rows = read_rows(ws, "d", 0.2, 0.15, 0)
    data = ImageBatches(rows.test, DecodeConfig(size=(SIZE, SIZE)), 4, False, 0, fill=False)
    pred = np.concatenate([np.argmax(model.predict_on_batch(data[i][0]), 1) for i in range(len(data))])
    assert np.mean(pred == rows.test.y) == pytest.approx(s.metrics["test_accuracy"])
    # In a fresh process too, where nothing of ours was imported before the load.
    code = (
        "from imgfeat.finetune.model import load_finetuned_model as load; import sys; "
        "print(load(sys.argv[1]).output_shape)"
    )
    out = subprocess.run([sys.executable, "-c", code, s.model], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("(None, 2)"), out.stderr[-2000:]


def test_batchnorm_and_lower_layers_keep_the_base_weights(tuned):
    from imgfeat.backbones import build_model, get_backbone

    _, s = tuned
    spec = get_backbone(BACKBONE)
    base = build_model(spec, weights="none", input_size=SIZE)
    tuned_model = build_model(spec, weights=s.weights, input_size=SIZE)
    start = [lyr.name for lyr in base.layers].index("block6d_expand_conv")
    changed = []
    for i, (a, b) in enumerate(zip(base.layers, tuned_model.layers)):
        same = all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a.weights, b.weights))
        if i < start or type(a).__name__ == "BatchNormalization":
            assert same, a.name
        elif a.weights and not same:
            changed.append(a.name)
    assert "top_conv" in changed and "block7a_project_conv" in changed


def test_tuned_weights_make_a_different_featureset(tuned):
    from imgfeat.extract.extract import ExtractConfig, run_extract
    from imgfeat.extract.featureset import load_features

    ws, s = tuned
    runs = {
        w: run_extract(
            ws,
            ExtractConfig(dataset="d", backbone=BACKBONE, weights=w, input_size=SIZE, batch_size=8, workers=1),
            f"x-{i}",
        )
        for i, w in enumerate(("none", s.weights))
    }
    names = [r.featureset for r in runs.values()]
    assert names[0] != names[1]
    (ids0, X0), (ids1, X1) = (load_features(ws, n) for n in names)
    assert list(ids0) == list(ids1) and len(ids0) >= 20
    assert np.std(X0, axis=0).mean() > 1e-3 and np.std(X1, axis=0).mean() > 1e-3  # features carry signal
    assert np.abs(X0.astype(np.float32) - X1.astype(np.float32)).mean() > 1e-3


def test_same_configuration_on_same_data_is_reused(tuned):
    from imgfeat.finetune import run_finetune

    ws, s = tuned
    again = run_finetune(ws, ft_config(), "ft2")
    assert again.reused and again.finetune_id == s.finetune_id and again.weights_sha256 == s.weights_sha256
    from imgfeat.finetune.train import make_finetune_id

    # A changed parameter is a new fine-tune; decode threads or a wait are not parameters.
    assert make_finetune_id(ft_config(workers=1, wait=5), "b", "d") == make_finetune_id(ft_config(), "b", "d")
    assert make_finetune_id(ft_config(learning_rate=1e-3), "b", "d") != make_finetune_id(ft_config(), "b", "d")


def test_cli_json_summary(tuned, capsys):
    ws, s = tuned
    code = main(
        [
            "finetune",
            "--workspace",
            str(ws.root),
            "--dataset",
            "d",
            "--backbone",
            BACKBONE,
            "--weights",
            "none",
            "--input-size",
            str(SIZE),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["name"] == s.name and out["weights"] == s.weights and out["reused"] is True
    assert out["metrics"]["test_accuracy"] == s.metrics["test_accuracy"]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--backbone", "inception_v3"], "has no named blocks"),
        (["--backbone", BACKBONE, "--unfreeze-blocks", "99"], "has 16 blocks"),
        (["--backbone", BACKBONE, "--augment", "flip,blur"], "unknown augmentation 'blur'"),
        (["--backbone", "resnet5"], "did you mean 'resnet50'"),
    ],
)
def test_bad_flags_exit_2_and_write_nothing(tuned, capsys, flags, message):
    ws, _ = tuned
    before = sorted(p.name for p in (ws.root / "finetune").iterdir())
    argv = [
        "finetune",
        "--workspace",
        str(ws.root),
        "--dataset",
        "d",
        "--weights",
        "none",
        "--input-size",
        str(SIZE),
        *flags,
    ]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse rejects a bad --augment itself
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in (ws.root / "finetune").iterdir()) == before


def test_one_class_dataset_is_a_clear_error(ws, tmp_path, capsys):
    make_set(tmp_path / "one", {"train": 4}, classes=(("red", 0),))
    run_scan(ws, ScanConfig(root=tmp_path / "one", dataset="one"), "scan1")
    code = main(
        ["finetune", "--dataset", "one", "--backbone", BACKBONE, "--weights", "none", "--input-size", str(SIZE)]
    )
    assert code == 2 and "one class only" in capsys.readouterr().err
    assert not (ws.root / "finetune").exists()


@pytest.mark.slow
def test_killed_finetune_resumes_from_its_last_checkpoint(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from imgfeat.finetune import run_finetune

    make_set(tmp_path / "imgs", {"train": 12, "test": 2})
    ws = Workspace(tmp_path / "ws")
    run_scan(ws, ScanConfig(root=tmp_path / "imgs", dataset="d"), "scan1")
    cfg = ft_config(epochs=2, patience=10)
    argv = [
        sys.executable,
        "-m",
        "imgfeat",
        "finetune",
        "--workspace",
        str(ws.root),
        "--dataset",
        "d",
        "--backbone",
        BACKBONE,
        "--weights",
        "none",
        "--input-size",
        str(SIZE),
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--patience",
        "10",
    ]
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    )
    deadline = time.monotonic() + 300
    try:
        while not list((ws.root / "finetune").glob("*/checkpoint/checkpoint.json")):
            assert proc.poll() is None, "the fine-tune ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    (state_file,) = (ws.root / "finetune").glob("*/checkpoint/checkpoint.json")
    state = json.loads(state_file.read_text())
    done = state["epoch"]
    assert 1 <= done < cfg.total_epochs and not (state_file.parent.parent / "finetune.json").exists()
    s = run_finetune(ws, cfg, "resume")
    assert s.resumed_from_epoch == done and s.epochs_run == cfg.total_epochs
    from imgfeat.finetune.train import read_meta

    history = read_meta(ws, s.finetune_id)["history"]["loss"]
    assert history[:done] == state["history"]["loss"]  # the killed run's epochs are kept, not redone


def test_warm_start_from_a_logreg_head_on_the_same_recipe(tuned):
    from imgfeat.core.errors import ConfigError
    from imgfeat.extract.extract import ExtractConfig, run_extract
    from imgfeat.finetune import run_finetune
    from imgfeat.heads import TrainConfig, run_train

    ws, s = tuned

    def logreg_on(weights: str, run_id: str) -> dict:
        fs = run_extract(
            ws,
            ExtractConfig(dataset="d", backbone=BACKBONE, weights=weights, input_size=SIZE, batch_size=8, workers=1),
            run_id,
        ).featureset
        return run_train(ws, TrainConfig(dataset="d", featureset=fs, head="logreg", cv=2), run_id)

    head = logreg_on("none", "w1")
    warm = run_finetune(ws, ft_config(warm_start_head=head.head_id, warmup_epochs=0), "ft-warm")
    # Before any training the model is the logreg head on the frozen backbone: the same test accuracy.
    assert warm.metrics["warm_start_test_accuracy"] == head.metrics["test_accuracy"]
    assert warm.finetune_id != s.finetune_id
    # A head's name (its latest version) and NAME@ID work like everywhere else: the same fine-tune.
    pinned = f"{head.name}@{head.head_id.rsplit('-', 1)[1]}"
    for ref in (head.name, pinned):
        again = run_finetune(ws, ft_config(warm_start_head=ref, warmup_epochs=0), f"ft-{ref}")
        assert again.reused and again.finetune_id == warm.finetune_id
    other = logreg_on(s.weights, "w2")  # a head on the tuned features: another recipe, now the name's latest
    assert other.name == head.name
    for ref in (other.head_id, head.name):
        with pytest.raises(ConfigError, match="recipe differs: weights"):
            run_finetune(ws, ft_config(warm_start_head=ref, warmup_epochs=0), "ft-bad")
    assert run_finetune(ws, ft_config(warm_start_head=pinned, warmup_epochs=0), "ft-pin").reused
    with pytest.raises(ConfigError, match=f"did you mean '{head.name}'"):
        run_finetune(ws, ft_config(warm_start_head=head.name + "x", warmup_epochs=0), "ft-typo")


def test_warm_start_by_name_from_the_cli(tuned, capsys):
    from imgfeat.extract.extract import ExtractConfig, run_extract
    from imgfeat.finetune.train import read_meta
    from imgfeat.heads import TrainConfig, run_train

    ws, _ = tuned
    fs = run_extract(
        ws,
        ExtractConfig(dataset="d", backbone=BACKBONE, weights="none", input_size=SIZE, batch_size=8, workers=1),
        "cli-x",
    ).featureset
    head = run_train(ws, TrainConfig(dataset="d", featureset=fs, head="logreg", cv=2, name="warm"), "cli-t")
    argv = [
        "finetune",
        "--workspace",
        str(ws.root),
        "--dataset",
        "d",
        "--backbone",
        BACKBONE,
        "--weights",
        "none",
        "--input-size",
        str(SIZE),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--warmup-epochs",
        "0",
        "--warm-start",
        "warm",
        "--json",
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert read_meta(ws, out["finetune_id"])["params"]["warm_start_head"] == head.head_id
