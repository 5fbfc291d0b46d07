"""GPU decode's logic on CPU: JAX CPU plus a Pillow codec with nvImageCodec's interface, against the CPU path.

Every batch is compared with ``make_batch`` (the thread path) on the same items: the same ids, the
same error rows, fallback rows bit for bit, device-resized rows within 1 per channel (measured:
the resize reproduces Pillow's filter weights and per-pass rounding; fixed point against float
rounding leaves at most 1) and cosine >= 0.999.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import sys
import time
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image, ImageOps
from tiny_images import encode, noise_image

from imgfeat.core.errors import ConfigError
from imgfeat.core.hashing import content_id
from imgfeat.extract import gpudecode as G
from imgfeat.extract.batches import InputSpec, Item, make_batch
from imgfeat.extract.decode import ORIENTATION_TAG, DecodeConfig
from imgfeat.tools.samples import load_photo

SIZE = (36, 48)  # (h, w) of the model input: not square, so a swapped axis shows
MAX_ABS_DIFF = 1  # measured on the photos below: 0 on most pixels, 1 on at most a few percent
MIN_COSINE = 0.999
RUN = "run-gpu"
JPEG_MAGIC = b"\xff\xd8\xff"


# --- a codec with nvImageCodec's Python interface, decoding with Pillow ---------------------------


class FakeParams:
    def __init__(self, apply_exif_orientation: bool = True, color_spec: str = "SRGB", allow_any_depth: bool = False):
        self.apply_exif_orientation = apply_exif_orientation
        self.color_spec = color_spec


class FakeCodeStream:
    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)


class PillowDecoder:
    """nvimgcodec 0.9's Decoder: decode(list of CodeStream, *, params) -> arrays, None where it cannot decode.
    Anything else is a TypeError quoting the arguments, as its binding's is."""

    refuse: ClassVar[set[bytes]] = set()  # files this "GPU" declines, like a progressive JPEG nvJPEG refuses

    def __init__(self, options: str = "") -> None:
        self.options = options
        self.calls: list[int] = []

    def decode(self, srcs, *, params=None):
        if not all(isinstance(s, FakeCodeStream) for s in srcs) or not isinstance(params, (FakeParams, type(None))):
            raise TypeError(f"decode(): incompatible function arguments. Invoked with: {srcs!r}, {params!r}")
        self.calls.append(len(srcs))
        return [self._one(s.data, params or FakeParams()) for s in srcs]

    def _one(self, data: bytes, params: FakeParams):
        if data in self.refuse:
            return None
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                    return None
                im.load()
                if params.apply_exif_orientation:
                    im = ImageOps.exif_transpose(im)
                return np.array(im.convert("RGB"))  # writable, as DLPack export wants
        except Exception:
            return None


def fake_module(refuse=(), color_specs=("SRGB",)) -> types.SimpleNamespace:
    """nvImageCodec 0.9's names: its ColorSpec has SRGB and no RGB."""
    decoder = type("Decoder", (PillowDecoder,), {"refuse": set(refuse)})
    spec = types.SimpleNamespace(**{name: name for name in color_specs})
    return types.SimpleNamespace(Decoder=decoder, DecodeParams=FakeParams, ColorSpec=spec, CodeStream=FakeCodeStream)


class HostCodec:
    """The same Pillow decoder handing back numpy arrays (the host-padding branch)."""

    def __init__(self, dcfg: DecodeConfig, refuse=()) -> None:
        self.decoder = fake_module(refuse).Decoder()
        self.params = FakeParams(apply_exif_orientation=dcfg.exif == "rotate")

    def decode(self, datas):
        return self.decoder.decode([FakeCodeStream(d) for d in datas], params=self.params)


# --- files --------------------------------------------------------------------------------------


def jpeg(im: Image.Image, orientation: int | None = None, **save) -> bytes:
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = orientation
        save["exif"] = exif
    return encode(im, "JPEG", quality=save.pop("quality", 90), **save)


def photo(name: str, w: int, h: int) -> Image.Image:
    return load_photo(name).resize((w, h), Image.Resampling.BICUBIC)


def write_items(folder: Path, files: dict[str, bytes]) -> list[Item]:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        items.append(Item(content_id(data), str(folder / name)))
    return items


def spec_of(batch_size: int = 8, size=SIZE, **dcfg) -> InputSpec:
    return InputSpec(DecodeConfig(size, **dcfg), batch_size)


def run_gpu(items, spec, codec=None, workers=2, ahead=1, counts=None):
    codec = codec if codec is not None else G.NvImageCodec(spec.dcfg, module=fake_module())
    return list(G.gpu_batches(items, spec, RUN, workers, ahead, codec=codec, counts=counts))


@pytest.fixture(autouse=True)
def _no_failed_gpu_calls(caplog, request):
    """A codec call that fails sends its files to the CPU path quietly but for a warning: none expected."""
    yield
    if "broken" not in request.fixturenames:
        assert not [r for r in caplog.records if "GPU decode of" in r.getMessage()]


def assert_same_as_cpu(items: list[Item], spec: InputSpec, batches) -> dict[str, float]:
    """Each GPU batch against make_batch on the same chunk; returns worst cosine / diff seen."""
    worst = {"cosine": 1.0, "max_abs": 0}
    chunks = [items[i : i + spec.batch_size] for i in range(0, len(items), spec.batch_size)]
    assert len(batches) == len(chunks)
    for chunk, got in zip(chunks, batches):
        want = make_batch(chunk, spec, RUN)
        assert got.ids == want.ids and got.errors == want.errors
        raw = np.asarray(got.raw)
        assert raw.shape == want.raw.shape and raw.dtype == np.uint8
        assert not raw[len(want.ids) :].any(), "padding rows must be zero"
        for row in range(len(want.ids)):
            a, b = raw[row].astype(np.float64).ravel(), want.raw[row].astype(np.float64).ravel()
            cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            worst["cosine"] = min(worst["cosine"], cosine)
            worst["max_abs"] = max(worst["max_abs"], int(np.abs(a - b).max()))
    assert worst["cosine"] >= MIN_COSINE and worst["max_abs"] <= MAX_ABS_DIFF, worst
    return worst


# --- fidelity -----------------------------------------------------------------------------------

PHOTOS = {  # name -> (photo, width, height): square, wide, tall, large, tiny upscales, exact size, a strip
    "astronaut_square.jpg": ("astronaut", 180, 180),
    "coffee_wide.jpg": ("coffee", 190, 140),
    "chelsea_tall.jpg": ("chelsea", 135, 185),
    "rocket_large.jpg": ("rocket", 640, 427),
    "astronaut_up.jpg": ("astronaut", 20, 14),
    "coffee_up_tall.jpg": ("coffee", 9, 31),
    "chelsea_exact.jpg": ("chelsea", SIZE[1], SIZE[0]),
    "rocket_strip.jpg": ("rocket", 190, 12),
}


def photo_files() -> dict[str, bytes]:
    """Most share the (192, 192) bucket, so the test compiles few shapes."""
    files = {name: jpeg(photo(p, w, h)) for name, (p, w, h) in PHOTOS.items()}
    files["chelsea_gray.jpg"] = jpeg(photo("chelsea", 150, 140).convert("L"))
    for orientation in (3, 6, 8):  # 180 degrees, and the two that swap width and height
        files[f"coffee_exif{orientation}.jpg"] = jpeg(photo("coffee", 176, 132), orientation)
    return files


@pytest.mark.parametrize("exif", ["rotate", "ignore"])
def test_device_resize_matches_the_cpu_path_on_photos(tmp_path, exif):
    items = write_items(tmp_path, photo_files())
    spec = spec_of(batch_size=8, exif=exif)
    module = fake_module()
    codec = G.NvImageCodec(spec.dcfg, module=module)
    counts = collections.Counter()
    worst = assert_same_as_cpu(items, spec, run_gpu(items, spec, codec, counts=counts))
    assert counts == {"gpu": len(items)}
    # one batched decode call per batch (two makers: in either order)
    assert sorted(codec._decoder.calls) == [4, 8], "one batched decode call per batch"
    assert codec._decoder.options == G.CODEC_OPTIONS
    assert worst["max_abs"] == MAX_ABS_DIFF, "the comparison saw device-resized pixels"


@pytest.mark.parametrize("interpolation", sorted(set(G.KERNELS) - {"bilinear"}))  # bilinear: above
def test_every_pillow_filter_is_reproduced(interpolation):
    dcfg = DecodeConfig(SIZE, interpolation=interpolation)
    images = [np.asarray(photo(p, w, h)) for p, w, h in [("coffee", 190, 150), ("chelsea", 140, 23)]]
    out = np.asarray(G.DeviceResizer(dcfg).assemble(2, list(enumerate(images)), {}))
    for row, pixels in enumerate(images):
        want = np.asarray(Image.fromarray(pixels).resize(SIZE[::-1], Image.Resampling[interpolation.upper()]))
        assert np.abs(out[row].astype(int) - want).max() <= MAX_ABS_DIFF


# --- fallbacks ----------------------------------------------------------------------------------


def fallback_files() -> dict[str, bytes]:
    good = jpeg(photo("astronaut", 64, 48))
    return {
        "ok.jpg": good,
        "plain.png": encode(photo("rocket", 70, 40), "PNG"),
        "cmyk.jpg": jpeg(photo("chelsea", 60, 40).convert("CMYK")),
        "refused.jpg": jpeg(photo("coffee", 50, 50), quality=80),
        "truncated.jpg": good[: len(good) // 2],
        "cut_then_eoi.jpg": good[: len(good) // 2] + G.JPEG_EOI,
        "garbage_jpeg.jpg": JPEG_MAGIC + bytes(300) + G.JPEG_EOI,
        "text.jpg": b"not an image\n" * 10,
        "empty.jpg": b"",
        "changed.jpg": jpeg(noise_image(3, (30, 20))),
        "vanished.jpg": jpeg(noise_image(4, (30, 20))),
        "gif.gif": encode(noise_image(5, (20, 30)).convert("P"), "GIF"),
    }


def test_fallbacks_give_the_cpu_paths_rows_and_error_rows(tmp_path):
    files = fallback_files()
    items = write_items(tmp_path, files)
    (tmp_path / "changed.jpg").write_bytes(jpeg(noise_image(9, (30, 20))))
    (tmp_path / "vanished.jpg").unlink()
    spec = spec_of(batch_size=16)
    module = fake_module(refuse=[files["refused.jpg"]])
    codec = G.NvImageCodec(spec.dcfg, module=module)
    counts = collections.Counter()
    [batch] = run_gpu(items, spec, codec, counts=counts)
    assert_same_as_cpu(items, spec, [batch])
    want = make_batch(items, spec, RUN)
    codes = {r.path.rsplit("/", 1)[1]: r.error_code for r in batch.errors}
    assert codes["changed.jpg"] == "changed_since_scan" and codes["vanished.jpg"] == "vanished"
    assert codes["empty.jpg"] == "empty" and codes["text.jpg"] == "not_an_image"
    assert codes["truncated.jpg"] == "truncated"
    # Rows the CPU decoded are bit-identical to the thread path's.
    raw = np.asarray(batch.raw)
    for name in ("plain.png", "cmyk.jpg", "refused.jpg", "gif.gif"):
        row = want.ids.index(content_id(files[name]))
        assert np.array_equal(raw[row], want.raw[row]), name
    # ok.jpg, refused.jpg and cut_then_eoi.jpg reach the codec; the rest never do
    assert codec._decoder.calls == [3]
    assert counts["gpu"] + counts["cpu"] == len(want.ids) and counts["error"] == len(want.errors)
    assert counts["gpu"] in (1, 2)  # ok.jpg, and cut_then_eoi.jpg if Pillow decodes what is left


@pytest.mark.parametrize("broken", ["raises", "binding_type_error", "wrong_shape", "short_list"])
def test_a_failing_codec_sends_files_to_the_cpu(tmp_path, broken, caplog):
    items = write_items(tmp_path, {f"{i}.jpg": jpeg(photo("coffee", 40 + i, 30)) for i in range(3)})
    spec = spec_of(batch_size=4)

    class Broken:
        def decode(self, datas):
            if broken == "raises":
                raise RuntimeError("nvjpeg exploded")
            if broken == "binding_type_error":  # a binding of another version: it quotes every argument
                raise TypeError(f"decode(): incompatible function arguments.\nInvoked with: {list(datas)!r}")
            if broken == "short_list":
                return [np.zeros((30, 40, 3), np.uint8)]
            return [np.zeros((5, 5, 3), np.uint8) for _ in datas]

    counts = collections.Counter()
    [batch] = run_gpu(items, spec, Broken(), counts=counts)
    want = make_batch(items, spec, RUN)
    assert counts == {"cpu": 3}
    assert batch.ids == want.ids and np.array_equal(np.asarray(batch.raw), want.raw)
    # the warning is one short line: the reason's first line, never the files' bytes
    for record in caplog.records:
        message = record.getMessage()
        assert "\n" not in message and "\\xff" not in message and len(message) < 400


# --- the batch contract -------------------------------------------------------------------------


@pytest.mark.parametrize("ahead", [0, 2])
def test_batches_keep_order_boundaries_and_zero_padding(tmp_path, ahead):
    files = {f"{i:02d}.jpg": jpeg(photo(("coffee", "rocket")[i % 2], 140 + 5 * i, 190 - i)) for i in range(9)}
    files["02.jpg"] = b"broken"
    items = write_items(tmp_path, files)
    spec = spec_of(batch_size=4)
    batches = run_gpu(items, spec, ahead=ahead, workers=3)
    assert [len(b.ids) + len(b.errors) for b in batches] == [4, 4, 1]
    assert [i for b in batches for i in b.ids] == [it.image_id for it in items if not it.path.endswith("02.jpg")]
    assert all(b.decode_seconds > 0 for b in batches)
    assert_same_as_cpu(items, spec, batches)


def test_images_of_one_size_are_stacked_by_one_call(tmp_path):
    """A camera dump: most images share a size. They are stacked and padded by one compiled call per
    batch (not one per image); the odd sizes beside them still take the per-image path; both match
    the CPU path row for row."""
    size = (24, 40)  # kernels of their own, so this test counts only its own compiles
    files = {f"{i:02d}.jpg": jpeg(photo(("coffee", "rocket", "chelsea")[i % 3], 120, 90)) for i in range(40)}
    files.update({f"odd{i}.jpg": jpeg(photo("astronaut", 100 + i, 95)) for i in range(3)})
    items = write_items(tmp_path, files)
    spec = spec_of(batch_size=32, size=size)
    batches = run_gpu(items, spec)
    assert_same_as_cpu(items, spec, batches)
    compiles = G.device_kernels("bilinear", size).compiles
    stacked = [c for c in compiles if c[0] == "stack_pad"]
    pads = [c for c in compiles if c[0] == "pad"]
    # batch 1: 29 of 90x120 (stacked as 32) + 3 odd; batch 2: 11 of 90x120 (fewer than STACK_MIN: padded one by one)
    assert [c[2] for c in stacked] == [(90, 120, 3)] and len(stacked[0]) == 2 + 32, stacked
    assert {c[1] for c in pads} == {(95, 100 + i, 3) for i in range(3)} | {(90, 120, 3)}, pads


def test_several_makers_share_the_codec_one_call_at_a_time_and_keep_the_order(tmp_path):
    files = {f"{i:02d}.jpg": jpeg(photo(("coffee", "rocket")[i % 2], 60 + i, 50)) for i in range(30)}
    files["07.jpg"] = b"broken"
    items = write_items(tmp_path, files)
    spec = spec_of(batch_size=4)
    codec = G.NvImageCodec(spec.dcfg, module=fake_module())
    inside, most = [0], [0]
    decode = codec._decoder.decode

    def counted(srcs, **kw):  # nvImageCodec 0.9 crashes when two decodes overlap: none may
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        try:
            time.sleep(0.01)
            return decode(srcs, **kw)
        finally:
            inside[0] -= 1

    codec._decoder.decode = counted
    counts: collections.Counter = collections.Counter()
    stats: dict[str, float] = {}
    batches = list(G.gpu_batches(items, spec, RUN, 2, 4, codec=codec, counts=counts, makers=3, stats=stats))
    assert [i for b in batches for i in b.ids] == [it.image_id for it in items if not it.path.endswith("07.jpg")]
    assert_same_as_cpu(items, spec, batches)
    assert counts == {"gpu": 29, "error": 1} and len(codec._decoder.calls) == len(batches) and most[0] == 1
    assert set(stats) == {"assemble", "codec", "cpu_decode", "gpu_decode", "to_jax"}
    assert stats["gpu_decode"] >= stats["codec"] > 0 and stats["assemble"] > 0


def test_a_batch_of_only_failures_is_all_zero(tmp_path):
    items = write_items(tmp_path, {"a.jpg": b"", "b.jpg": b"junk", "c.png": JPEG_MAGIC})
    items.append(Item("0" * 32, str(tmp_path / "gone.jpg")))
    spec = spec_of(batch_size=4)
    [batch] = run_gpu(items, spec)
    assert batch.ids == [] and len(batch.errors) == 4
    assert np.asarray(batch.raw).shape == (4, *SIZE, 3) and not np.asarray(batch.raw).any()
    assert batch.errors == make_batch(items, spec, RUN).errors


def test_compiled_shapes_stay_bounded_over_many_source_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(G, "MAX_PAD_SHAPES", 4)
    size = (20, 28)  # kernels of their own, so this test counts only its own compiles
    rng = np.random.default_rng(0)
    dims = {(int(h), int(w)) for h, w in zip(rng.integers(33, 64, 40), rng.integers(65, 96, 40))}
    files = {f"{h}x{w}.jpg": jpeg(noise_image(h * w, (w, h))) for h, w in sorted(dims)}
    items = write_items(tmp_path, files)
    spec = spec_of(batch_size=8, size=size)
    batches = run_gpu(items, spec)
    assert_same_as_cpu(items, spec, batches)
    compiles = G.device_kernels("bilinear", size).compiles
    kinds = {name: sum(1 for c in compiles if c[0] == name) for name in ("resize", "pad", "stack", "place")}
    # two buckets, (48, 96) and (64, 96); batches of 8: every call takes 8 rows whatever the count of
    # images: one resize and one stack per bucket, one place; pads capped at 4
    assert len(dims) > 30 and kinds["resize"] == 2 and kinds["stack"] == 2 and kinds["place"] == 1
    assert kinds["pad"] == 4, kinds
    assert len(compiles) <= 18


# --- routing and checks (no compiles) -----------------------------------------------------------


@pytest.mark.quick
def test_gpu_shape_routes_only_plain_complete_jpegs():
    dcfg = DecodeConfig(SIZE)
    im = noise_image(1, (40, 30))
    assert G.gpu_shape(jpeg(im), dcfg) == (30, 40)
    assert G.gpu_shape(jpeg(im.convert("L")), dcfg) == (30, 40)
    assert G.gpu_shape(jpeg(im, orientation=6), dcfg) == (40, 30)
    assert G.gpu_shape(jpeg(im, orientation=6), DecodeConfig(SIZE, exif="ignore")) == (30, 40)
    assert G.gpu_shape(jpeg(im, orientation=3), dcfg) == (30, 40)
    for data in (
        encode(im, "PNG"),
        jpeg(im.convert("CMYK")),
        jpeg(im)[:-10],
        jpeg(im) + b"trailer",
        JPEG_MAGIC + G.JPEG_EOI,
        b"",
        with_segment(jpeg(im), ADOBE_RGB),
        rgb_named(jpeg(im)),
        jpeg(im, orientation=9),
        with_segment(jpeg(im), XMP_ORIENTATION),
    ):
        assert G.gpu_shape(data, dcfg) is None
    # without EXIF rotation, orientation tags do not matter
    assert G.gpu_shape(with_segment(jpeg(im), XMP_ORIENTATION), DecodeConfig(SIZE, exif="ignore")) == (30, 40)


ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"  # APP14, colour transform 0: RGB
# Pillow rotates by an XMP tiff:Orientation when EXIF has none; nvJPEG reads EXIF only
XMP_BODY = b'http://ns.adobe.com/xap/1.0/\x00<rdf:Description tiff:Orientation="6"/>'
XMP_ORIENTATION = b"\xff\xe1" + (len(XMP_BODY) + 2).to_bytes(2, "big") + XMP_BODY


def with_segment(data: bytes, segment: bytes) -> bytes:
    return data[:2] + segment + data[2:]


def rgb_named(data: bytes) -> bytes:
    """The same JPEG with its components named "R", "G", "B" (libjpeg then reads it as RGB)."""
    sof = data.index(b"\xff\xc0") + 4
    out = bytearray(data)
    out[sof + 6 : sof + 15 : 3] = b"RGB"
    return bytes(out)


@pytest.mark.quick
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_gpu_shape_leaves_huge_images_to_the_cpu(monkeypatch):
    data = jpeg(noise_image(1, (40, 30)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert G.gpu_shape(data, DecodeConfig(SIZE)) is None
    monkeypatch.setattr(G, "bucket_side", lambda n: None if n > 35 else 48)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert G.gpu_shape(data, DecodeConfig(SIZE)) is None


@pytest.mark.quick
def test_buckets_and_row_counts():
    assert G.bucket_side(1) == 32 and G.bucket_side(375) == 384 and G.bucket_side(500) == 512
    assert G.bucket_side(16384) == 16384 and G.bucket_side(16385) is None
    assert [G.padded_rows(n, 256) for n in (1, 2, 16, 17, 64, 65, 200, 256)] == [16, 16, 16, 64, 64, 256, 256, 256]
    assert [G.padded_rows(n, 8) for n in (1, 5, 8)] == [8, 8, 8] and G.padded_rows(1, 1) == 1
    assert G.bucket_rows((384, 512)) == 256 and G.bucket_rows((16384, 16384)) == 1


@pytest.mark.quick
def test_filter_weights_are_pillows_and_ignore_padding():
    w = G.filter_weights(G.KERNELS["bilinear"], 4, 8, 2)
    assert np.allclose(w.sum(axis=1), 1) and not w[:, 4:].any()
    assert np.allclose(w[0, :4], [3 / 7, 3 / 7, 1 / 7, 0])  # downscale by 2: a triangle 2 pixels wide
    assert np.allclose(G.filter_weights(G.KERNELS["bicubic"], 5, 5, 5), np.eye(5))


class FakeDevice:
    def __init__(self, platform: str) -> None:
        self.platform = platform


@pytest.fixture
def gpu_host(monkeypatch):
    """Everything GPU decode needs, faked: the extra importable, Keras on JAX, a GPU device."""
    import jax

    monkeypatch.setitem(sys.modules, G.CODEC_MODULE, fake_module())
    monkeypatch.setattr(G, "keras_backend", lambda: "jax")
    monkeypatch.setattr(jax, "devices", lambda *a: [FakeDevice("gpu")])
    return monkeypatch


@pytest.mark.quick
def test_check_gpu_decode_passes_when_everything_is_there(gpu_host):
    G.check_gpu_decode(DecodeConfig(SIZE))


MISSING = {
    "extra": "pip install 'imgfeat[gpu]'",
    "backend": "KERAS_BACKEND=jax",
    "gpu": "JAX sees no GPU (its devices: cpu)",
    "fast_decode": "drop --fast-decode",
    "interpolation": "interpolation 'nearest' has no GPU kernel",
}


@pytest.mark.quick
@pytest.mark.parametrize("missing, named", sorted(MISSING.items()))
def test_check_gpu_decode_names_what_is_missing(gpu_host, missing, named):
    import jax

    dcfg = DecodeConfig(
        SIZE,
        fast_decode=missing == "fast_decode",
        interpolation="nearest" if missing == "interpolation" else "bilinear",
    )
    if missing == "extra":
        gpu_host.setitem(sys.modules, G.CODEC_MODULE, None)  # import raises ImportError
    if missing == "backend":
        gpu_host.setattr(G, "keras_backend", lambda: "tensorflow")
    if missing == "gpu":
        gpu_host.setattr(jax, "devices", lambda *a: [FakeDevice("cpu")])
    with pytest.raises(ConfigError, match="decode 'gpu' cannot run here") as info:
        G.check_gpu_decode(dcfg)
    assert named in str(info.value) and info.value.exit_code == 2
    assert not [other for other in MISSING.values() if other != named and other in str(info.value)]


@pytest.mark.quick
def test_check_gpu_decode_names_every_missing_piece_at_once(monkeypatch):
    monkeypatch.setitem(sys.modules, G.CODEC_MODULE, None)
    monkeypatch.setattr(G, "keras_backend", lambda: "tensorflow")
    with pytest.raises(ConfigError) as info:
        G.check_gpu_decode(DecodeConfig(SIZE, fast_decode=True))
    text = str(info.value)
    assert all(
        s in text
        for s in ("imgfeat[gpu]", "nvidia-nvimgcodec-cu12", "KERAS_BACKEND=jax", "--fast-decode", "JAX sees no GPU")
    )


@pytest.mark.quick
@pytest.mark.parametrize("names, asked", [(("SRGB", "UNCHANGED"), "SRGB"), (("RGB", "UNCHANGED"), "RGB")])
def test_the_codec_asks_for_rgb_by_the_name_its_binding_has(names, asked):
    codec = G.NvImageCodec(DecodeConfig(SIZE), module=fake_module(color_specs=names))
    assert codec._params.color_spec == asked


@pytest.mark.quick
def test_what_the_codec_prints_at_load_is_logged_not_left_on_stderr(capfd, caplog):
    """nvImageCodec prints several lines to the C stderr when nvJPEG2000 and nvTIFF are absent, at load:
    they go to the native logger at debug level (seen with --log-level debug), never to the user."""
    noisy = (
        b"Failed to load nvjpeg2k library! Please install nvJPEG2000 (see https://docs.nvidia.com/...).\n"
        b"\x1b[0;31m[ERROR] \x1b[0m[nvtiff_ext] Failed to load nvTIFF library or retrieve version.\n"
    )

    class Loud(PillowDecoder):
        def __init__(self, options: str = "") -> None:
            os.write(2, noisy)
            super().__init__(options)

    module = fake_module()
    module.Decoder = Loud
    with caplog.at_level(logging.DEBUG, logger="imgfeat.native"):
        G.NvImageCodec(DecodeConfig(SIZE), module=module)
    print("ours", file=sys.stderr)
    assert capfd.readouterr().err == "ours\n"
    logged = [r for r in caplog.records if r.name == "imgfeat.native"]
    assert [r.levelno for r in logged] == [logging.DEBUG] * 2 and "nvTIFF" in logged[1].getMessage()


# --- the GPU host's benchmark script ------------------------------------------------------------


def bench_module(name: str = "bench_gpu_decode"):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_exits_2_saying_what_is_missing(tmp_path, capsys):
    assert bench_module().main([str(tmp_path)]) == 2
    assert "decode 'gpu' cannot run here" in capsys.readouterr().err


def test_bench_runs_its_passes_with_a_codec(tmp_path, monkeypatch, capsys):
    files = {n: b for n, b in photo_files().items() if "exif" in n or "square" in n}
    write_items(tmp_path / "imgs", files)
    monkeypatch.setattr(G, "check_gpu_decode", lambda dcfg: None)
    real = G.NvImageCodec
    monkeypatch.setattr(G, "NvImageCodec", lambda dcfg, **kw: real(dcfg, module=fake_module(), **kw))
    out = tmp_path / "out.json"
    args = [str(tmp_path / "imgs"), "--size", "36", "--batch-size", "4", "--workers", "2", "--out", str(out)]
    switch_before = sys.getswitchinterval()
    assert bench_module().main([*args, "--variants"]) == 0
    result = json.loads(out.read_text())
    assert result == json.loads(capsys.readouterr().out)
    assert [p["rows"] for p in result["passes"]] == [len(files)] * 2
    assert [p["makers"] for p in result["passes"]] == [G.MAKERS] * 2
    assert result["passes"][0]["jax"]["compile_seconds"] > 0  # the first pass compiles the kernels
    assert {v["rows"] for v in result["variants"].values()} == {len(files)}
    assert result["variants"]["one_read_thread"]["workers"] == 1 and result["variants"]["one_maker"]["makers"] == 1
    assert sys.getswitchinterval() == switch_before  # put back after each pass
    assert all(p["phase_seconds"]["gpu_decode"] > 0 for p in [*result["passes"], *result["variants"].values()])
    assert result["fidelity"]["compared"] == len(files) and result["fidelity"]["min_cosine"] >= MIN_COSINE
    assert result["fidelity"]["max_abs_diff"] <= MAX_ABS_DIFF and result["decode_only_images_per_s"] > 0
    assert result["decode_only_images_per_s_plain_upsampling"] > 0
    for mode in ("rotate", "ignore"):
        check = result["exif_orientations"][mode]
        assert check["compared"] == 8 and check["ok"] and check["max_abs_diff"] <= MAX_ABS_DIFF


def test_codec_bench_exits_2_without_the_codec(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nvidia", None)  # not installed
    assert bench_module("bench_codec").main([str(tmp_path)]) == 2
    assert "nvidia" in capsys.readouterr().err
    assert bench_module("bench_codec").main([str(tmp_path), "--configs", "all_fancy,fast"]) == 2
    assert "--configs fast: not one of all_fancy" in capsys.readouterr().err


def test_codec_bench_measures_each_configuration_and_its_fidelity(tmp_path, monkeypatch, capsys):
    """A decoder that differs from Pillow by more than a level or two is reported, and not timed
    beside busy readers; one the host cannot make is an error entry, not a failed run."""
    files = {f"{i}.jpg": jpeg(photo(("coffee", "rocket")[i % 2], 60 + i, 50)) for i in range(6)}
    write_items(tmp_path / "imgs", files)

    class Decoder(PillowDecoder):
        def __init__(self, max_num_cpu_threads=0, backends=None, options=""):
            if backends and backends[0] == "GPU_ONLY":
                raise RuntimeError("Internal error - Could not create decoder. Code: 7")
            super().__init__(options)
            self.off = 9 if backends and backends[0] == "HYBRID_CPU_GPU" else 0

        def _one(self, data, params):
            img = super()._one(data, params)
            return img if img is None or not self.off else np.clip(img.astype(int) + self.off, 0, 255).astype(np.uint8)

    nv = fake_module()
    nv.Decoder, nv.Backend = Decoder, lambda kind: kind
    nv.BackendKind = types.SimpleNamespace(
        HW_GPU_ONLY="HW_GPU_ONLY", GPU_ONLY="GPU_ONLY", HYBRID_CPU_GPU="HYBRID_CPU_GPU"
    )
    monkeypatch.setitem(sys.modules, "nvidia", types.SimpleNamespace(nvimgcodec=nv))
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", nv)
    out = tmp_path / "codec.json"
    args = [str(tmp_path / "imgs"), "--batch-sizes", "4", "--readers", "2", "--switch-intervals", "0.001"]
    before = sys.getswitchinterval()
    assert bench_module("bench_codec").main([*args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result == json.loads(capsys.readouterr().out) and result["files"] == len(files)
    configs = result["configs"]
    assert configs["all_fancy"]["fidelity"]["max_abs_diff"] == 0 and configs["all_fancy"]["batch_4"]["not_decoded"] == 0
    assert configs["all_fancy"]["batch_4_with_2_readers_switch_1000us"]["images_per_s"] > 0
    assert configs["hybrid_fancy"]["fidelity"]["max_abs_diff"] == 9
    assert not any("readers" in k for k in configs["hybrid_fancy"])
    assert configs["cuda_fancy"] == {"error": "RuntimeError: Internal error - Could not create decoder. Code: 7"}
    assert sys.getswitchinterval() == before


def test_stopping_early_drops_the_queued_work(tmp_path):
    items = write_items(tmp_path, {f"{i}.jpg": jpeg(noise_image(i, (40, 30))) for i in range(12)})
    spec = spec_of(batch_size=2)
    batches = G.gpu_batches(items, spec, RUN, 2, 3, codec=HostCodec(spec.dcfg))
    first = next(batches)
    batches.close()  # the executor stops the iteration: the pools shut down, nothing hangs
    assert first.ids == [it.image_id for it in items[:2]]
