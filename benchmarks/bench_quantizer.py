"""The quantizer over dedup's lists' centroids, two levels against three: cost a query and agreement.

Not a test: run it by hand, with one thread for steady figures, e.g.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_quantizer.py              # the lists of 1M and 10M rows
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_quantizer.py --nlists 2048,4096 --clusters 1000

For each ``--nlists`` value (default: the lists ``dedup_params`` gives 1M and 10M rows) the lists'
centroids are trained as dedup trains them in memory (``two_level_centroids`` on 39 rows a list
of ``bench_dedup_recall.planted``'s clustered rows), then ``kinds.list_quantizer`` is built with
two levels and with three (THREE_LEVEL_LISTS set past and below the count), and ``--queries``
fresh rows are searched for their nearest list (top-1, the cost of adding a row) and, the first
10,000, their 12 nearest (dedup's nprobe: a search). Printed per structure (and for the exact
flat search): build seconds, us a query (top-1, top-12), the share of queries whose top-1 list
is the exact one (a flat search of the centroids), and the share of the exact 12 nearest lists
found. The ratios matter, not the absolute figures: compare structures of one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_dedup_recall, beside this file
from bench_dedup_recall import planted

ROWS = (1_000_000, 10_000_000)  # dedup's lists at these many rows, by default
TOP_LISTS = 12  # lists a dedup query probes past FINE_LISTS (dedup.FINE_NPROBE)
TOP_QUERIES = 10_000  # queries whose TOP_LISTS nearest lists are checked


def timed_search(index, Q: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    """(us a query, ids) of searching ``Q``'s ``k`` nearest, after a warm-up on a few of them."""
    index.search(Q[:1000], k)
    t0 = time.perf_counter()
    _, ids = index.search(Q, k)
    return (time.perf_counter() - t0) / len(Q) * 1e6, ids


def measure(nlist: int, args: argparse.Namespace) -> list[dict]:
    from imgfeat.index import kinds

    faiss = kinds.import_faiss()
    size = kinds.MIN_POINTS_PER_LIST * nlist
    X, _ = planted(size + args.queries, args.dim, args.clusters, 0, 0.97, args.seed)
    C = kinds.two_level_centroids(X[:size], nlist, args.seed)
    Q = np.ascontiguousarray(X[size:])
    del X
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(C)
    flat_us, truth = timed_search(exact, Q, 1)
    flat_top_us, truth_top = timed_search(exact, Q[:TOP_QUERIES], TOP_LISTS)
    flat = {"us_per_query": round(flat_us, 2), f"us_per_query_top{TOP_LISTS}": round(flat_top_us, 2)}
    out = [{"nlist": len(C), "structure": "flat", **flat}]
    real = kinds.THREE_LEVEL_LISTS
    try:
        for structure, threshold in (("two-level", len(C) + 1), ("three-level", 0)):
            kinds.THREE_LEVEL_LISTS = threshold
            t0 = time.perf_counter()
            quantizer = kinds.list_quantizer(C, args.seed)
            built = time.perf_counter() - t0
            us, ids = timed_search(quantizer, Q, 1)
            top_us, top = timed_search(quantizer, Q[:TOP_QUERIES], TOP_LISTS)
            found = np.mean([len(np.intersect1d(a, b)) / TOP_LISTS for a, b in zip(top, truth_top)])
            out.append(
                {
                    "nlist": len(C),
                    "structure": structure,
                    "build_s": round(built, 1),
                    "us_per_query": round(us, 2),
                    f"us_per_query_top{TOP_LISTS}": round(top_us, 2),
                    "top1_agreement": round(float(np.mean(ids[:, 0] == truth[:, 0])), 4),
                    f"top{TOP_LISTS}_found": round(float(found), 4),
                }
            )
    finally:
        kinds.THREE_LEVEL_LISTS = real
    return out


def main() -> int:
    from imgfeat.index.dedup import EXACT_MAX, dedup_params

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nlists", default=None, help="list counts, comma-separated (default: dedup's at 1M and 10M rows)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--clusters", type=int, default=100, help="centres of the synthetic rows (1: no clusters)")
    p.add_argument("--queries", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    nlists = (
        [int(v) for v in args.nlists.split(",")]
        if args.nlists
        else [dedup_params(n, EXACT_MAX, args.dim).lists for n in ROWS]
    )
    for nlist in nlists:
        for row in measure(nlist, args):
            print(json.dumps({"clusters": args.clusters, **row}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
