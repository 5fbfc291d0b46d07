"""Resizing without antialiasing, as keras.ops.image.resize(antialias=False) does, on the host in NumPy.

Pillow's filters always widen their support when they shrink (antialiasing). A keras-hub image
converter with ``antialias=False`` does not: it samples each output pixel from the 2 (bilinear)
or 4 (bicubic) input pixels around its centre, however large the reduction. On a 9x reduction
the two differ enough to move a feature (cosine 0.99), so for such converters decode resizes
here instead. The arithmetic is TensorFlow's ``resize_bilinear`` / ``resize_bicubic`` with half-pixel
centres: Keys' cubic (a = -0.5) with its offset quantised to 1/1024 as TensorFlow's table is,
out-of-image taps weighted 0 and the rest renormalised. It agrees with keras' resize to ~1e-4
(0-255 scale) before the result is rounded to uint8. Separable, by gathers: the cost is a few
multiply-adds per output pixel and row, never a float copy of the whole decoded photo.
"""

from __future__ import annotations

import numpy as np

METHODS = ("bilinear", "bicubic")
KEYS_A = -0.5
TABLE_SIZE = 1024  # TensorFlow's bicubic coefficient table: offsets are rounded to 1/1024


def _keys(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    a = KEYS_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def taps(n_in: int, n_out: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (n_out, taps): which input pixels make each output pixel, and how much."""
    centre = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(centre)
    if method == "bilinear":
        lerp = centre - base
        lo = np.clip(base, 0, n_in - 1)
        hi = np.clip(np.ceil(centre), 0, n_in - 1)
        return np.stack([lo, hi], 1).astype(np.int64), np.stack([1 - lerp, lerp], 1)
    if method != "bicubic":
        raise ValueError(f"no antialias-free resize for {method!r} (known: {', '.join(METHODS)})")
    delta = np.round((centre - base) * TABLE_SIZE) / TABLE_SIZE
    offsets = np.arange(-1, 3)
    idx = base[:, None] + offsets[None, :]
    w = np.where((idx >= 0) & (idx < n_in), _keys(delta[:, None] - offsets[None, :]), 0.0)
    return np.clip(idx, 0, n_in - 1).astype(np.int64), w / w.sum(1, keepdims=True)


def resize_no_antialias(img: np.ndarray, size: tuple[int, int], method: str) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8, keras' antialias=False resize rounded to the nearest integer."""
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    idx, wt = taps(img.shape[0], h, method)
    rows = np.einsum("hk,hkwc->hwc", wt.astype(np.float32), img[idx].astype(np.float32))
    idx, wt = taps(img.shape[1], w, method)
    out = np.einsum("wk,hwkc->hwc", wt.astype(np.float32), rows[:, idx])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
