"""Objects fetched ahead of decode: many concurrent GETs (bounded), so decoders and the model never
wait on the store's latency.

Items whose path is an object URI are read by a pool of I/O threads (obstore releases the GIL) a
few batches ahead of the decoders; each item comes out with its bytes, or with the ReadError
that says why it has none (a missing object, a refused one, one over the size limit: a row,
tried again by the next run). A store that cannot be reached even after retries raises
StorageUnavailable here and stops the run: committed shards stay, the rerun resumes. Local
files pass through untouched (the decoders read them, as before).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from imgfeat.core.stores import is_uri
from imgfeat.extract.batches import ChunkedItems, InputSpec, Item, batch_chunks
from imgfeat.extract.decode import ReadError, read_file_bytes

DEFAULT_FETCHERS = 32  # concurrent GETs: enough to hide ~50 ms of latency at ~600 small images/s per core


def fetched(item: Item, max_bytes: int) -> Item:
    """``item`` with its bytes, or with the ReadError that says why not (the pure I/O step)."""
    try:
        return replace(item, data=read_file_bytes(item.path, max_bytes))
    except ReadError as exc:
        return replace(item, error=exc)


def prefetch(items: Iterable[Item] | ChunkedItems, spec: InputSpec, fetchers: int = DEFAULT_FETCHERS) -> ChunkedItems:
    """``items`` as the decoders' batch chunks, objects fetched ahead by ``fetchers`` threads."""
    return ChunkedItems(
        _prefetched(batch_chunks(items, spec.batch_size), spec.max_file_bytes, fetchers, spec.batch_size)
    )


def _prefetched(chunks: Iterator[list[Item]], max_bytes: int, fetchers: int, batch_size: int) -> Iterator[list[Item]]:
    ahead = max(2, math.ceil(2 * fetchers / max(1, batch_size)))  # chunks in flight: every fetcher busy
    with ThreadPoolExecutor(fetchers, thread_name_prefix="imgfeat-fetch") as pool:
        pending: collections.deque[list[Item | Future[Item]]] = collections.deque()
        try:
            for chunk in chunks:
                pending.append([pool.submit(fetched, it, max_bytes) if is_uri(it.path) else it for it in chunk])
                if len(pending) >= ahead:
                    yield _resolve(pending.popleft())
            while pending:
                yield _resolve(pending.popleft())
        finally:
            for chunk_left in pending:
                for slot in chunk_left:
                    if isinstance(slot, Future):
                        slot.cancel()


def _resolve(chunk: list[Item | Future[Item]]) -> list[Item]:
    return [slot.result() if isinstance(slot, Future) else slot for slot in chunk]


def any_remote(items: list[Item]) -> bool:
    return any(is_uri(it.path) for it in items)
