"""What extract's content check costs: BLAKE2b-128 of each file's bytes against the decode it guards.

    .venv/bin/python benchmarks/bench_verify.py                      # 300 generated 400x300 JPEGs
    .venv/bin/python benchmarks/bench_verify.py --images DIR --size 224

Extract hashes the bytes it decodes so that a file changed since the scan becomes an error row
(changed_since_scan) instead of a feature under the old image_id. It already holds the bytes,
so the check is one hash call per image; this prints its time per image next to the decode's
(read + decode + resize, as extract does it), each the fastest of three passes over the same
bytes in memory. The ratio is what the check can cost extract at most on a decode-bound host.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from imgfeat.core.hashing import content_id
from imgfeat.extract.decode import DecodeConfig, decode_bytes, read_file_bytes


def make_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
        small.resize((400, 300), Image.Resampling.BILINEAR).save(folder / f"{i:04d}.jpg", quality=90)


def fastest(fn, datas: list[bytes], rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for d in datas:
            fn(d)
        best = min(best, time.perf_counter() - t0)
    return best / len(datas)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=None, help="a folder of JPEGs (default: 300 generated)")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--size", type=int, default=224, help="model input side")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.images or Path(tmp)
        if args.images is None:
            make_images(folder, args.n)
        datas = [read_file_bytes(p) for p in sorted(folder.rglob("*.jpg"))[: args.n]]
    cfg = DecodeConfig((args.size, args.size))
    hash_s, decode_s = fastest(content_id, datas), fastest(lambda d: decode_bytes(d, cfg), datas)
    out = {
        "images": len(datas),
        "mean_bytes": sum(map(len, datas)) // len(datas),
        "hash_ms": round(hash_s * 1e3, 4),
        "decode_ms": round(decode_s * 1e3, 4),
        "hash_over_decode": round(hash_s / decode_s, 4),
    }
    print(
        json.dumps(out)
        if args.json
        else f"{out['images']} JPEGs of {out['mean_bytes']} bytes: hash {out['hash_ms']} ms, decode "
        f"{out['decode_ms']} ms per image; the check costs {out['hash_over_decode']:.2%} of the decode"
    )


if __name__ == "__main__":
    main()
