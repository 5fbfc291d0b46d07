"""Image file -> uint8 RGB array at the model's input size, exactly as keras.utils.load_img makes it.

Fidelity: with ``exif="ignore"`` the array equals ``img_to_array(load_img(path,
target_size=(h, w), interpolation=...))`` bit for bit: Pillow opens the file, converts
any mode other than RGB with ``img.convert("RGB")`` (so grayscale, 16-bit, CMYK,
palette and LA images become RGB the way Keras makes them), then resizes with
``img.resize((w, h), resample)`` using Keras' interpolation table, skipping the
resize when the image already has the target size.

EXIF orientation (a decision, not an accident): ``exif="rotate"``, the default,
applies ``ImageOps.exif_transpose`` before resizing, so a feature describes the photo
as a person sees it (a portrait shot from a phone stays upright). ``load_img`` does
not rotate, so on a photo whose EXIF orientation tag is not 1 the two differ; on every
photo without such a tag they agree bit for bit. Choose ``exif="ignore"`` to reproduce
``load_img`` on rotated photos too. The mode is part of the featureset fingerprint.

``fast_decode=True`` asks libjpeg to decode a JPEG at 1/2, 1/4 or 1/8 scale
(``Image.draft``) when the reduced image is still at least the target size, then
resizes as above. It is several times faster on large photos and close to, not equal
to, the full decode, so it is opt-in and named in the fingerprint.

Modes follow load_img too: a 16-bit PNG (mode I;16) goes through Pillow's ``convert("RGB")``,
which clips values above 255 rather than rescaling them, exactly as load_img does; an
animated GIF gives its first frame; palette transparency and alpha are dropped, not
composited on a background.

Bad files never raise anything but ``DecodeError(code, message)``, whose code is one of
``ERROR_CODES``; callers turn it into an error row. Pixel counts over Pillow's
``Image.MAX_IMAGE_PIXELS`` are ``too_large`` (Pillow itself only warns below 2x the limit).
One case Pillow cannot see: a well-formed PNG whose compressed data ends early decodes with
the missing rows black (load_img does the same); a file cut short is ``truncated``.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError, ImgfeatError, unknown_value
from imgfeat.core.stores import ObjectMissing, ObjectRefused, is_uri, read_object
from imgfeat.extract.resample import resize_no_antialias

log = logging.getLogger(__name__)

# keras/src/utils/image_utils.py PIL_INTERPOLATION_METHODS, by name.
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "hamming": Image.Resampling.HAMMING,
    "box": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
}
EXIF_MODES = ("rotate", "ignore")
CROPS = ("none", "centre")
NO_ANTIALIAS_METHODS = (
    "bilinear",
    "bicubic",
)  # imgfeat.extract.resample.METHODS  # "centre": crop to the target's aspect ratio first, as keras' Resizing does
ERROR_CODES = S.DECODE_ERROR_CODES  # the vocabulary lives in core/schemas.py; old name kept
# Failures to read a file (not its content): transient, so the next run tries the file again.
READ_ERROR_CODES = ("unreadable", "vanished", "not_a_file", "file_too_large")
DEFAULT_MAX_FILE_BYTES = 1 << 30  # 1 GiB: larger files are error rows, never a 3 GB read into memory
ORIENTATION_TAG = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class DecodeError(ImgfeatError):
    """One image could not be decoded; ``code`` is one of ERROR_CODES (a row, not a failed run)."""

    transient = False  # a decode failure of the same bytes is final

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ReadError(DecodeError):
    """The file could not be read (gone, no permission, not a regular file, too big): retried next run."""

    transient = True


@dataclass(frozen=True)
class DecodeConfig:
    """How files become model inputs; every field changes the numbers, so all go in the fingerprint."""

    size: tuple[int, int]  # (height, width), like load_img's target_size
    interpolation: str = "bilinear"
    fast_decode: bool = False
    exif: str = "rotate"
    crop: str = "none"  # keras-hub converters with crop_to_aspect_ratio: "centre"
    antialias: bool = True  # False: keras' antialias=False resize (extract/resample.py), not Pillow's

    def __post_init__(self) -> None:
        if len(self.size) != 2 or any(int(v) != v or v < 1 for v in self.size):
            raise ConfigError(f"decode size must be (height, width) positive integers, got {self.size!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise unknown_value("interpolation", self.interpolation, INTERPOLATIONS)
        if self.exif not in EXIF_MODES:
            raise unknown_value("exif mode", self.exif, EXIF_MODES)
        if self.crop not in CROPS:
            raise unknown_value("crop", self.crop, CROPS)


def decode_image(
    path: str | os.PathLike[str], cfg: DecodeConfig, max_bytes: int = DEFAULT_MAX_FILE_BYTES
) -> np.ndarray:
    """Read one image file into a uint8 (h, w, 3) RGB array, or raise DecodeError."""
    data = read_file_bytes(path if is_uri(path) else Path(path), max_bytes)
    return decode_bytes(data, cfg, name=str(path))


def decode_bytes(data: bytes, cfg: DecodeConfig, name: str = "<bytes>") -> np.ndarray:
    """The pure mapper: encoded bytes in, uint8 (h, w, 3) RGB array out, or DecodeError."""
    if not data:
        raise DecodeError("empty", f"{name} is an empty file")
    try:
        return _decode(data, cfg)
    except DecodeError as exc:
        raise DecodeError(exc.code, f"{name}: {exc.message}") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_large", f"{name}: {exc}") from None
    except UnidentifiedImageError:
        raise DecodeError("not_an_image", f"{name}: Pillow does not recognise this file as an image") from None
    except MemoryError:
        raise DecodeError("too_large", f"{name}: not enough memory to decode") from None
    except Exception as exc:  # Pillow's plugins raise OSError, SyntaxError, struct.error, ...: all are rows
        raise DecodeError(_classify(exc), f"{name}: {type(exc).__name__}: {exc}") from None


def decode_batch(
    paths: Sequence[str | os.PathLike[str]], cfg: DecodeConfig
) -> tuple[np.ndarray, list[DecodeError | None]]:
    """Decode several files: a (n, h, w, 3) uint8 array (zeros where a file failed) and per-file errors."""
    h, w = cfg.size
    out = np.zeros((len(paths), h, w, 3), dtype=np.uint8)
    errors: list[DecodeError | None] = []
    for i, path in enumerate(paths):
        try:
            out[i] = decode_image(path, cfg)
            errors.append(None)
        except DecodeError as exc:
            errors.append(exc)
    return out, errors


def read_file_bytes(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """A regular file's (or an object's, for an ``s3://``/``gs://``/``az://`` URI) bytes, at most
    ``max_bytes`` of them, or ReadError. A store that cannot be reached after retries raises
    StorageUnavailable: the run stops there rather than call every image unreadable."""
    if is_uri(path):
        return _read_object_bytes(str(path), max_bytes)
    # load_img reads the whole file into memory too; reading first keeps OS errors apart from format errors.
    with open_regular_file(path) as fh:
        try:
            data = _read_at_most(fh, max_bytes + 1)
        except OSError as exc:
            raise ReadError("unreadable", f"{path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise ReadError("file_too_large", f"{path}: larger than the {max_bytes}-byte limit (--max-file-bytes)")
    return data


def _read_object_bytes(uri: str, max_bytes: int) -> bytes:
    try:
        return read_object(uri, max_bytes)
    except ObjectMissing as exc:
        raise ReadError("vanished", f"{exc} (the object no longer exists)") from None
    except ObjectRefused as exc:
        raise ReadError("unreadable", str(exc)) from None
    except ValueError:
        raise ReadError("file_too_large", f"{uri}: larger than the {max_bytes}-byte limit (--max-file-bytes)") from None


def open_regular_file(path: str | os.PathLike[str]) -> io.FileIO:
    """Open for reading, or ReadError. Opened non-blocking and checked after open (not before: the
    file may be swapped in between), so a FIFO, device or folder where an image was never hangs."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ReadError("vanished", f"{path}: the file no longer exists") from None
    except OSError as exc:
        raise ReadError("unreadable", f"{path}: {exc.strerror or exc}") from None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError as exc:
        os.close(fd)
        raise ReadError("unreadable", f"{path}: {exc.strerror or exc}") from None
    if not regular:
        os.close(fd)
        raise ReadError("not_a_file", f"{path}: not a regular file")
    return io.FileIO(fd, "rb", closefd=True)


def _read_at_most(fh: io.FileIO, limit: int) -> bytes:
    chunks: list[bytes] = []
    left = limit
    while left > 0 and (chunk := fh.read(min(left, 16 << 20))):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _decode(data: bytes, cfg: DecodeConfig) -> np.ndarray:
    h, w = cfg.size
    with Image.open(io.BytesIO(data)) as opened:  # closes the opened file, whatever img becomes
        img: Image.Image = opened
        _check_pixels(img)
        if cfg.fast_decode:
            _draft(img, (w, h), cfg.exif)
        img.load()  # decode now, so truncation surfaces here and not inside convert()
        if cfg.exif == "rotate":
            img = ImageOps.exif_transpose(img)
        if img.mode != "RGB":
            img = _to_rgb(img)
        if cfg.crop == "centre":
            img = _centre_crop(img, h, w)
        if not cfg.antialias and img.size != (w, h) and cfg.interpolation in NO_ANTIALIAS_METHODS:
            return _resized_no_antialias(img, (h, w), cfg.interpolation)
        if img.size != (w, h):
            img = img.resize((w, h), INTERPOLATIONS[cfg.interpolation])
        arr = np.asarray(img, dtype=np.uint8)
    if arr.shape != (h, w, 3):  # never hand back a silently wrong array
        raise DecodeError("unsupported_mode", f"decoded to shape {arr.shape}, expected {(h, w, 3)}")
    return arr


def _resized_no_antialias(img: Image.Image, size: tuple[int, int], method: str) -> np.ndarray:
    return resize_no_antialias(np.asarray(img, dtype=np.uint8), size, method)


def _centre_crop(img: Image.Image, h: int, w: int) -> Image.Image:
    """The largest centred box of the target's aspect ratio, computed as keras.ops.image.resize's
    crop_to_aspect_ratio does (float32 products, truncated), so the same pixels are kept."""
    width, height = img.size
    crop_h = max(min(height, int(np.float32(width * h) / np.float32(w))), 1)
    crop_w = max(min(width, int(np.float32(height * w) / np.float32(h))), 1)
    top = int(np.float32(height - crop_h) / np.float32(2))
    left = int(np.float32(width - crop_w) / np.float32(2))
    if (crop_w, crop_h) == (width, height):
        return img
    return img.crop((left, top, left + crop_w, top + crop_h))


def own_pixel_limit_warnings() -> None:
    """For a process of ours that decodes (a decode worker, a Ray actor): Pillow's warning for an
    image between its pixel limit and twice it is dropped, ``_check_pixels`` makes the file a
    too_large error row. Never called in a caller's process (a notebook keeps Pillow's warning);
    the command line demotes it to a debug line instead (``core/logs.SPURIOUS_WARNINGS``)."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _check_pixels(img: Image.Image) -> None:
    # Pillow only warns between 1x and 2x its limit (it raises above 2x); a warning is no row, so check
    # here, without touching the process-wide warning filters that decode threads share.
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise DecodeError("too_large", f"{img.width}x{img.height} pixels is over Pillow's limit of {limit}")


def _to_rgb(img: Image.Image) -> Image.Image:
    try:
        return img.convert("RGB")
    except ValueError as exc:  # e.g. modes Pillow cannot convert to RGB
        raise DecodeError("unsupported_mode", f"cannot convert mode {img.mode!r} to RGB: {exc}") from None


def _draft(img: Image.Image, target_wh: tuple[int, int], exif: str) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale where the result still covers the target."""
    if img.format != "JPEG":
        return
    w, h = target_wh
    if exif == "rotate" and img.getexif().get(ORIENTATION_TAG, 1) in TRANSPOSED_ORIENTATIONS:
        w, h = h, w  # the stored image is rotated by 90 degrees against what the model will see
    # draft() picks the largest reduction whose size is still >= the requested size.
    img.draft("RGB", (w, h))


def _classify(exc: BaseException) -> str:
    text = str(exc).lower()
    if "truncated" in text or "premature end" in text or isinstance(exc, EOFError):
        return "truncated"
    if "mode" in text:
        return "unsupported_mode"
    if "cannot identify" in text or "not a " in text:
        return "not_an_image"
    return "unreadable"


# Pillow's default is to raise on truncated files; make sure nobody flipped it for the whole process.
if ImageFile.LOAD_TRUNCATED_IMAGES:
    log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on: truncated images will decode as partial arrays")
