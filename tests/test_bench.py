"""`imgfeat bench`: image listing and staging, ratio arithmetic, and one real run of the measured processes."""

from __future__ import annotations

import json

import pytest
from tiny_images import write_noise_images

from imgfeat.cli.main import main
from imgfeat.core.errors import ConfigError
from imgfeat.tools.bench import BenchConfig, _report, list_images, stage_images


@pytest.mark.quick
def test_list_and_stage_take_the_same_first_files(tmp_path):
    write_noise_images(tmp_path / "src", 7, size=(28, 20), classes=("b", "a"))
    (tmp_path / "src" / "notes.txt").write_text("not an image")
    files = list_images(tmp_path / "src", limit=5)
    assert len(files) == 5 and files == sorted(files)
    staged = stage_images(files, tmp_path / "flat")
    assert sorted(p.read_bytes() for p in staged.iterdir()) == sorted(p.read_bytes() for p in files)


@pytest.mark.quick
def test_report_uses_each_paths_fastest_round(tmp_path):
    write_noise_images(tmp_path, 1, size=(28, 20), classes=("b",))
    cfg = BenchConfig(backbone="mobilenet_v2", images=tmp_path, repeat=2)
    runs = {
        "input": [{"seconds": 4.0, "inner": {}}, {"seconds": 5.0, "inner": {}}],
        "forward": [{"seconds": 12.0, "inner": {}}, {"seconds": 10.0, "inner": {}}],
        "extract": [{"seconds": 11.0, "inner": {"extracted": 100}}, {"seconds": 20.0, "inner": {}}],
        "tutorial": [{"seconds": 25.0, "inner": {}}, {"seconds": 22.0, "inner": {}}],
    }
    out = _report(cfg, 100, runs)
    assert out["images_per_s"] == {"input": 25.0, "forward": 10.0, "extract": 9.09, "tutorial": 4.55}
    assert out["end_to_end_over_forward"] == pytest.approx(0.909, abs=1e-3)
    # the limit is the slower of the two: here the model
    assert out["end_to_end_over_limit"] == pytest.approx(0.909, abs=1e-3) and out["limited_by"] == "forward"
    assert out["end_to_end_over_input"] == pytest.approx(0.364, abs=1e-3)
    slow_input = _report(cfg, 100, {**runs, "input": [{"seconds": 20.0, "inner": {}}]})
    assert slow_input["limited_by"] == "input" and slow_input["end_to_end_over_limit"] == pytest.approx(1.818, abs=1e-3)
    assert out["end_to_end_over_tutorial"] == pytest.approx(2.0, abs=1e-2)


@pytest.mark.quick
def test_bad_bench_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not a folder"):
        BenchConfig(backbone="mobilenet_v2", images=tmp_path / "missing")
    with pytest.raises(ConfigError, match="did you mean 'resnet50'"):
        BenchConfig(backbone="resnet05", images=tmp_path)
    with pytest.raises(ConfigError, match="--decode 'cuda': allowed are auto, threads, processes, gpu"):
        BenchConfig(backbone="mobilenet_v2", images=tmp_path, decode="cuda")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match=r"--logs '.*a-file' is not a folder"):
        BenchConfig(backbone="mobilenet_v2", images=tmp_path, logs=tmp_path / "a-file")
    # here (no nvImageCodec, Keras on TensorFlow): named before any timed process starts, not a traceback
    with pytest.raises(ConfigError, match=r"decode .gpu. cannot run here: nvidia\.nvimgcodec is not importable"):
        BenchConfig(backbone="mobilenet_v2", images=tmp_path, decode="gpu")


@pytest.mark.slow
def test_bench_runs_the_measured_processes(tmp_path, capsys):
    # The tutorial process is left out to keep the suite short: it costs another TensorFlow start-up.
    write_noise_images(tmp_path / "imgs", 6, size=(28, 20), classes=("b", "a"))
    code = main(
        [
            "bench",
            "--workspace",
            str(tmp_path / "ws"),
            "--backbone",
            "mobilenet_v2",
            "--images",
            str(tmp_path / "imgs"),
            "--input-size",
            "32",
            "--batch-size",
            "4",
            "--skip",
            "tutorial",
            "--logs",
            str(tmp_path / "logs"),
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").iterdir()}
    assert set(logs) == {"input-1.log", "forward-1.log", "extract-1.log"}
    assert "building mobilenet_v2 at 32 px" in logs["extract-1.log"]  # its own log lines, kept
    assert set(out["images_per_s"]) == {"input", "forward", "extract"}
    assert out["extract_inner"]["extracted"] == 6 and out["images"] == 6
    assert out["end_to_end_over_forward"] > 0 and "end_to_end_over_tutorial" not in out
    assert out["end_to_end_over_limit"] > 0 and out["limited_by"] in ("input", "forward")
