"""Hashing lives in core/hashing.py: the only hashlib import, and every id it makes keeps its value."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from imgfeat.core import hashing
from imgfeat.finetune.data import FinetuneRows, Split
from imgfeat.finetune.train import FinetuneConfig, data_hash, make_finetune_id
from imgfeat.heads.data import LabelledRows
from imgfeat.heads.train import TrainConfig, make_head_id
from imgfeat.index.dedup import DedupConfig, images_of, inputs_digest
from imgfeat.scan.scan import ScanConfig, scan_options

pytestmark = pytest.mark.quick

REPO = Path(__file__).resolve().parent.parent
# The code that ships or measures it; tests and scripts/make_lite_reference.py compute digests on
# their own on purpose (an independent check of ours).
CODE = ("pipeline", "jobs", "benchmarks")
IMPORTS_HASHLIB = re.compile(r"^\s*(import hashlib|from hashlib import)", re.MULTILINE)


def test_only_core_hashing_imports_hashlib():
    found = sorted(
        str(p.relative_to(REPO))
        for d in CODE
        for p in (REPO / d).rglob("*.py")
        if IMPORTS_HASHLIB.search(p.read_text(encoding="utf-8"))
    )
    assert found == ["pipeline/core/hashing.py"]


def test_the_helpers_give_the_standard_digests():
    # sha256("abc\n"), BLAKE2b-128("abc"), sha256('{"a":1}')
    assert hashing.sha256_lines(["abc"]) == "edeaaff3f1774ad2888673770c6d64097e391bc362d7d6fb34982ddf0efd18cb"
    assert hashing.digest_chunks([b"a", b"bc"], hashing.CONTENT_ID_ALGORITHM) == hashing.content_id(b"abc")
    assert hashing.canonical_digest({"a": 1}) == "015abd7f5cc57a2dd94b7590f04ad8084273905ee33ec5cebeae62276a97f862"
    assert hashing.canonical_digest({"a": 1}, 8) == "015abd7f"


def _rows() -> LabelledRows:
    return LabelledRows.of(
        train_ids=np.array(["a1", "b2"]),
        train_labels=np.array(["cat", "dög"]),
        test_ids=np.array(["c3"]),
        test_labels=np.array(["cat"]),
        eval_split="test",
    )


def test_head_and_finetune_ids_keep_the_values_workspaces_hold():
    """Ids name folders on disk: the same data and options must keep naming the same head."""
    rows = _rows()
    assert rows.digest() == "ed94033dda96a5639a4b18df1bbd169ca54d7b430352caef7606ffa91a5dac7d"
    assert make_head_id(TrainConfig(dataset="d", featureset="fs"), rows) == "d-logreg-db09a0f4"

    def split(ids: list[str], y: list[int]) -> Split:
        return Split(np.array(ids), [f"/{i}" for i in ids], np.array(y))

    tuned = FinetuneRows(["cat", "dög"], split(["a1"], [0]), split(["b2"], [1]), split(["c3"], [0]), rows, "test")
    data = data_hash(tuned)
    assert data == "33f21492c744f82b38588077fcff294ac78eda5c7515907236fed756578195c3"
    assert (
        make_finetune_id(FinetuneConfig(dataset="d", backbone="mobilenet_v2"), "base", data)
        == "d-mobilenet_v2-dd63dd3e"
    )


def test_scan_and_dedup_digests_keep_their_values(tmp_path):
    """A changed digest would relabel every carried-over row or recompute every dedup result."""
    (tmp_path / "l.csv").write_text("path,label\na.jpg,cat\n")
    opts = scan_options(ScanConfig(root=str(tmp_path), dataset="d", labels_csv=str(tmp_path / "l.csv")))
    assert opts["labels_csv_sha256"] == "56d8e3299ea7587deb63a70020f232b5ce85eb088be7f4fa6c69be817b72629f"
    im = images_of(
        ["a1"], np.zeros((1, 2), np.float32), ["a1", "a1"], ["/x/a.jpg", "/x/ä.jpg"], ["train", None], 1, ["cat", None]
    )
    # changed once, on purpose, when dedup stopped holding the manifest (rows digested in manifest order)
    assert inputs_digest(DedupConfig(dataset="d", featureset="fs"), im) == "7be6966e6d5305d7a57faac90fd84bc8"
