"""The input mapper every executor shares: todo items -> verified decode -> one fixed-shape padded batch."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from imgfeat.core.errors import unknown_value
from imgfeat.core.hashing import content_id
from imgfeat.core.schemas import ErrorRow
from imgfeat.extract.decode import (
    DEFAULT_MAX_FILE_BYTES,
    DecodeConfig,
    DecodeError,
    ReadError,
    decode_bytes,
    read_file_bytes,
)

STAGE_DECODE = "decode"
# The file could not be read, or its bytes were not the scanned ones: an outcome about a path at a
# moment, never final for the content id (retried from another path now, by the next run later).
# Only a decode failure of the very bytes that hash to the id is final.
STAGE_READ = "read"
CHANGED_SINCE_SCAN = "changed_since_scan"


@dataclass(frozen=True)
class Item:
    """One image to extract: its content id and the absolute path (or object URI) to read it from;
    ``data``/``error``: its bytes, or why they could not be had, when fetched ahead (extract/fetch.py)."""

    image_id: str
    path: str
    data: bytes | None = field(default=None, repr=False, compare=False)
    error: ReadError | None = field(default=None, repr=False, compare=False)


# Where files are decoded. threads: Pillow in a thread pool (Pillow releases the GIL, but threads
# stop scaling near 8 on a 16-core host); processes: Pillow in worker processes writing straight
# into shared batch buffers; gpu: JPEGs batch-decoded and resized on the GPU (nvImageCodec), other
# files on the CPU; auto: threads or processes by the number of decode workers (measured:
# PROCESS_DECODE_MIN_WORKERS). Only gpu changes the numbers (it is named in the fingerprint).
DECODE_MODES = ("auto", "threads", "processes", "gpu")
PROCESS_DECODE_MIN_WORKERS = 8
DECODERS = {"gpu": "nvimgcodec"}  # decode mode -> the decoder the recipe names (default "pillow")


def resolve_decode(mode: str, workers: int) -> str:
    """auto -> threads or processes, by the number of decoders; any other mode as given."""
    if mode not in DECODE_MODES:
        raise unknown_value("decode", str(mode), DECODE_MODES)
    if mode != "auto":
        return mode
    return "processes" if workers >= PROCESS_DECODE_MIN_WORKERS else "threads"


def decoder_of(mode: str) -> str:
    """The decoder a decode mode makes the numbers with: 'pillow', or 'nvimgcodec' for the GPU."""
    return DECODERS.get(mode, "pillow")


def decode_mode_of(decoder: str) -> str:
    """decoder_of's inverse: the mode that makes a recipe's decoder's numbers (gpu, else auto)."""
    return next((mode for mode, name in DECODERS.items() if name == decoder), "auto")


@dataclass(frozen=True)
class InputSpec:
    """How an executor turns items into model inputs (picklable: it travels to Ray workers)."""

    dcfg: DecodeConfig
    batch_size: int
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    decode: str = "auto"  # one of DECODE_MODES
    # object-store options (--storage-option) for workers in other processes (Ray); may hold secrets
    storage: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def batch_shape(self) -> tuple[int, int, int, int]:
        """The one shape every model call takes: (batch_size, height, width, 3) uint8."""
        h, w = self.dcfg.size
        return (self.batch_size, h, w, 3)


@dataclass
class Batch:
    """A fixed-shape uint8 model input: the first ``len(ids)`` rows are real, the rest are padding."""

    ids: list[str]
    raw: np.ndarray
    errors: list[ErrorRow]
    decode_seconds: float
    release: Callable[[], None] | None = None  # hands a pooled buffer back, once the model is done with raw


def read_verified(item: Item, spec: InputSpec) -> bytes:
    """Read one file, or ReadError: its bytes must still hash to the manifest's image_id (if they
    do not, nothing is known about the id's bytes: the error is about this path now)."""
    if item.error is not None:
        raise item.error
    data = item.data if item.data is not None else read_file_bytes(item.path, spec.max_file_bytes)
    if content_id(data) != item.image_id:
        raise ReadError(
            CHANGED_SINCE_SCAN,
            f"{item.path}: the file's bytes changed since the scan (rescan the dataset to extract its new content)",
        )
    return data


def decode_item(item: Item, spec: InputSpec) -> np.ndarray:
    """Read, verify and decode one file (see read_verified)."""
    return decode_bytes(read_verified(item, spec), spec.dcfg, name=item.path)


def is_final(stage: str, code: str) -> bool:
    """Whether an error row closes its content id: a decode failure of the verified bytes. Rows of
    older versions said stage "decode" for changed_since_scan, hence the code test."""
    return stage != STAGE_READ and code != CHANGED_SINCE_SCAN


def decode_error_row(item: Item, exc: DecodeError, run_id: str) -> ErrorRow:
    stage = STAGE_READ if exc.transient else STAGE_DECODE
    return ErrorRow(item.image_id, item.path, stage, exc.code, exc.message, run_id)


def make_batch(items: list[Item], spec: InputSpec, run_id: str) -> Batch:
    """The pure mapper of the input side: files -> one zero-padded uint8 batch plus error rows."""
    t0 = time.perf_counter()
    h, w = spec.dcfg.size
    raw = np.zeros((spec.batch_size, h, w, 3), dtype=np.uint8)
    ids: list[str] = []
    errors: list[ErrorRow] = []
    for item in items:
        try:
            raw[len(ids)] = decode_item(item, spec)
            ids.append(item.image_id)
        except DecodeError as exc:
            errors.append(decode_error_row(item, exc, run_id))
    return Batch(ids, raw, errors, time.perf_counter() - t0)


def pad_rows(pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """Zero-pad (n, H, W, 3) to (batch_size, H, W, 3): one traced shape for every model call."""
    if len(pixels) == batch_size:
        return pixels
    out = np.zeros((batch_size, *pixels.shape[1:]), dtype=pixels.dtype)
    out[: len(pixels)] = pixels
    return out


@dataclass(frozen=True)
class ChunkedItems:
    """Items already cut into batch chunks (each of at most the batch size), for a decoder to take
    as they are: one decode stream then serves units of work whose batches must not span two of
    them (the local executor's shards), where chunking the items itself would join their ends."""

    chunks: Iterable[list[Item]]


def batch_chunks(items: Iterable[Item] | ChunkedItems, size: int) -> Iterator[list[Item]]:
    """The batch chunks a decoder makes: ``items`` in chunks of ``size``, or ChunkedItems' chunks."""
    if not isinstance(items, ChunkedItems):
        yield from chunked(items, size)
        return
    for chunk in items.chunks:
        if not 0 < len(chunk) <= size:
            raise ValueError(f"a batch chunk of {len(chunk)} items, the batch size is {size}")
        yield chunk


def chunked(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
