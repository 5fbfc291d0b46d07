"""Every numeric option has one range, checked at the edge for its flag and its job-file key alike
(issue 23 F4: ``--in-flight 4611686018427387904`` allocated until the kernel stopped it)."""

from __future__ import annotations

import argparse
import math

import pytest

from imgfeat.cli.main import build_parser, main
from imgfeat.core.errors import ConfigError
from imgfeat.core.ranges import RANGES, Range
from imgfeat.run import jobfile as J

HUGE = 4611686018427387904  # 2**62: the value of the report


NOT_NUMERIC = {"augment_list", "c_grid", "size"}  # flag types that parse words or lists (c_grid: test below;
# size: tests/test_memory_budget.py)


def _numeric_flags() -> list[tuple[str, argparse.Action]]:
    """(command, action) of every flag that takes a value with a type other than text or a word list."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for command, p in sorted(sub.choices.items()):
        for action in p._actions:
            if (
                action.option_strings
                and action.type not in (None, str)
                and action.nargs != 0
                and getattr(action.type, "__name__", "") not in NOT_NUMERIC
            ):
                out.append((command, action))
    return out


FLAGS = _numeric_flags()


def _config_classes() -> dict[str, type]:
    from imgfeat.extract.executors import ExecutorConfig
    from imgfeat.extract.extract import ExtractConfig
    from imgfeat.finetune.train import FinetuneConfig
    from imgfeat.heads import PredictConfig, ReportConfig, TrainConfig
    from imgfeat.index.build import IndexConfig
    from imgfeat.scan.scan import ScanConfig

    return {
        "datasets.d": ScanConfig,
        "features.f": ExtractConfig,
        "heads.h": TrainConfig,
        "finetune.t": FinetuneConfig,
        "indexes.i": IndexConfig,
        "predict": PredictConfig,
        "report": ReportConfig,
        "executor": ExecutorConfig,
    }


NUMERIC = (J.INT, J.NUMBER, J.SECONDS)
JOB_KEYS = sorted(
    {
        (where, key)
        for where, cls in _config_classes().items()
        for key, kind in J.field_types(cls).items()
        if kind in NUMERIC
    }
    | {("run", key) for key, kind in J.JOB_KEY_TYPES["run"].items() if kind in NUMERIC}
)


def _outside(rng: Range) -> list:
    below = rng.lo - 1 if rng.integer else rng.lo - max(1e-3, abs(rng.lo) / 2)
    above = HUGE if rng.hi < HUGE else rng.hi * 2
    out = [below, above]
    if not rng.integer:
        out += [math.nan, math.inf]
    return out


@pytest.mark.quick
@pytest.mark.parametrize("command, action", FLAGS, ids=[f"{c} {a.option_strings[0]}" for c, a in FLAGS])
def test_every_numeric_flag_has_a_range_and_refuses_values_outside_it(command, action):
    key = getattr(action.type, "range_key", None)
    assert key in RANGES, f"{command} {action.option_strings[0]} has no range (type {action.type!r})"
    rng = RANGES[key]
    for good in (rng.lo, rng.hi):
        assert action.type(str(int(good) if rng.integer else good)) == good
    if action.default is not None:
        assert rng.allows(action.default), f"the default {action.default!r} is outside {rng.text()}"
    for bad in [*_outside(rng), "x"]:
        with pytest.raises(argparse.ArgumentTypeError, match=r"expected an? (integer|number) from"):
            action.type(str(bad))


@pytest.mark.quick
@pytest.mark.parametrize("where, key", JOB_KEYS, ids=[f"{w}.{k}" for w, k in JOB_KEYS])
def test_every_numeric_job_file_key_has_the_same_range(where, key):
    assert key in RANGES, f"[{where}] {key} has no range"
    rng = RANGES[key]
    kinds = J.JOB_KEY_TYPES["run"] if where == "run" else J.field_types(_config_classes()[where])
    J.check_types({key: rng.lo, "x": 0}, kinds, where)
    J.check_types({key: int(rng.hi) if rng.integer else rng.hi}, kinds, where)
    for bad in _outside(rng):
        with pytest.raises(ConfigError) as info:
            J.check_types({key: bad}, kinds, where)
        message = str(info.value)
        assert f"{where}.{key} = " in message and rng.text() in message


@pytest.mark.quick
def test_a_flag_and_its_job_file_key_share_one_range():
    flag_keys = {a.type.range_key for _, a in FLAGS}
    job_keys = {k for _, k in JOB_KEYS}
    shared = flag_keys & job_keys
    assert {"in_flight", "batch_size", "workers", "shard_size", "wait", "epochs"} <= shared
    assert RANGES["in_flight"].hi < HUGE


@pytest.mark.quick
def test_the_reported_in_flight_is_refused_by_flag_and_job_file_before_any_work(ws, tmp_path, capsys):
    code = None
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "extract",
                "--dataset",
                "d",
                "--backbone",
                "mobilenet_v2",
                "--weights",
                "none",
                "--input-size",
                "32",
                "--decode",
                "processes",
                "--in-flight",
                str(HUGE),
            ]
        )
    code = exit_info.value.code
    err = capsys.readouterr().err
    assert code == 2 and "--in-flight" in err and str(HUGE) in err and "from 1 to 64" in err
    job = tmp_path / "job.toml"
    job.write_text(
        f'[run]\nin_flight = {HUGE}\n[datasets.d]\nroot = "imgs"\n'
        '[features.f]\nbackbone = "mobilenet_v2"\nweights = "none"\ninput_size = 32\n'
    )
    assert main(["run", str(job), "--dry-run", "--json"]) == 2
    err = capsys.readouterr().err
    assert "run.in_flight" in err and str(HUGE) in err and "from 1 to 64" in err
    assert not (ws.root / "features").exists()


def _api_cases():
    from imgfeat.extract.executors import ExecutorConfig
    from imgfeat.extract.extract import ExtractConfig
    from imgfeat.finetune.train import FinetuneConfig
    from imgfeat.heads import PredictConfig, ReportConfig, TrainConfig
    from imgfeat.index.build import IndexConfig
    from imgfeat.index.dedup import DedupConfig
    from imgfeat.scan.scan import ScanConfig

    return [
        (ExecutorConfig, {}, "in_flight"),
        (ExtractConfig, dict(dataset="d", backbone="mobilenet_v2", weights="none"), "shard_size"),
        (ScanConfig, dict(root="r", dataset="d"), "max_pixels"),
        (TrainConfig, dict(dataset="d", featureset="f"), "epochs"),
        (PredictConfig, dict(head_id="h", dataset="d"), "top_k"),
        (ReportConfig, dict(head_id="h"), "thumb_size"),
        (FinetuneConfig, dict(dataset="d", backbone="mobilenet_v2"), "epochs"),
        (IndexConfig, dict(featureset="f"), "nlist"),
        (DedupConfig, dict(featureset="f", dataset="d"), "neighbours"),
    ]


@pytest.mark.quick
@pytest.mark.parametrize("case", range(9))
def test_the_api_configs_refuse_out_of_range_values_too(case):
    cls, base, key = _api_cases()[case]
    cls(**base, **{key: int(RANGES[key].hi)})
    with pytest.raises(ConfigError, match=f"{key} = {HUGE}: expected an integer from"):
        cls(**base, **{key: HUGE})


@pytest.mark.quick
@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "1e13", "0.1,x", "", ",".join(["1"] * 101)])
def test_a_c_grid_flag_refuses_values_outside_the_range_of_c(text):
    from imgfeat.cli.train import c_grid

    with pytest.raises(argparse.ArgumentTypeError, match="got"):
        c_grid(text)
    assert c_grid("1e-12,1,1e12") == (1e-12, 1.0, 1e12)
