"""--memory-budget: one size parser for flags, job-file keys and configs; its default a share of RAM."""

from __future__ import annotations

import pytest
from jobtext import BASE, parse

from imgfeat.cli.main import main
from imgfeat.core.errors import ConfigError
from imgfeat.core.sizes import memory_budget, parse_size, physical_memory

HEADS = '\n[heads.h]\ndataset = "photos"\nfeatures = "tiny"\n'


@pytest.mark.quick
@pytest.mark.parametrize(
    "text, n",
    [
        ("256MB", 256 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1.5 gb", 1_500_000_000),
        (" 64 MiB ", 64 << 20),
        ("1048576", 1 << 20),
        (3 << 20, 3 << 20),
    ],
)
def test_sizes_read_in_decimal_and_binary_units(text, n):
    assert parse_size(text) == n


@pytest.mark.quick
@pytest.mark.parametrize("bad", ["12", "1x", "MB", "-5MB", "2 PiB", "1e9", True, 1.5, 12])
def test_a_bad_size_names_the_key_the_value_and_what_is_allowed(bad):
    with pytest.raises(ConfigError) as info:
        parse_size(bad, "heads.h.memory_budget")
    said = str(info.value)
    assert said.startswith(f"heads.h.memory_budget = {bad!r}: expected a size")
    assert "GiB" in said and "from 64 KiB to 1 PiB" in said


@pytest.mark.quick
def test_the_default_budget_is_a_quarter_of_physical_memory():
    assert memory_budget(None) == physical_memory() // 4 > 0
    assert memory_budget(5 << 20) == 5 << 20


@pytest.mark.quick
def test_every_stage_config_takes_a_size_text_and_keeps_bytes():
    from imgfeat.heads import PredictConfig, ReportConfig, TrainConfig
    from imgfeat.index.build import IndexConfig
    from imgfeat.index.dedup import DedupConfig

    configs = [
        TrainConfig(dataset="d", featureset="f", memory_budget="256MB"),
        PredictConfig(head_id="h", dataset="d", memory_budget="256MB"),
        ReportConfig(head_id="h", memory_budget="256MB"),
        IndexConfig(featureset="f", memory_budget="256MB"),
        DedupConfig(featureset="f", dataset="d", memory_budget="256MB"),
    ]
    assert [c.memory_budget for c in configs] == [256 * 10**6] * 5
    with pytest.raises(ConfigError, match="memory_budget = '9 bananas'"):
        TrainConfig(dataset="d", featureset="f", memory_budget="9 bananas")


@pytest.mark.quick
def test_the_flag_refuses_a_bad_size_with_exit_2(ws, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--dataset", "d", "--featureset", "f", "--memory-budget", "lots"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--memory-budget" in err and "'lots'" in err and "GiB" in err


@pytest.mark.quick
def test_run_memory_budget_is_every_stage_default_and_a_table_overrides_it():
    from imgfeat.run.run import train_config

    job = parse('[run]\nmemory_budget = "1GiB"\n' + BASE + HEADS)
    assert job.memory_budget == 1 << 30
    assert train_config(job, job.heads[0], "fs").memory_budget == 1 << 30
    job = parse('[run]\nmemory_budget = "1GiB"\n' + BASE + HEADS + 'memory_budget = "300MB"\n')
    assert train_config(job, job.heads[0], "fs").memory_budget == 300 * 10**6


@pytest.mark.quick
@pytest.mark.parametrize(
    "where, text",
    [
        ("run", '[run]\nmemory_budget = "huge"\n' + BASE + HEADS),
        ("heads.h", BASE + HEADS + "memory_budget = 1.5\n"),
        ("heads.h", BASE + HEADS + 'memory_budget = "3 KB"\n'),
    ],
)
def test_a_bad_job_file_budget_names_its_key(where, text):
    with pytest.raises(ConfigError, match=rf"{where}.memory_budget = "):
        parse(text)
