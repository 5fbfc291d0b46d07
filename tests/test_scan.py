"""The scan stage on generated trees: layouts, awkward files, symlinks, rescans, crashes, the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_images import encode, noise_image, png_chunk
from tiny_images import jpeg_bytes as jpeg

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError, LockBusyError
from imgfeat.core.storage import FileLock, temp_path
from imgfeat.core.workspace import Workspace
from imgfeat.scan import probe as probe_mod
from imgfeat.scan import scan as scan_mod
from imgfeat.scan.manifest import manifest_info, read_manifest
from imgfeat.scan.scan import ScanConfig, folder_label_split, fraction_split, plan_scan, run_scan

pytestmark = pytest.mark.quick

# ---------------------------------------------------------------- tiny images, made here (see tiny_images.py)


def png_bomb(width=100_000, height=100_000) -> bytes:
    """A valid-looking PNG of a few dozen bytes that declares a huge size."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + png_chunk(b"IEND", b"")
    )


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    return encode(noise_image(3, (40, 20)), "JPEG", exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [noise_image(i, (12, 10)).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def png16() -> bytes:
    return encode(Image.fromarray((np.arange(48).reshape(6, 8) * 1000).astype(np.uint16)), "PNG")


def write(root: Path, rel: str, data: bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def rows_by_path(ws, dataset="d") -> dict[str, dict]:
    return {r[S.PATH]: r for r in read_manifest(ws, dataset).to_pylist()}


# ---------------------------------------------------------------- every kind of awkward file

# (path under ROOT/things, bytes, status, (width, height), format, mode)
AWKWARD = [
    ("zero.jpg", lambda: b"", S.STATUS_EMPTY, None, None, None),
    ("cut.jpg", lambda: jpeg(seed=1, size=(64, 48))[:-400], S.STATUS_TRUNCATED, (64, 48), "JPEG", "RGB"),
    ("cut.png", lambda: encode(noise_image(), "PNG")[:-20], S.STATUS_TRUNCATED, (32, 24), "PNG", "RGB"),
    ("text.jpg", lambda: b"this is not an image\n", S.STATUS_NOT_AN_IMAGE, None, None, None),
    ("png_named.jpg", lambda: encode(noise_image(2), "PNG"), S.STATUS_OK, (32, 24), "PNG", "RGB"),
    ("alpha.png", lambda: encode(noise_image(mode="RGBA"), "PNG"), S.STATUS_OK, (32, 24), "PNG", "RGBA"),
    ("deep.png", png16, S.STATUS_OK, (8, 6), "PNG", "I;16"),
    ("gray.jpg", lambda: encode(noise_image(mode="L"), "JPEG"), S.STATUS_OK, (32, 24), "JPEG", "L"),
    (
        "cmyk.jpg",
        lambda: encode(Image.new("CMYK", (9, 7), (0, 50, 100, 0)), "JPEG"),
        S.STATUS_OK,
        (9, 7),
        "JPEG",
        "CMYK",
    ),
    ("palette.gif", lambda: encode(noise_image().convert("P"), "GIF"), S.STATUS_OK, (32, 24), "GIF", "P"),
    ("animated.gif", animated_gif, S.STATUS_OK, (12, 10), "GIF", "P"),
    ("photo.webp", lambda: encode(noise_image(), "WEBP"), S.STATUS_OK, (32, 24), "WEBP", "RGB"),
    ("scan.tiff", lambda: encode(noise_image(), "TIFF"), S.STATUS_OK, (32, 24), "TIFF", "RGB"),
    ("old.bmp", lambda: encode(noise_image(), "BMP"), S.STATUS_OK, (32, 24), "BMP", "RGB"),
    ("rotated.jpg", exif_rotated_jpeg, S.STATUS_OK, (40, 20), "JPEG", "RGB"),  # as stored, not as shown
    ("dot.png", lambda: encode(Image.new("RGB", (1, 1)), "PNG"), S.STATUS_OK, (1, 1), "PNG", "RGB"),
    ("bomb.png", png_bomb, S.STATUS_TOO_LARGE, None, None, None),
    ("with space.jpg", lambda: jpeg(seed=4), S.STATUS_OK, (32, 24), "JPEG", "RGB"),
    ("ñandú 猫.jpg", lambda: jpeg(seed=5), S.STATUS_OK, (32, 24), "JPEG", "RGB"),
    ("LOUD.JPG", lambda: jpeg(seed=6), S.STATUS_OK, (32, 24), "JPEG", "RGB"),
    ("nested/deeper/inner.Png", lambda: encode(noise_image(7), "PNG"), S.STATUS_OK, (32, 24), "PNG", "RGB"),
]
# Entries that must not become rows.
NOT_ROWS = {
    ".DS_Store": b"\0\0\0\1Bud1",
    "._photo.jpg": b"\0\5\26\7",
    ".cache/thumb.jpg": None,
    "notes.txt": b"a note",
    "README": b"no extension",
}


@pytest.fixture(scope="module")
def awkward_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("awkward") / "root"
    for rel, make, *_ in AWKWARD:
        write(root / "things", rel, make())
    for rel, data in NOT_ROWS.items():
        write(root / "things", rel, data if data is not None else jpeg(seed=8))
    return root


@pytest.fixture(scope="module")
def scanned_awkward(awkward_tree, tmp_path_factory):
    """Scan the awkward tree (once per module) with one unreadable file and one broken link added."""
    ws = Workspace(tmp_path_factory.mktemp("awkward-ws"))
    unreadable = write(awkward_tree / "things", "locked.jpg", jpeg(seed=9))
    (awkward_tree / "things" / "gone.jpg").symlink_to(awkward_tree / "no-such-file.jpg")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _make_unreadable(unreadable, monkeypatch)
        summary = run_scan(ws, ScanConfig(awkward_tree, "d"), "run1")
    return summary, rows_by_path(ws)


def _make_unreadable(path: Path, monkeypatch) -> None:
    """chmod 000; as root (where chmod does not stop reads) make the probe's open() refuse it."""
    path.chmod(0o000)
    if os.access(path, os.R_OK):
        real_open = open

        def refusing_open(file, *args, **kwargs):
            if os.fspath(file) == str(path):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(probe_mod, "open", refusing_open, raising=False)


@pytest.mark.parametrize("rel,make,status,size,fmt,mode", AWKWARD, ids=[a[0] for a in AWKWARD])
def test_awkward_file_gets_its_status_and_header(scanned_awkward, rel, make, status, size, fmt, mode):
    _, rows = scanned_awkward
    row = rows["things/" + rel]
    assert (row[S.STATUS], row[S.FORMAT], row[S.MODE]) == (status, fmt, mode), row[S.ERROR]
    assert (row[S.WIDTH], row[S.HEIGHT]) == (size or (None, None))
    assert row[S.LABEL] == "things"
    data = make()
    assert row[S.BYTES] == len(data)
    assert row[S.IMAGE_ID] == hashlib.blake2b(data, digest_size=16).hexdigest()
    assert (row[S.ERROR] is None) == (status == S.STATUS_OK)


def test_nothing_vanishes_and_hidden_or_non_images_are_skipped(scanned_awkward):
    summary, rows = scanned_awkward
    expected = {"things/" + a[0] for a in AWKWARD} | {"things/locked.jpg", "things/gone.jpg"}
    assert set(rows) == expected
    assert summary.files == len(expected)
    assert summary.skipped == {"hidden": 3, "non_image": 2}
    assert summary.ok + summary.errors == len(expected)
    assert sum(summary.status.values()) == len(expected)


def test_unreadable_files_and_broken_links_are_rows_without_an_id(scanned_awkward):
    _, rows = scanned_awkward
    for rel, words in (("things/locked.jpg", "permission denied"), ("things/gone.jpg", "broken")):
        row = rows[rel]
        assert row[S.STATUS] == S.STATUS_UNREADABLE
        assert row[S.IMAGE_ID] is None
        assert words in row[S.ERROR]


def test_too_large_is_checked_against_max_pixels_with_the_size_recorded(ws, tmp_path):
    write(tmp_path / "r", "big.png", encode(noise_image(size=(40, 30)), "PNG"))
    write(tmp_path / "r", "small.png", encode(noise_image(size=(10, 10)), "PNG"))
    run_scan(ws, ScanConfig(tmp_path / "r", "d", max_pixels=1000), "r")
    rows = rows_by_path(ws)
    assert rows["big.png"][S.STATUS] == S.STATUS_TOO_LARGE
    assert (rows["big.png"][S.WIDTH], rows["big.png"][S.HEIGHT]) == (40, 30)
    assert "1200" in rows["big.png"][S.ERROR] and "1000" in rows["big.png"][S.ERROR]
    assert rows["small.png"][S.STATUS] == S.STATUS_OK


def test_a_file_name_that_is_not_utf8_is_an_unreadable_row(ws, tmp_path):
    root = tmp_path / "r"
    write(root, "fine.jpg", jpeg())
    os.makedirs(os.fsencode(root) + b"/caf\xe9")
    with open(os.fsencode(root) + b"/caf\xe9/x.jpg", "wb") as fh:
        fh.write(jpeg(seed=1))
    summary = run_scan(ws, ScanConfig(root, "d"), "r")
    rows = rows_by_path(ws)
    assert rows["caf\\xe9/x.jpg"][S.STATUS] == S.STATUS_UNREADABLE
    assert "UTF-8" in rows["caf\\xe9/x.jpg"][S.ERROR]
    assert summary.status == {"ok": 1, "unreadable": 1}


def test_keep_non_images_records_them_and_pillow_decides(ws, tmp_path):
    root = tmp_path / "r"
    write(root, "notes.txt", b"plain text")
    write(root, "picture.dat", encode(noise_image(), "PNG"))
    run_scan(ws, ScanConfig(root, "d", keep_non_images=True), "r")
    rows = rows_by_path(ws)
    assert rows["notes.txt"][S.STATUS] == S.STATUS_NOT_AN_IMAGE
    assert (rows["picture.dat"][S.STATUS], rows["picture.dat"][S.FORMAT]) == (S.STATUS_OK, "PNG")


@pytest.mark.parametrize(
    "fmt,tail,truncated",
    [
        ("JPEG", b"...\xff\xda scan data \xff\xd9", False),
        ("JPEG", b"...\xff\xda scan data \xff\xd9\x00\x00\n", False),  # zero padding after EOI
        ("JPEG", b"...\xff\xda scan data \xff\xd9 appended by a phone", False),
        ("JPEG", b"...\xff\xd9 thumbnail \xff\xda scan data cut", True),
        ("PNG", b"...IDAT...\x00\x00\x00\x00IEND\xaeB`\x82", False),
        ("PNG", b"...IDAT...", True),
        ("GIF", b"anything", False),
    ],
)
def test_truncation_is_told_from_the_end_of_the_file(fmt, tail, truncated):
    assert (probe_mod.truncation(fmt, tail) is not None) == truncated


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize(
    "rel,label,split",
    [
        ("a.jpg", None, None),
        ("cat/a.jpg", "cat", None),
        ("cat/2019/summer/a.jpg", "cat", None),
        ("train/cat/a.jpg", "cat", S.SPLIT_TRAIN),
        ("Train/cat/a.jpg", "cat", S.SPLIT_TRAIN),
        ("VALIDATION/dog/x/a.jpg", "dog", S.SPLIT_VAL),
        ("val/dog/a.jpg", "dog", S.SPLIT_VAL),
        ("TEST/a.jpg", None, S.SPLIT_TEST),
        ("testing/a.jpg", "testing", None),
    ],
)
def test_folder_label_and_split(rel, label, split):
    assert folder_label_split(rel) == (label, split)


def test_split_label_layout_end_to_end(ws, tmp_path):
    root = tmp_path / "r"
    for i, rel in enumerate(["Train/cat/a.jpg", "Train/dog/deep/b.jpg", "VALIDATION/cat/c.jpg", "test/dog/d.jpg"]):
        write(root, rel, jpeg(seed=i))
    summary = run_scan(ws, ScanConfig(root, "d", test_fraction=0.9), "r")
    got = {p: (r[S.LABEL], r[S.SPLIT]) for p, r in rows_by_path(ws).items()}
    assert got == {
        "Train/cat/a.jpg": ("cat", "train"),
        "Train/dog/deep/b.jpg": ("dog", "train"),
        "VALIDATION/cat/c.jpg": ("cat", "val"),  # folders win over --test-fraction
        "test/dog/d.jpg": ("dog", "test"),
    }
    assert summary.labels == 2 and summary.splits == {"test": 1, "train": 2, "val": 1}


def test_flat_layout_has_no_labels(ws, tmp_path):
    for i in range(3):
        write(tmp_path / "r", f"{i}.jpg", jpeg(seed=i))
    summary = run_scan(ws, ScanConfig(tmp_path / "r", "d"), "r")
    assert {(r[S.LABEL], r[S.SPLIT]) for r in rows_by_path(ws).values()} == {(None, None)}
    assert summary.files == 3 and summary.labels == 0


def test_labels_csv_overrides_folders_and_counts_missing_files(ws, tmp_path):
    root = tmp_path / "r"
    write(root, "cat/a.jpg", jpeg(seed=1))
    write(root, "cat/b.jpg", jpeg(seed=2))
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("path,label\ncat/a.jpg,tiger\n./cat/b.jpg,lynx\ncat/missing.jpg,dog\n")
    summary = run_scan(ws, ScanConfig(root, "d", labels_csv=csv_file), "r")
    rows = rows_by_path(ws)
    assert (rows["cat/a.jpg"][S.LABEL], rows["cat/b.jpg"][S.LABEL]) == ("tiger", "lynx")
    assert summary.labels_csv_missing == 1
    assert manifest_info(ws, "d")["options"]["labels_csv"] == str(csv_file)


@pytest.mark.parametrize(
    "text,words",
    [("file,label\na.jpg,x\n", "path,label"), ("path,label\na.jpg,x,extra\n", "line 2"), ("", "header")],
)
def test_malformed_labels_csv_is_a_config_error(ws, tmp_path, text, words):
    write(tmp_path / "r", "a.jpg", jpeg())
    bad = tmp_path / "labels.csv"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=words):
        run_scan(ws, ScanConfig(tmp_path / "r", "d", labels_csv=bad), "r")
    with pytest.raises(ConfigError, match="does not exist"):
        run_scan(ws, ScanConfig(tmp_path / "r", "d", labels_csv=tmp_path / "nope.csv"), "r")


def test_test_fraction_is_deterministic_across_rescans_renames_and_duplicates(ws, tmp_path):
    root = tmp_path / "r"
    for i in range(40):
        write(root, f"img{i:02d}.jpg", jpeg(seed=i, size=(8, 8)))
    write(root, "copy_of_img07.jpg", (root / "img07.jpg").read_bytes())
    run_scan(ws, ScanConfig(root, "d", test_fraction=0.3), "r1")
    first = rows_by_path(ws)
    splits = [r[S.SPLIT] for r in first.values()]
    assert 0 < splits.count("test") < splits.count("train")
    for r in first.values():  # the documented rule, recomputed here from the id
        assert r[S.SPLIT] == ("test" if int(r[S.IMAGE_ID][:8], 16) / 2**32 < 0.3 else "train")
    assert first["copy_of_img07.jpg"][S.SPLIT] == first["img07.jpg"][S.SPLIT]
    (root / "img03.jpg").rename(root / "renamed.jpg")
    run_scan(ws, ScanConfig(root, "d", test_fraction=0.3), "r2")
    again = rows_by_path(ws)
    assert again["renamed.jpg"][S.SPLIT] == first["img03.jpg"][S.SPLIT]
    assert all(again[p][S.SPLIT] == r[S.SPLIT] for p, r in first.items() if p in again)


def test_fraction_split_rule():
    assert fraction_split("00000000" + "0" * 24, 0.01) == "test"
    assert fraction_split("ffffffff" + "0" * 24, 0.99) == "train"
    assert fraction_split("80000000" + "0" * 24, 0.5) == "train"


# ---------------------------------------------------------------- symlinks


def test_symlink_loop_ends_and_links_out_of_root_need_follow_links(ws, tmp_path):
    root, outside = tmp_path / "r", tmp_path / "outside"
    write(root, "cat/a.jpg", jpeg(seed=1))
    write(outside, "far.jpg", jpeg(seed=2))
    (root / "cat" / "loop").symlink_to(root)  # cat/loop -> root: a cycle
    (root / "ext").symlink_to(outside)  # a folder out of the root
    (root / "cat" / "far_link.jpg").symlink_to(outside / "far.jpg")  # a file out of the root
    (root / "cat" / "near_link.jpg").symlink_to(root / "cat" / "a.jpg")  # inside: kept
    (root / "alias").symlink_to(root / "cat")  # a second way into cat/: not entered
    summary = run_scan(ws, ScanConfig(root, "d"), "r")
    assert set(rows_by_path(ws)) == {"cat/a.jpg", "cat/near_link.jpg"}
    assert summary.skipped == {"link_loop": 1, "link_outside_root": 2, "link_to_scanned_dir": 1}
    rows = rows_by_path(ws)
    assert rows["cat/near_link.jpg"][S.IMAGE_ID] == rows["cat/a.jpg"][S.IMAGE_ID]

    summary = run_scan(ws, ScanConfig(root, "d", follow_links=True), "r2")
    assert set(rows_by_path(ws)) == {"cat/a.jpg", "cat/near_link.jpg", "cat/far_link.jpg", "ext/far.jpg"}
    assert rows_by_path(ws)["ext/far.jpg"][S.LABEL] == "ext"
    assert summary.skipped == {"link_loop": 1, "link_to_scanned_dir": 1}

    (tmp_path / "outside" / "back").symlink_to(tmp_path / "outside")  # a cycle outside the root
    summary = run_scan(ws, ScanConfig(root, "d", follow_links=True), "r3")
    assert "ext/back/far.jpg" not in rows_by_path(ws) and summary.skipped["link_loop"] == 2


# ---------------------------------------------------------------- incremental rescans


@pytest.fixture
def counted_probes(monkeypatch) -> list[str]:
    """Record every file the scan hashes."""
    calls: list[str] = []
    real = scan_mod.probe_file

    def counting(path, max_pixels):
        calls.append(path)
        return real(path, max_pixels)

    monkeypatch.setattr(scan_mod, "probe_file", counting)
    return calls


def test_rescan_reads_only_what_changed(ws, tmp_path, counted_probes):
    root = tmp_path / "r"
    for i in range(6):
        write(root, f"cat/{i}.jpg", jpeg(seed=i, size=(8, 8)))
    run_scan(ws, ScanConfig(root, "d"), "r1")
    assert len(counted_probes) == 6
    before = rows_by_path(ws)

    counted_probes.clear()
    summary = run_scan(ws, ScanConfig(root, "d"), "r2")
    assert counted_probes == []
    assert (summary.unchanged, summary.hashed) == (6, 0)
    assert rows_by_path(ws) == before

    st = (root / "cat/0.jpg").stat()
    os.utime(root / "cat/0.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    write(root, "cat/1.jpg", jpeg(seed=100, size=(8, 8)))  # rewritten
    (root / "cat/2.jpg").unlink()  # removed
    write(root, "dog/new.jpg", jpeg(seed=200, size=(8, 8)))  # added
    cfg = ScanConfig(root, "d")
    plan = plan_scan(ws, cfg)
    assert counted_probes == []  # the dry run hashes nothing
    assert (plan.new, plan.changed, plan.removed, plan.unchanged) == (1, 2, 1, 3)

    summary = run_scan(ws, cfg, "r3")
    assert sorted(Path(p).name for p in counted_probes) == ["0.jpg", "1.jpg", "new.jpg"]
    assert (summary.added, summary.changed, summary.removed, summary.unchanged) == (1, 2, 1, 3)
    after = rows_by_path(ws)
    assert "cat/2.jpg" not in after and after["dog/new.jpg"][S.LABEL] == "dog"
    assert after["cat/0.jpg"][S.IMAGE_ID] == before["cat/0.jpg"][S.IMAGE_ID]
    assert after["cat/1.jpg"][S.IMAGE_ID] != before["cat/1.jpg"][S.IMAGE_ID]
    assert list(after) == sorted(after)  # walk order: deterministic


def test_rescan_with_new_options_relabels_carried_rows_without_hashing(ws, tmp_path, counted_probes):
    root = tmp_path / "r"
    for i in range(4):
        write(root, f"cat/{i}.jpg", jpeg(seed=i, size=(8, 8)))
    run_scan(ws, ScanConfig(root, "d"), "r1")
    counted_probes.clear()
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\ncat/0.jpg,lion\n")
    summary = run_scan(ws, ScanConfig(root, "d", labels_csv=labels, test_fraction=0.5, max_pixels=10), "r2")
    assert counted_probes == [] and summary.unchanged == 4
    rows = rows_by_path(ws)
    assert rows["cat/0.jpg"][S.LABEL] == "lion"
    assert {r[S.SPLIT] for r in rows.values()} <= {"train", "test"} and None not in {r[S.SPLIT] for r in rows.values()}
    assert {r[S.STATUS] for r in rows.values()} == {S.STATUS_TOO_LARGE}  # 64 pixels > 10
    assert manifest_info(ws, "d")["options"]["test_fraction"] == 0.5

    labels.write_text("path,label\ncat/0.jpg,puma\n")  # same CSV path, new content
    summary = run_scan(ws, ScanConfig(root, "d", labels_csv=labels, test_fraction=0.5), "r3")
    assert rows_by_path(ws)["cat/0.jpg"][S.LABEL] == "puma"
    assert {r[S.STATUS] for r in rows_by_path(ws).values()} == {S.STATUS_OK}  # default limit again
    # Files that were over the limit were never checked for truncation: now they are read.
    assert summary.retried == 4 and len(counted_probes) == 4


def test_a_crash_mid_scan_keeps_the_old_manifest_and_leaves_no_partial_file(ws, tmp_path, monkeypatch):
    root = tmp_path / "r"
    for i in range(3):
        write(root, f"{i}.jpg", jpeg(seed=i, size=(8, 8)))
    run_scan(ws, ScanConfig(root, "d"), "r1")
    manifest = ws.manifest_path("d")
    old_bytes = manifest.read_bytes()
    for i in range(3, 40):
        write(root, f"{i}.jpg", jpeg(seed=i, size=(8, 8)))
    monkeypatch.setattr(scan_mod, "BATCH_FILES", 4)  # small batches and row groups: rows reach
    monkeypatch.setattr(scan_mod, "ROW_GROUP_ROWS", 4)  # the temporary file before the crash
    seen_partial: list[bool] = []
    real = scan_mod.probe_file

    def crashing(path, max_pixels):
        if path.endswith("30.jpg"):
            seen_partial.append(temp_path(manifest).exists())  # outside datasets/d/: readers never see it
            raise RuntimeError("disk on fire")
        return real(path, max_pixels)

    monkeypatch.setattr(scan_mod, "probe_file", crashing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_scan(ws, ScanConfig(root, "d", workers=1), "r2")
    assert seen_partial == [True]
    assert manifest.read_bytes() == old_bytes
    assert sorted(p.name for p in manifest.parent.iterdir()) == ["manifest.parquet"]


def test_a_second_scanner_of_the_same_dataset_fails_fast(ws, tmp_path):
    write(tmp_path / "r", "a.jpg", jpeg())
    with FileLock(ws.locks_dir / "dataset-d.lock", "test holder"):
        with pytest.raises(LockBusyError, match="dataset 'd'"):
            run_scan(ws, ScanConfig(tmp_path / "r", "d"), "r")
        run_scan(ws, ScanConfig(tmp_path / "r", "other"), "r")  # another dataset is not blocked


def test_one_info_line_at_the_end_with_the_counts(ws, tmp_path, caplog):
    write(tmp_path / "r", "a.jpg", jpeg())
    write(tmp_path / "r", "b.jpg", b"")
    with caplog.at_level(logging.INFO, logger="imgfeat"):
        run_scan(ws, ScanConfig(tmp_path / "r", "d"), "r")
    lines = [r.getMessage() for r in caplog.records if r.name == "imgfeat.scan.scan" and r.levelno == logging.INFO]
    assert len(lines) == 1
    assert "2 files (2 added" in lines[0] and "1 ok, 1 errors" in lines[0]


def test_empty_folder_gives_an_empty_readable_manifest(ws, tmp_path):
    (tmp_path / "r").mkdir()
    summary = run_scan(ws, ScanConfig(tmp_path / "r", "d"), "r")
    table = read_manifest(ws, "d")
    assert summary.files == 0 and table.num_rows == 0
    assert table.schema.remove_metadata() == S.MANIFEST_SCHEMA


# ---------------------------------------------------------------- bad values at the edge


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"test_fraction": -0.1}, "-0.1"),
        ({"test_fraction": 1.5}, "1.5"),
        ({"max_pixels": 0}, "max_pixels"),
        ({"workers": 0}, "workers"),
        ({"dataset": "../escape"}, "../escape"),
    ],
)
def test_bad_config_values_name_themselves(tmp_path, kwargs, words):
    with pytest.raises(ConfigError, match=__import__("re").escape(words)):
        ScanConfig(**{"root": tmp_path, "dataset": "d", **kwargs})


def test_root_must_be_an_existing_folder(ws, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        run_scan(ws, ScanConfig(tmp_path / "nope", "d"), "r")
    write(tmp_path, "file.jpg", jpeg())
    with pytest.raises(ConfigError, match="not a directory"):
        plan_scan(ws, ScanConfig(tmp_path / "file.jpg", "d"))


# ---------------------------------------------------------------- the command


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from imgfeat.cli.main import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json_summary_and_run_record(ws, tmp_path, capsys):
    write(tmp_path / "r", "cat/a.jpg", jpeg())
    write(tmp_path / "r", "cat/bad.jpg", b"")
    code, out, _ = cli(["scan", str(tmp_path / "r"), "--dataset", "pets", "--json"], capsys)
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["files"], summary["ok"], summary["errors"], summary["added"]) == (2, 1, 1, 2)
    assert summary["status"] == {"empty": 1, "ok": 1}
    assert summary["manifest"] == str(ws.manifest_path("pets"))
    assert json.loads((ws.runs_dir / f"{summary['run_id']}.json").read_text())["files"] == 2


def test_cli_missing_root_exits_2_naming_it(ws, tmp_path, capsys):
    missing = tmp_path / "no-photos-here"
    code, out, err = cli(["scan", str(missing), "--dataset", "pets", "--json"], capsys)
    assert code == 2
    assert str(missing) in err and str(missing) in json.loads(out.strip().splitlines()[-1])["error"]


def test_cli_help_explains_layouts_and_gives_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["scan", "--help"], capsys)
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for words in ("ROOT/<split>/<label>", "--test-fraction", "--labels", "examples:", "imgfeat scan "):
        assert words in text


def test_rescan_merges_with_the_old_manifest_across_row_groups(ws, tmp_path, monkeypatch, counted_probes):
    """Small row groups and batches: carried rows come from many groups, interleaved with new ones."""
    from imgfeat.scan import manifest as manifest_mod
    from imgfeat.scan.rescan import walk_key

    for module in (manifest_mod, scan_mod):
        monkeypatch.setattr(module, "ROW_GROUP_ROWS", 7)
    monkeypatch.setattr(scan_mod, "BATCH_FILES", 5)
    root = tmp_path / "r"
    names = ["a.jpg", "a/x.jpg", "a b/x.jpg", "a-b.jpg", "a.b/x.jpg", "B.jpg", "b/c/d.jpg", "é.jpg", "z/0.jpg"]
    for i in range(60):
        write(root, f"{i % 4}/{names[i % len(names)].replace('.jpg', f'_{i}.jpg')}", jpeg(seed=i, size=(4, 4)))
    run_scan(ws, ScanConfig(root, "d"), "r1")
    first = rows_by_path(ws)
    assert list(first) == sorted(first, key=walk_key)  # the order the merge relies on
    assert manifest_mod.pq.ParquetFile(ws.manifest_path("d")).num_row_groups > 5

    doomed = sorted(first)[::6]
    for rel in doomed:
        (root / rel).unlink()
    added = ["0/a/new.jpg", "1/a b/new.jpg", "3/zz.jpg", "2/é/new.jpg"]
    for i, rel in enumerate(added):
        write(root, rel, jpeg(seed=500 + i, size=(4, 4)))
    rewritten = sorted(first)[3]
    write(root, rewritten, jpeg(seed=999, size=(5, 5)))
    counted_probes.clear()
    summary = run_scan(ws, ScanConfig(root, "d"), "r2")

    expected_reads = sorted(str(root / rel) for rel in [*added, rewritten])
    assert sorted(counted_probes) == expected_reads
    assert (summary.added, summary.changed, summary.removed) == (4, 1, len(doomed))
    assert summary.unchanged == 60 - len(doomed) - 1
    run_scan(ws, ScanConfig(root, "fresh"), "r3")  # what a scan from scratch says
    assert read_manifest(ws, "d").to_pylist() == read_manifest(ws, "fresh").to_pylist()
