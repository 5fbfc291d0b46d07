"""Decode throughput of extract's input side: a thread pool vs a process pool, same files, same batches.

Why: extract decodes in threads because Pillow releases the GIL in decode and resize; this checks
that a process pool (which must pickle every batch back to the parent) would not be faster.

    python benchmarks/extract_decode_pool.py DIR [--limit N] [--size 224] [--fast-decode] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from imgfeat.tools.bench import list_images
from imgfeat.extract.decode import DecodeConfig
from imgfeat.extract.batches import InputSpec, Item, chunked, make_batch


def measure(pool_cls, items: list[Item], dcfg: DecodeConfig, workers: int, batch_size: int) -> float:
    """Images per second decoding every batch through the pool (pool start-up included)."""
    t0 = time.perf_counter()
    with pool_cls(workers) as pool:
        futures = [pool.submit(make_batch, chunk, InputSpec(dcfg, batch_size), "bench")
                   for chunk in chunked(items, batch_size)]
        for fut in futures:
            fut.result()
    return len(items) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", type=Path)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fast-decode", action="store_true")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    items = [Item(str(i), str(p)) for i, p in enumerate(list_images(args.images, args.limit))]
    dcfg = DecodeConfig((args.size, args.size), fast_decode=args.fast_decode)
    best: dict[str, float] = {}
    for _ in range(args.repeat):  # interleaved; the best round counts (shared machines only slow things)
        for name, cls in (("threads", ThreadPoolExecutor), ("processes", ProcessPoolExecutor)):
            best[name] = max(best.get(name, 0.0), measure(cls, items, dcfg, args.workers, args.batch_size))
    print(json.dumps({"images": len(items), "workers": args.workers, "fast_decode": args.fast_decode,
                      "images_per_s": {k: round(v, 1) for k, v in best.items()}}))


if __name__ == "__main__":
    main()
