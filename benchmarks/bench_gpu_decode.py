"""GPU decode + device resize throughput on a GPU host (real nvImageCodec), with its fidelity to the CPU path.

    KERAS_BACKEND=jax python3 benchmarks/bench_gpu_decode.py /tmp/imgs --limit 40000 --out gpu_decode.json

Runs ``gpu_batches`` (read + content check on CPU threads, one batched nvJPEG call per batch, one
compiled resize per size bucket) over the first N files of a folder, blocking on each batch's device
array, and prints one JSON object: img/s per pass (the first pass includes compiles), the codec's
decode alone on bytes in memory (as extract asks for it, and with the codec's plain chroma
upsampling instead of libjpeg's, to show what that costs), and per-image cosine / max abs difference
against the CPU path (``make_batch``) for the first ``--compare`` files and for JPEGs tagged with
each EXIF orientation under both exif modes (stderr says so when any is below 0.999, or fell back to
the CPU). Needs only numpy, Pillow, pyarrow, jax with its CUDA plugin and nvidia-nvimgcodec (no
Keras, no install of this checkout: it is put on the path).
Where something is missing (no GPU, no extra) it exits 2 saying what.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MIN_COSINE = 0.999  # issue 12: per image, GPU decode against the CPU path


def import_imgfeat() -> None:
    """``imgfeat`` is ``pipeline/`` of this checkout when it is not installed (a bare GPU host)."""
    try:
        import imgfeat  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "imgfeat", ROOT / "pipeline" / "__init__.py", submodule_search_locations=[str(ROOT / "pipeline")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["imgfeat"] = module
        spec.loader.exec_module(module)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="a folder of images (searched recursively)")
    p.add_argument("--limit", type=int, default=40_000, help="at most this many files (default 40000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--size", type=int, default=224, help="square model input side (default 224)")
    p.add_argument("--workers", type=int, help="CPU read threads (default: extract's own for GPU decode)")
    p.add_argument("--ahead", type=int, default=2, help="batches read ahead")
    p.add_argument("--makers", type=int, help="threads making batches (default: gpu_batches' own)")
    p.add_argument(
        "--variants",
        action="store_true",
        help="after the passes, one warm pass each with 1, 2 and every core's read threads, and with 1 batch maker",
    )
    p.add_argument("--interpolation", default="bilinear")
    p.add_argument("--exif", default="rotate", choices=("rotate", "ignore"))
    p.add_argument("--passes", type=int, default=2, help="timed passes (the first includes compiles)")
    p.add_argument("--compare", type=int, default=512, help="images checked against the CPU path")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    return p.parse_args(argv)


def list_items(folder: Path, limit: int):
    from imgfeat.core.hashing import content_id
    from imgfeat.extract.batches import Item

    paths = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))[:limit]
    return [Item(content_id(p.read_bytes()), str(p)) for p in paths]  # also warms the page cache


class CompileTimes:
    """JAX's own compile events while a pass runs: how many XLA compiles, their seconds, cache hits."""

    def __init__(self) -> None:
        import jax

        self.events: collections.Counter = collections.Counter()
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)

    def _duration(self, name: str, seconds: float, **_) -> None:
        if name.endswith("backend_compile_duration"):
            self.events["compiles"] += 1
            self.events["compile_seconds"] += seconds

    def _event(self, name: str, **_) -> None:
        if "compilation_cache" in name:
            self.events[name.rpartition("/")[2]] += 1

    def take(self) -> dict:
        out = {k: round(v, 3) if isinstance(v, float) else v for k, v in self.events.items()}
        self.events.clear()
        return out


def timed_pass(items, spec, args, codec, workers=None, makers=None, times=None) -> dict:
    import jax

    from imgfeat.extract.gpudecode import MAKERS, gpu_batches

    rows, counts, stats = 0, collections.Counter(), {}
    workers, makers = workers or args.workers, makers or args.makers or MAKERS
    t0 = time.perf_counter()
    batches = gpu_batches(items, spec, "bench", workers, args.ahead, codec, counts, makers, stats)
    for batch in batches:
        jax.block_until_ready(batch.raw)
        rows += len(batch.ids)
    seconds = time.perf_counter() - t0
    return {
        "seconds": round(seconds, 3),
        "images_per_s": round(len(items) / seconds, 1),
        "workers": workers,
        "makers": makers,
        "rows": rows,
        "decoded_on_gpu": counts["gpu"],
        "decoded_on_cpu": counts["cpu"],
        "errors": counts["error"],
        "phase_seconds": stats,
        **({"jax": times.take()} if times is not None else {}),
    }


def variants(items, spec, args, times) -> dict:
    """Warm passes that each change one thing; the codecs are made per maker, as extract makes them."""
    return {
        "one_read_thread": timed_pass(items, spec, args, None, workers=1, times=times),
        "two_read_threads": timed_pass(items, spec, args, None, workers=2, times=times),
        "every_core_read_threads": timed_pass(items, spec, args, None, workers=os.cpu_count() or 1, times=times),
        "one_maker": timed_pass(items, spec, args, None, makers=1, times=times),
    }


def decode_only(items, args, codec) -> float:
    """The codec alone on bytes in memory, one call per batch, results on the device (after one untimed
    batch: the codec's first call allocates its buffers, a fifth of the time for 5,000 files on an H200)."""
    import jax

    datas = [Path(it.path).read_bytes() for it in items]
    jax.block_until_ready([x for x in codec.decode(datas[: args.batch_size]) if x is not None])
    t0 = time.perf_counter()
    for start in range(0, len(datas), args.batch_size):
        jax.block_until_ready([x for x in codec.decode(datas[start : start + args.batch_size]) if x is not None])
    return round(len(datas) / (time.perf_counter() - t0), 1)


def compare(items, spec, args, codec) -> dict:
    """Per image, the GPU batch's row against the CPU path's (make_batch): worst cosine and difference."""
    from imgfeat.extract.batches import make_batch
    from imgfeat.extract.gpudecode import gpu_batches

    cosines, max_abs, counts = [], 0, collections.Counter()
    batches = gpu_batches(items, spec, "bench", args.workers, args.ahead, codec=codec, counts=counts)
    for start, got in zip(range(0, len(items), spec.batch_size), batches):
        want = make_batch(items[start : start + spec.batch_size], spec, "bench")
        raw = np.asarray(got.raw)
        for row in range(len(want.ids)):
            a, b = raw[row].astype(np.float64).ravel(), want.raw[row].astype(np.float64).ravel()
            cosines.append(round(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)), 6))
            max_abs = max(max_abs, int(np.abs(a - b).max()))
    worst = min(cosines, default=1.0)
    # "ok" needs the GPU to have decoded every JPEG: a fallback to the CPU would match trivially
    return {
        "compared": len(cosines),
        "decoded_on_gpu": counts["gpu"],
        "min_cosine": worst,
        "max_abs_diff": max_abs,
        "ok": worst >= MIN_COSINE and counts["gpu"] == len(cosines),
        "cosines": cosines,
    }


def exif_check(args) -> dict:
    """JPEGs tagged with EXIF orientations 1-8, under both exif modes: nvJPEG must orient as Pillow."""
    from PIL import Image

    from imgfeat.core.hashing import content_id
    from imgfeat.extract.batches import InputSpec, Item
    from imgfeat.extract.decode import ORIENTATION_TAG, DecodeConfig
    from imgfeat.extract.gpudecode import NvImageCodec

    y, x = np.mgrid[0:300, 0:400]
    pixels = np.stack([x * 255 // 400, y * 255 // 300, (x // 50 + y // 50) % 2 * 255], -1).astype(np.uint8)
    pixels[:60, :80] = (255, 0, 0)  # a corner mark: every orientation looks different
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        items = []
        for orientation in range(1, 9):
            exif = Image.Exif()
            exif[ORIENTATION_TAG] = orientation
            path = Path(tmp) / f"orientation{orientation}.jpg"
            Image.fromarray(pixels).save(path, quality=95, exif=exif)
            items.append(Item(content_id(path.read_bytes()), str(path)))
        for mode in ("rotate", "ignore"):
            dcfg = DecodeConfig((args.size, args.size), interpolation=args.interpolation, exif=mode)
            result[mode] = compare(items, InputSpec(dcfg, 8), args, NvImageCodec(dcfg))
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "jax")  # Keras is not imported; the check reads this
    import_imgfeat()
    from imgfeat.core.errors import ConfigError
    from imgfeat.extract.batches import InputSpec
    from imgfeat.extract.decode import DecodeConfig
    from imgfeat.extract.gpudecode import NvImageCodec, check_gpu_decode, device_kernels

    try:
        dcfg = DecodeConfig((args.size, args.size), interpolation=args.interpolation, exif=args.exif)
        check_gpu_decode(dcfg)
    except ConfigError as exc:
        print(f"bench_gpu_decode: {exc}", file=sys.stderr)
        return 2
    import jax

    from imgfeat.extract.gpudecode import READ_THREADS

    args.workers = args.workers or min(os.cpu_count() or 1, READ_THREADS)
    items = list_items(args.folder, args.limit)
    if not items:
        print(f"bench_gpu_decode: no files under {args.folder}", file=sys.stderr)
        return 2
    spec = InputSpec(dcfg, args.batch_size)
    codec = NvImageCodec(dcfg)
    times = CompileTimes()
    result: dict = {
        "files": len(items),
        "batch_size": args.batch_size,
        "size": args.size,
        "workers": args.workers,
        "ahead": args.ahead,
        "interpolation": args.interpolation,
        "exif": args.exif,
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
    }

    def save(key: str, value) -> None:  # each part written as it is measured: a crash leaves the parts before it
        result[key] = value
        if args.out:
            from imgfeat.core.storage import write_bytes_atomic

            write_bytes_atomic(json.dumps(result, indent=1).encode() + b"\n", args.out)

    # the codec alone first, then with libjpeg's fancy upsampling off: what asking nvJPEG for
    # libjpeg's chroma upsampling costs
    save("decode_only_images_per_s", decode_only(items, args, codec))
    save("decode_only_images_per_s_plain_upsampling", decode_only(items, args, NvImageCodec(dcfg, options="")))
    save("passes", [])
    for _ in range(args.passes):  # a codec per pass, made as extract makes it
        save("passes", [*result["passes"], timed_pass(items, spec, args, None, times=times)])
    if args.variants:
        save("variants", variants(items, spec, args, times))
    fidelity = compare(items[: args.compare], spec, args, codec)
    fidelity.pop("cosines")
    save("fidelity", fidelity)
    save("exif_orientations", exif_check(args))
    save("compiles", len(device_kernels(dcfg.interpolation, dcfg.size).compiles))
    print(json.dumps(result, indent=1))
    checks = [result["fidelity"], *result["exif_orientations"].values()]
    if not all(c["ok"] for c in checks):
        print(f"bench_gpu_decode: some images are below cosine {MIN_COSINE} against the CPU path", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
