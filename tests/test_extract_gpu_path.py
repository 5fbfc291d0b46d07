"""`extract --decode gpu` through the whole driver, on CPU: a Pillow codec with nvImageCodec's interface
stands in for the GPU. Every manifest row ends as a feature or an error row, the featureset is a
different one (the decoder is in the fingerprint), features match the Pillow path per image, and a
rerun resumes without a model. The GPU host runs the real codec (benchmarks/bench_gpu_decode.py)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_gpudecode import fake_module, jpeg
from tiny_images import corrupt_png, png_bytes

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError
from imgfeat.core.workspace import Workspace
from imgfeat.extract import gpudecode as G
from imgfeat.scan.scan import ScanConfig, run_scan
from imgfeat.tools.samples import load_photo

MIN_COSINE = 0.999


def _photos(folder):
    folder.mkdir(parents=True)
    for i, (name, size) in enumerate(
        [
            ("astronaut", (120, 90)),
            ("coffee", (200, 150)),
            ("chelsea", (90, 160)),
            ("rocket", (300, 200)),
            ("astronaut", (64, 64)),
            ("coffee", (70, 40)),
        ]
    ):
        (folder / f"p{i}.jpg").write_bytes(jpeg(load_photo(name).resize(size, Image.Resampling.BICUBIC)))
    (folder / "flat.png").write_bytes(png_bytes(3, (50, 40)))  # the CPU fallback
    (folder / "broken.png").write_bytes(corrupt_png())  # an error row either way
    (folder / "cut.jpg").write_bytes((folder / "p1.jpg").read_bytes()[:300])  # truncated: the CPU path's row


@pytest.fixture
def gpu_as_fake(monkeypatch):
    """The extra, the backend and the device pass; the codec decodes with Pillow."""
    monkeypatch.setattr(G, "check_gpu_decode", lambda dcfg: None)
    real = G.NvImageCodec.__init__
    monkeypatch.setattr(G.NvImageCodec, "__init__", lambda self, dcfg, module=None: real(self, dcfg, fake_module()))


def _features(ws, fs):
    t = pq.read_table(ws.featureset_dir(fs))
    return {i: np.asarray(v, np.float32) for i, v in zip(t[S.IMAGE_ID].to_pylist(), t[S.FEATURE].to_pylist())}


def _errors(ws, fs):
    from imgfeat.extract.featureset import read_errors

    return {r[S.PATH].rsplit("/", 1)[-1]: r[S.ERROR_CODE] for r in read_errors(ws, fs).to_pylist()}


def test_gpu_decode_extracts_every_row_like_the_pillow_path(tmp_path, gpu_as_fake):
    from imgfeat.extract.extract import ExtractConfig, run_extract

    _photos(tmp_path / "imgs")
    ws = Workspace(tmp_path / "ws")
    run_scan(ws, ScanConfig(root=tmp_path / "imgs", dataset="d"), "scan")
    opts = dict(dataset="d", backbone="efficientnet_lite0", weights="none", input_size=48, batch_size=4)
    cpu = run_extract(ws, ExtractConfig(**opts, decode="threads"), "r1").to_json()
    gpu = run_extract(ws, ExtractConfig(**opts, decode="gpu"), "r2").to_json()
    assert gpu["featureset"] != cpu["featureset"], "GPU-decoded numbers are another featureset"
    assert gpu["extracted"] == cpu["extracted"] == 7 and gpu["error_rows"] == cpu["error_rows"] == 2
    assert _errors(ws, gpu["featureset"]) == _errors(ws, cpu["featureset"])
    a, b = _features(ws, cpu["featureset"]), _features(ws, gpu["featureset"])
    assert a.keys() == b.keys()
    assert max(np.abs(v).max() for v in a.values()) > 1e-3, "features must carry signal"
    for image_id in a:
        cos = float(a[image_id] @ b[image_id] / (np.linalg.norm(a[image_id]) * np.linalg.norm(b[image_id])))
        assert cos >= MIN_COSINE, (image_id, cos)
    from imgfeat.extract.featureset import read_provenance

    assert read_provenance(ws, gpu["featureset"]).recipe.decoder == "nvimgcodec"
    again = run_extract(ws, ExtractConfig(**opts, decode="gpu"), "r3").to_json()
    assert again["extracted"] == 0 and not again["model_built"]


def test_decode_gpu_without_the_pieces_exits_2_and_writes_nothing(tmp_path, capsys):
    """Here (no GPU, no extra, TensorFlow backend) the flag names what is missing."""
    from imgfeat.cli.main import main

    _photos(tmp_path / "imgs")
    assert main(["scan", "--workspace", str(tmp_path / "ws"), str(tmp_path / "imgs"), "--dataset", "d"]) == 0

    def data():  # runs/<id>.json records every attempt, a rejected one too: everything else must stay
        return sorted(p.relative_to(tmp_path) for p in (tmp_path / "ws").rglob("*") if "runs" not in p.parts)

    before = data()
    code = main(
        [
            "extract",
            "--workspace",
            str(tmp_path / "ws"),
            "--dataset",
            "d",
            "--backbone",
            "efficientnet_lite0",
            "--weights",
            "none",
            "--decode",
            "gpu",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "imgfeat[gpu]" in err and "jax" in err.lower()
    assert data() == before


def test_ray_takes_only_its_own_decode_modes(tmp_path):
    from imgfeat.extract.executors import ExecutorConfig
    from imgfeat.extract.extract import ExtractConfig, run_extract

    _photos(tmp_path / "imgs")
    ws = Workspace(tmp_path / "ws")
    run_scan(ws, ScanConfig(root=tmp_path / "imgs", dataset="d"), "scan")
    with pytest.raises(ConfigError, match="decode = 'threads' is for the local executor"):
        run_extract(
            ws,
            ExtractConfig(dataset="d", backbone="efficientnet_lite0", weights="none", decode="threads"),
            "r",
            ExecutorConfig(name="ray"),
        )
