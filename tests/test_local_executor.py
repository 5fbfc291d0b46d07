"""The local executor's one stream across shards: batches cut at shard ends, decoders started once,
commits in shard order off the model's thread, and the same rows as one shard of everything."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from tiny_images import noise_image

from imgfeat.core.errors import ImgfeatError
from imgfeat.core.storage import list_shards
from imgfeat.core.workspace import Workspace
from imgfeat.extract.batches import Batch, ChunkedItems, InputSpec, Item, batch_chunks
from imgfeat.extract.decode import DecodeConfig
from imgfeat.extract.executors import local
from imgfeat.extract.executors.base import BatchReport
from imgfeat.extract.extract import ExtractConfig, run_extract
from imgfeat.extract.forward import Landed
from imgfeat.scan.scan import ScanConfig, run_scan

ITEMS = [Item(f"id{i:02d}", f"/nowhere/{i}.jpg") for i in range(10)]


def landed_of(chunks: list[list[Item]]) -> list[Landed]:
    return [
        Landed(Batch([i.image_id for i in c], np.zeros((3, 1, 1, 3), np.uint8), [], 0.0), None, 0.0, 0.0)
        for c in chunks
    ]


@pytest.mark.quick
def test_the_plan_cuts_batches_at_shard_ends_and_hands_each_shard_its_own():
    plan = local.ShardPlan(ITEMS, shard_size=4, batch_size=3, tag="t")
    chunks = list(plan.chunks())
    assert [len(c) for c in chunks] == [3, 1, 3, 1, 2]  # never 3 items across a shard's end
    plan2 = local.ShardPlan(ITEMS, shard_size=4, batch_size=3, tag="t")
    stream = iter(landed_of(list(plan2.chunks())))
    got = [(s.first, s.seq, [i for one in landed for i in one.batch.ids]) for s, landed in plan2.split(stream)]
    assert got == [
        (0, 0, [i.image_id for i in ITEMS[0:4]]),
        (4, 1, [i.image_id for i in ITEMS[4:8]]),
        (8, 2, [i.image_id for i in ITEMS[8:10]]),
    ]
    assert not plan2.started


@pytest.mark.quick
def test_decoders_take_chunked_items_as_they_are():
    assert [len(c) for c in batch_chunks(ITEMS, 4)] == [4, 4, 2]
    assert [len(c) for c in batch_chunks(ChunkedItems([ITEMS[:1], ITEMS[1:4]]), 4)] == [1, 3]
    with pytest.raises(ValueError, match="batch chunk of 5 items"):
        list(batch_chunks(ChunkedItems([ITEMS[:5]]), 4))
    # A thread decoder keeps the chunks: these files are missing, so each batch is its items' error rows.
    spec = _spec(batch_size=4)
    batches = list(local.thread_batches(ChunkedItems([ITEMS[:1], ITEMS[1:4]]), spec, "r", workers=2))
    assert [[e.image_id for e in b.errors] for b in batches] == [["id00"], ["id01", "id02", "id03"]]


class _Writer:
    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail
        self.feature_shards = [name]

    def flush(self) -> None:
        if self.fail:
            raise ImgfeatError(f"disk full at {self.name}")
        self.log.append(f"{self.name} on {threading.current_thread().name}")


@pytest.mark.quick
def test_commits_run_in_shard_order_off_the_callers_thread():
    log: list[str] = []
    commits = local.CommitThread()
    try:
        for k in range(3):
            commits.submit(_Writer(f"s{k}", log), local.Shard(k, [], "t", seq=k), local.NO_SEAM)  # type: ignore[arg-type]
        reports = list(commits.wait())
    finally:
        commits.close()
    assert [r.shards for r in reports] == [["s0"], ["s1"], ["s2"]]
    assert [line.split(" on ")[0] for line in log] == ["s0", "s1", "s2"]
    assert all("imgfeat-commit" in line for line in log)


@pytest.mark.quick
def test_after_a_failed_commit_no_later_shard_commits_and_the_failure_is_raised():
    log: list[str] = []
    commits = local.CommitThread()
    try:
        for k, fail in enumerate((False, True, False)):
            commits.submit(_Writer(f"s{k}", log, fail), local.Shard(k, [], "t", seq=k), local.NO_SEAM)  # type: ignore[arg-type]
        got: list[BatchReport] = []
        with pytest.raises(ImgfeatError, match="disk full at s1"):
            got.extend(commits.wait())
    finally:
        commits.close()
    assert [r.shards for r in got] == [["s0"]]
    assert [line.split(" on ")[0] for line in log] == ["s0"]


def _spec(batch_size: int) -> InputSpec:
    return InputSpec(DecodeConfig(size=(8, 8)), batch_size, decode="threads")


def test_one_decode_stream_for_all_shards_and_the_rows_of_one_big_shard(tmp_path: Path, monkeypatch):
    """Shards of 5 items, batches of 3: the decoders start once, each shard holds the next 5 todo
    items (a batch never joins two shards), and the features equal one shard's of everything, bit for bit."""
    (tmp_path / "imgs").mkdir()
    for i in range(13):
        noise_image(i, (20, 16)).save(tmp_path / "imgs" / f"img{i:02d}.jpg", quality=90)
    starts: list[int] = []
    real = local.decoded_batches

    def counted(*args, **kw):
        starts.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(local, "decoded_batches", counted)
    base = dict(backbone="efficientnet_lite0", weights="none", input_size=32, batch_size=3, workers=2, decode="threads")
    tables = {}
    for shard_size in (5, 1000):
        ws = Workspace(tmp_path / f"ws{shard_size}")
        run_scan(ws, ScanConfig(root=tmp_path / "imgs", dataset="d"), "scan")
        summary = run_extract(ws, ExtractConfig(dataset="d", shard_size=shard_size, **base), "run").to_json()
        assert summary["extracted"] == 13
        tables[shard_size] = [pq.read_table(p) for p in list_shards(ws.featureset_dir(summary["featureset"]))]
    assert len(starts) == 2  # one decode stream per run, not one per shard
    (one,) = tables[1000]
    assert [len(t) for t in tables[5]] == [5, 5, 3]
    parts = [one.slice(0, 5), one.slice(5, 5), one.slice(10, 3)]
    for part, shard in zip(parts, tables[5]):
        assert shard.column("image_id").to_pylist() == part.column("image_id").to_pylist()
        a = np.asarray(shard.column("feature").combine_chunks().flatten())
        b = np.asarray(part.column("feature").combine_chunks().flatten())
        assert a.tobytes() == b.tobytes()


@pytest.mark.quick
def test_decoders_default_to_every_core_and_gpu_decode_to_a_few_readers(monkeypatch):
    """nvJPEG keeps CPU threads of its own busy: GPU decode's readers default to a few, not every core."""
    from imgfeat.extract.gpudecode import READ_THREADS

    monkeypatch.setattr(local.os, "cpu_count", lambda: 16)
    assert [local.default_workers(mode) for mode in ("auto", "threads", "processes")] == [16, 16, 16]
    assert local.default_workers("gpu") == READ_THREADS < 16
    monkeypatch.setattr(local.os, "cpu_count", lambda: 2)
    assert local.default_workers("gpu") == 2 and local.default_workers() == 2
