"""Logs: JSON lines only with --log-format json, no TensorFlow/absl/CUDA noise, our line first."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from imgfeat.core.logs import JsonFormatter, _fatal, ensure_notebook_logging


@pytest.mark.quick
def test_json_formatter_makes_one_parseable_line():
    record = logging.LogRecord("imgfeat.x", logging.WARNING, __file__, 1, "a %s\nline", ("two",), None)
    obj = json.loads(JsonFormatter().format(record))
    assert obj["level"] == "warning" and obj["msg"] == "a two\nline" and obj["logger"] == "imgfeat.x"


@pytest.mark.quick
@pytest.mark.parametrize(
    "line,fatal",
    [
        ("E0000 00:00:1796012390.911461 8645 cuda_platform.cc:52] failed call to cuInit", False),
        ("I0000 00:00:1796012383.157810 8645 cudart_stub.cc:31] Could not find cuda drivers", False),
        ("F0000 00:00:1.0 1 x.cc:1] Check failed", True),
        ("Fatal Python error: Segmentation fault", True),
    ],
)
def test_only_fatal_native_lines_reach_the_user(line, fatal):
    assert _fatal(line) is fatal


@pytest.mark.quick
def test_a_notebook_without_logging_config_sees_our_lines(monkeypatch, capsys):
    root, ours = logging.getLogger(), logging.getLogger("imgfeat")
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(ours, "handlers", [])
    monkeypatch.setattr(ours, "propagate", True)
    monkeypatch.setattr(ours, "level", ours.level)
    ensure_notebook_logging()
    logging.getLogger("imgfeat.heads.train").info("training logreg head")
    assert "training logreg head" in capsys.readouterr().err
    ours.handlers.clear()


def test_a_run_that_builds_a_model_writes_only_json_to_stderr(tmp_path):
    """A real process: TensorFlow's C++ lines (cuInit, cudart_stub, absl) must not get through."""
    from PIL import Image

    from imgfeat.core.workspace import Workspace
    from imgfeat.scan.scan import ScanConfig, run_scan

    for k in range(3):
        (tmp_path / "img" / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 36), (k * 60, 90, 30)).save(tmp_path / "img" / "a" / f"{k}.jpg")
    ws = Workspace(tmp_path / "ws")
    run_scan(ws, ScanConfig(root=tmp_path / "img", dataset="toy"), "s1")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # the command's own default
    cmd = [
        sys.executable,
        "-m",
        "imgfeat",
        "extract",
        "--workspace",
        str(ws.root),
        "--dataset",
        "toy",
        "--backbone",
        "efficientnet_lite0",
        "--weights",
        "none",
        "--input-size",
        "32",
        "--log-format",
        "json",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    records = [json.loads(line) for line in lines]  # every line parses, or this raises
    assert records and records[0]["msg"].startswith("building efficientnet_lite0")
    assert not any(r["logger"] == "imgfeat.native" for r in records)  # native lines are debug-only
    assert "3 extracted" in proc.stdout


def test_the_extract_bar_starts_after_the_build_log(tmp_path):
    """The bar used to be drawn at 0% before 'building ...' and then sit there for the whole build."""
    from PIL import Image

    from imgfeat.core.workspace import Workspace
    from imgfeat.scan.scan import ScanConfig, run_scan

    for k in range(3):
        (tmp_path / "img" / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 36), (k * 60, 30, 90)).save(tmp_path / "img" / "a" / f"{k}.jpg")
    ws = Workspace(tmp_path / "ws")
    run_scan(ws, ScanConfig(root=tmp_path / "img", dataset="toy"), "s1")
    env = {**os.environ, "IMGFEAT_PROGRESS": "1"}  # bars on, as on a terminal
    cmd = [
        sys.executable,
        "-m",
        "imgfeat",
        "extract",
        "--workspace",
        str(ws.root),
        "--dataset",
        "toy",
        "--backbone",
        "mobilenet_v2",
        "--weights",
        "none",
        "--input-size",
        "32",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = proc.stderr
    assert "building mobilenet_v2" in err and "extract:" in err
    assert err.index("building mobilenet_v2") < err.index("extract:")


@pytest.mark.quick
@pytest.mark.parametrize("level", ["info", "debug"])
def test_a_spurious_library_warning_is_a_debug_line_not_a_flood(level):
    """scikit-learn's threads may warn about `delayed` on every batch of a streamed fit: hundreds
    of lines on stderr at info; one debug line each at debug; any other warning still shows.
    (A fresh process: the logging set up is the command line's own.)"""
    code = f"""
import warnings
from imgfeat.core.logs import setup_logging
setup_logging({level!r})
warnings.simplefilter("always")
for _ in range(3):
    warnings.warn("`sklearn.utils.parallel.delayed` should be used with `sklearn.utils.parallel.Parallel` to "
                  "make it possible to propagate the scikit-learn configuration", UserWarning)
warnings.warn("a warning a user should see", UserWarning)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "a warning a user should see" in res.stderr
    assert res.stderr.count("sklearn.utils.parallel.delayed") == (3 if level == "debug" else 0)
    assert ("DEBUG" in res.stderr) == (level == "debug")


@pytest.mark.quick
def test_a_cache_that_cannot_keep_compiles_is_one_line_of_ours():
    """JAX warns once per compile it cannot keep (a full disk under the compilation cache): a run
    would print a file path and source line per compile; the command line says it once, its way."""
    code = """
import warnings
from imgfeat.core.logs import setup_logging
setup_logging("info")
warnings.simplefilter("always")
for name in ("jit__uniform", "jit_call", "jit_broadcast_in_dim"):
    warnings.warn(f"Error writing persistent compilation cache entry for '{name}': "
                  "OSError: [Errno 28] No space left on device", UserWarning)
warnings.warn("a warning a user should see", UserWarning)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.strip().splitlines()
    cache = [ln for ln in lines if "compilation cache" in ln]
    assert len(cache) == 1 and "WARNING" in cache[0], res.stderr
    assert cache[0].endswith(
        "the JAX compilation cache cannot keep compiles (OSError: [Errno 28] No space left on device); "
        "this run compiles as if it had none"
    )
    assert "warnings.warn" not in res.stderr.split("a warning a user should see")[0]  # no source line of theirs
    assert "a warning a user should see" in res.stderr
