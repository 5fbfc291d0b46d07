"""Trust at index (issue 23 F6-F13): bad waits refused at the edge, file names in the provenance
kept inside their folder, damaged index files one line naming the file and `index --rebuild`."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from synthetic import fake_image_id, write_featureset
from test_decode import hang_guard

from imgfeat.core.errors import ConfigError, ImgfeatError
from imgfeat.core.storage import FileLock

pytestmark = pytest.mark.quick


def featureset(ws, name: str = "fs", n: int = 40, seed: int = 0) -> list[str]:
    """``n`` distinct random float32 rows (neighbours differ per query)."""
    X = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    ids = [fake_image_id(name, k) for k in range(n)]
    write_featureset(ws, name, ids, X, dtype="float32")
    return ids


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    from imgfeat.cli.main import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    """The command's error: one logged line, no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "ERROR" in line or "error" in line.split(" ", 3)[:3]]
    assert len(lines) == 1, err
    return lines[0]


def searched(capsys, ws, ids: list[str]) -> list:
    code, out, err = cli(
        capsys, "similar", "--workspace", str(ws.root), "--index", "ix", "--image-id", ids[0], "--top", "5", "--json"
    )
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])["results"]


# --- F6: waits ---


@pytest.mark.parametrize("value", ["nan", "-5", "inf", "-inf"])
@pytest.mark.parametrize("command", ["index", "scan", "extract", "train", "predict", "report", "finetune", "run"])
def test_every_wait_flag_refuses_non_finite_and_negative_seconds(capsys, command, value):
    """Before, `index --wait nan` waited for ever on a held lock and `--wait -5` was accepted."""
    from imgfeat.cli.main import main

    with pytest.raises(SystemExit) as info:
        main([command, f"--wait={value}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"--wait: expected a number from 0 to 604800, got '{value}'" in err


def test_index_wait_nan_exits_2_with_the_lock_held(ws, capsys):
    featureset(ws)
    with FileLock(ws.locks_dir / "index-ix.lock", "index ix"), hang_guard(20):
        with pytest.raises(SystemExit) as info:
            cli(capsys, "index", "--workspace", str(ws.root), "--featureset", "fs", "--name", "ix", "--wait", "nan")
    assert info.value.code == 2 and "got 'nan'" in capsys.readouterr().err
    assert not (ws.root / "indexes").exists()


@pytest.mark.parametrize("wait", [float("nan"), -5.0, float("inf")])
def test_the_api_and_the_lock_refuse_bad_waits(ws, wait):
    from imgfeat.index import IndexConfig

    with pytest.raises(ConfigError, match="index wait must be a finite number of seconds, 0 or more"):
        IndexConfig(featureset="fs", wait=wait)
    with pytest.raises(ConfigError, match="wait must be a finite number of seconds"):
        FileLock(ws.locks_dir / "x.lock", "x", wait)


@pytest.mark.parametrize(
    "section",
    [
        "[run]\nwait = nan\n",
        "[run]\nwait = inf\n",
        "[run]\nwait = -5\n",
        '[indexes.near]\nfeatures = "tiny"\nwait = nan\n',
    ],
)
def test_job_files_refuse_bad_waits(section):
    """[run] wait is the one wait of a job (every stage's, the index's too); an index table has none."""
    from imgfeat.run.jobfile import parse_job
    from imgfeat.run.run import check_job

    text = (
        '[datasets.photos]\nroot = "images"\n[features.tiny]\nbackbone = "efficientnet_lite0"\ndatasets = ["photos"]\n'
    )
    with pytest.raises(ConfigError, match="wait"):
        check_job(parse_job(tomllib.loads(text + section), base=Path("/jobs"), source="job.toml", workspace=None))


def test_a_job_files_wait_reaches_the_index_stage():
    from imgfeat.run.jobfile import parse_job
    from imgfeat.run.run import index_config

    text = (
        '[run]\nwait = 30\n[datasets.photos]\nroot = "images"\n[features.tiny]\n'
        'backbone = "efficientnet_lite0"\ndatasets = ["photos"]\n[indexes.near]\nfeatures = "tiny"\n'
    )
    job = parse_job(tomllib.loads(text), base=Path("/jobs"), source="job.toml", workspace=None)
    assert index_config(job, job.indexes[0], "fs").wait == 30


# --- F12: file names recorded in the provenance ---


def edit_provenance(ws, name: str = "ix", **changes) -> Path:
    path = ws.index_files_dir(name) / "_index.json"
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))
    return path


@pytest.mark.parametrize(
    "index_file", ["../../../../../../../../etc/passwd", "/etc/passwd", "..", "sub/x.faiss", "_index-x.faiss\x00"]
)
def test_the_index_file_named_in_the_provenance_stays_in_its_folder(ws, capsys, index_file):
    """Before, FAISS read (and tried to parse) /etc/passwd."""
    ids = featureset(ws)
    cli(capsys, "index", "--workspace", str(ws.root), "--featureset", "fs", "--name", "ix")
    edit_provenance(ws, index_file=index_file)
    code, _, err = cli(capsys, "similar", "--workspace", str(ws.root), "--index", "ix", "--image-id", ids[0])
    line = one_error_line(err)
    assert code == 1 and "_index.json" in line and "index_file" in line and "--rebuild" in line


@pytest.mark.parametrize("what", ["fifo", "link"])
def test_a_fifo_or_a_link_where_the_index_file_was_is_refused_not_opened(ws, tmp_path, capsys, what):
    """Before, a FIFO outside the workspace blocked `similar` for ever."""
    ids = featureset(ws)
    cli(capsys, "index", "--workspace", str(ws.root), "--featureset", "fs", "--name", "ix")
    files = ws.index_files_dir("ix")
    (faiss_file,) = files.glob("_index-*.faiss")
    faiss_file.unlink()
    outside = tmp_path / "outside.faiss"
    os.mkfifo(outside)
    if what == "fifo":
        os.mkfifo(faiss_file)
    else:
        faiss_file.symlink_to(outside)
    with hang_guard(20):
        code, _, err = cli(capsys, "similar", "--workspace", str(ws.root), "--index", "ix", "--image-id", ids[0])
    line = one_error_line(err)
    assert code == 1 and faiss_file.name in line
    assert ("symbolic link" if what == "link" else "not a regular file") in line


# --- F7-F11, F13: damaged files, and --rebuild ---


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def scramble(path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).bytes(path.stat().st_size))


DAMAGE = {
    "faiss random bytes": ("_index-*.faiss", scramble),  # F7
    "faiss truncated": ("_index-*.faiss", truncate),  # F8
    "json not json": ("_index.json", lambda p: p.write_text("{not json")),  # F9
    "json a list": ("_index.json", lambda p: p.write_text("[1, 2]")),  # F9
    "json missing rows": (
        "_index.json",
        lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "rows"})),
    ),  # F10
    "json rows a string": (
        "_index.json",
        lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "rows": "40"})),
    ),  # F11
    "json params a list": (
        "_index.json",
        lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "params": [1]})),
    ),  # F11
    "json params unknown key": (
        "_index.json",
        lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "params": {"kind": "flat", "shards": 3}})),
    ),  # F11
    "ids truncated": ("ids.parquet", truncate),  # F13
    "ids not parquet": ("ids.parquet", lambda p: p.write_text("image_id\n")),  # F13
    "ids without their columns": ("ids.parquet", lambda p: pq.write_table(pa.table({"x": [1]}), p)),
    "ids as integers": (
        "ids.parquet",
        lambda p: pq.write_table(
            pa.table({"image_id": list(range(40)), "dataset": [None] * 40, "path": [None] * 40}), p
        ),
    ),
}


def damage(ws, which: str) -> Path:
    pattern, how = DAMAGE[which]
    folder = ws.index_dir("ix") if pattern == "ids.parquet" else ws.index_files_dir("ix")
    (path,) = folder.glob(pattern)
    how(path)
    return path


@pytest.mark.parametrize("which", list(DAMAGE))
def test_a_damaged_index_is_one_line_naming_the_file_and_rebuild_restores_it(ws, capsys, which):
    """Before: RuntimeError (FAISS), JSONDecodeError, KeyError, TypeError or ArrowInvalid tracebacks."""
    ids = featureset(ws)
    ws_flag = ("--workspace", str(ws.root))
    assert cli(capsys, "index", *ws_flag, "--featureset", "fs", "--name", "ix")[0] == 0
    before = searched(capsys, ws, ids)
    path = damage(ws, which)
    commands = [["similar", "--index", "ix", "--image-id", ids[0]], ["index", "--featureset", "fs", "--name", "ix"]]
    if which == "faiss random bytes":  # of the right size: only reading it tells (a rerun with nothing new does not)
        commands.pop()
    for argv in commands:
        code, _, err = cli(capsys, *argv, *ws_flag)
        line = one_error_line(err)
        assert code == 1 and str(path) in line, line
        assert "'imgfeat index --rebuild --featureset" in line and "--name ix'" in line, line
    code, out, err = cli(capsys, "index", *ws_flag, "--featureset", "fs", "--name", "ix", "--rebuild", "--json")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["rows"], summary["rebuilt"], summary["written"]) == (40, True, True)
    assert searched(capsys, ws, ids) == before
    assert [p.name for p in ws.index_dir("ix").iterdir()] == ["ids.parquet"]
    assert len(list(ws.index_files_dir("ix").glob("_index-*.faiss"))) == 1


def test_rebuild_keeps_the_kind_and_refuses_another_featureset(ws, capsys):
    from imgfeat.index import IndexConfig, build_index, list_indexes

    featureset(ws)
    featureset(ws, "fs2", seed=2)
    build_index(ws, IndexConfig("fs", name="ix", kind="hnsw"), "r1")
    out = build_index(ws, IndexConfig("fs", name="ix", rebuild=True), "r2")
    assert (out.kind, out.rebuilt, out.rows) == ("hnsw", True, 40)
    with pytest.raises(ConfigError, match="index ix was built on featureset fs, not fs2"):
        build_index(ws, IndexConfig("fs2", name="ix", rebuild=True), "r3")
    assert [i.run_id for i in list_indexes(ws)] == ["r2"]


def test_ls_lists_the_rest_and_names_the_damaged_index(ws, capsys):
    """Before, one damaged _index.json made `ls` (and `prune`) a JSONDecodeError traceback."""
    featureset(ws)
    for name in ("ix", "ok"):
        cli(capsys, "index", "--workspace", str(ws.root), "--featureset", "fs", "--name", name)
    path = damage(ws, "json not json")
    code, out, err = cli(capsys, "ls", "--workspace", str(ws.root), "--json")
    assert code == 0 and "Traceback" not in err
    listed = {i["name"]: i for i in json.loads(out.strip().splitlines()[-1])["indexes"]}
    assert listed["ok"]["rows"] == 40 and listed["ok"]["featureset"] == "fs"
    assert str(path) in listed["ix"]["error"] and "--rebuild" in listed["ix"]["error"]
    assert str(path) in err  # and a warning says it
    code, out, err = cli(capsys, "ls", "--workspace", str(ws.root))
    assert code == 0 and "ok" in out and str(path) in out
    code, _, err = cli(capsys, "prune", "--workspace", str(ws.root))
    assert code == 1 and str(path) in one_error_line(err)  # which featureset it needs is unknown: prune waits


def test_a_copied_index_answers_to_its_folder_name(ws):
    import shutil

    from imgfeat.index import Index, IndexConfig, build_index

    featureset(ws)
    build_index(ws, IndexConfig("fs", name="ix"), "r1")
    shutil.copytree(ws.index_dir("ix"), ws.index_dir("copy"))
    shutil.copytree(ws.index_files_dir("ix"), ws.index_files_dir("copy"))
    shutil.rmtree(ws.index_dir("ix"))
    assert Index.open(ws, "copy").name == "copy" and len(Index.open(ws, "copy")) == 40


def test_an_index_grows_from_its_committed_rows_read_a_row_group_at_a_time(ws):
    """An extension copies the committed rows of ids.parquet (the provenance's prefix: rows a
    crash left after it are not the index's) a row group at a time into the new ids file, and
    checks them as it copies: a file changed between the read of its ids and the copy commits
    nothing."""
    from imgfeat.index import Index, IndexConfig, build_index
    from imgfeat.index import build as B

    ids = featureset(ws, n=300)
    build_index(ws, IndexConfig("fs", name="ix", kind="flat"), "r1")
    path = ws.index_dir("ix") / "ids.parquet"
    committed = pq.read_table(path)
    stray = committed.slice(0, 7).set_column(0, committed.schema.field(0), pa.array([f"{k:032x}" for k in range(7)]))
    pq.write_table(pa.concat_tables([committed, stray]), path, row_group_size=64)  # 5 groups, 7 stray rows
    assert Index.open(ws, "ix").ids == ids
    more = [fake_image_id("more", k) for k in range(20)]
    write_featureset(ws, "fs", more, np.random.default_rng(5).standard_normal((20, 16)), "float32", run_id="r2")
    out = build_index(ws, IndexConfig("fs", name="ix", kind="flat"), "r2")
    assert (out.added, out.rows) == (20, 320)
    assert Index.open(ws, "ix").ids == ids + more
    assert pq.read_table(path)["image_id"].to_pylist() == ids + more

    real = B._id_rows

    def tampered(*args):  # the committed rows swapped while the new index is being made
        t = pq.read_table(path)
        pq.write_table(t.take(pa.array([1, 0, *range(2, t.num_rows)])), path)
        return real(*args)

    later = [fake_image_id("later", k) for k in range(5)]
    write_featureset(ws, "fs", later, np.random.default_rng(6).standard_normal((5, 16)), "float32", run_id="r3")
    B._id_rows = tampered
    try:
        with pytest.raises(ImgfeatError, match=r"ids.parquet does not match .*_index.json; rebuild it"):
            build_index(ws, IndexConfig("fs", name="ix", kind="flat"), "r3")
    finally:
        B._id_rows = real
    assert json.loads((ws.index_files_dir("ix") / "_index.json").read_text())["rows"] == 320  # nothing committed


def test_an_ids_file_that_does_not_match_names_both_files_and_rebuild(ws):
    import pyarrow.parquet as pq

    from imgfeat.index import Index, IndexConfig, build_index

    featureset(ws)
    build_index(ws, IndexConfig("fs", name="ix"), "r1")
    path = ws.index_dir("ix") / "ids.parquet"
    pq.write_table(pq.read_table(path).slice(1), path)
    with pytest.raises(ImgfeatError, match=r"ids.parquet does not match .*_index.json; rebuild it"):
        Index.open(ws, "ix")


def test_a_truncated_index_file_without_a_recorded_size_is_faiss_own_error_in_one_line(ws):
    """Provenance written before index_bytes was kept: FAISS' read error, named and with the way back."""
    from imgfeat.index import Index, IndexConfig, build_index

    featureset(ws)
    build_index(ws, IndexConfig("fs", name="ix"), "r1")
    edit_provenance(ws, index_bytes=None)
    (path,) = ws.index_files_dir("ix").glob("_index-*.faiss")
    truncate(path)
    with pytest.raises(ImgfeatError) as info:
        Index.open(ws, "ix")
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "Error in" not in message
    assert message.endswith("'imgfeat index --rebuild --featureset fs --name ix'")


@pytest.mark.parametrize("which", ["folder", "files"])
def test_a_writer_never_writes_through_a_linked_index_folder(ws, tmp_path, which):
    from imgfeat.index import IndexConfig, build_index

    featureset(ws)
    outside = tmp_path / "outside"
    outside.mkdir()
    link = ws.index_dir("ix") if which == "folder" else ws.index_files_dir("ix")
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    with pytest.raises(ImgfeatError, match=f"{link} is a symbolic link"):
        build_index(ws, IndexConfig("fs", name="ix"), "r1")
    assert not any(outside.iterdir())


# --- one reader: the index's vectors are the featureset's rows ---


def test_the_index_reads_the_rows_the_featureset_reader_trusts(ws):
    """read_vectors and load_features take the same rows: a duplicate id's first row (in shard
    order), and nothing of a shard rewritten since its commit."""
    from imgfeat.core.storage import list_shards
    from imgfeat.extract.featureset import load_features
    from imgfeat.index.vectors import normalise, read_vectors

    rng = np.random.default_rng(9)
    X = rng.standard_normal((3, 10, 16)).astype(np.float32)
    first = [fake_image_id("first", k) for k in range(10)]
    later = first[:5] + [fake_image_id("later", k) for k in range(5)]  # 5 duplicates, then 5 new
    lost = [fake_image_id("lost", k) for k in range(10)]
    for run, ids, x in (("a1", first, X[0]), ("b2", later, X[1]), ("c3", lost, X[2])):
        write_featureset(ws, "fs", ids, x, dtype="float32", run_id=run)
    edited = list_shards(ws.featureset_dir("fs"))[-1]  # c3's
    pq.write_table(pq.read_table(edited).slice(1), edited)
    expected = {**dict(zip(later, X[1])), **dict(zip(first, X[0]))}  # a1's row of a duplicate wins
    for wanted in (None, first[::3] + later[-2:] + lost[:2]):
        want_ids, want_X = load_features(ws, "fs", wanted)
        got_ids, got_X = read_vectors(ws, "fs", wanted)
        keys = list(expected) if wanted is None else [i for i in wanted if i in expected]
        assert sorted(got_ids) == sorted(want_ids.tolist()) == sorted(keys)
        np.testing.assert_allclose(got_X, normalise(np.stack([expected[i] for i in got_ids])), rtol=1e-6)
        np.testing.assert_allclose(normalise(want_X), normalise(np.stack([expected[i] for i in want_ids])), rtol=1e-6)
