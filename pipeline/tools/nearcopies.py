"""Near-copies people make of a photo (nine transforms), distinct real photos to plant them in, and the scoring."""

from __future__ import annotations

import importlib.util
import io
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from imgfeat.core.results import JsonObject


def _crop(im: Image.Image) -> Image.Image:
    w, h = im.size
    dx, dy = round(w * 0.03), round(h * 0.03)  # 3% off each side
    return im.crop((dx, dy, w - dx, h - dy)).resize((w, h), Image.Resampling.BILINEAR)


def _letterbox(im: Image.Image) -> Image.Image:
    w, h = im.size
    pad = round(h * 0.05)  # bars adding 10% to the height
    out = Image.new("RGB", (w, h + 2 * pad))
    out.paste(im, (0, pad))
    return out


# name -> (transform, format, save options). The copies a collection really holds: re-encodes,
# small edits, thumbnails and grey renditions of the same photo.
TRANSFORMS: dict[str, tuple[Callable[[Image.Image], Image.Image], str, dict]] = {
    "png": (lambda im: im, "PNG", {}),
    "brightness": (lambda im: ImageEnhance.Brightness(im).enhance(1.15), "PNG", {}),
    "width96": (
        lambda im: im.resize((96, max(1, round(im.height * 96 / im.width))), Image.Resampling.BILINEAR),
        "PNG",
        {},
    ),
    "crop_q75": (_crop, "JPEG", {"quality": 75}),
    "jpeg_q30": (lambda im: im, "JPEG", {"quality": 30}),
    "rotate3": (lambda im: im.rotate(3, resample=Image.Resampling.BILINEAR), "PNG", {}),
    "letterbox": (_letterbox, "PNG", {}),
    "half": (
        lambda im: im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.Resampling.BILINEAR),
        "PNG",
        {},
    ),
    "grayscale": (ImageOps.grayscale, "PNG", {}),
}
SUFFIX = {"PNG": ".png", "JPEG": ".jpg"}


def near_copy(im: Image.Image, transform: str) -> tuple[bytes, str]:
    """``(file bytes, suffix)`` of ``im`` under one of TRANSFORMS."""
    fn, fmt, options = TRANSFORMS[transform]
    buf = io.BytesIO()
    fn(im.convert("RGB")).save(buf, fmt, **options)
    return buf.getvalue(), SUFFIX[fmt]


# Real photos shipped inside installed packages (nothing is downloaded): (package, file in it).
PHOTO_FILES: tuple[tuple[str, str], ...] = (
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/retina.jpg"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/motorcycle_right.png"),
    ("skimage", "data/camera.png"),
    ("skimage", "data/coins.png"),
    ("skimage", "data/moon.png"),
    ("skimage", "data/brick.png"),
    ("skimage", "data/grass.png"),
    ("skimage", "data/gravel.png"),
    ("skimage", "data/color.png"),
    ("skimage", "data/ihc.png"),
    ("skimage", "data/cell.png"),
    ("skimage", "data/page.png"),
    ("skimage", "data/text.png"),
    ("skimage", "data/clock_motion.png"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)


def shipped_photos() -> dict[str, Image.Image]:
    """name -> RGB image of each photo in PHOTO_FILES that its installed package ships."""
    out = {}
    for package, rel in PHOTO_FILES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(list(spec.submodule_search_locations)[0]) / rel
        if path.is_file():
            with Image.open(path) as im:
                out[Path(rel).stem] = im.convert("RGB")
    return out


@dataclass(frozen=True)
class Distinct:
    """One distinct photo of the set: the source photo's name (its label) and the pixels."""

    label: str
    name: str
    image: Image.Image


def distinct_photos(grids: tuple[int, ...] = (1, 2, 3, 4), min_side: int = 96, max_side: int = 320) -> list[Distinct]:
    """Each shipped photo whole and cut into non-overlapping g x g tiles for each g in ``grids``.

    Tiles of one grid never overlap, so no two images of a grid are copies; tiles of different
    grids of a photo show the same scene at other scales (similar, not copies). Tiles under
    ``min_side`` pixels are skipped; each image is shrunk to at most ``max_side``.
    """
    out = []
    for label, photo in sorted(shipped_photos().items()):
        w, h = photo.size
        for g in grids:
            tw, th = w // g, h // g
            if min(tw, th) < min_side:
                continue
            for r in range(g):
                for c in range(g):
                    tile = photo.crop((c * tw, r * th, (c + 1) * tw, (r + 1) * th))
                    tile.thumbnail((max_side, max_side))
                    out.append(Distinct(label, f"{label}-g{g}-{r}{c}", tile))
    return out


def pick(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` of ``n`` positions, sorted, the same for the same seed."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(k, n), replace=False))


LABEL_CONFLICT = "label_conflict"  # the truth tag of the same bytes under another label


def build_photo_set(
    root: Path,
    copy_fraction: float,
    seed: int,
    grids: tuple[int, ...] = (1, 2, 3, 4),
    max_side: int = 320,
    label_conflict: bool = True,
) -> dict[str, tuple[str, str | None]]:
    """Distinct photos in train/ and test/ (a quarter) by label, and near-copies of training photos in test/.

    ``copy_fraction`` of the number of photos are copies, made from the saved files with each of
    TRANSFORMS in turn, under the original's label; with ``label_conflict``, one training photo's
    bytes are also held out under another label. Returns {relative path: (the distinct photo it
    shows, the transform, LABEL_CONFLICT or None)}.
    """
    photos = distinct_photos(grids, max_side=max_side)
    test = set(pick(len(photos), len(photos) // 4, seed).tolist())
    truth: dict[str, tuple[str, str | None]] = {}
    for k, p in enumerate(photos):
        rel = f"{'test' if k in test else 'train'}/{p.label}/{p.name}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        p.image.save(root / rel, quality=90)
        truth[rel] = (p.name, None)
    train = [rel for rel in truth if rel.startswith("train/")]
    n_copies = round(copy_fraction * len(photos))
    names = list(TRANSFORMS)
    for j, k in enumerate(pick(len(train), n_copies, seed + 1).tolist()):
        rel = train[k]
        with Image.open(root / rel) as im:  # a copy is made from the file, as a person would
            data, suffix = near_copy(im, names[j % len(names)])
        label = rel.split("/")[1]
        copy_rel = f"test/{label}/copy-{names[j % len(names)]}-{j:03d}{suffix}"
        (root / copy_rel).parent.mkdir(parents=True, exist_ok=True)
        (root / copy_rel).write_bytes(data)
        truth[copy_rel] = (truth[rel][0], names[j % len(names)])
    if label_conflict and len(train) > 1:  # the very same bytes held out under another label
        rel, other = train[0], next(r for r in train if r.split("/")[1] != train[0].split("/")[1])
        conflict_rel = f"test/{other.split('/')[1]}/same-bytes-as-{Path(rel).name}"
        (root / conflict_rel).parent.mkdir(parents=True, exist_ok=True)
        (root / conflict_rel).write_bytes((root / rel).read_bytes())
        truth[conflict_rel] = (truth[rel][0], LABEL_CONFLICT)
    return truth


def score(truth: dict[str, tuple[str, str | None]], groups_dir: str, leaks_dir: str) -> JsonObject:
    """Recall per transform and overall; false grouping: images grouped with another photo's image.

    A copy is found when it is grouped with its original and reported as a leak of it; the
    label conflict is found when it is grouped with its original and the group is flagged.
    """
    import pyarrow.parquet as pq

    groups = pq.read_table(groups_dir).to_pylist()
    leaks = {r["path"]: r["nearest_path"] for r in pq.read_table(leaks_dir).to_pylist()}
    members: dict[str, set[str]] = defaultdict(set)
    group_of, flagged = {}, {}
    for r in groups:
        members[r["group_id"]].add(truth[r["path"]][0])
        group_of[r["path"]] = r["group_id"]
        flagged[r["path"]] = r.get("label_conflict", False)
    original = {name: rel for rel, (name, t) in truth.items() if t is None}
    found: dict[str, list[bool]] = defaultdict(list)
    found["all"] = []  # first in the report, then each transform
    conflicts = []
    for rel, (name, t) in truth.items():
        if t == LABEL_CONFLICT:
            conflicts.append(
                group_of.get(rel) is not None and group_of.get(rel) == group_of.get(original[name]) and flagged[rel]
            )
        if t is None or t == LABEL_CONFLICT:
            continue
        g = group_of.get(rel)
        ok = g is not None and g == group_of.get(original[name]) and truth.get(leaks.get(rel, ""), ("",))[0] == name
        found[t].append(ok)
        found["all"].append(ok)
    false = sum(1 for rel in truth if rel in group_of and len(members[group_of[rel]]) > 1)
    return {
        "recall": {t: round(sum(v) / len(v), 3) for t, v in found.items()},
        "found": f"{sum(found['all'])}/{len(found['all'])}",
        "false_grouped": false,
        "false_grouping_rate": round(false / len(truth), 4),
        "images": len(truth),
        "label_conflicts_found": f"{sum(conflicts)}/{len(conflicts)}",
    }
