"""Opt-in GPU decode (JAX): JPEGs batch-decoded by nvImageCodec, resized on the device per size bucket; CPU fallback.

The contract is the thread path's (``make_batch``): batches in todo order, the first ``len(ids)``
rows real and in item order, the rest zero, error rows with the CPU path's codes; here ``raw``
is a uint8 JAX array on the device. Reading and the content check run on CPU threads. A file
goes to the GPU only when it is a plain JPEG (8-bit, Huffman-coded, gray or YCbCr: its markers
say so, ``jpeg_header.py``) within Pillow's pixel limit, ending with its EOI marker; the codec's
output must have the size the header promises. Everything else (PNG, CMYK, cut-short or corrupt files,
images the codec refuses or returns None for) is decoded by ``decode_bytes``, exactly as today.

The resize reproduces Pillow's ``resize((w, h), filter)`` (a full squash, no crop): the same
filter weights over each image's real pixels (padding never leaks in), horizontal pass first,
each pass rounded to uint8, so on the same decoded pixels it differs from Pillow by at most 1
per channel (fixed-point against float rounding). nvJPEG's decode differs from libjpeg's
slightly, so the decoder is part of the featureset fingerprint (the recipe's decode mode).
"""

from __future__ import annotations

import collections
import functools
import importlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from imgfeat.core.errors import ConfigError
from imgfeat.core.logs import native_stderr_to_debug
from imgfeat.core.schemas import ErrorRow
from imgfeat.extract.batches import (
    Batch,
    ChunkedItems,
    InputSpec,
    Item,
    batch_chunks,
    decode_error_row,
    read_verified,
)
from imgfeat.extract.compilecache import enable_compile_cache
from imgfeat.extract.decode import (
    TRANSPOSED_ORIENTATIONS,
    DecodeConfig,
    DecodeError,
    decode_bytes,
)
from imgfeat.extract.jpeg_header import HUFFMAN_SOF, JpegHeader, read_jpeg_header
from imgfeat.extract.recipe import keras_backend

log = logging.getLogger(__name__)

CODEC_MODULE = "nvidia.nvimgcodec"
GPU_EXTRA = "pip install 'imgfeat[gpu]' (CUDA 12 hosts: pip install nvidia-nvimgcodec-cu12)"
# libjpeg (Pillow) upsamples chroma "fancily"; nvImageCodec's default does not: ask for libjpeg's way
# (a documented option for every JPEG decoder plugin: nvimagecodec/codec_options.html).
CODEC_OPTIONS = ":fancy_upsampling=1"
JPEG_EOI = b"\xff\xd9"
RGB_COMPONENT_IDS = (82, 71, 66)  # "R", "G", "B": libjpeg reads such a JPEG as RGB, not YCbCr
# Bucket sides: 32 and 48 times powers of two (padding wastes at most a third of a side).
BUCKET_SIDES = tuple(sorted(b << k for b in (32, 48) for k in range(10) if b << k <= 16384))
BUCKET_BYTES = 256 << 20  # at most this much padded uint8 input per compiled resize call
CHANNELS = 3
# Distinct source sizes padded by a compiled call on the device; past this many, pad on the host.
MAX_PAD_SHAPES = 64
# Images of one exact size, this many or more in a bucket of a batch, are stacked and padded by one
# compiled call (one more compile per size and row count) instead of one call per image.
STACK_MIN = 16
MIN_ROWS = 16  # the fewest rows a compiled resize call takes (see padded_rows)
# Threads making batches (the codec call, the device dispatch; the codec one call at a time): a second
# one dispatches a batch while the first waits on the codec (measured on an H200: 3,594 img/s
# against 3,281 with one).
MAKERS = 2
# CPU threads reading and probing files for GPU decode, unless told otherwise: nvJPEG works on CPU
# threads of its own, and more readers only take cores from it (H200 host, 16 cores: 4,229 img/s
# with 4 readers, 3,960 with 8, 3,281 with 16).
READ_THREADS = 4
# The resize's two matrix products are small and exact (HIGHEST precision); letting XLA autotune
# them made each cold compile of the resize cost ~13 s on an H200. Unmeasured since (see README).
RESIZE_COMPILER_OPTIONS = {"xla_gpu_autotune_level": 0}
CODEC_LOCK = threading.Lock()  # one codec call at a time in this process (see GpuBatcher)


# Pillow's resampling filters (src/libImaging/Resample.c) and their supports, on any array module.
def _bilinear(x, xp):
    return xp.maximum(1.0 - xp.abs(x), 0.0)


def _hamming(x, xp):
    a = xp.abs(x)
    t = xp.where(a == 0, 1.0, a * np.pi)
    return xp.where(a == 0, 1.0, xp.where(a >= 1, 0.0, xp.sin(t) / t * (0.54 + 0.46 * xp.cos(t))))


def _bicubic(x, xp, a=-0.5):
    x = xp.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return xp.where(x < 1, near, xp.where(x < 2, far, 0.0))


def _sinc(x, xp):
    t = xp.where(x == 0, 1.0, x * np.pi)
    return xp.where(x == 0, 1.0, xp.sin(t) / t)


def _lanczos(x, xp):
    return xp.where((x >= -3) & (x < 3), _sinc(x, xp) * _sinc(x / 3, xp), 0.0)


# Not "box" and "nearest": they jump between taps, so float32 and Pillow's float64 pick different
# pixels at ties (measured: off by 90); the continuous filters stay within 1.
KERNELS: dict[str, Callable] = {"bilinear": _bilinear, "hamming": _hamming, "bicubic": _bicubic, "lanczos": _lanczos}


def filter_weights(kernel: Callable, in_real, in_pad: int, out: int, xp=np):
    """(out, in_pad) weights of Pillow's resample for an axis of ``in_real`` pixels (padded to ``in_pad``)."""
    scale = in_real / out
    filterscale = xp.maximum(scale, 1.0)
    center = (xp.arange(out, dtype=np.float32) + 0.5) * scale
    taps = xp.arange(in_pad, dtype=np.float32)
    w = kernel((taps[None, :] + 0.5 - center[:, None]) / filterscale, xp)
    w = xp.where(taps[None, :] < in_real, w, 0.0)  # padding is never a tap: edges renormalise as Pillow's do
    return w / xp.sum(w, axis=1, keepdims=True)


def bucket_side(n: int) -> int | None:
    """The smallest bucket side holding ``n`` pixels, or None when the image is too large for one."""
    return next((b for b in BUCKET_SIDES if b >= n), None)


def bucket_rows(bucket: tuple[int, int]) -> int:
    """How many images of one bucket one compiled call takes (a power of two)."""
    fit = max(1, BUCKET_BYTES // (bucket[0] * bucket[1] * CHANNELS))
    return 1 << (fit.bit_length() - 1)


def padded_rows(n: int, limit: int) -> int:
    """Rows one compiled call is given for ``n`` images, at most ``limit`` (>= n): 16, 64, 256, ... (powers
    of 4 from MIN_ROWS), so a bucket compiles at most three shapes for a batch of 256. A cold
    resize compile costs seconds on a GPU (measured: ~13 s each on an H200, so a 40,000-image run's
    one odd tail batch cost as much as its decode); a few padded rows cost microseconds."""
    rows = MIN_ROWS
    while rows < n:
        rows *= 4
    return min(rows, limit)


def gpu_shape(data: bytes, dcfg: DecodeConfig) -> tuple[int, int] | None:
    """(h, w) the GPU decode of these bytes must have, or None when the CPU path must decode them."""
    if not data.endswith(JPEG_EOI):
        return None  # cut short (or trailing bytes): the CPU path decides
    head = read_jpeg_header(data)
    if head is None or not _plain_jpeg(head):
        return None
    h, w = head.height, head.width
    limit = Image.MAX_IMAGE_PIXELS
    if limit and h * w > limit:
        return None  # the CPU path names it too_large
    if dcfg.exif == "rotate":
        if head.orientation not in (None, *range(1, 9)) or (head.orientation is None and head.xmp_orientation):
            return None  # an orientation nvJPEG may read otherwise than Pillow: Pillow decides
        if head.orientation in TRANSPOSED_ORIENTATIONS:
            h, w = w, h
    if bucket_side(h) is None or bucket_side(w) is None:
        return None
    return h, w


def _plain_jpeg(head: JpegHeader) -> bool:
    """8-bit Huffman-coded gray or YCbCr: what nvJPEG and libjpeg decode alike. CMYK/YCCK, 12-bit,
    lossless, arithmetic-coded and RGB-coded JPEGs (Adobe transform 0, or components named R, G, B)
    take the CPU path."""
    if head.sof not in HUFFMAN_SOF or head.precision != 8 or not head.height or not head.width:
        return False
    if head.components == 1:
        return True
    return head.components == 3 and head.adobe_transform != 0 and head.component_ids != RGB_COMPONENT_IDS


def check_gpu_decode(dcfg: DecodeConfig | None, probe_devices: bool = True) -> None:
    """ConfigError (exit 2) naming every piece GPU decode lacks here: the extra, the backend, a GPU, an option.

    ``dcfg`` None leaves the options out; ``probe_devices`` False leaves out asking JAX for its devices,
    for a parent process that must not take the GPU (JAX claims most of its memory on first use)."""
    problems = [*_option_problems(dcfg)] if dcfg is not None else []
    try:
        import_codec()
    except (ImportError, OSError) as exc:
        problems.append(f"{CODEC_MODULE} is not importable ({exc}): {GPU_EXTRA}")
    backend = keras_backend()
    if backend != "jax":
        problems.append(f"the Keras backend is {backend!r}, GPU decode runs on JAX: set KERAS_BACKEND=jax")
    if probe_devices:
        problems.extend(_gpu_problems())
    if problems:
        raise ConfigError("decode 'gpu' cannot run here: " + "; ".join(problems))


# nvImageCodec loads every extension it ships; those whose CUDA library is absent (nvJPEG2000, nvTIFF:
# JPEG 2000 and TIFF, which never reach the GPU here) print several lines to the C-level stderr, which
# go to the native logger at debug level, as TensorFlow's do.
def import_codec() -> Any:
    """nvidia.nvimgcodec, imported with what it prints to fd 2 logged at debug level."""
    loaded = sys.modules.get(CODEC_MODULE)
    if loaded is not None:
        return loaded
    with native_stderr_to_debug():
        return importlib.import_module(CODEC_MODULE)


def _option_problems(dcfg: DecodeConfig) -> Iterator[str]:
    if dcfg.fast_decode:
        yield "fast_decode is libjpeg's reduced-size decode, which the GPU decoder has not: drop --fast-decode"
    if dcfg.interpolation not in KERNELS:
        yield (
            f"interpolation {dcfg.interpolation!r} has no GPU kernel "
            f"(allowed with decode 'gpu': {', '.join(sorted(KERNELS))})"
        )


def _gpu_problems() -> list[str]:
    try:
        import jax
    except ImportError as exc:
        return [f"jax is not importable ({exc})"]
    try:
        platforms = sorted({d.platform for d in jax.devices()})
    except RuntimeError as exc:
        return [f"JAX found no devices ({exc})"]
    if "gpu" not in platforms:
        return [f"JAX sees no GPU (its devices: {', '.join(platforms)}); install jax with its CUDA plugin"]
    return []


class NvImageCodec:
    """nvImageCodec's batched decoder, bound to one EXIF mode: JPEG bytes in, uint8 (h, w, 3) JAX arrays
    on the GPU out (None where it could not decode). ``module`` replaces nvidia.nvimgcodec in tests;
    ``options`` "" gives the codec's defaults (nvJPEG's plain chroma upsampling: for measuring only).
    ``seconds`` adds up the time in the codec's call and in handing its images to JAX."""

    def __init__(self, dcfg: DecodeConfig, module: Any = None, options: str = CODEC_OPTIONS) -> None:
        import jax

        nv = module if module is not None else import_codec()
        self._from_dlpack = jax.dlpack.from_dlpack
        with native_stderr_to_debug():  # the extensions load with the first decoder
            try:
                self._decoder = nv.Decoder(options=options) if options else nv.Decoder()
            except TypeError:  # a binding without decoder options: nvJPEG's default chroma upsampling
                log.warning("nvImageCodec takes no decoder options: decoding without %s", options)
                self._decoder = nv.Decoder()
        # interleaved 8-bit RGB: ColorSpec.SRGB in nvImageCodec 0.9 (which has no RGB), RGB in older bindings
        rgb = getattr(nv.ColorSpec, "SRGB", None) or nv.ColorSpec.RGB
        self._params = nv.DecodeParams(apply_exif_orientation=dcfg.exif == "rotate", color_spec=rgb)
        # nvImageCodec 0.9 decodes CodeStreams (older bindings took bytes) and takes params by keyword only
        self._stream = getattr(nv, "CodeStream", None)
        self.seconds: collections.Counter[str] = collections.Counter()

    def decode(self, datas: Sequence[bytes]) -> list[Any]:
        t0 = time.perf_counter()
        srcs = [self._stream(d) for d in datas] if self._stream is not None else list(datas)
        images = self._decoder.decode(srcs, params=self._params)
        t1 = time.perf_counter()
        out = [None if img is None else self._from_dlpack(img) for img in images]
        self.seconds.update({"codec": t1 - t0, "to_jax": time.perf_counter() - t1})
        return out


class DeviceKernels:
    """The compiled device functions for one (interpolation, output size), shared by every run in this
    process (jit caches per function object). ``compiles`` records every trace, i.e. every compile."""

    def __init__(self, interpolation: str, size: tuple[int, int]) -> None:
        import jax
        import jax.numpy as jnp

        enable_compile_cache()
        self.compiles: list[tuple] = []
        self.pad_shapes: set[tuple[int, int]] = set()  # source sizes `pad` has compiled for
        resize = functools.partial(_resize_rows, kernel=KERNELS[interpolation], out_hw=size)
        self.resize = _jit_with_options(self._counted("resize", resize), RESIZE_COMPILER_OPTIONS)
        self.pad = jax.jit(self._counted("pad", _pad_to), static_argnums=(1,))
        self.stack = jax.jit(self._counted("stack", lambda *rows: jnp.stack(rows)))
        self.stack_pad = jax.jit(self._counted("stack_pad", _stack_pad), static_argnums=0)
        self.place = jax.jit(self._counted("place", lambda out, rows, idx: out.at[idx].set(rows, mode="drop")))
        self.zeros = jax.jit(self._counted("zeros", lambda shape: jnp.zeros(shape, jnp.uint8)), static_argnums=0)

    def _counted(self, name: str, fn: Callable) -> Callable:
        def traced(*args):
            self.compiles.append((name, *(getattr(a, "shape", a) for a in args)))
            return fn(*args)

        return traced


def _jit_with_options(fn: Callable, options: dict[str, Any]) -> Callable:
    import jax

    try:
        return jax.jit(fn, compiler_options=options)
    except TypeError:  # a JAX without per-function compiler options
        return jax.jit(fn)


@functools.cache
def device_kernels(interpolation: str, size: tuple[int, int]) -> DeviceKernels:
    return DeviceKernels(interpolation, size)


class DeviceResizer:
    """Decoded images of any size -> one (batch, H, W, 3) uint8 device array: images are padded into
    size buckets and each bucket is resized by one compiled call (``kernels.compiles`` counts them)."""

    def __init__(self, dcfg: DecodeConfig) -> None:
        import jax

        self.jax = jax
        self.size = tuple(dcfg.size)
        self.kernels = device_kernels(dcfg.interpolation, self.size)

    def assemble(self, batch_size: int, device_rows: list[tuple[int, Any]], host_rows: dict[int, np.ndarray]) -> Any:
        """Rows already at (H, W) from the CPU path plus decoded images of any size at their rows."""
        h, w = self.size
        if host_rows:
            base = np.zeros((batch_size, h, w, CHANNELS), np.uint8)
            for row, pixels in host_rows.items():
                base[row] = pixels
            out = self.jax.device_put(base)
        else:
            out = self.kernels.zeros((batch_size, h, w, CHANNELS))
        for bucket, rows in _by_bucket(device_rows).items():
            step = min(bucket_rows(bucket), 1 << max(0, batch_size - 1).bit_length())
            for group, stack in self._groups(rows):
                for start in range(0, len(group), step):
                    out = self._resize_into(out, bucket, group[start : start + step], batch_size, step, stack)
        return out

    def _groups(self, rows: list[tuple[int, Any]]) -> list[tuple[list[tuple[int, Any]], bool]]:
        """A bucket's rows as groups, each with whether it is stacked whole: the device images of one
        exact size, where there are STACK_MIN of them and the size is within the compile budget
        (MAX_PAD_SHAPES, shared with ``_padded``), are stacked and padded by one call; the rest are
        padded one call per image."""
        by_shape: dict[tuple, list[tuple[int, Any]]] = collections.defaultdict(list)
        for row in rows:
            by_shape[tuple(row[1].shape)].append(row)
        groups: list[tuple[list[tuple[int, Any]], bool]] = []
        rest: list[tuple[int, Any]] = []
        seen = self.kernels.pad_shapes
        for shape, same in by_shape.items():
            device = not isinstance(same[0][1], np.ndarray)
            if device and len(same) >= STACK_MIN and (shape[:2] in seen or len(seen) < MAX_PAD_SHAPES):
                seen.add(shape[:2])
                groups.append((same, True))
            else:
                rest.extend(same)
        return [*groups, (rest, False)] if rest else groups

    def _resize_into(
        self, out: Any, bucket: tuple[int, int], rows: list[tuple[int, Any]], batch_size: int, step: int, stack: bool
    ) -> Any:
        n = padded_rows(len(rows), step)
        k = self.kernels
        if stack:  # one exact size: stacked and padded in one call
            filler = k.zeros(rows[0][1].shape)
            stacked = k.stack_pad(bucket, *[img for _, img in rows], *[filler] * (n - len(rows)))
        else:
            padded = [self._padded(img, bucket) for _, img in rows]
            padded += [k.zeros((*bucket, CHANNELS))] * (n - len(rows))
            stacked = k.stack(*padded)
        hw = np.ones((n, 2), np.int32)
        hw[: len(rows)] = [img.shape[:2] for _, img in rows]
        idx = np.full(n, batch_size, np.int32)  # filler rows point past the batch: dropped
        idx[: len(rows)] = [row for row, _ in rows]
        return k.place(out, k.resize(stacked, hw), idx)

    def _padded(self, img: Any, bucket: tuple[int, int]) -> Any:
        """One image at the top left of a (Hb, Wb, 3) device array (the padding is never read)."""
        shape = tuple(img.shape[:2])
        if not isinstance(img, np.ndarray):
            seen = self.kernels.pad_shapes
            if shape in seen or len(seen) < MAX_PAD_SHAPES:
                seen.add(shape)
                return self.kernels.pad(img, bucket)
            img = np.asarray(img)  # one more distinct size would mean one more compile: pad on the host
        host = np.zeros((*bucket, CHANNELS), np.uint8)
        host[: shape[0], : shape[1]] = img
        return self.jax.device_put(host)


def _by_bucket(rows: list[tuple[int, Any]]) -> dict[tuple[int, int], list[tuple[int, Any]]]:
    groups: dict[tuple[int, int], list[tuple[int, Any]]] = collections.defaultdict(list)
    for row, img in rows:
        h, w = bucket_side(img.shape[0]), bucket_side(img.shape[1])
        assert h is not None and w is not None, "only images that fit a bucket are routed to the GPU"
        groups[(h, w)].append((row, img))
    return groups


def _pad_to(img, bucket: tuple[int, int]):
    import jax.numpy as jnp

    return jnp.pad(img, ((0, bucket[0] - img.shape[0]), (0, bucket[1] - img.shape[1]), (0, 0)))


def _stack_pad(bucket: tuple[int, int], *imgs):
    import jax.numpy as jnp

    h, w = imgs[0].shape[:2]
    return jnp.pad(jnp.stack(imgs), ((0, 0), (0, bucket[0] - h), (0, bucket[1] - w), (0, 0)))


def _round8(x, jnp):
    return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)  # Pillow's fixed point rounds half up, then clips


def _resize_one(img, hw, kernel: Callable, out_hw: tuple[int, int]):
    import jax
    import jax.numpy as jnp

    exact = jax.lax.Precision.HIGHEST  # no TF32: the sums must be exact to the rounding
    x = img.astype(jnp.float32)
    hw = hw.astype(jnp.float32)
    across = filter_weights(kernel, hw[1], img.shape[1], out_hw[1], jnp)  # (W, Wb)
    x = _round8(jnp.einsum("hwc,Ww->hWc", x, across, precision=exact), jnp)
    down = filter_weights(kernel, hw[0], img.shape[0], out_hw[0], jnp)  # (H, Hb)
    return _round8(jnp.einsum("hWc,Hh->HWc", x, down, precision=exact), jnp).astype(jnp.uint8)


def _resize_rows(padded, hw, kernel: Callable, out_hw: tuple[int, int]):
    """(n, Hb, Wb, 3) uint8 padded images with their real (h, w) -> (n, H, W, 3) uint8, Pillow's way."""
    import jax

    return jax.vmap(functools.partial(_resize_one, kernel=kernel, out_hw=out_hw))(padded, hw)


@dataclass
class FileRead:
    """One file after the CPU threads: verified bytes and the (h, w) a GPU decode must give, or the error."""

    data: bytes = b""
    gpu_hw: tuple[int, int] | None = None
    error: DecodeError | None = None
    seconds: float = 0.0


def read_probe(item: Item, spec: InputSpec) -> FileRead:
    """Read and verify one file, and decide whether the GPU may decode it (in a CPU thread)."""
    t0 = time.perf_counter()
    try:
        data = read_verified(item, spec)
    except DecodeError as exc:
        return FileRead(error=exc, seconds=time.perf_counter() - t0)
    return FileRead(data, gpu_shape(data, spec.dcfg), seconds=time.perf_counter() - t0)


class GpuBatcher:
    """Turns one chunk of items (read by CPU threads) into one Batch: a GPU decode call for the JPEGs,
    the CPU path for the rest, one device resize per size bucket (or per exact size within it).

    Maker threads share the one ``codec`` and every codec in the process is called one call at a
    time (``CODEC_LOCK``): nvImageCodec 0.9 fails ("Future already retrieved") and then crashes when
    two decoders decode at once (measured on an H200), so what overlaps is one batch's decode with
    another's device dispatch. ``counts``
    counts files by where they went; ``seconds`` adds up each phase's wall time in the makers:
    "gpu_decode" (the codec call, its images handed to JAX, any wait for the codec), "cpu_decode"
    (fallbacks, in the read threads) and "assemble" (dispatching the pad, resize and placement)."""

    def __init__(
        self, spec: InputSpec, codec: Any, pool: ThreadPoolExecutor, counts: collections.Counter | None = None
    ) -> None:
        self.spec, self.codec, self.pool = spec, codec, pool
        self.resizer = DeviceResizer(spec.dcfg)
        self.counts = counts if counts is not None else collections.Counter()  # files by where they went
        self.seconds: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()  # counts and seconds

    def _add(self, counts: collections.Counter, seconds: dict[str, float]) -> None:
        with self._lock:
            self.counts.update(counts)
            self.seconds.update(seconds)

    def batch(self, items: list[Item], reads: list[FileRead], run_id: str) -> Batch:
        t0 = time.perf_counter()
        phases: dict[str, float] = {}
        outcomes = self._decoded(items, reads, phases)
        counts: collections.Counter = collections.Counter()
        ids: list[str] = []
        errors: list[ErrorRow] = []
        device_rows: list[tuple[int, Any]] = []
        host_rows: dict[int, np.ndarray] = {}
        for item, (kind, value) in zip(items, outcomes):
            counts[kind] += 1
            if kind == "error":
                errors.append(decode_error_row(item, value, run_id))
                continue
            if kind == "gpu":
                device_rows.append((len(ids), value))
            else:
                host_rows[len(ids)] = value
            ids.append(item.image_id)
        t1 = time.perf_counter()
        raw = self.resizer.assemble(self.spec.batch_size, device_rows, host_rows)
        phases["assemble"] = time.perf_counter() - t1
        self._add(counts, phases)
        seconds = time.perf_counter() - t0 + sum(r.seconds for r in reads)
        return Batch(ids, raw, errors, seconds)

    def _decoded(self, items: list[Item], reads: list[FileRead], phases: dict[str, float]) -> list[tuple[str, Any]]:
        """Per item ("gpu", image of any size) | ("cpu", (H, W, 3) array) | ("error", DecodeError)."""
        outcomes: list[tuple[str, Any] | None] = [None if r.error is None else ("error", r.error) for r in reads]
        jpegs = [i for i, r in enumerate(reads) if r.gpu_hw is not None and r.error is None]
        t0 = time.perf_counter()
        for i, img in zip(jpegs, self._gpu_decode([reads[i].data for i in jpegs])):
            hw = reads[i].gpu_hw
            if img is not None and hw is not None and tuple(img.shape) == (*hw, CHANNELS) and img.dtype == np.uint8:
                outcomes[i] = ("gpu", img)
        t1 = time.perf_counter()
        rest = [i for i, o in enumerate(outcomes) if o is None]
        for i, outcome in zip(
            rest, self.pool.map(self._cpu_decode, [items[i] for i in rest], [reads[i].data for i in rest])
        ):
            outcomes[i] = outcome
        phases["gpu_decode"], phases["cpu_decode"] = t1 - t0, time.perf_counter() - t1
        return [o for o in outcomes if o is not None]  # every item has its outcome by now

    def _gpu_decode(self, datas: list[bytes]) -> list[Any]:
        if not datas:
            return []
        try:
            with CODEC_LOCK:
                images = self.codec.decode(datas)
        except Exception as exc:  # a failed batch call: every file of it takes the CPU path
            # the first line only, cut short: a binding's TypeError quotes every argument, i.e. the files' bytes
            reason = str(exc).partition("\n")[0][:200]
            log.warning(
                "GPU decode of %d files failed (%s: %s); decoding them on the CPU",
                len(datas),
                type(exc).__name__,
                reason,
            )
            return [None] * len(datas)
        return list(images) if len(images) == len(datas) else [None] * len(datas)

    def _cpu_decode(self, item: Item, data: bytes) -> tuple[str, Any]:
        try:
            return "cpu", decode_bytes(data, self.spec.dcfg, name=item.path)
        except DecodeError as exc:
            return "error", exc


def gpu_batches(
    items: Iterable[Item] | ChunkedItems,
    spec: InputSpec,
    run_id: str,
    workers: int,
    ahead: int,
    codec: Any = None,
    counts: collections.Counter | None = None,
    makers: int = MAKERS,
    stats: dict[str, Any] | None = None,
) -> Iterator[Batch]:
    """Batches in todo order (the thread path's contract), ``raw`` a uint8 JAX array on the device.

    ``workers`` CPU threads read, verify and probe files and decode the CPU fallbacks; ``makers``
    more threads make the batches (the codec call, the resize dispatch), up to ``ahead`` batches
    ahead of the caller, so the model's thread never waits on a decode it could overlap. ``codec``
    has ``decode(list of bytes) -> list of (h, w, 3) uint8 arrays or None``; None makes the real
    one (``NvImageCodec``). ``counts``, when given, counts files by where they went: "gpu", "cpu"
    (the CPU path decoded them) or "error"; ``stats``, when given, receives the makers' phase
    seconds (``GpuBatcher.seconds``, and the codec's own) when the batches are done. A batch's
    ``decode_seconds`` is its files' read and probe seconds plus the seconds its batch took to make
    (device work still running is not counted).
    """
    codec = codec if codec is not None else NvImageCodec(spec.dcfg)
    with (
        ThreadPoolExecutor(max(1, workers), thread_name_prefix="imgfeat-gpu-read") as pool,
        ThreadPoolExecutor(max(1, makers), thread_name_prefix="imgfeat-gpu-decode") as maker,
    ):
        batcher = GpuBatcher(spec, codec, pool, counts)
        pending: collections.deque[Future] = collections.deque()
        try:
            for chunk in batch_chunks(items, spec.batch_size):
                reads = [pool.submit(read_probe, item, spec) for item in chunk]
                pending.append(maker.submit(_finish, batcher, chunk, reads, run_id))
                if len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
            log.info(
                "GPU decode: %d files decoded on the GPU, %d by the CPU path, %d error rows",
                batcher.counts["gpu"],
                batcher.counts["cpu"],
                batcher.counts["error"],
            )
        finally:  # stopped early (or failed): drop the work queued for batches nobody will take
            maker.shutdown(cancel_futures=True)
            pool.shutdown(cancel_futures=True)
            if stats is not None:
                stats.update(phase_seconds(batcher))


def phase_seconds(batcher: GpuBatcher) -> dict[str, float]:
    """The makers' seconds per phase, the codec's own split included (where it keeps one)."""
    out = collections.Counter(batcher.seconds)
    out.update(getattr(batcher.codec, "seconds", {}))
    return {k: round(v, 3) for k, v in sorted(out.items())}


def _finish(batcher: GpuBatcher, chunk: list[Item], futures: list[Future], run_id: str) -> Batch:
    return batcher.batch(chunk, [f.result() for f in futures], run_id)
