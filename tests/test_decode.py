"""decode_image on every awkward kind of file: the right array, or a DecodeError with the right code."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_images import noise_pixels

from imgfeat.core.errors import ConfigError
from imgfeat.extract.decode import (
    ERROR_CODES,
    READ_ERROR_CODES,
    DecodeConfig,
    DecodeError,
    ReadError,
    decode_batch,
    decode_bytes,
    decode_image,
    read_file_bytes,
)
from imgfeat.tools.samples import photo_path

pytestmark = pytest.mark.quick

SIZE = (24, 32)  # (h, w): not square, so a swapped axis shows
CFG = DecodeConfig(SIZE)


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int) -> bytes:
    """A well-formed PNG that claims width x height RGB pixels and holds only one row of them."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" + b"\x80" * 3 * min(width, 64))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", row) + _chunk(b"IEND", b"")


def _animated_gif(path: Path) -> Path:
    frames = [Image.fromarray(np.full((30, 40, 3), v, np.uint8)).convert("P") for v in (200, 10, 90)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return path


# Files that decode: name -> writer. Each must give the load_img conversion: open, convert("RGB"), resize.
GOOD = {
    "rgb.png": lambda p: _save(Image.fromarray(noise_pixels(40, 30)), p),
    "gray.png": lambda p: _save(Image.fromarray(noise_pixels(40, 30)[..., 0]), p),
    "png16.png": lambda p: _save(Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16)), p),
    "cmyk.jpg": lambda p: _save(Image.fromarray(noise_pixels(40, 30)).convert("CMYK"), p, quality=95),
    "palette_transparent.png": lambda p: _save(Image.fromarray(noise_pixels(40, 30)).convert("P"), p, transparency=3),
    "rgba.png": lambda p: _save(
        Image.fromarray(np.dstack([noise_pixels(40, 30), noise_pixels(40, 30, seed=1)[..., :1]])), p
    ),
    "la.png": lambda p: _save(Image.fromarray(noise_pixels(40, 30)[..., 0]).convert("LA"), p),
    "animated.gif": _animated_gif,
    "one_pixel.png": lambda p: _save(Image.new("RGB", (1, 1), (250, 10, 128)), p),
    "bilevel.png": lambda p: _save(Image.fromarray(noise_pixels(40, 30)[..., 0] > 128), p),
    "photo.webp": lambda p: _save(Image.fromarray(noise_pixels(40, 30)), p, quality=90),
    "photo.tiff": lambda p: _save(Image.fromarray(noise_pixels(40, 30)), p),
    "photo.bmp": lambda p: _save(Image.fromarray(noise_pixels(40, 30)), p),
    "exact_size.png": lambda p: _save(Image.fromarray(noise_pixels(SIZE[1], SIZE[0])), p),
}


def _half_a_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(noise_pixels(200, 150)).save(buf, "JPEG", quality=90)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


# Files that must not decode: name -> (bytes, DecodeError code).
BAD = {
    "empty.jpg": (b"", "empty"),
    "text.jpg": (b"this is not a JPEG\n" * 20, "not_an_image"),
    "truncated.jpg": (_half_a_jpeg(), "truncated"),
    "bomb.png": (_png_header(60_000, 60_000), "too_large"),  # 3.6 G pixels claimed: refused unread
    "truncated.png": (photo_path("chelsea").read_bytes()[:40_000], "truncated"),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_decodable_files_give_rgb_uint8_at_target_size(tmp_path, name):
    path = GOOD[name](tmp_path / name)
    arr = decode_image(path, DecodeConfig(SIZE, exif="ignore"))
    assert arr.shape == (*SIZE, 3) and arr.dtype == np.uint8
    # The reference is load_img's own steps (tests/test_fidelity.py compares with load_img itself).
    with Image.open(path) as img:
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        ref = rgb if rgb.size == (SIZE[1], SIZE[0]) else rgb.resize((SIZE[1], SIZE[0]), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(arr, np.asarray(ref))


def test_animated_gif_gives_its_first_frame(tmp_path):
    arr = decode_image(_animated_gif(tmp_path / "a.gif"), CFG)
    assert abs(int(arr.mean()) - 200) <= 2  # frame 0 is grey 200; later frames are 10 and 90


def test_one_pixel_image_fills_the_target(tmp_path):
    arr = decode_image(GOOD["one_pixel.png"](tmp_path / "p.png"), CFG)
    assert (arr == np.array([250, 10, 128], np.uint8)).all()


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_raise_decode_error_with_code(tmp_path, name):
    data, code = BAD[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DecodeError) as info:
        decode_image(path, CFG)
    assert info.value.code == code
    assert code in ERROR_CODES and name in info.value.message


@pytest.mark.quick
def test_missing_file_and_directory_are_transient_read_errors(tmp_path):
    for path, code in ((tmp_path / "nope.jpg", "vanished"), (tmp_path, "not_a_file")):
        with pytest.raises(ReadError) as info:
            decode_image(path, CFG)
        assert info.value.code == code and info.value.transient and code in READ_ERROR_CODES


@contextlib.contextmanager
def hang_guard(seconds: int):
    """Fail the test instead of hanging it (no pytest-timeout here): SIGALRM interrupts a blocked open."""

    def timeout(*_):
        raise TimeoutError(f"hung for {seconds} s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.quick
def test_a_fifo_where_an_image_was_is_an_error_row_not_a_hang(tmp_path):
    fifo = tmp_path / "img.jpg"
    os.mkfifo(fifo)
    with hang_guard(5), pytest.raises(ReadError) as info:
        read_file_bytes(fifo)
    assert info.value.code == "not_a_file"


@pytest.mark.quick
def test_bytes_read_per_file_are_bounded(tmp_path):
    big = GOOD["rgb.png"](tmp_path / "a.png")
    size = big.stat().st_size
    with open(big, "ab") as fh:  # a valid image at the head of a file far larger than the limit
        fh.truncate(size + (4 << 20))
    with pytest.raises(ReadError) as info:
        decode_image(big, CFG, max_bytes=size + 1024)
    assert info.value.code == "file_too_large" and "--max-file-bytes" in info.value.message
    assert len(read_file_bytes(big, max_bytes=size + (4 << 20))) == size + (4 << 20)


def test_pixel_limit_between_one_and_two_times_is_too_large(monkeypatch):
    # Pillow only warns up to 2x its limit; a warning must not slip through as a decoded image.
    buf = io.BytesIO()
    Image.fromarray(noise_pixels(40, 30)).save(buf, "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1200 pixels: over, but under 2x
    with pytest.raises(DecodeError) as info:
        decode_bytes(buf.getvalue(), CFG)
    assert info.value.code == "too_large"


def test_decode_batch_keeps_order_and_reports_each_failure(tmp_path):
    good = GOOD["rgb.png"](tmp_path / "a.png")
    bad = tmp_path / "b.jpg"
    bad.write_text("nope")
    arr, errors = decode_batch([good, bad, good], CFG)
    assert arr.shape == (3, *SIZE, 3) and arr.dtype == np.uint8
    assert errors[0] is None and errors[2] is None and errors[1].code == "not_an_image"
    assert (arr[1] == 0).all() and (arr[0] == arr[2]).all() and arr[0].any()


def test_exif_rotate_turns_the_photo_upright_and_ignore_does_not(tmp_path):
    # Orientation 6: the stored pixels must be rotated 90 degrees clockwise to be seen upright.
    stored = Image.fromarray(noise_pixels(40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(stored, tmp_path / "rotated.jpg", exif=exif, quality=95)
    cfg = DecodeConfig((20, 10))
    upright = decode_image(path, cfg)
    ignored = decode_image(path, DecodeConfig((20, 10), exif="ignore"))
    with Image.open(path) as img:
        want_upright = img.transpose(Image.Transpose.ROTATE_270).resize((10, 20), Image.Resampling.BILINEAR)
        want_ignored = img.convert("RGB").resize((10, 20), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(upright, np.asarray(want_upright))
    np.testing.assert_array_equal(ignored, np.asarray(want_ignored))
    assert not np.array_equal(upright, ignored)


def test_fast_decode_is_close_to_the_full_decode_on_a_large_jpeg():
    path = photo_path("china")  # 640x427 JPEG: 4x the target, so libjpeg decodes at 1/4 scale
    full = decode_image(path, DecodeConfig((96, 96)))
    fast = decode_image(path, DecodeConfig((96, 96), fast_decode=True))
    assert fast.shape == full.shape and fast.dtype == np.uint8
    diff = np.abs(fast.astype(np.int16) - full.astype(np.int16))
    assert 0 < diff.mean() < 4  # a different, slightly softer resampling of the same picture
    # PNGs have no reduced decode: fast_decode changes nothing there.
    png = photo_path("chelsea")
    np.testing.assert_array_equal(
        decode_image(png, DecodeConfig((96, 96), fast_decode=True)), decode_image(png, DecodeConfig((96, 96)))
    )


def test_fast_decode_never_goes_below_the_target_size(tmp_path):
    # 300x200 JPEG to 140x90: 2x would be 150x100 >= target, 4x would be too small.
    path = _save(Image.fromarray(noise_pixels(300, 200)), tmp_path / "p.jpg", quality=95)
    with Image.open(path) as img:
        img.draft("RGB", (140, 90))
        assert img.size == (150, 100)  # what Pillow's draft does, which decode relies on
    arr = decode_image(path, DecodeConfig((90, 140), fast_decode=True))
    assert arr.shape == (90, 140, 3)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"size": (0, 10)}, "size"),
        ({"size": (10,)}, "size"),
        ({"size": (10, 10), "interpolation": "bilinar"}, "bilinear"),
        ({"size": (10, 10), "exif": "rotated"}, "rotate"),
    ],
)
def test_bad_decode_config_is_a_config_error_naming_the_choices(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        DecodeConfig(**kwargs)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about each corrupt TIFF tag
def test_damaged_files_only_ever_raise_decode_error():
    """Bytes flipped and cut at random in every format: each gives an array or a DecodeError, never a crash."""
    rng = np.random.default_rng(0)
    seeds = []
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"):
        buf = io.BytesIO()
        Image.fromarray(noise_pixels(50, 40)).save(buf, fmt)
        seeds.append(buf.getvalue())
    outcomes = set()
    for i in range(600):
        data = bytearray(seeds[i % len(seeds)])
        for _ in range(int(rng.integers(1, 12))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            data = data[: int(rng.integers(1, len(data)))]
        try:
            arr = decode_bytes(bytes(data), CFG)
            assert arr.shape == (*SIZE, 3) and arr.dtype == np.uint8
            outcomes.add("ok")
        except DecodeError as exc:
            assert exc.code in ERROR_CODES
            outcomes.add(exc.code)
    assert {"ok", "truncated", "not_an_image"} <= outcomes
