"""Hashing in one place: file and byte digests (sha256, md5), the BLAKE2b-128 content id, canonical JSON.

The only module that imports ``hashlib`` (tests/test_hashing.py checks it): every id, name suffix and
integrity digest of imgfeat is one of the named helpers below, so changing how one is computed is one edit.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

CHUNK_BYTES = 1 << 20
CONTENT_ID_BYTES = 16  # image_id = BLAKE2b-128 of the file's bytes, as hex
CONTENT_ID_ALGORITHM = "blake2b-128"  # the name digest_chunks knows the content id's hash by
COMPACT = (",", ":")
# json.dumps' own separators: the featureset fingerprint was first computed with them, and
# existing featureset names (workspaces on disk) must keep hashing to the same value.
DEFAULT_SEPARATORS = (", ", ": ")


def content_hasher() -> hashlib.blake2b:
    """An incremental hasher whose hexdigest is an image_id (feed it the file's bytes)."""
    return hashlib.blake2b(digest_size=CONTENT_ID_BYTES)


def content_id(data: bytes) -> str:
    """The image_id of some bytes: BLAKE2b-128 hex."""
    h = content_hasher()
    h.update(data)
    return h.hexdigest()


def digest_chunks(chunks: Iterable[bytes], algorithm: str = "sha256") -> str:
    """Hex digest of byte chunks fed in order: "sha256", "md5" or CONTENT_ID_ALGORITHM (BLAKE2b-128)."""
    h = content_hasher() if algorithm == CONTENT_ID_ALGORITHM else hashlib.new(algorithm, usedforsecurity=False)
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def sha256_lines(lines: Iterable[str]) -> str:
    """sha256 of text lines, each UTF-8 with a newline after it: the identity of a list of rows, streamed."""
    return digest_chunks(f"{line}\n".encode() for line in lines)


def file_digests(path: str | os.PathLike[str], algorithms: Iterable[str] = ("sha256",)) -> dict[str, str]:
    """Hex digests of one file, read once in chunks, e.g. ``{"md5": ..., "sha256": ...}``."""
    hashers = {name: hashlib.new(name, usedforsecurity=False) for name in algorithms}
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            for h in hashers.values():
                h.update(chunk)
    return {name: h.hexdigest() for name, h in hashers.items()}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex of a file's bytes, read in chunks."""
    return file_digests(path)["sha256"]


def canonical_json(obj: Any, separators: tuple[str, str] = COMPACT) -> str:
    """JSON with sorted keys and fixed separators: the same object always gives the same text."""
    return json.dumps(obj, sort_keys=True, separators=separators, default=str)


def sha256_bytes(data: bytes | memoryview) -> str:
    """sha256 hex of bytes in memory (the fastest digest here: ~2.5x BLAKE2b on CPUs with SHA extensions)."""
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    """sha256 hex of a string's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical_digest(obj: Any, length: int | None = None, separators: tuple[str, str] = COMPACT) -> str:
    """sha256 hex of ``canonical_json(obj)``; ``length`` cuts it to a short digest for a name (head ids)."""
    return sha256_text(canonical_json(obj, separators))[:length]
