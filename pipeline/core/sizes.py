"""Sizes of memory: ``--memory-budget 256MB`` parsed into bytes, and the default budget (a share of RAM)."""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from imgfeat.core.errors import ConfigError

# Decimal units are powers of 1000, binary ones of 1024, as everywhere else (``ls -h`` aside).
UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}
UNITS_TEXT = "B, KB, MB, GB, TB, PB, KiB, MiB, GiB, TiB, PiB"
DEFAULT_BUDGET_FRACTION = 4  # the default budget is a quarter of physical memory
BUDGET_MIN, BUDGET_MAX = 64 << 10, 1 << 50  # memory_budget's range (64 KiB: tests force the streamed paths)
FALLBACK_RAM = 8 << 30  # where the OS does not say how much memory there is
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_size(value: Any, where: str = "memory_budget") -> int:
    """``256MB``, ``2GiB``, ``1.5 GB`` or a whole number of bytes -> bytes; a ConfigError naming
    ``where`` (the flag or key as written), the value and what is allowed otherwise (units, and the
    range BUDGET_MIN..BUDGET_MAX, which core/ranges.py lists as memory_budget's)."""
    allowed = f"a size such as 256MB or 2GiB (units {UNITS_TEXT}), from {human(BUDGET_MIN)} to {human(BUDGET_MAX)}"
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value)) and m.group(2).lower() in (*UNITS, ""):
        n = int(float(m.group(1)) * UNITS[m.group(2).lower() or "b"])
    else:
        raise ConfigError(f"{where} = {value!r}: expected {allowed}")
    if not BUDGET_MIN <= n <= BUDGET_MAX:
        raise ConfigError(f"{where} = {value!r}: expected {allowed}")
    return n


def human(n: int) -> str:
    """Bytes as people read them: ``256 MiB``, ``1.5 GiB``."""
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def physical_memory() -> int:
    """Bytes of RAM on this machine (FALLBACK_RAM where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return FALLBACK_RAM


def memory_budget(value: int | None) -> int:
    """The budget a stage works within: the one given, else a quarter of physical memory."""
    return int(value) if value is not None else physical_memory() // DEFAULT_BUDGET_FRACTION


def release_freed_memory() -> None:
    """Hand the memory freed so far back to the operating system: Arrow's pool's unused buffers, and
    glibc's heap (``malloc_trim``).

    Between the phases of a stage at millions of rows (id sets built, an index filled) glibc keeps
    the freed arrays' pages as free holes in its heap, and Arrow's pool (mimalloc) its freed
    buffers, both counted in the process's resident memory: on a 1M-row IVF build 40-80 MB that
    later phases do not reuse. The glibc part is a no-op where there is no glibc.
    """
    global _libc
    pa = sys.modules.get("pyarrow")
    if pa is not None:  # (a stage that never loaded Arrow has no pool to empty)
        pa.default_memory_pool().release_unused()
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc: Any = None
