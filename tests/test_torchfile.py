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

_TORCH_NAMES = {
    np.dtype("float32"): "FloatStorage",
    np.dtype("float16"): "HalfStorage",
    np.dtype("int64"): "LongStorage",
    np.dtype("uint8"): "ByteStorage",
}


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
        return (
            self.fake.rebuild,
            (
                ("storage", self.key),
                self.offset,
                self.shape,
                self.stride,
                False,
                __import__("collections").OrderedDict(),
            ),
        )


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

    state = __import__("collections").OrderedDict((name, _Tensor(fake, *spec)) for name, spec in tensors.items())
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
    with pytest.raises(TorchFileError, match=r"refusing to load .*(system|eval)"):
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
    return b"\x80\x02c" + target + b"N}X" + len(name).to_bytes(4, "little") + name + b"K\x07\x85s\x86b."


@pytest.mark.quick
@pytest.mark.parametrize(
    "target", [b"torch._utils\n_rebuild_tensor_v2\n", b"collections\nOrderedDict\n", b"torch\nFloatStorage\n"]
)
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
    path.write_bytes(data[:at] + np.int64(2**61).tobytes() + data[at + 8 :])
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
    path.write_bytes(data[:at] + pickle.dumps(["9"], protocol=2) + data[at + len(keys) :])
    with pytest.raises(TorchFileError, match=r"storage '0'.*does not hold"):
        read_state_dict(path)


def test_every_truncation_and_random_corruption_is_one_error_type(monkeypatch, tmp_path):
    fake = _fake_torch(monkeypatch)
    data = legacy_save(
        fake,
        {"a": ("0", 0, (2, 4), (4, 1)), "b": ("1", 1, (2,), (1,))},
        {"0": np.arange(8, dtype=np.float32), "1": np.arange(3, dtype=np.int64)},
    )
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


class _Built(_Tensor):
    """A tensor record followed by a BUILD opcode with ``state`` (a crafted file; torch never writes one)."""

    def __init__(self, fake, state, *spec):
        super().__init__(fake, *spec)
        self.state = state

    def __reduce__(self):
        return (*super().__reduce__(), self.state)


def _crafted(monkeypatch, tensors, storages=None, built=None) -> bytes:
    fake = _fake_torch(monkeypatch)
    storages = {"0": np.arange(8, dtype=np.float32)} if storages is None else storages
    data = legacy_save(fake, tensors, storages)
    if built is not None:  # the same file with the first tensor's record followed by a BUILD
        out = io.BytesIO()
        for obj in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(obj, out, protocol=2)
        ((name, spec),) = tensors.items()

        class P(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "storage":
                    return ("storage", fake.torch.FloatStorage, obj[1], "cpu", 8, None)
                return None

        P(out, protocol=2).dump({name: _Built(fake, built, *spec)})
        data = out.getvalue() + data[data.index(pickle.dumps(sorted(storages), protocol=2)) :]
    return data


# (tensors as (storage key, offset, size, stride), storages or None for one of 8 floats, BUILD state), what is said
CRAFTED = {
    "BUILD sets the storage to 5": ({"w": ("0", 0, (8,), (1,))}, None, {"storage": 5}, "set attributes"),
    "BUILD sets the size": ({"w": ("0", 0, (8,), (1,))}, None, {"size": (1 << 40,)}, "set attributes"),
    "1 GiB of zero strides over one element": (
        {"w": ("0", 0, (16384, 16384), (0, 0))},
        {"0": np.ones(1, np.float32)},
        None,
        "holds 268435456 elements",
    ),
    "overlapping strides": ({"w": ("0", 0, (4, 4), (1, 1))}, {"0": np.ones(7, np.float32)}, None, "holds 16"),
    "past the end": ({"w": ("0", 7, (2,), (1,))}, None, None, "reaches element 8"),
    "a negative size": ({"w": ("0", 0, (-2, 4), (4, 1))}, None, None, "negative"),
    "a negative stride": ({"w": ("0", 7, (4,), (-1,))}, None, None, "negative"),
    "a negative offset": ({"w": ("0", -1, (2,), (1,))}, None, None, "negative"),
    "sizes and strides of other lengths": ({"w": ("0", 0, (2, 4), (1,))}, None, None, "2 sizes but 1 strides"),
    "a size that is a string": ({"w": ("0", 0, "12", (1, 1))}, None, None, "expected integers"),
    "an offset that is a float": ({"w": ("0", 1.5, (2,), (1,))}, None, None, "expected integers"),
    "an offset that is a bool": ({"w": ("0", True, (2,), (1,))}, None, None, "expected integers"),
    "a size of 2**70": ({"w": ("0", 0, (2**70,), (0,))}, None, None, "holds"),
    "a thousand copies of one storage": (
        {f"w{i}": ("0", 0, (1024,), (1,)) for i in range(1000)},
        {"0": np.ones(1024, np.float32)},
        None,
        "would hold",
    ),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_tensor_records_are_one_clear_error(monkeypatch, tmp_path, case):
    tensors, storages, built, message = CRAFTED[case]
    path = tmp_path / "crafted.pth"
    path.write_bytes(_crafted(monkeypatch, tensors, storages, built))
    with pytest.raises(TorchFileError, match=message):
        read_state_dict(path)


def test_the_1_gib_zero_stride_file_is_a_few_hundred_bytes(monkeypatch, tmp_path):
    tensors, storages, _, _ = CRAFTED["1 GiB of zero strides over one element"]
    assert len(_crafted(monkeypatch, tensors, storages)) < 400  # so refusing it is what stops the allocation


def test_tied_weights_and_empty_tensors_still_load(monkeypatch, tmp_path):
    path = tmp_path / "ok.pth"
    path.write_bytes(
        _crafted(
            monkeypatch, {"a": ("0", 0, (8,), (1,)), "b": ("0", 0, (2, 4), (4, 1)), "empty": ("0", 9, (0, 3), (0, 0))}
        )
    )
    sd = read_state_dict(path)
    assert sd["a"].tolist() == list(range(8)) and sd["b"].shape == (2, 4) and sd["empty"].shape == (0, 3)


def test_a_folder_or_a_missing_file_is_the_same_error(tmp_path):
    for path in (tmp_path, tmp_path / "missing.pth"):
        with pytest.raises(TorchFileError, match="cannot read"):
            read_state_dict(path)


def test_random_opcode_insertions_are_the_clear_error_or_success(monkeypatch):
    """A bounded, seeded fuzz of the pickles: opcode bytes (BUILD, SETITEM, REDUCE, ...) spliced in."""
    data = _crafted(monkeypatch, {"a": ("0", 0, (2, 4), (4, 1)), "b": ("0", 1, (3,), (2,))})
    opcodes = b"bs(tR.NK]aeu}q0h\x85\x86\x87Q"
    rng = np.random.default_rng(23)
    for _ in range(600):
        blob = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(0, len(blob)))
            blob[at:at] = bytes([opcodes[int(rng.integers(0, len(opcodes)))]])
        try:
            read_state_dict(io.BytesIO(bytes(blob)))
        except TorchFileError:
            pass
