"""Tiny generated test images: seeded noise pixels, encoded files and damaged variants (tests only).

One set of generators for every test module (``from tiny_images import noise_image``): noise
images are distinct per seed, so each one hashes to its own image_id and gives its own feature.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CHANNELS = {"RGB": 3, "RGBA": 4, "L": None}


def noise_pixels(width: int = 32, height: int = 24, seed: int = 0, channels: int | None = 3) -> np.ndarray:
    """A (height, width[, channels]) uint8 array of seeded uniform noise."""
    shape = (height, width) if channels is None else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def noise_image(seed: int = 0, size: tuple[int, int] = (32, 24), mode: str = "RGB") -> Image.Image:
    """A seeded noise image of ``size`` = (width, height) in ``mode`` (RGB, RGBA or L)."""
    return Image.fromarray(noise_pixels(size[0], size[1], seed, CHANNELS[mode]), mode)


def encode(im: Image.Image, fmt: str, **save) -> bytes:
    """``im`` saved in ``fmt`` (JPEG, PNG, ...) as bytes."""
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (32, 24), quality: int = 90) -> bytes:
    return encode(noise_image(seed, size), "JPEG", quality=quality)


def png_bytes(seed: int = 0, size: tuple[int, int] = (32, 24), mode: str = "RGB") -> bytes:
    return encode(noise_image(seed, size, mode), "PNG")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def corrupt_png(seed: int = 0, size: tuple[int, int] = (40, 30), at: int = 2, length: int = 38) -> bytes:
    """A PNG whose header and IEND are intact (scan says ok) but whose pixel data is garbage."""
    data = bytearray(png_bytes(seed, size))
    start = data.index(b"IDAT") + 4 + at
    data[start : start + length] = bytes(length)
    return bytes(data)


def write_noise_images(
    folder: Path,
    n: int,
    seed: int = 0,
    size: tuple[int, int] = (28, 20),
    fmt: str = "JPEG",
    classes: tuple[str, ...] = (),
) -> list[Path]:
    """``n`` distinct noise files in ``folder`` (or ``folder/<class>/`` round-robin); their paths."""
    suffix = {"JPEG": ".jpg", "PNG": ".png"}[fmt]
    paths = []
    for i in range(n):
        where = folder / classes[i % len(classes)] if classes else folder
        where.mkdir(parents=True, exist_ok=True)
        path = where / f"{i:03d}{suffix}"
        path.write_bytes(encode(noise_image(seed + i, size), fmt))
        paths.append(path)
    return paths
