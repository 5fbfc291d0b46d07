"""The demo's photo set (imgfeat.tools.samples): made once, atomically, and remade only when its spec changes."""

from __future__ import annotations

import pytest

from imgfeat.tools.samples import DEMO_STAMP, demo_photo_set


@pytest.mark.quick
def test_demo_photo_set_is_made_once_and_remade_when_its_spec_changes(tmp_path):
    root = tmp_path / "demo_images"
    out, n = demo_photo_set(root, per_class=2)
    jpgs = sorted(root.rglob("*.jpg"))
    assert out == root and n == len(jpgs) == 12  # 6 classes x 2
    assert len({p.parent.parent.name for p in jpgs} | {p.parent.name for p in jpgs}) > 1  # labelled folders
    assert not root.with_name("demo_images.tmp").exists()  # made aside, then moved in whole
    mtimes = {p: p.stat().st_mtime_ns for p in jpgs}
    assert demo_photo_set(root, per_class=2) == (root, 12)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.jpg")} == mtimes  # the same spec: nothing rewritten
    assert demo_photo_set(root, per_class=3)[1] == len(list(root.rglob("*.jpg"))) == 18
    assert "per_class=3" in (root / DEMO_STAMP).read_text()


@pytest.mark.quick
def test_a_half_made_set_without_its_stamp_is_made_again(tmp_path):
    root = tmp_path / "demo_images"
    root.mkdir()
    (root / "stray.jpg").write_bytes(b"not a photo")  # an older, interrupted or foreign folder
    _, n = demo_photo_set(root, per_class=1)
    assert n == 6 and not (root / "stray.jpg").exists()
