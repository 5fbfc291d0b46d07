"""The extract driver's pure parts: the input mapper, the error-rate policy, the typed summary, executor options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgfeat.core.errors import ConfigError, ErrorRateExceeded
from imgfeat.core.hashing import content_id
from imgfeat.extract.batches import InputSpec, Item, make_batch
from imgfeat.extract.decode import DecodeConfig
from imgfeat.extract.executors import ExecutorConfig
from imgfeat.extract.extract import ExtractSummary, check_error_rate
from imgfeat.run.jobfile import load_job

# The keys `--json` and runs/<id>.json had before the summary was typed; they must all stay.
TODAYS_KEYS = {
    "featureset",
    "dataset",
    "manifest_rows",
    "extracted",
    "reused",
    "duplicates",
    "errors",
    "error_rows",
    "error_rate",
    "model_built",
    "model_seconds",
    "decode_seconds",
    "input_wait_seconds",
    "build_seconds",
    "shards",
    "batch_size",
    "seconds",
    "images_per_s",
}


def _jpeg(path: Path, seed: int) -> Item:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(path)
    return Item(content_id(path.read_bytes()), str(path))


@pytest.mark.quick
def test_make_batch_pads_verifies_content_and_sorts_failures_by_stage(tmp_path):
    good = _jpeg(tmp_path / "a.jpg", 0)
    changed = _jpeg(tmp_path / "b.jpg", 1)
    _jpeg(tmp_path / "b.jpg", 2)  # rewritten after its id was taken
    gone = Item("0" * 32, str(tmp_path / "gone.jpg"))
    batch = make_batch([good, changed, gone], InputSpec(DecodeConfig((8, 8)), batch_size=4), "r")
    assert batch.raw.shape == (4, 8, 8, 3) and batch.raw.dtype == np.uint8
    assert batch.ids == [good.image_id] and batch.raw[0].any() and not batch.raw[1:].any()
    assert [(e.stage, e.error_code) for e in batch.errors] == [("read", "changed_since_scan"), ("read", "vanished")]


@pytest.mark.quick
def test_one_error_rate_policy():
    check_error_rate({"d -> fs": (5, 100)}, None)
    check_error_rate({"d -> fs": (5, 100)}, 0.05)  # at the limit is not over it
    check_error_rate({"d -> fs": (0, 0)}, 0.0)  # an empty dataset has no rate
    with pytest.raises(ErrorRateExceeded, match=r"6 of 100 images \(6.0%\) in b ended as error rows") as exc:
        check_error_rate({"a": (1, 100), "b": (6, 100)}, 0.05)
    assert exc.value.exit_code == 3


@pytest.mark.quick
def test_the_typed_summary_keeps_todays_keys_and_labels_both_rates():
    s = ExtractSummary(
        "fs", "d", 42, 40, 0, 1, 1, {"empty": 1}, 0, 2, True, 2, 32, 10.0, loop_seconds=2.0, build_seconds=3.0
    )
    out = s.to_json()
    assert TODAYS_KEYS <= set(out) and out["errors"] == {"new": 1, "by_code": {"empty": 1}, "known": 0}
    assert (out["images_per_s"], out["images_per_s_loop"]) == (4.0, 20.0)
    assert out["error_rate"] == round(2 / 42, 6) and "executor" not in out


@pytest.mark.quick
@pytest.mark.parametrize("executor, info", [("local", {}), ("ray", {"actors": 2, "batches_per_actor": 3})])
def test_the_extract_summary_comes_back_from_its_json(executor, info):
    s = ExtractSummary(
        "fs",
        "d",
        42,
        40,
        0,
        1,
        1,
        {"empty": 1},
        0,
        2,
        True,
        2,
        32,
        10.0,
        model_seconds=1.5,
        loop_seconds=2.0,
        executor=executor,
        executor_info=info,
        commit_records={"recorded": 1, "adopted": 0, "set_aside": 0},
    )
    out = json.loads(json.dumps(s.to_json()))
    assert ExtractSummary.from_json(out) == s and ExtractSummary.from_json(out).to_json() == out


@pytest.mark.quick
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "spark"}, "unknown executor 'spark'"),
        ({"workers": 0}, "workers must be a positive integer"),
        ({"actors": True}, "actors must be a positive integer"),
        ({"address": 5}, "invalid Ray address 5"),
        ({"gpus_per_worker": "1"}, "gpus per worker"),
    ],
)
def test_executor_options_are_checked_at_the_edge(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ExecutorConfig(**kwargs)


@pytest.mark.quick
def test_a_job_file_reaches_the_executor_options(tmp_path):
    from imgfeat.run.run import executor_config

    job_file = tmp_path / "job.toml"
    job_file.write_text(
        '[run]\nexecutor = "ray"\nworkers = 3\nray_actors = 2\nray_address = "auto"\n'
        'gpus_per_worker = 0.5\nin_flight = 3\n[datasets.d]\nroot = "x"\n'
    )
    cfg = executor_config(load_job(job_file, workspace=tmp_path))
    assert cfg == ExecutorConfig(name="ray", workers=3, actors=2, address="auto", gpus_per_worker=0.5, in_flight=3)


@pytest.mark.quick
def test_decode_modes_auto_rule_and_bad_values():
    import dataclasses

    from imgfeat.extract.batches import PROCESS_DECODE_MIN_WORKERS, decoder_of, resolve_decode
    from imgfeat.extract.extract import ExtractConfig

    decode_help = next(f for f in dataclasses.fields(ExtractConfig) if f.name == "decode").metadata["help"]
    assert f"from {PROCESS_DECODE_MIN_WORKERS} workers up" in decode_help, "--help states the auto rule's figure"
    assert resolve_decode("auto", 2) == "threads"
    assert resolve_decode("auto", PROCESS_DECODE_MIN_WORKERS) == "processes"
    assert resolve_decode("threads", 64) == "threads" and resolve_decode("processes", 1) == "processes"
    assert decoder_of("gpu") == "nvimgcodec" and decoder_of("processes") == decoder_of("auto") == "pillow"
    with pytest.raises(ConfigError, match=r"unknown decode .cuda.*allowed: auto, gpu, processes, threads"):
        ExtractConfig(dataset="d", backbone="mobilenet_v2", decode="cuda")
    with pytest.raises(ConfigError, match="in flight must be a positive integer, got 0"):
        ExecutorConfig(in_flight=0)
    assert InputSpec(DecodeConfig((5, 7)), 3).batch_shape == (3, 5, 7, 3)


@pytest.mark.quick
def test_only_a_decode_failure_of_the_ids_own_bytes_is_final():
    """Issue 23 F1: outcomes about a path at a moment never close the content id, including the
    changed_since_scan rows older versions wrote with stage "decode"."""
    from imgfeat.extract.batches import is_final

    assert is_final("decode", "truncated") and is_final("decode", "not_an_image")
    assert not is_final("read", "vanished") and not is_final("read", "changed_since_scan")
    assert not is_final("decode", "changed_since_scan")
