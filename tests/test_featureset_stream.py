"""featureset.iter_features: the one streaming reader of a featureset (bounded batches, load_features' rows)."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import write_featureset

from imgfeat.extract.featureset import iter_features, load_features


def _ids(n: int, start: int = 0) -> list[str]:
    return [f"{k:032x}" for k in range(start, start + n)]


@pytest.fixture
def fs(ws):
    """250 rows in 64-row shards, 10 of them written again by a second run, two holding NaN/inf (never read back)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((250, 16)).astype(np.float32)
    X[7, 3], X[100, 0] = np.nan, np.inf
    write_featureset(ws, "fs", _ids(250), X, "float32", 64)
    write_featureset(
        ws, "fs", _ids(10, 240) + _ids(0), X[240:250] + 100, "float32", 64, run_id="zlater"
    )  # its shards sort after the first
    return X


@pytest.mark.quick
def test_batches_are_bounded_and_hold_every_finite_row_once(ws, fs):
    batches = list(iter_features(ws, "fs", batch_rows=50))
    assert max(len(i) for i, _ in batches) <= 50 and all(len(i) == len(X) for i, X in batches)
    ids = np.concatenate([i for i, _ in batches]).tolist()
    X = np.concatenate([X for _, X in batches])
    assert len(ids) == len(set(ids)) == 248 and _ids(1, 7)[0] not in ids and _ids(1, 100)[0] not in ids
    want = np.delete(fs, [7, 100], axis=0)  # the first row of each id (in shard order) wins
    np.testing.assert_array_equal(X[np.argsort(ids)], want)
    assert X.dtype == np.float32


@pytest.mark.quick
def test_ids_choose_rows_and_load_features_gives_the_same_rows_in_their_order(ws, fs):
    wanted = _ids(3, 245) + _ids(2, 5) + _ids(1, 7) + ["f" * 32]
    got = {
        i: x for ids, X in iter_features(ws, "fs", ids=wanted, batch_rows=2, dtype=np.float16) for i, x in zip(ids, X)
    }
    assert sorted(got) == sorted(wanted[:5])
    assert got[_ids(1, 246)[0]].dtype == np.float16
    ids, X = load_features(ws, "fs", wanted)
    assert ids.tolist() == wanted[:5]
    np.testing.assert_array_equal(X, fs[[245, 246, 247, 5, 6]])


@pytest.mark.quick
def test_a_shard_without_wanted_ids_is_never_decoded(ws, fs, monkeypatch):
    from imgfeat.extract import featureset as F

    opened = []
    real = F.open_shard
    monkeypatch.setattr(F, "open_shard", lambda name, path: opened.append(path) or real(name, path))
    assert [i.tolist() for i, _ in iter_features(ws, "fs", ids=_ids(1, 70))] == [_ids(1, 70)]
    assert len(opened) == 1


@pytest.mark.quick
@pytest.mark.parametrize("plain", [False, True])
def test_a_plan_from_the_id_columns_reads_back_iter_features_rows_without_an_id(ws, fs, plain):
    """plan_rows decides from the id columns which rows iter_features(ids=...) yields (a duplicate's
    first row, no NaN/inf row, each id once), and iter_planned reads those rows back in that order
    with no id at all: each batch says which plan rows it holds."""
    from imgfeat.core.keys import KeyIndex, as_strings
    from imgfeat.extract.featureset import iter_planned, plan_rows

    wanted = _ids(20, 235) + _ids(3, 5) + _ids(1, 7) + _ids(2, 99) + ["f" * 32]
    if plain:  # ids that are not content ids stay plain keys: the same plan
        write_featureset(ws, "plain", [f"img-{k}" for k in range(250)], fs, "float32", 64)
        write_featureset(ws, "plain", [f"img-{k}" for k in range(240, 250)], fs[240:] + 100, "float32", 64, "zlater")
        wanted = [f"img-{int(i, 16)}" for i in wanted[:-1]] + ["nope"]
    name = "plain" if plain else "fs"
    index = KeyIndex(wanted)
    ranks: list[np.ndarray] = []
    plan = plan_rows(ws, name, index, ranks.append)
    expected = [(i.tolist(), X) for i, X in iter_features(ws, name, ids=wanted, batch_rows=1000)]
    want_ids = [i for ids, _ in expected for i in ids]
    want_X = np.concatenate([X for _, X in expected])
    order = np.concatenate(ranks)
    assert plan.rows == len(want_ids) == len(order) == 18  # 7 and 100 hold NaN/inf; 250.. and the last: none
    assert as_strings(index.keys()[order]) == want_ids
    got = list(iter_planned(name, plan, batch_rows=5))
    assert max(len(at) for at, _ in got) <= 5
    np.testing.assert_array_equal(np.concatenate([at for at, _ in got]), np.arange(plan.rows))
    np.testing.assert_array_equal(np.concatenate([X for _, X in got]), want_X)


@pytest.mark.quick
def test_planned_rows_of_a_shard_changed_since_its_commit_do_not_come(ws, fs):
    """A shard rewritten between the plan and the read is left out (open_shard warns): the rows that
    come say which plan rows they are, so a caller knows what is missing."""
    import pyarrow.parquet as pq

    from imgfeat.core.keys import KeyIndex
    from imgfeat.core.storage import list_shards
    from imgfeat.extract.featureset import iter_planned, plan_rows

    plan = plan_rows(ws, "fs", KeyIndex(_ids(250)))
    first = list_shards(ws.featureset_dir("fs"))[0]
    pq.write_table(pq.read_table(first).slice(1), first)
    at = np.concatenate([a for a, _ in iter_planned("fs", plan)])
    in_first = int(np.unpackbits(plan.shards[0][1]).sum())
    np.testing.assert_array_equal(at, np.arange(in_first, plan.rows))
