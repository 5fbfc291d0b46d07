"""The look of an image: a small luminance descriptor dedup checks feature neighbours with, and its calibration.

Backbone features find the candidates (each image's nearest neighbours) but cannot tell a copy
from another photo of the same scene: crops of one photo, or shots of a texture, score as high
as re-encoded copies. The look decides. It is the image's detail at 32 x 32 in luminance, so it
is blind to colour (a grayscale copy looks the same), brightness and contrast (it is
normalised), size and re-encoding (it is tiny), letterbox bars (near-constant border rows and
columns are trimmed first) and slight crops and rotations (the central part is compared, and
each image also has looks turned by +-3 degrees and one cropped by 3% a side; two images are
compared at their best pair of these). It keeps only the detail (a high-pass:
the 32 x 32 image minus its blur), so smooth gradients, vignetting and dark skies that many
different photos share count for nothing. Two looks are compared by their cosine.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFilter

from imgfeat.core.keys import PACKED, KeyLike, concat_keys, keys_of, keys_to_arrow
from imgfeat.core.results import JsonObject
from imgfeat.core.storage import scratch_file, scratch_writes
from imgfeat.core.stores import ObjectUri, image_source
from imgfeat.tools.nearcopies import TRANSFORMS, near_copy

log = logging.getLogger(__name__)

SIDE = 32  # the look's side in pixels
TURNS = (3.0, -3.0)  # degrees: a copy may be turned slightly
ZOOM = 0.03  # of each side: a copy may be cropped slightly and scaled back
VARIANTS = 3 + len(TURNS)  # as is, mirrored, each turn, then zoomed in
MIRRORED = 1  # the variant that is mirrored
MARGIN = 0.06  # of each side left out: turned copies' corners and slight crops
FLAT_STD = 1.5  # a border row or column varying less than this (0-255) is a bar, trimmed
HIGH_PASS_SIGMA = 6.0  # pixels of the 32 x 32 image: detail finer than this is kept
DECODE_SIDE = 256  # JPEGs are decoded at a reduced scale, never below this many pixels a side
LOOK_THRESHOLD = 0.8  # looks at least this alike are copies (see the README's dedup section)
LOOK_VERSION = "2"  # bumped whenever a look is computed differently: cached looks of another version are redone


def _trim(g: Image.Image) -> Image.Image:
    """``g`` without its near-constant border rows and columns (letterbox and pillarbox bars)."""
    a = np.asarray(g, np.float32)
    rows, cols = np.flatnonzero(a.std(axis=1) > FLAT_STD), np.flatnonzero(a.std(axis=0) > FLAT_STD)
    if len(rows) < 4 or len(cols) < 4:
        return g
    return g.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))


def _detail(g: Image.Image) -> np.ndarray:
    """The unit-length high-pass 32 x 32 look of a grey image (zeros when it has no detail)."""
    from scipy.ndimage import gaussian_filter

    w, h = g.size
    mx, my = round(w * MARGIN), round(h * MARGIN)
    g = g.crop((mx, my, max(mx + 1, w - mx), max(my + 1, h - my))).resize((2 * SIDE, 2 * SIDE), Image.Resampling.BOX)
    v = np.asarray(g.filter(ImageFilter.GaussianBlur(1)).resize((SIDE, SIDE), Image.Resampling.BOX), np.float32)
    v = v - gaussian_filter(v, HIGH_PASS_SIGMA, mode="nearest")
    v -= v.mean()
    norm = float(np.linalg.norm(v))
    return (v / norm if norm > 1e-3 else np.zeros_like(v)).ravel()


def looks_of_image(im: Image.Image) -> np.ndarray:
    """``(VARIANTS, SIDE * SIDE)``: the look as is, mirrored, turned by each of TURNS, and zoomed in by ZOOM."""
    g = _trim(im.convert("L"))
    out = [_detail(g), _detail(g.transpose(Image.Transpose.FLIP_LEFT_RIGHT))]
    out += [_detail(g.rotate(t, resample=Image.Resampling.BILINEAR)) for t in TURNS]
    w, h = g.size
    dx, dy = round(w * ZOOM), round(h * ZOOM)
    out.append(_detail(g.crop((dx, dy, max(dx + 1, w - dx), max(dy + 1, h - dy)))))
    return np.stack(out)


def looks_of_file(path: Path | ObjectUri) -> np.ndarray | None:
    """The looks of an image file; None when it cannot be read (the pair is then judged by features)."""
    try:
        with Image.open(image_source(path)) as im:
            im.draft("L", (DECODE_SIDE, DECODE_SIDE))  # JPEG: decode at a reduced scale (fast)
            return looks_of_image(im)
    except Exception as exc:  # noqa: BLE001 - any unreadable file just has no look (features judge it)
        log.debug("no look for %s: %s", path, exc)
        return None


def looks_of_files(paths: Sequence[Path | ObjectUri | None], workers: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``(L, ok)``: float16 looks of each path (``L[k]`` zeros and ``ok[k]`` False where unreadable or None)."""
    L = np.zeros((len(paths), VARIANTS, SIDE * SIDE), np.float16)
    ok = np.zeros(len(paths), bool)
    with ThreadPoolExecutor(max(1, workers)) as pool:  # decoding and resizing release the GIL
        for k, v in enumerate(pool.map(lambda p: None if p is None else looks_of_file(p), paths)):
            if v is not None and np.any(v[0]):
                L[k], ok[k] = v, True
    return L, ok


PAIRS_PER_CHUNK = 1024  # pairs compared at a time (bounded float32 copies of float16 looks)
LOOK_BYTES = VARIANTS * SIDE * SIDE * 2  # one image's looks, float16


class LookStore:
    """Looks (float16) in an unnamed scratch file, row by row, and the node each row belongs to.

    Holding every image's looks in memory grows with the dataset (10 KiB an image); here only the
    node -> row map lives in memory, and ``store[nodes]`` reads just those rows (a mapping opened
    and closed per call, so pages read stay out of the process's resident memory). Each row is
    named by its image id, kept as a compact key (``core/keys.py``: 16 bytes, not a Python string);
    ``pos[node]`` is its row, -1 for a node without a look.
    """

    def __init__(self, nodes: int, folder: Path | None = None) -> None:
        self._folder = Path(folder) if folder is not None else Path(tempfile.gettempdir())
        self._file = scratch_file(folder)  # held open until close()
        self._keys: list[np.ndarray] = []  # the rows' ids, a key array per append
        self._rows = 0
        self.pos: np.ndarray = np.full(nodes, -1, np.int32 if nodes < 2**31 else np.int64)  # (40 MB at 10M)

    def __len__(self) -> int:
        return self._rows

    def append(self, ids: KeyLike, L: np.ndarray, nodes: Sequence[int] | np.ndarray | None = None) -> None:
        """Add rows ``L`` (``(len(ids), VARIANTS, SIDE * SIDE)``) named ``ids`` (strings or keys);
        rows of ``nodes`` >= 0 are their looks."""
        start = self._rows
        keys = keys_of(ids) if len(ids) else np.zeros(0, PACKED)
        with scratch_writes(self._folder):
            self._file.seek(start * LOOK_BYTES)
            self._file.write(np.ascontiguousarray(L, np.float16).tobytes())
        self._keys.append(keys)
        self._rows += len(keys)
        if nodes is not None:
            nodes = np.asarray(nodes, np.int64)
            rows = start + np.arange(len(nodes))
            self.pos[nodes[nodes >= 0]] = rows[nodes >= 0]

    def clear(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._keys, self._rows = [], 0
        self.pos[:] = -1

    @property
    def ok(self) -> np.ndarray:
        return self.pos >= 0

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The looks of scratch rows ``rows``: ``(len(rows), VARIANTS, SIDE * SIDE)`` float16.

        Read with one ``pread`` per run of consecutive rows, not through a mapping: the kernel maps
        pages around each one touched (and the resident set counts them), hundreds of MiB for a
        block of random rows of a large store.
        """
        rows = np.asarray(rows, np.int64)
        if not len(rows) or not self._rows:
            return np.zeros((len(rows), VARIANTS, SIDE * SIDE), np.float16)
        with scratch_writes(self._folder):  # the buffered writes land here: a full disk says so
            self._file.flush()
        fd = self._file.fileno()
        want, back = np.unique(rows, return_inverse=True)  # each row read once (pairs repeat their first image)
        got = np.empty((len(want), VARIANTS, SIDE * SIDE), np.float16)
        flat = got.reshape(len(want), -1).view(np.uint8)
        breaks = np.flatnonzero(np.diff(want) != 1) + 1  # runs of consecutive rows: one read each
        for lo, hi in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(want)].tolist()):
            os.preadv(fd, [flat[lo:hi].data], int(want[lo]) * LOOK_BYTES)
        return got[back.reshape(-1)]

    def __getitem__(self, nodes: np.ndarray) -> np.ndarray:
        """The looks of ``nodes`` (each must have one): what ``look_similarity`` indexes."""
        return self.rows(self.pos[np.asarray(nodes, np.int64)])

    def ids(self) -> np.ndarray:
        """Every row's id as a key, in row order."""
        if len(self._keys) > 1:
            self._keys = [concat_keys(self._keys)]
        return self._keys[0] if self._keys else np.zeros(0, PACKED)

    def blocks(self, rows: int = 4096) -> Iterator[tuple[pa.Array, np.ndarray]]:
        """``(ids, looks)`` of every row in order, ``rows`` at a time (the ids as an Arrow string column)."""
        keys = self.ids()
        for lo in range(0, self._rows, rows):
            hi = min(self._rows, lo + rows)
            yield keys_to_arrow(keys[lo:hi]), self.rows(np.arange(lo, hi))

    def close(self) -> None:
        self._file.close()


def look_similarity(L: np.ndarray | LookStore, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(straight, mirrored)`` look cosines of pairs ``a[k]``, ``b[k]`` (looks ``L[a]``: an array or a store).

    Straight is the best over every variant of one against every variant of the other, mirror
    aside: a turn of one against a zoom of the other matches a copy turned on a larger canvas.
    """
    keep = [v for v in range(VARIANTS) if v != MIRRORED]
    straight, mirrored = np.zeros(len(a), np.float32), np.zeros(len(a), np.float32)
    for lo in range(0, len(a), PAIRS_PER_CHUNK):
        A = L[a[lo : lo + PAIRS_PER_CHUNK]].astype(np.float32)
        B = L[b[lo : lo + PAIRS_PER_CHUNK]].astype(np.float32)
        straight[lo : lo + len(A)] = np.einsum("npd,nqd->npq", A[:, keep], B[:, keep]).max(axis=(1, 2))
        mirrored[lo : lo + len(A)] = np.einsum("nd,nd->n", A[:, MIRRORED], B[:, 0])
    return straight, mirrored


def calibrate(paths: Sequence[Path | ObjectUri], threshold: float = LOOK_THRESHOLD) -> JsonObject:
    """How the look treats copies of these images: each made with the nine near-copy transforms.

    Returns per transform the share of copies whose look is at least ``threshold`` alike to
    their original's, with the minimum and median look similarity, and the share over all.
    """
    import io

    sims: dict[str, list[float]] = {t: [] for t in TRANSFORMS}
    for path in paths:
        try:
            with Image.open(image_source(path)) as opened:
                opened.draft("RGB", (DECODE_SIDE, DECODE_SIDE))
                im = opened.convert("RGB")
                im.thumbnail((DECODE_SIDE, DECODE_SIDE))  # copies of a big photo look the same at this size
        except Exception:  # noqa: BLE001 - an unreadable image is left out of the calibration
            continue
        orig = looks_of_image(im)
        if not np.any(orig[0]):
            continue  # no detail at all: nothing to calibrate on
        for t in TRANSFORMS:
            data, _ = near_copy(im, t)
            with Image.open(io.BytesIO(data)) as copy:
                s, _ = look_similarity(np.stack([orig, looks_of_image(copy)]), np.array([0]), np.array([1]))
            sims[t].append(float(s[0]))
    every = [s for v in sims.values() for s in v]
    per: JsonObject = {
        t: {
            "found": round(float(np.mean(np.array(v) >= threshold)), 3),
            "min": round(min(v), 3),
            "median": round(float(np.median(v)), 3),
        }
        for t, v in sims.items()
        if v
    }
    return {
        "images": len(every) // max(1, len(TRANSFORMS)),
        "threshold": threshold,
        "found": round(float(np.mean(np.array(every) >= threshold)), 3) if every else None,
        "transforms": per,
    }
