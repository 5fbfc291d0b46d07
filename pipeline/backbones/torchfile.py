"""A safe, torch-free reader for the legacy (non-zip) ``torch.save`` format of a state_dict."""

from __future__ import annotations

import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from imgfeat.core.errors import ImgfeatError

# torch/serialization.py: the first pickle in a legacy file is this number.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# The storage classes torch pickles by name -> the element type of their raw bytes.
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}

# The only globals a weights file may name. Anything else (os.system, builtins.eval,
# torch.nn modules, ...) is refused before it is called, so loading never runs code.
_REBUILD = ("torch._utils", "_rebuild_tensor_v2")
_ORDERED_DICT = ("collections", "OrderedDict")


class TorchFileError(ImgfeatError):
    """The file is not a legacy torch state_dict we can read safely."""


@dataclass(frozen=True)
class _StorageType:
    name: str

    def __setstate__(self, state: Any) -> None:
        raise TorchFileError("malformed weights file: it tries to set attributes of a storage type")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STORAGE_DTYPES[self.name])


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype
    numel: int
    view: tuple[str, int, int] | None  # (root key, offset, size) for old storage views


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, *rest):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: remembers where the data will be."""
    if not isinstance(storage, _StorageRef):
        raise TorchFileError("malformed tensor record: its storage is not a persistent id")
    return _TensorRef(storage, int(storage_offset), tuple(map(int, size)), tuple(map(int, stride)))


class _Allowed:
    """A fresh, callable stand-in for an allowed global: a BUILD opcode aimed at it is refused.

    ``find_class`` never hands out the real function or class, so no opcode can reach (and
    change) an object that outlives the load, such as a function's ``__defaults__``.
    """

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        raise TorchFileError("malformed weights file: it tries to set attributes of an allowed global")


class _SafeUnpickler(pickle.Unpickler):
    """Allows only tensor rebuilds, storage types and OrderedDict; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == _REBUILD:
            return _Allowed(_rebuild_tensor_v2)
        if (module, name) == _ORDERED_DICT:
            import collections

            return _Allowed(collections.OrderedDict)
        if module in ("torch", "torch.storage", "torch.cuda") and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise TorchFileError(
            f"refusing to load {module}.{name}: a weights file may only contain tensors "
            "(torch._utils._rebuild_tensor_v2, torch.*Storage, collections.OrderedDict)"
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        # ('storage', storage_type, root_key, location, numel, view_metadata)
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise TorchFileError(f"unsupported persistent id in weights file: {pid!r:.80}")
        _, stype, key, _location, numel, view = pid
        if not isinstance(stype, _StorageType):
            raise TorchFileError(f"unsupported storage type {stype!r:.80}")
        if view is not None:
            view = (str(view[0]), int(view[1]), int(view[2]))
        return _StorageRef(str(key), stype.dtype, int(numel), view)


def _load_pickle(fh: IO[bytes]) -> Any:
    try:
        return _SafeUnpickler(fh).load()
    except TorchFileError:
        raise
    except Exception as exc:  # corrupt or truncated pickles raise many exception types
        raise TorchFileError(f"corrupt weights file: {type(exc).__name__}: {exc}") from exc


def _check_header(fh: IO[bytes], path: Path) -> None:
    head = fh.read(2)
    fh.seek(0)
    if head == b"PK":
        raise TorchFileError(f"{path} is a zip-format torch file; only the legacy format is supported")
    if _load_pickle(fh) != LEGACY_MAGIC:
        raise TorchFileError(f"{path} is not a legacy torch.save file (bad magic number)")
    if _load_pickle(fh) != LEGACY_PROTOCOL:
        raise TorchFileError(f"{path}: unsupported torch.save protocol version")
    sys_info = _load_pickle(fh)
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise TorchFileError(f"{path} was written on a big-endian machine; not supported")


def _read_storages(fh: IO[bytes], keys: list[str], dtypes: dict[str, np.dtype], path: Path) -> dict[str, np.ndarray]:
    """Each storage: an int64 element count, then its raw little-endian bytes."""
    out: dict[str, np.ndarray] = {}
    for key in keys:
        count_bytes = fh.read(8)
        if len(count_bytes) != 8:
            raise TorchFileError(f"{path} is truncated (storage {key} is missing)")
        (numel,) = struct.unpack("<q", count_bytes)
        dtype = dtypes.get(key, np.dtype("u1"))
        if numel < 0 or numel * dtype.itemsize > _bytes_left(fh):
            raise TorchFileError(f"{path} is truncated (storage {key} claims {numel} elements, "
                                 "more than the file holds)")
        data = fh.read(numel * dtype.itemsize)
        if len(data) != numel * dtype.itemsize:
            raise TorchFileError(f"{path} is truncated (storage {key} is short)")
        out[key] = np.frombuffer(data, dtype=dtype)
    return out


def _bytes_left(fh: IO[bytes]) -> int:
    here = fh.tell()
    end = fh.seek(0, io.SEEK_END)
    fh.seek(here)
    return end - here


def _collect_refs(obj: Any) -> dict[str, _TensorRef]:
    if not isinstance(obj, dict):
        raise TorchFileError(f"expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, _TensorRef)]
    if bad:
        raise TorchFileError(f"state_dict entries that are not tensors: {bad[:5]}")
    return {str(k): v for k, v in obj.items()}


def _materialise(ref: _TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
    s = ref.storage
    root = s.view[0] if s.view else s.key
    if root not in storages:
        raise TorchFileError(f"a tensor refers to storage {root!r}, which the file does not hold")
    flat = storages[root]
    if s.view:
        flat = flat[s.view[1] : s.view[1] + s.view[2]]
    needed = ref.offset + sum((n - 1) * st for n, st in zip(ref.size, ref.stride)) + 1
    if any(n < 0 for n in ref.size) or len(ref.size) != len(ref.stride):
        raise TorchFileError(f"malformed tensor record: size {ref.size}, stride {ref.stride}")
    if any(n == 0 for n in ref.size):
        return np.zeros(ref.size, dtype=flat.dtype)
    if ref.offset < 0 or needed > flat.size or min(ref.stride, default=0) < 0:
        raise TorchFileError(f"tensor of size {ref.size} does not fit its storage {s.key}")
    strides = tuple(st * flat.itemsize for st in ref.stride)
    view = np.lib.stride_tricks.as_strided(flat[ref.offset :], shape=ref.size, strides=strides)
    return np.array(view, copy=True)  # own the memory; native byte order and contiguous


def read_state_dict(source: str | Path | IO[bytes]) -> dict[str, np.ndarray]:
    """Read a legacy ``torch.save(state_dict)`` file into ``{name: ndarray}`` without torch.

    Raises ``TorchFileError`` for anything but plain tensors: a file naming any other class
    or function (e.g. ``os.system``) is refused before anything in it is called, and every
    malformed file (truncated, random bytes, impossible sizes) is this one error type.
    """
    path = Path(getattr(source, "name", source)) if not isinstance(source, io.BytesIO) else Path("<bytes>")
    fh = open(source, "rb") if isinstance(source, (str, Path)) else source
    try:
        return _read(fh, path)
    except TorchFileError:
        raise
    except (ValueError, TypeError, OverflowError, KeyError, IndexError, MemoryError, struct.error) as exc:
        raise TorchFileError(f"{path}: corrupt weights file: {type(exc).__name__}: {exc}") from exc
    finally:
        if fh is not source:
            fh.close()


def _read(fh: IO[bytes], path: Path) -> dict[str, np.ndarray]:
    _check_header(fh, path)
    refs = _collect_refs(_load_pickle(fh))
    keys = _load_pickle(fh)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise TorchFileError(f"{path}: malformed storage key list")
    dtypes = {r.storage.view[0] if r.storage.view else r.storage.key: r.storage.dtype for r in refs.values()}
    storages = _read_storages(fh, keys, dtypes, path)
    return {name: _materialise(ref, storages) for name, ref in refs.items()}
