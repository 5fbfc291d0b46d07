"""Real photos that ship inside installed packages, and a labelled photo set made from them."""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# name -> (package, file inside the package). All ship in the wheels; nothing is downloaded.
SHIPPED_PHOTOS: dict[str, tuple[str, str]] = {
    "chelsea": ("skimage", "data/chelsea.png"),  # a tabby cat
    "coffee": ("skimage", "data/coffee.png"),  # a cup of espresso
    "astronaut": ("skimage", "data/astronaut.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "hubble": ("skimage", "data/hubble_deep_field.jpg"),
    "retina": ("skimage", "data/retina.jpg"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "camera": ("skimage", "data/camera.png"),  # grayscale
    "china": ("sklearn", "datasets/images/china.jpg"),  # a temple
    "flower": ("sklearn", "datasets/images/flower.jpg"),
}

# The demo's classes: one shipped photo each, seen through random crops and jitter.
DEMO_CLASSES: dict[str, str] = {
    "cat": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
    "temple": "china",
    "flower": "flower",
    "motorcycle": "motorcycle",
}


def photo_path(name: str) -> Path:
    """Path of a photo shipped by an installed package (see ``SHIPPED_PHOTOS``)."""
    package, rel = SHIPPED_PHOTOS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; it ships the photo {name!r}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r}")
    return path


def load_photo(name: str) -> Image.Image:
    with Image.open(photo_path(name)) as im:
        return im.convert("RGB")


@dataclass(frozen=True)
class PhotoSetSpec:
    """How to build a labelled set: ``per_class`` images per class, ``test_fraction`` held out."""

    classes: tuple[tuple[str, str], ...] = tuple(DEMO_CLASSES.items())
    per_class: int = 60
    test_fraction: float = 0.25
    min_side: int = 128
    max_side: int = 320
    seed: int = 0
    # Crop area as a fraction of the photo, and colour jitter strength (factors in 1 +- jitter).
    # Smaller crops and stronger jitter make a harder set (e.g. crop_area=(0.05, 0.2), jitter=0.5).
    crop_area: tuple[float, float] = (0.3, 1.0)
    jitter: float = 0.25


def augment(photo: Image.Image, rng: np.random.Generator, spec: PhotoSetSpec) -> Image.Image:
    """One random crop, flip, scale (longest side in ``min_side..max_side``) and colour jitter of ``photo``."""
    w, h = photo.size
    area = rng.uniform(*spec.crop_area) * w * h
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(min(w, max(16, round(np.sqrt(area * aspect)))))
    ch = int(min(h, max(16, round(np.sqrt(area / aspect)))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    im = photo.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        im = ImageOps.mirror(im)
    side = int(rng.integers(spec.min_side, spec.max_side + 1))
    scale = side / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BILINEAR)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        im = enhancer(im).enhance(float(rng.uniform(1.0 - spec.jitter, 1.0 + spec.jitter)))
    return im


def make_photo_set(out_dir: Path, spec: PhotoSetSpec = PhotoSetSpec()) -> list[Path]:
    """Write ``out_dir/<split>/<label>/<label>_<i>.jpg`` deterministically; return the paths.

    Every image is a random crop, flip, scale and colour jitter of its class's real photo, so a
    head must learn the content rather than a file artefact. Same spec, same bytes.
    """
    out_dir = Path(out_dir)
    written: list[Path] = []
    for ci, (label, photo_name) in enumerate(spec.classes):
        photo = load_photo(photo_name)
        rng = np.random.default_rng([spec.seed, ci])
        n_test = int(round(spec.per_class * spec.test_fraction))
        for i in range(spec.per_class):
            split = "test" if i < n_test else "train"
            path = out_dir / split / label / f"{label}_{i:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            im = augment(photo, rng, spec)
            im.save(path, "JPEG", quality=int(rng.integers(75, 96)))
            written.append(path)
    return written


# Small crops with strong jitter: colour statistics alone score ~86% here, ImageNet features ~98%,
# random features ~73% (benchmarks/lite_probe.py), so the demo's head has work to do.
DEMO_SPEC_AREA, DEMO_SPEC_JITTER = (0.05, 0.2), 0.5
DEMO_STAMP = ".imgfeat-demo"  # in the set's folder: the spec it was made with


def demo_photo_set(root: Path, per_class: int) -> tuple[Path, int]:
    """``imgfeat demo``'s photo set under ``root``, made once (atomically: a half-made set is never
    scanned) and made again only when its spec changed; returns (root, number of images)."""
    spec = PhotoSetSpec(per_class=per_class, crop_area=DEMO_SPEC_AREA, jitter=DEMO_SPEC_JITTER)
    stamp = root / DEMO_STAMP
    if stamp.is_file() and stamp.read_text() == repr(spec):
        return root, sum(1 for _ in root.rglob("*.jpg"))
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    paths = make_photo_set(tmp, spec)
    (tmp / DEMO_STAMP).write_text(repr(spec))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root, len(paths)
