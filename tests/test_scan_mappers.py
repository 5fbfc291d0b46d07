"""Scan's pure pieces, called directly: walk order and skips, probe, labels and splits, rescan matching."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pytest
from tiny_images import encode, jpeg_bytes, noise_image, png_bytes

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError
from imgfeat.scan import walk as W
from imgfeat.scan.probe import has_image_extension, probe_file, truncation
from imgfeat.scan.rescan import OldRow, classify, walk_key
from imgfeat.scan.scan import Labeller, fraction_split, read_labels_csv, relabel, repixel
from imgfeat.scan.walk import FileEntry, WalkOptions, WalkStats, walk

pytestmark = pytest.mark.quick


@pytest.fixture
def tree(tmp_path) -> Path:
    """root/{b/2.jpg, b/10.png, a.jpg, .hidden.jpg, .dot/x.jpg, notes.txt, c/d/deep.JPG}."""
    root = tmp_path / "root"
    for rel, data in [
        ("b/2.jpg", jpeg_bytes(1)),
        ("b/10.png", png_bytes(2)),
        ("a.jpg", jpeg_bytes(3)),
        (".hidden.jpg", jpeg_bytes(4)),
        (".dot/x.jpg", jpeg_bytes(5)),
        ("notes.txt", b"text"),
        ("c/d/deep.JPG", jpeg_bytes(6)),
    ]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def walked(root: Path, **opts) -> tuple[list[str], WalkStats]:
    stats = WalkStats()
    return [e.rel for e in walk(str(root), WalkOptions(**opts), stats)], stats


# ---------------------------------------------------------------- walk


def test_walk_is_depth_first_sorted_by_name_and_skips_hidden_and_non_images(tree):
    rels, stats = walked(tree)
    assert rels == ["a.jpg", "b/10.png", "b/2.jpg", "c/d/deep.JPG"]
    assert stats.skipped[W.SKIP_HIDDEN] == 2 and stats.skipped[W.SKIP_NON_IMAGE] == 1
    assert stats.dirs == 4  # root, b, c, c/d


def test_walk_keeps_non_images_on_request(tree):
    rels, stats = walked(tree, keep_non_images=True)
    assert "notes.txt" in rels and stats.skipped[W.SKIP_NON_IMAGE] == 0


def test_walk_entries_carry_stat_facts(tree):
    entries = {e.rel: e for e in walk(str(tree), WalkOptions(), WalkStats())}
    st = os.stat(tree / "a.jpg")
    assert entries["a.jpg"] == FileEntry("a.jpg", str(tree / "a.jpg"), st.st_size, st.st_mtime_ns, None)


def test_walk_order_is_the_rescan_merge_order(tree):
    rels, _ = walked(tree)
    assert rels == sorted(rels, key=walk_key)


def test_a_link_to_a_folder_inside_the_root_is_not_walked_twice(tree):
    (tree / "again").symlink_to(tree / "b")
    rels, stats = walked(tree)
    assert rels.count("b/2.jpg") == 1 and not any(r.startswith("again/") for r in rels)
    assert stats.skipped[W.SKIP_LINKED_DIR] == 1


def test_a_link_out_of_the_root_needs_follow_links(tree, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "far.jpg").write_bytes(jpeg_bytes(7))
    (tree / "out").symlink_to(outside)
    rels, stats = walked(tree)
    assert "out/far.jpg" not in rels and stats.skipped[W.SKIP_OUTSIDE_ROOT] == 1
    assert "out/far.jpg" in walked(tree, follow_links=True)[0]


def test_a_broken_link_is_an_entry_with_a_stat_error(tree):
    (tree / "gone.jpg").symlink_to(tree / "nowhere.jpg")
    entry = next(e for e in walk(str(tree), WalkOptions(), WalkStats()) if e.rel == "gone.jpg")
    assert entry.size is None and "broken symbolic link" in entry.stat_error


@pytest.mark.parametrize(
    "name, want",
    [
        ("a.jpg", True),
        ("A.JPEG", True),
        ("x.webp", True),
        ("x.txt", False),
        (".jpg", False),
        ("jpg", False),
        ("archive.tar.gz", False),
    ],
)
def test_has_image_extension(name, want):
    assert has_image_extension(name) is want


# ---------------------------------------------------------------- probe


def test_probe_hashes_the_bytes_and_reads_the_header(tmp_path):
    data = png_bytes(0, (12, 7))
    path = tmp_path / "x.png"
    path.write_bytes(data)
    probe = probe_file(str(path), max_pixels=10_000)
    assert probe.image_id == hashlib.blake2b(data, digest_size=16).hexdigest()
    assert (probe.status, probe.width, probe.height, probe.format, probe.mode) == (S.STATUS_OK, 12, 7, "PNG", "RGB")


@pytest.mark.parametrize(
    "data, max_pixels, status",
    [
        (b"", 10_000, S.STATUS_EMPTY),
        (b"plain text, not pixels", 10_000, S.STATUS_NOT_AN_IMAGE),
        (jpeg_bytes(1, (40, 30))[:-300], 10_000, S.STATUS_TRUNCATED),
        (png_bytes(1, (40, 30)), 1_000, S.STATUS_TOO_LARGE),
    ],
)
def test_probe_statuses(tmp_path, data, max_pixels, status):
    path = tmp_path / "f.jpg"
    path.write_bytes(data)
    probe = probe_file(str(path), max_pixels)
    assert probe.status == status and probe.error
    assert probe.image_id == hashlib.blake2b(data, digest_size=16).hexdigest()


def test_probe_of_a_missing_file_is_unreadable_without_an_id(tmp_path):
    probe = probe_file(str(tmp_path / "missing.jpg"), 10_000)
    assert probe.status == S.STATUS_UNREADABLE and probe.image_id is None and "vanished" in probe.error


def test_truncation_accepts_trailing_bytes_after_the_jpeg_end():
    whole = jpeg_bytes(2)
    assert truncation("JPEG", whole + b"camera trailer") is None
    assert truncation("JPEG", whole[:-2]) is not None
    assert truncation("PNG", encode(noise_image(), "PNG")) is None


# ---------------------------------------------------------------- labels and splits


def test_labeller_folder_labels_csv_override_and_fraction_split():
    lab = Labeller({"cat/a.jpg": "dog"}, test_fraction=0.5)
    assert lab.assign("cat/a.jpg", "00000000" + "0" * 24) == ("dog", S.SPLIT_TEST)
    assert lab.assign("cat/b.jpg", "ffffffff" + "0" * 24) == ("cat", S.SPLIT_TRAIN)
    assert lab.assign("train/cat/c.jpg", "00000000" + "0" * 24) == ("cat", S.SPLIT_TRAIN)  # folder split wins
    assert lab.assign("flat.jpg", None) == (None, None)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 1.0])
def test_fraction_split_takes_about_that_fraction(fraction):
    ids = [hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest() for i in range(400)]
    share = sum(fraction_split(i, fraction) == S.SPLIT_TEST for i in ids) / len(ids)
    assert abs(share - fraction) < 0.08


def test_labels_csv_paths_are_normalised(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n./cat\\a.jpg,tabby\n/b.jpg,\n")
    assert read_labels_csv(csv) == {"cat/a.jpg": "tabby", "b.jpg": None}
    csv.write_text("file,class\n")
    with pytest.raises(ConfigError, match="path,label"):
        read_labels_csv(csv)


def test_repixel_and_relabel_rewrite_carried_rows():
    rows = [
        {
            S.IMAGE_ID: "a" * 32,
            S.PATH: "cat/x.jpg",
            S.LABEL: "cat",
            S.SPLIT: None,
            S.WIDTH: 100,
            S.HEIGHT: 100,
            S.STATUS: S.STATUS_OK,
            S.ERROR: None,
        }
    ]
    out = repixel(rows, max_pixels=5_000)
    assert out[0][S.STATUS] == S.STATUS_TOO_LARGE and "100x100" in out[0][S.ERROR]
    assert repixel(rows, max_pixels=20_000)[0][S.STATUS] == S.STATUS_OK
    table = pa.Table.from_pylist(rows, schema=S.MANIFEST_SCHEMA)
    table = relabel(table, Labeller({"cat/x.jpg": "lynx"}, test_fraction=1.0))
    assert table.column(S.LABEL).to_pylist() == ["lynx"] and table.column(S.SPLIT).to_pylist() == [S.SPLIT_TEST]


# ---------------------------------------------------------------- rescan matching


@pytest.mark.parametrize(
    "old, want",
    [
        (None, "added"),
        (OldRow(0, 10, 5, S.STATUS_OK, 4, 4), "unchanged"),
        (OldRow(0, 11, 5, S.STATUS_OK, 4, 4), "changed"),
        (OldRow(0, 10, 6, S.STATUS_OK, 4, 4), "changed"),
        (OldRow(0, 10, 5, S.STATUS_UNREADABLE, None, None), "retried"),
        (OldRow(0, 10, 5, S.STATUS_TOO_LARGE, 4, 4), "retried"),  # now under the limit
        (OldRow(0, 10, 5, S.STATUS_TOO_LARGE, 400, 400), "unchanged"),  # still over it
    ],
)
def test_classify_a_walked_file_against_its_old_row(old, want):
    entry = FileEntry("a.jpg", "/r/a.jpg", 10, 5)
    assert classify(entry, old, max_pixels=1_000) == want


def test_walk_key_sorts_folders_before_longer_names():
    assert sorted(["a-b.jpg", "a/b.jpg", "a.jpg"], key=walk_key) == ["a/b.jpg", "a-b.jpg", "a.jpg"]
