"""One file's manifest facts: content hash, image header and status code, without a full decode."""

from __future__ import annotations

import errno
import io
import os
import stat
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from imgfeat.core import schemas as S
from imgfeat.core.hashing import content_hasher
from imgfeat.core.stores import ObjectMissing, ObjectRefused, is_uri, stream_object

# Extensions probed by default (compared lower-case). Other files are skipped unless the
# scan keeps non-images; either way Pillow, not the extension, decides what is an image.
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .apng .gif .bmp .dib .tif .tiff .webp .ppm .pgm .pbm .pnm "
    ".ico .jp2 .j2k .jpx .jpf .heic .heif .avif .tga .qoi .psd .pcx .sgi".split()
)

# Files up to this size are read whole (one read, one hash call, header from memory);
# larger ones are streamed so a 4 GB TIFF does not have to fit in memory.
WHOLE_READ_BYTES = 64 << 20
CHUNK_BYTES = 4 << 20
TAIL_BYTES = 64 << 10

NOT_REGULAR = "not a regular file"

# Formats Pillow reads only through an optional plugin: say so instead of 'not an image'.
PLUGIN_HINTS = {".heic": "pillow-heif", ".heif": "pillow-heif"}


@dataclass(frozen=True)
class Probe:
    """What probing one file found: the manifest columns that come from its bytes."""

    image_id: str | None
    status: str
    error: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    mode: str | None = None


def has_image_extension(name: str) -> bool:
    stem, dot, ext = name.rpartition(".")
    return bool(stem) and (dot + ext).lower() in IMAGE_EXTENSIONS


def probe_file(path: str, max_pixels: int) -> Probe:
    """Hash the bytes and read the header of ``path`` (a file, or an object's URI); every failure
    is a status, never a raise, but for a store that cannot be reached (StorageUnavailable)."""
    if is_uri(path):
        return _probe_object(path, max_pixels)
    try:
        digest, nbytes, data, tail = _read_and_hash(path)
    except OSError as exc:
        return Probe(None, S.STATUS_UNREADABLE, _os_message(exc))
    if nbytes == 0:
        return Probe(digest, S.STATUS_EMPTY, "the file is empty (0 bytes)")
    return _probe_header(path, digest, data, tail, max_pixels)


def _probe_object(uri: str, max_pixels: int) -> Probe:
    """probe_file of an object: one streamed GET (the header is parsed from the first bytes)."""
    h = content_hasher()
    head = bytearray()
    tail = b""
    nbytes = 0
    try:
        for chunk in stream_object(uri, CHUNK_BYTES):
            h.update(chunk)
            nbytes += len(chunk)
            if len(head) <= WHOLE_READ_BYTES:
                head += chunk
            tail = (tail + chunk)[-TAIL_BYTES:]
    except ObjectMissing as exc:
        return Probe(None, S.STATUS_UNREADABLE, f"cannot read the object: {exc} (it vanished)")
    except ObjectRefused as exc:
        return Probe(None, S.STATUS_UNREADABLE, f"cannot read the object: {exc}")
    digest = h.hexdigest()
    if nbytes == 0:
        return Probe(digest, S.STATUS_EMPTY, "the object is empty (0 bytes)")
    whole = bytes(head) if nbytes <= WHOLE_READ_BYTES else None
    return _probe_header(uri, digest, whole if whole is not None else bytes(head), tail, max_pixels, whole is not None)


def _read_and_hash(path: str) -> tuple[str, int, bytes | None, bytes]:
    """(BLAKE2b-128 hex, size, the bytes when small else None, the last TAIL_BYTES)."""
    h = content_hasher()
    with open(path, "rb", opener=_open_nonblocking) as fh:
        _check_regular(fh)
        data = fh.read(WHOLE_READ_BYTES + 1)
        if len(data) <= WHOLE_READ_BYTES:
            h.update(data)
            return h.hexdigest(), len(data), data, data[-TAIL_BYTES:]
        nbytes, tail = len(data), data[-TAIL_BYTES:]
        h.update(data)
        del data
        while chunk := fh.read(CHUNK_BYTES):
            h.update(chunk)
            nbytes += len(chunk)
            tail = (tail + chunk)[-TAIL_BYTES:]
    return h.hexdigest(), nbytes, None, tail


def _open_nonblocking(path: str, flags: int) -> int:
    # O_NONBLOCK: opening a FIFO swapped in after the walk must not wait for a writer.
    return os.open(path, flags | os.O_NONBLOCK)


def _check_regular(fh) -> None:
    """Refuse FIFOs, devices and sockets (checked on the open file, so no race), and
    zero-size files that still have content, like /proc/self/pagemap (reading never ends)."""
    st = os.fstat(fh.fileno())
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, NOT_REGULAR)
    if st.st_size == 0:
        try:
            extra = os.pread(fh.fileno(), 8, 0)
        except OSError:
            extra = b"?"
        if extra:
            raise OSError(errno.EINVAL, NOT_REGULAR + " (it reports 0 bytes but has content, like /proc files)")


def _probe_header(
    path: str, digest: str, data: bytes | None, tail: bytes, max_pixels: int, whole: bool = True
) -> Probe:
    """The header facts; ``data`` is the file's bytes (or, when not ``whole``, its first bytes),
    None to open ``path`` itself."""
    try:
        # Image.open parses the header only; pixel data is decoded lazily and never here.
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            width, height = im.size
            fmt, mode = im.format, im.mode
    except Image.DecompressionBombError as exc:
        return Probe(digest, S.STATUS_TOO_LARGE, str(exc))
    except UnidentifiedImageError:
        return Probe(digest, S.STATUS_NOT_AN_IMAGE, _unidentified_message(path))
    except Exception as exc:  # noqa: BLE001 - a plugin's bug on a crafted file must stay a row
        # Plugins raise OSError, ValueError, SyntaxError, struct.error, ... on corrupt headers.
        return Probe(digest, S.STATUS_NOT_AN_IMAGE, f"unreadable image header: {type(exc).__name__}: {exc}")
    probe = Probe(digest, S.STATUS_OK, None, width, height, fmt, mode)
    if width * height > max_pixels:
        return _with(probe, S.STATUS_TOO_LARGE, over_limit_message(width, height, max_pixels))
    missing_end = truncation(fmt, tail, data if whole else None)
    if missing_end:
        return _with(probe, S.STATUS_TRUNCATED, missing_end)
    return probe


def over_limit_message(width: int, height: int, max_pixels: int) -> str:
    return f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels}"


def _with(probe: Probe, status: str, error: str) -> Probe:
    return Probe(probe.image_id, status, error, probe.width, probe.height, probe.format, probe.mode)


def truncation(fmt: str | None, tail: bytes, data: bytes | None = None) -> str | None:
    """A message when the file's end shows it was cut short, else None (cheap: bytes we already have)."""
    if fmt in ("JPEG", "MPO"):
        return _jpeg_truncation(tail)
    if fmt == "PNG" and tail.rfind(b"IEND") == -1:
        return "PNG has no IEND chunk at the end: the file was cut short"
    if fmt == "WEBP" and data is not None and len(data) >= 12:
        declared = int.from_bytes(data[4:8], "little") + 8
        if len(data) < declared:
            return f"WebP declares {declared} bytes but the file has {len(data)}: it was cut short"
    return None


def _jpeg_truncation(tail: bytes) -> str | None:
    body = tail.rstrip(b"\x00\r\n\t ")
    if body.endswith(b"\xff\xd9"):
        return None
    # Some cameras append data after the end-of-image marker: accept an EOI after the last
    # start-of-scan. (Inside entropy-coded data 0xFF is always stuffed, so FFD9 only ends it.)
    eoi, sos = tail.rfind(b"\xff\xd9"), tail.rfind(b"\xff\xda")
    if eoi != -1 and eoi > sos:
        return None
    return "JPEG does not end with the end-of-image marker (FFD9): the file was cut short"


def _unidentified_message(path: str) -> str:
    plugin = PLUGIN_HINTS.get(os.path.splitext(path)[1].lower())
    if plugin:
        return f"Pillow cannot identify this file; reading it needs the {plugin} plugin"
    return "Pillow cannot identify this file as an image"


def _os_message(exc: OSError) -> str:
    reason = {
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOENT: "the file vanished or is a broken link",
        errno.EIO: "I/O error",
        errno.EISDIR: "is a directory",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return f"cannot read the file: {reason}"
