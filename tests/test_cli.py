"""The command line: every subcommand has --help, bad usage exits 2, --json ends stdout."""

from __future__ import annotations

import importlib.util
import json

import pytest

from imgfeat.cli.main import JOB_MODULES, main

PRESENT = [m for m in JOB_MODULES if importlib.util.find_spec(f"imgfeat.cli.{m}") is not None]


@pytest.mark.quick
@pytest.mark.parametrize("command", PRESENT)
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: imgfeat {command}" in out
    assert "--workspace" in out and "--json" in out
    assert "examples:" in out


@pytest.mark.quick
def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in PRESENT:
        assert command in out


@pytest.mark.quick
def test_unknown_command_and_bad_choice_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["run", "job.toml", "--log-format", "xml"])
    assert exc.value.code == 2
    assert "'xml'" in capsys.readouterr().err


@pytest.mark.quick
def test_config_error_exits_2_and_json_is_the_last_line(ws, tmp_path, capsys):
    missing = tmp_path / "nope.toml"
    code = main(["run", str(missing), "--json"])
    assert code == 2
    captured = capsys.readouterr()
    last = json.loads(captured.out.strip().splitlines()[-1])
    assert last["exit_code"] == 2 and "job file not found" in last["error"]
    assert "job file not found" in captured.err
    # the same object is kept in runs/<run_id>.json
    saved = json.loads((ws.runs_dir / f"{last['run_id']}.json").read_text())
    assert saved == last


def test_help_does_not_import_tensorflow_or_keras():
    """`imgfeat --help` must stay fast: job modules import the heavy stack only when they run."""
    import subprocess
    import sys

    code = (
        "import sys; from imgfeat.cli.main import build_parser; build_parser(); "
        "print(sorted(m for m in ('tensorflow', 'keras', 'jax', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _stage_configs():
    from imgfeat.extract.executors import ExecutorConfig
    from imgfeat.extract.extract import ExtractConfig
    from imgfeat.finetune.train import FinetuneConfig
    from imgfeat.heads import PredictConfig, ReportConfig, TrainConfig
    from imgfeat.index.build import IndexConfig
    from imgfeat.index.dedup import DedupConfig
    from imgfeat.scan.scan import ScanConfig
    from imgfeat.tools.bench import BenchConfig
    from imgfeat.tools.classify import ClassifyConfig

    return [
        ("scan", ScanConfig),
        ("extract", ExtractConfig),
        ("extract", ExecutorConfig),
        ("train", TrainConfig),
        ("predict", PredictConfig),
        ("report", ReportConfig),
        ("finetune", FinetuneConfig),
        ("index", IndexConfig),
        ("dedup", DedupConfig),
        ("classify", ClassifyConfig),
        ("bench", BenchConfig),
    ]


@pytest.mark.quick
@pytest.mark.parametrize("command, config", _stage_configs(), ids=lambda v: getattr(v, "__name__", v))
def test_stage_flags_take_name_help_and_default_from_the_config(command, config):
    """One default per option: the flag's is the config field's, so --help and the API agree."""
    import argparse
    import dataclasses

    from imgfeat.cli.main import build_parser
    from imgfeat.core.options import options

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = {a.option_strings[-1]: a for a in sub.choices[command]._actions if a.option_strings}
    opts = options(config)
    assert opts, f"{config.__name__} declares no flags"
    for name, o in opts.items():
        action = actions[o.flag]
        assert action.help == o.help and action.dest == o.dest
        field = next(f for f in dataclasses.fields(config) if f.name == name)
        if field.default is dataclasses.MISSING:
            assert action.required, o.flag
        else:
            assert action.default == field.default, o.flag
