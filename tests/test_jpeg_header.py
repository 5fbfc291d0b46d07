"""read_jpeg_header against Pillow's own reading of the same JPEGs, and on damaged headers."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image
from tiny_images import encode, noise_image

from imgfeat.extract.decode import ORIENTATION_TAG
from imgfeat.extract.jpeg_header import XMP_HEADER, exif_orientation, read_jpeg_header

pytestmark = pytest.mark.quick


def with_exif(orientation: int) -> dict:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    exif[0x010F] = "camera maker"  # another tag first, so the orientation is not the only entry
    return {"exif": exif}


JPEGS = {  # name -> (image, save options)
    "rgb": (noise_image(1, (40, 30)), {}),
    "gray": (noise_image(2, (33, 17), "L"), {}),
    "cmyk": (noise_image(3, (20, 20)).convert("CMYK"), {}),
    "progressive": (noise_image(4, (64, 48)), {"progressive": True}),
    "subsampled_444": (noise_image(5, (31, 29)), {"subsampling": 0}),
    **{f"orientation{o}": (noise_image(6, (50, 20)), with_exif(o)) for o in range(1, 9)},
}


@pytest.mark.parametrize("name", sorted(JPEGS))
def test_header_agrees_with_pillow(name):
    im, save = JPEGS[name]
    data = encode(im, "JPEG", quality=85, **save)
    head = read_jpeg_header(data)
    with Image.open(io.BytesIO(data)) as pil:
        assert (head.width, head.height) == pil.size
        assert head.components == {"L": 1, "RGB": 3, "CMYK": 4}[pil.mode]
        assert head.orientation == pil.getexif().get(ORIENTATION_TAG)
        assert head.sof == (0xC2 if pil.info.get("progressive") else 0xC0) and head.precision == 8
        assert (head.adobe_transform is not None) == ("adobe" in pil.info)


def test_exif_orientation_reads_both_byte_orders():
    for order, fmt in ((b"MM", ">"), (b"II", "<")):
        entries = [(0x010F, 2, 4, 0), (ORIENTATION_TAG, 3, 1, 6 << 16 if fmt == ">" else 6)]
        tiff = order + struct.pack(fmt + "HIH", 42, 8, len(entries))
        tiff += b"".join(struct.pack(fmt + "HHII", *e) for e in entries) + b"\0\0\0\0"
        assert exif_orientation(tiff) == 6
    assert exif_orientation(b"XX" + bytes(20)) is None and exif_orientation(b"II*\0" + bytes(4)) is None


def test_xmp_orientation_is_flagged():
    data = encode(noise_image(1, (20, 10)), "JPEG")
    xmp = XMP_HEADER + b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    segment = b"\xff\xe1" + struct.pack(">H", len(xmp) + 2) + xmp
    head = read_jpeg_header(data[:2] + segment + data[2:])
    assert head.xmp_orientation and head.orientation is None


def test_damaged_headers_give_none():
    data = encode(noise_image(1, (20, 10)), "JPEG")
    sof = data.index(b"\xff\xc0")
    for bad in (
        b"",
        b"\xff\xd8",
        data[: sof + 5],
        data[:2] + b"\x00" + data[3:],
        data[: sof + 2] + b"\x00\x01" + data[sof + 4 :],
        encode(noise_image(1), "PNG"),
    ):
        assert read_jpeg_header(bad) is None
    assert read_jpeg_header(data[:sof] + data[sof : sof + 19] + data[sof:]) is None  # two frame headers


def test_many_real_jpegs_agree_with_pillow():
    rng = np.random.default_rng(0)
    for seed in range(20):
        w, h = (int(v) for v in rng.integers(1, 300, 2))
        data = encode(
            noise_image(seed, (w, h)),
            "JPEG",
            quality=int(rng.integers(30, 100)),
            optimize=bool(seed % 2),
            **with_exif(int(rng.integers(1, 9))),
        )
        head = read_jpeg_header(data)
        with Image.open(io.BytesIO(data)) as pil:
            assert (head.width, head.height) == pil.size
            assert head.orientation == pil.getexif().get(ORIENTATION_TAG)
