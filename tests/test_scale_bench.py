"""benchmarks/scale.py: its synthetic featureset, its growth ratios, and one tiny end-to-end run of every stage."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


def _scale():
    spec = importlib.util.spec_from_file_location("scale_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.quick
def test_synthetic_featureset_is_readable_labelled_and_never_a_real_backbone(tmp_path):
    import imgfeat
    from imgfeat.backbones.registry import by_name
    from imgfeat.core.workspace import Workspace
    from imgfeat.extract.featureset import read_provenance
    from imgfeat.scan.manifest import read_manifest

    scale = _scale()
    fs = scale.write_synthetic(tmp_path, 300, dim=16, classes=3, seed=0, dtype="float16", shard_rows=64)
    ws = Workspace(tmp_path)
    assert fs.startswith("synthetic-gaussian-")
    assert read_provenance(ws, fs).recipe.backbone == "synthetic-gaussian" not in by_name()
    ids, X = imgfeat.Featureset(fs, workspace=str(tmp_path)).to_numpy()
    manifest = read_manifest(ws, "scale").to_pandas()
    assert len(ids) == len(set(ids)) == 300 and sorted(ids) == sorted(manifest.image_id)
    assert set(manifest.label) == {"class00", "class01", "class02"}
    assert 0.1 < (manifest.split == "test").mean() < 0.3
    # the classes carry signal: each vector is nearer its own class's mean than the others'
    labels = manifest.set_index("image_id").loc[list(ids), "label"].to_numpy()
    X = X.astype(np.float32)
    means = np.stack([X[labels == c].mean(0) for c in sorted(set(labels))])
    nearest = np.argmin(((X[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (np.array(sorted(set(labels)))[nearest] == labels).mean() > 0.6


@pytest.mark.quick
def test_ratios_compare_each_n_with_the_previous_successful_one():
    scale = _scale()
    Row = scale.Row
    rows = [
        Row("images", "train", 100, 0, 10.0, 10.0, 200.0),
        Row("images", "train", 1000, 0, 50.0, 20.0, 300.0),
        Row("images", "train", 10000, 1, 1.0, 1.0, 100.0),
        Row("images", "scan", 100, 0, 1.0, 100.0, 50.0),
    ]
    scale.add_ratios(rows)
    assert rows[0].per_item_ratio is None and rows[3].per_item_ratio is None
    assert rows[1].per_item_ratio == pytest.approx(0.5) and rows[1].rss_ratio == pytest.approx(1.5)
    assert rows[2].per_item_ratio is None  # a failed run is not a figure


@pytest.mark.slow
def test_tiny_run_measures_every_stage_at_every_size(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--sizes",
            "30,60",
            "--feature-sizes",
            "60,120",
            "--out",
            str(out),
            "--images-dir",
            str(tmp_path / "images"),
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "scale.json").read_text())["rows"]
    got = {(r["source"], r["stage"], r["n"]) for r in rows}
    stages = ("scan", "extract", "train", "predict", "index", "dedup", "report")
    assert got >= {("images", s, n) for s in stages for n in (30, 60)}
    assert got >= {("synthetic", s, n) for s in stages[2:] for n in (60, 120)}
    for r in rows:
        assert r["rc"] == 0 and r["wall_s"] > 0 and r["peak_rss_mib"] > 10
        assert r["items_per_s"] == pytest.approx(r["n"] / r["wall_s"], rel=0.01)
        if (r["source"], r["n"]) in {("images", 60), ("synthetic", 120)}:
            # each later size has its growth from the one before, finite and positive
            assert math.isfinite(r["per_item_ratio"]) and r["per_item_ratio"] > 0 and r["rss_ratio"] > 0
    extract = next(r for r in rows if r["stage"] == "extract" and r["n"] == 60)
    assert extract["summary"]["extracted"] == 60  # every generated image is a real, decodable JPEG
    with open(out / "scale.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (out / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(stage in proc.stdout for stage in stages)  # the printed table
