"""`imgfeat run` end to end: first run, no-op rerun, growth, dry run, exit 3, concurrent runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from imgfeat.cli.main import main
from imgfeat.core import schemas as S
from imgfeat.core.storage import FileLock
from imgfeat.scan.scan import ScanConfig, run_scan
from imgfeat.tools.samples import PhotoSetSpec, make_photo_set

pytestmark = pytest.mark.slow

CLASSES = (("cat", "chelsea"), ("coffee", "coffee"), ("rocket", "rocket"))
# Real (pip-shipped ImageNet) weights at a small input size: fast, and features that mean something.
JOB = """
[datasets.photos]
root = "images"

[features.tiny]
backbone = "efficientnet_lite0"
weights = "imagenet"
input_size = 64
batch_size = 16
shard_size = 16

[heads.photos-logreg]
dataset = "photos"
features = "tiny"
head = "logreg"
cv = 2
"""


@pytest.fixture
def job(tmp_path, keras_home) -> Path:  # keras_home: Lite weights convert into a private cache
    make_photo_set(tmp_path / "images", PhotoSetSpec(classes=CLASSES, per_class=12, min_side=64, max_side=96))
    path = tmp_path / "job.toml"
    path.write_text(JOB)
    return path


def run(job: Path, *flags: str, capsys) -> tuple[int, dict]:
    code = main(["run", str(job), "--json", *flags])
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1])


def feature_ids(ws, summary) -> list[str]:
    (ex,) = summary["extract"].values()
    folder = ws.featureset_dir(ex["featureset"])
    return [i for p in sorted(folder.glob("part-*.parquet")) for i in pq.read_table(p)[S.IMAGE_ID].to_pylist()]


def test_first_run_rerun_and_growth(ws, job, capsys):
    code, first = run(job, capsys=capsys)
    assert code == 0, first.get("error")
    (ex,) = first["extract"].values()
    assert ex["extracted"] == 36 and first["model_work"]
    (tr,) = first["train"].values()
    assert tr["metrics"]["test_accuracy"] >= 0.0 and not tr["reused"]
    (pr,) = first["predict"].values()
    assert pr["written"] == 36
    (rep,) = first["report"].values()
    assert Path(rep["report"]).is_file()

    # Nothing changed: no model work at all (the model is not even built), same head reused.
    code, again = run(job, capsys=capsys)
    assert code == 0
    (ex2,) = again["extract"].values()
    assert ex2["extracted"] == 0 and ex2["model_built"] is False
    assert again["model_work"] is False
    (tr2,) = again["train"].values()
    assert tr2["reused"] and tr2["head_id"] == tr["head_id"]
    assert list(again["predict"].values())[0]["written"] == 0

    # Add 5 images, remove 2: exactly the 5 new ones are extracted.
    images = job.parent / "images"
    extra = make_photo_set(
        job.parent / "extra",
        PhotoSetSpec(classes=CLASSES[:1], per_class=5, seed=7, min_side=64, max_side=96, test_fraction=0.0),
    )
    for p in extra:
        shutil.copy(p, images / "train" / "cat" / f"new_{p.name}")
    removed = sorted((images / "train" / "rocket").iterdir())[:2]
    for p in removed:
        p.unlink()
    code, grown = run(job, capsys=capsys)
    assert code == 0
    (scan,) = grown["scan"].values()
    assert (scan["added"], scan["removed"]) == (5, 2)
    (ex3,) = grown["extract"].values()
    assert ex3["extracted"] == 5
    ids = feature_ids(ws, grown)
    assert len(ids) == len(set(ids)) == 41  # the cache keeps removed images' features; no duplicates
    (tr3,) = grown["train"].values()
    assert tr3["head_id"] != tr["head_id"] and not tr3["reused"]  # new training data, new head
    # The job file's names find the latest versions; NAME@ID still finds the first head.
    from imgfeat.heads.versions import resolve_featureset, resolve_head

    assert tr3["name"] == "photos-logreg" and resolve_head(ws, "photos-logreg") == tr3["head_id"]
    assert resolve_head(ws, f"photos-logreg@{tr['head_id']}") == tr["head_id"]
    assert resolve_featureset(ws, "tiny") == ex3["featureset"]


def files_outside_runs(ws) -> dict[str, tuple[int, bytes]]:
    """Every file a run leaves, but run records and lock files (a lock names its last holder)."""
    return {
        str(p.relative_to(ws.root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(ws.root.rglob("*"))
        if p.is_file() and p.relative_to(ws.root).parts[0] not in ("runs", ".locks")
    }


# After the CLI's run: which libraries only model work needs did it import?
HEAVY_PROBE = """
import sys
from imgfeat.cli.main import main
code = main(sys.argv[1:])
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy', 'tensorflow', 'keras', 'matplotlib', 'skops'})
print('HEAVY', ','.join(heavy))
raise SystemExit(code)
"""


def test_a_rerun_with_nothing_new_writes_nothing_and_loads_no_model_library(ws, job, capsys):
    code, first = run(job, capsys=capsys)
    assert code == 0, first.get("error")
    before = files_outside_runs(ws)
    assert any(k.startswith("reports/") for k in before) and any(k.startswith("names/") for k in before)

    env = {**os.environ, "IMGFEAT_WORKSPACE": str(ws.root)}
    proc = subprocess.run(
        [sys.executable, "-c", HEAVY_PROBE, "run", str(job), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert again["model_work"] is False and list(again["train"].values())[0]["reused"]
    assert list(again["report"].values())[0]["reused"] is True
    # No file changed: not the manifest, not names/*.json, not the report page (bytes and mtimes).
    after = files_outside_runs(ws)
    assert sorted(after) == sorted(before)
    assert [k for k in before if before[k] != after[k]] == []
    # What made a no-op run slow: scikit-learn (3 s with scipy), skops and matplotlib, Keras/TensorFlow.
    heavy = [ln for ln in proc.stdout.splitlines() if ln.startswith("HEAVY")][-1]
    assert heavy == "HEAVY ", heavy


def test_dry_run_does_nothing(ws, job, capsys):
    code, plan = run(job, "--dry-run", capsys=capsys)
    assert code == 0 and plan["dry_run"]
    assert plan["scan"]["photos"]["new"] == 36
    assert not ws.manifest_path("photos").exists()
    assert not (ws.root / "features").exists()
    # Without --json: a line per stage for people (it was a 56-line JSON document).
    assert main(["run", str(job), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert not any(ln.lstrip().startswith(("{", "}", '"')) for ln in lines) and len(lines) <= 6
    assert [ln.split()[0] for ln in lines[1:]] == ["scan", "extract", "train"]
    assert "36 new" in lines[1] and "photos-logreg" in lines[3]
    # A scanned dataset: the extract plan counts its todo rows (no model is built).
    run_scan(ws, ScanConfig(root=job.parent / "images", dataset="photos"), "scan-first")
    code, plan = run(job, "--dry-run", capsys=capsys)
    assert code == 0, plan.get("error")
    (ex,) = plan["extract"].values()
    assert ex["todo"] == 36 and ex["new_or_changed_files"] == 0
    assert not (ws.root / "features").exists()


def test_too_many_bad_images_exit_3_after_writing_everything(ws, job, capsys):
    bad = job.parent / "images" / "train" / "cat"
    for i in range(6):
        (bad / f"broken_{i}.jpg").write_bytes(b"this is not a jpeg" * (i + 1))
    (bad / "truncated.jpg").write_bytes((bad / "cat_0010.jpg").read_bytes()[:300])
    code, summary = run(job, "--max-error-rate", "0.1", capsys=capsys)
    assert code == 3
    assert "over --max-error-rate" in summary["error"]
    (rate,) = summary["error_rates"].values()
    assert rate["errors"] == 7 and rate["images"] == 43
    (pr,) = summary["predict"].values()
    assert pr["written"] == 36  # the run still finished every stage
    # the same job with a looser limit passes
    code, _ = run(job, "--max-error-rate", "0.2", capsys=capsys)
    assert code == 0


def test_a_held_stage_fails_fast_or_waits(ws, job, capsys):
    with FileLock(ws.locks_dir / "extract.lock", "test"):
        code, summary = run(job, capsys=capsys)
    assert code == 1
    assert "extract stage" in summary["error"] and "--wait" in summary["error"]
    code, summary = run(job, capsys=capsys)  # the failed run left nothing half-done
    assert code == 0 and list(summary["extract"].values())[0]["extracted"] == 36


def test_two_concurrent_runs_with_wait_both_finish_cleanly(ws, job):
    env = {**os.environ, "IMGFEAT_WORKSPACE": str(ws.root)}
    cmd = [sys.executable, "-m", "imgfeat", "run", str(job), "--json", "--wait", "300"]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    extracted = sorted(list(s["extract"].values())[0]["extracted"] for s in summaries)
    assert extracted == [0, 36]  # one did the work, the other found it done
    ids = feature_ids(ws, summaries[0])
    assert len(ids) == len(set(ids)) == 36
    head = list(summaries[0]["train"].values())[0]["head_id"]
    pred_ids = [
        i for p in ws.predictions_dir(head).glob("part-*.parquet") for i in pq.read_table(p)[S.IMAGE_ID].to_pylist()
    ]
    assert len(pred_ids) == len(set(pred_ids)) == 36
