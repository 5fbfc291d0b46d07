"""The legacy torch.save reader: exact tensors back, and no code ever runs while loading."""

from __future__ import annotations

import io
import os
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest

from imgfeat.backbones.lite import VARIANTS, block_plan, source_weights_file
from imgfeat.backbones.torchfile import LEGACY_MAGIC, LEGACY_PROTOCOL, TorchFileError, read_state_dict

pytestmark = pytest.mark.quick

_TORCH_NAMES = {np.dtype("float32"): "FloatStorage", np.dtype("float16"): "HalfStorage",
                np.dtype("int64"): "LongStorage", np.dtype("uint8"): "ByteStorage"}


def _fake_torch(monkeypatch) -> types.SimpleNamespace:
    """Just enough of ``torch`` for pickle to name its globals, so tests write files without torch."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # pragma: no cover - never called, only named
        raise AssertionError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in _TORCH_NAMES.values():
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return types.SimpleNamespace(torch=torch, rebuild=_rebuild_tensor_v2)


class _Tensor:
    """A tensor record: a view (offset, shape, strides in elements) into a named storage."""

    def __init__(self, fake, key, offset, shape, stride):
        self.fake, self.key, self.offset, self.shape, self.stride = fake, key, offset, shape, stride

    def __reduce__(self):
        return (self.fake.rebuild, (("storage", self.key), self.offset, self.shape, self.stride, False,
                                    __import__("collections").OrderedDict()))


def legacy_save(fake, tensors: dict[str, tuple[str, int, tuple, tuple]], storages: dict[str, np.ndarray]) -> bytes:
    """Write bytes laid out as torch's ``_legacy_save``: 5 pickles, then each storage's bytes."""
    out = io.BytesIO()
    for obj in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(obj, out, protocol=2)

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "storage":
                arr = storages[obj[1]]
                stype = getattr(fake.torch, _TORCH_NAMES[arr.dtype])
                return ("storage", stype, obj[1], "cpu", arr.size, None)
            return None

    state = __import__("collections").OrderedDict(
        (name, _Tensor(fake, *spec)) for name, spec in tensors.items()
    )
    P(out, protocol=2).dump(state)
    keys = sorted(storages)
    pickle.dump(keys, out, protocol=2)
    for key in keys:
        out.write(np.int64(storages[key].size).tobytes())
        out.write(storages[key].astype(storages[key].dtype.newbyteorder("<")).tobytes())
    return out.getvalue()


def test_round_trip_of_views_offsets_and_dtypes(monkeypatch, tmp_path):
    fake = _fake_torch(monkeypatch)
    shared = np.arange(24, dtype=np.float32)
    storages = {"0": shared, "1": np.array([1.5, -2.25, 3.0], np.float16), "2": np.array([7, -9], np.int64)}
    tensors = {
        "conv.weight": ("0", 0, (2, 3, 2, 2), (12, 4, 2, 1)),
        "transposed": ("0", 0, (4, 6), (1, 4)),  # a non-contiguous view of the same storage
        "tail": ("0", 20, (4,), (1,)),  # a storage offset
        "half": ("1", 0, (3,), (1,)),
        "counts": ("2", 1, (), ()),  # a 0-d tensor, like num_batches_tracked
    }
    path = tmp_path / "w.pth"
    path.write_bytes(legacy_save(fake, tensors, storages))
    monkeypatch.delitem(sys.modules, "torch")  # reading must not need torch at all
    sd = read_state_dict(path)
    assert list(sd) == list(tensors)
    np.testing.assert_array_equal(sd["conv.weight"], shared.reshape(2, 3, 2, 2))
    np.testing.assert_array_equal(sd["transposed"], shared.reshape(6, 4).T)
    np.testing.assert_array_equal(sd["tail"], [20, 21, 22, 23])
    assert sd["half"].dtype == np.float16 and sd["half"].tolist() == [1.5, -2.25, 3.0]
    assert sd["counts"].shape == () and int(sd["counts"]) == -9


def _malicious(payload_reduce, position: str) -> bytes:
    class Evil:
        def __reduce__(self):
            return payload_reduce

    out = io.BytesIO()
    header = [LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True}]
    if position == "header":
        header[0] = Evil()
    for obj in header:
        pickle.dump(obj, out, protocol=2)
    if position == "state":
        pickle.dump({"weight": Evil()}, out, protocol=2)
    return out.getvalue()


@pytest.mark.parametrize("position", ["header", "state"])
@pytest.mark.parametrize("target", ["os.system", "builtins.eval"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, position, target):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    payload = (os.system, (command,)) if target == "os.system" else (eval, (f"open({str(marker)!r}, 'w')",))
    path = tmp_path / "evil.pth"
    path.write_bytes(_malicious(payload, position))
    with pytest.raises(TorchFileError, match="refusing to load .*(system|eval)"):
        read_state_dict(path)
    assert not marker.exists(), "loading a weights file ran code"


def test_zip_format_and_truncated_files_say_what_is_wrong(monkeypatch, tmp_path):
    zpath = tmp_path / "new.pth"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("archive/data.pkl", b"")
    with pytest.raises(TorchFileError, match="zip-format"):
        read_state_dict(zpath)
    fake = _fake_torch(monkeypatch)
    data = legacy_save(fake, {"w": ("0", 0, (8,), (1,))}, {"0": np.ones(8, np.float32)})
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:-5])
    with pytest.raises(TorchFileError, match="truncated"):
        read_state_dict(cut)


def test_reads_the_shipped_lite0_weights():
    sd = read_state_dict(source_weights_file(VARIANTS["efficientnet_lite0"]))
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280) and sd["_fc.weight"].dtype == np.float32
    blocks = {k.split(".")[1] for k in sd if k.startswith("_blocks.")}
    assert len(blocks) == len(block_plan(VARIANTS["efficientnet_lite0"])) == 16
    assert all(np.isfinite(v).all() for v in sd.values())
    # BatchNorm variances are never negative (a few dead channels are exactly 0): a byte-order or
    # offset slip would scatter signs and magnitudes
    variances = [v for k, v in sd.items() if k.endswith("running_var")]
    assert all((v >= 0).all() and v.mean() > 1e-3 for v in variances)


def _global_build(target: bytes, attr: str) -> bytes:
    """A pickle that names an allowed global, then a BUILD setting ``attr`` on it (slot state)."""
    name = attr.encode()
    return (b"\x80\x02c" + target + b"N}X" + len(name).to_bytes(4, "little") + name
            + b"K\x07\x85s\x86b.")


@pytest.mark.quick
@pytest.mark.parametrize("target", [b"torch._utils\n_rebuild_tensor_v2\n", b"collections\nOrderedDict\n",
                                    b"torch\nFloatStorage\n"])
def test_a_build_opcode_aimed_at_an_allowed_global_mutates_nothing(tmp_path, target):
    import collections

    from imgfeat.backbones import torchfile

    before = (torchfile._rebuild_tensor_v2.__defaults__, getattr(collections.OrderedDict, "__defaults__", None))
    out = io.BytesIO()
    for obj in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True}):
        pickle.dump(obj, out, protocol=2)
    out.write(_global_build(target, "__defaults__"))
    path = tmp_path / "build.pth"
    path.write_bytes(out.getvalue())
    with pytest.raises(TorchFileError):
        read_state_dict(path)
    after = (torchfile._rebuild_tensor_v2.__defaults__, getattr(collections.OrderedDict, "__defaults__", None))
    assert after == before == ((False, None), None)


def _one_tensor_file(monkeypatch, storages=None, keys=None) -> bytes:
    fake = _fake_torch(monkeypatch)
    return legacy_save(fake, {"w": ("0", 0, (8,), (1,))}, storages or {"0": np.ones(8, np.float32)})


@pytest.mark.quick
def test_a_storage_claiming_2_to_the_61_elements_is_one_clear_error(monkeypatch, tmp_path):
    data = _one_tensor_file(monkeypatch)
    count = np.int64(8).tobytes()
    at = data.rindex(count)  # the storage's element count sits right before its 32 bytes
    path = tmp_path / "huge.pth"
    path.write_bytes(data[:at] + np.int64(2**61).tobytes() + data[at + 8:])
    with pytest.raises(TorchFileError, match="claims 2305843009213693952 elements"):
        read_state_dict(path)


@pytest.mark.quick
def test_a_tensor_whose_storage_key_is_missing_is_one_clear_error(monkeypatch, tmp_path):
    fake = _fake_torch(monkeypatch)
    data = legacy_save(fake, {"w": ("0", 0, (8,), (1,))}, {"0": np.ones(8, np.float32)})
    # rewrite the storage key list ['0'] as ['9'], so the tensor's storage is never stored
    keys = pickle.dumps(["0"], protocol=2)
    at = data.rindex(keys)
    path = tmp_path / "nokey.pth"
    path.write_bytes(data[:at] + pickle.dumps(["9"], protocol=2) + data[at + len(keys):])
    with pytest.raises(TorchFileError, match="storage '0'.*does not hold"):
        read_state_dict(path)


def test_every_truncation_and_random_corruption_is_one_error_type(monkeypatch, tmp_path):
    fake = _fake_torch(monkeypatch)
    data = legacy_save(fake, {"a": ("0", 0, (2, 4), (4, 1)), "b": ("1", 1, (2,), (1,))},
                       {"0": np.arange(8, dtype=np.float32), "1": np.arange(3, dtype=np.int64)})
    rng = np.random.default_rng(0)
    cases = [data[:n] for n in range(len(data))]
    for _ in range(300):
        flipped = bytearray(data)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 4))):
            flipped[pos] = int(rng.integers(0, 256))
        cases.append(bytes(flipped))
    cases += [rng.bytes(int(n)) for n in rng.integers(1, 400, size=50)]
    ok = 0
    for blob in cases:
        try:
            read_state_dict(io.BytesIO(blob))
            ok += 1
        except TorchFileError:
            pass
    assert ok < len(cases) // 2  # most corruptions are caught, and none escaped as another type
