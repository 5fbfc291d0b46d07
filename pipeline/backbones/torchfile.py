"""A safe, torch-free reader for the legacy (non-zip) ``torch.save`` format of a state_dict."""

from __future__ import annotations

import io
import math
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
_MAX_EXPANSION = 4  # tensors may hold at most this many times the bytes stored (tied weights share a storage)


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


class _Sealed:
    """Our records: a BUILD opcode aimed at one would rewrite its fields behind the checks made when
    it was built (``{'storage': 5}``), so it is refused."""

    def __setstate__(self, state: Any) -> None:
        raise TorchFileError(f"malformed weights file: it tries to set attributes of a {type(self).__name__}")


@dataclass(frozen=True)
class _StorageRef(_Sealed):
    key: str
    dtype: np.dtype
    numel: int
    view: tuple[str, int, int] | None  # (root key, offset, size) for old storage views


@dataclass(frozen=True)
class _TensorRef(_Sealed):
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, *rest):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: remembers where the data will be."""
    if not isinstance(storage, _StorageRef):
        raise TorchFileError("malformed tensor record: its storage is not a persistent id")
    if not (_is_int(storage_offset) and _is_ints(size) and _is_ints(stride)):
        raise TorchFileError(
            f"malformed tensor record: offset {storage_offset!r:.40}, size {size!r:.80}, "
            f"stride {stride!r:.80} (expected integers)"
        )
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_ints(values: Any) -> bool:
    return isinstance(values, (tuple, list)) and all(map(_is_int, values))


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
            if not (
                isinstance(view, tuple)
                and len(view) == 3
                and _is_int(view[1])
                and _is_int(view[2])
                and view[1] >= 0
                and view[2] >= 0
            ):
                raise TorchFileError(f"malformed storage view in weights file: {view!r:.80}")
            view = (str(view[0]), view[1], view[2])
        if not _is_int(numel) or numel < 0:
            raise TorchFileError(f"malformed storage size in weights file: {numel!r:.40}")
        return _StorageRef(str(key), stype.dtype, numel, view)


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
            raise TorchFileError(
                f"{path} is truncated (storage {key} claims {numel} elements, more than the file holds)"
            )
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


def _fitting(ref: _TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
    """The flat storage (or storage view) a tensor reads, once the tensor is known to fit in it."""
    s = ref.storage
    root = s.view[0] if s.view else s.key
    if root not in storages:
        raise TorchFileError(f"a tensor refers to storage {root!r}, which the file does not hold")
    flat = storages[root]
    if s.view:
        if s.view[1] + s.view[2] > flat.size:
            raise TorchFileError(f"storage view {s.key!r} reaches past the end of storage {root!r}")
        flat = flat[s.view[1] : s.view[1] + s.view[2]]
    why = tensor_problem(ref.offset, ref.size, ref.stride, flat.size)
    if why:
        raise TorchFileError(
            f"tensor of size {ref.size}, stride {ref.stride} at offset {ref.offset} does not "
            f"fit its storage {s.key!r} of {flat.size} elements: {why}"
        )
    return flat


def _materialise(ref: _TensorRef, flat: np.ndarray) -> np.ndarray:
    if any(n == 0 for n in ref.size):
        return np.zeros(ref.size, dtype=flat.dtype)
    strides = tuple(st * flat.itemsize for st in ref.stride)
    view = np.lib.stride_tricks.as_strided(flat[ref.offset :], shape=ref.size, strides=strides)
    return np.array(view, copy=True)  # own the memory; native byte order and contiguous


def tensor_problem(offset: int, size: tuple[int, ...], stride: tuple[int, ...], storage: int) -> str | None:
    """Pure: why a tensor view cannot be materialised from a storage of ``storage`` elements (None: it can).

    Its extent (the last element reached through sizes and strides) must lie in the storage, and it
    may hold no more elements than the storage: zero or overlapping strides would otherwise let a few
    bytes of file expand into gigabytes (size (16384, 16384), stride (0, 0) over one element).
    """
    if len(size) != len(stride):
        return f"{len(size)} sizes but {len(stride)} strides"
    if offset < 0 or any(n < 0 for n in size) or any(st < 0 for st in stride):
        return "a negative offset, size or stride"
    numel = math.prod(size)
    if numel == 0:
        return None
    extent = offset + sum((n - 1) * st for n, st in zip(size, stride)) + 1
    if extent > storage:
        return f"it reaches element {extent - 1}"
    if numel > storage:
        return f"it holds {numel} elements"
    return None


def read_state_dict(source: str | Path | IO[bytes]) -> dict[str, np.ndarray]:
    """Read a legacy ``torch.save(state_dict)`` file into ``{name: ndarray}`` without torch.

    Raises ``TorchFileError`` for anything but plain tensors: a file naming any other class
    or function (e.g. ``os.system``) is refused before anything in it is called, and every
    malformed file (truncated, random bytes, impossible sizes) is this one error type.
    """
    path = Path(str(getattr(source, "name", source))) if not isinstance(source, io.BytesIO) else Path("<bytes>")
    try:
        fh = open(source, "rb") if isinstance(source, (str, Path)) else source  # noqa: SIM115 (closed in finally)
    except OSError as exc:
        raise TorchFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return _read(fh, path)
    except TorchFileError:
        raise
    except Exception as exc:  # whatever a crafted file provokes (AttributeError, RecursionError, ...) is this error
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
    flats = {name: _fitting(ref, storages) for name, ref in refs.items()}  # every tensor checked first
    _check_total(refs, storages, path)
    return {name: _materialise(ref, flats[name]) for name, ref in refs.items()}


def _check_total(refs: dict[str, _TensorRef], storages: dict[str, np.ndarray], path: Path) -> None:
    """Many tensors over one storage (tied weights) are legitimate, thousands are an expansion attack:
    the tensors together may hold at most ``_MAX_EXPANSION`` times the bytes the file stores."""
    stored = sum(a.nbytes for a in storages.values())
    wanted = sum(math.prod(r.size) * r.storage.dtype.itemsize for r in refs.values())
    if wanted > _MAX_EXPANSION * stored + 2**20:
        raise TorchFileError(
            f"{path}: its tensors would hold {wanted:,} bytes from {stored:,} stored: "
            "a legitimate state_dict stores each tensor's data"
        )
