"""Dedup's approximate search at a million rows: does it find planted near-copies, under each budget?

Not a test: run it by hand, e.g.

    .venv/bin/python benchmarks/bench_dedup_recall.py                       # 1,000,000 x 128
    .venv/bin/python benchmarks/bench_dedup_recall.py --rows 300000 --budgets 1GB,64MB

Unit vectors around ``--clusters`` centres (as image features of a few kinds), with ``--copies`` of
them copied with noise (cosine ``~--cosine`` to their source) appended, written to a scratch
vector store as dedup holds vectors past its budget. For each ``--budgets`` value, in a process of
its own (its peak RSS is its own), ``search_neighbours`` finds each row's neighbours as dedup does;
printed: the search's kind, whether the two-level quantizer's training sample was streamed, the
lists, the quantizer's levels (``--three-level-from``: from how many lists it has three; a large
number keeps two), seconds, peak RSS, and recall (the share of copies whose nearest other row is
their source), and pair recall (the share of copies paired with their source from either side, as
dedup's pairs are). ``--dominant 0.9`` puts nine rows in ten around one centre, as a collection of mostly
one kind of photo.
Under the smaller default budget the lists' training sample does not fit an eighth of it and goes
through scratch stores; under the larger it is taken into memory: the two recalls should agree.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DOMINANT_SPREAD = 0.3  # the dominant kind's rows: this much of the others' noise (cosine ~0.9 to their centre)


def planted(
    rows: int, dim: int, clusters: int, copies: int, cosine: float, seed: int, dominant: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` unit vectors, the last ``copies`` of them near-copies of the rows ``src``; a share
    ``dominant`` of the others close around the first centre (one kind of photo, shot alike), the
    rest spread evenly over all."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    base = rows - copies
    X = np.empty((rows, dim), np.float32)
    for lo in range(0, base, 100_000):
        hi = min(base, lo + 100_000)
        alike = rng.random(hi - lo) < dominant
        spread = np.where(alike, np.float32(DOMINANT_SPREAD), np.float32(1.0))[:, None]
        centre = np.where(alike, 0, rng.integers(0, clusters, hi - lo))
        X[lo:hi] = centres[centre] + spread * rng.standard_normal((hi - lo, dim), np.float32)
    X[:base] /= np.linalg.norm(X[:base], axis=1, keepdims=True)
    src = rng.choice(base, copies, replace=False)
    noise = rng.standard_normal((copies, dim)).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    # a unit copy at the given cosine: the source turned by acos(cosine) towards a random direction
    noise -= (noise * X[src]).sum(axis=1, keepdims=True) * X[src]
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    X[base:] = cosine * X[src] + np.sqrt(1 - cosine**2) * noise
    return X, src


def quantizer_levels(index) -> int:
    """Levels of an IVF index's quantizer: 1 flat, 2 an IVF over a flat one, 3 over a two-level one."""
    from imgfeat.index.kinds import import_faiss

    faiss = import_faiss()
    q, levels = faiss.downcast_index(index.quantizer), 1
    while isinstance(q, faiss.IndexIVF):
        q, levels = faiss.downcast_index(q.quantizer), levels + 1
    return levels


def child(args: argparse.Namespace, budget: str) -> dict:
    from imgfeat.core.sizes import parse_size
    from imgfeat.index import dedup, kinds
    from imgfeat.index.scratch import VectorStore

    if args.three_level_from is not None:
        kinds.THREE_LEVEL_LISTS = args.three_level_from
    X, src = planted(args.rows, args.dim, args.clusters, args.copies, args.cosine, args.seed, args.dominant)
    streamed, lists, levels = [], [], []
    real_streamed, real_index = dedup.streamed_two_level_centroids, dedup.two_level_index
    dedup.streamed_two_level_centroids = lambda *a, **k: streamed.append(1) or real_streamed(*a, **k)

    def index(*a, **k):
        out = real_index(*a, **k)
        lists.append(out[1].lists)
        levels.append(quantizer_levels(out[0]))
        return out

    dedup.two_level_index = index
    copies = np.arange(args.rows - args.copies, args.rows)
    nearest = np.full(args.copies, -1, np.int64)
    copy_of = np.full(args.rows, -1, np.int64)
    copy_of[src] = copies
    source_found = np.zeros(args.copies, bool)  # the source's own neighbours hold its copy

    def emit(queries: np.ndarray, sims: np.ndarray, rows: np.ndarray) -> None:
        mine = queries >= copies[0]
        for q, r in zip(queries[mine], rows[mine]):
            r = r[r >= 0]
            nearest[q - copies[0]] = r[0] if len(r) else -1
        sources = copy_of[queries] >= 0
        hit = (rows[sources] == copy_of[queries[sources]][:, None]).any(axis=1)
        source_found[copy_of[queries[sources]] - copies[0]] = hit

    with tempfile.TemporaryDirectory() as tmp, VectorStore(args.dim, Path(tmp)) as store:
        for lo in range(0, args.rows, 100_000):
            store.append(X[lo : lo + 100_000])
        del X
        t0 = time.perf_counter()
        kind = dedup.search_neighbours(store, 20, emit, memory_budget=parse_size(budget))
        seconds = time.perf_counter() - t0
    return {
        "budget": budget,
        "kind": kind,
        "sample_streamed": bool(streamed),
        "lists": lists[0] if lists else None,
        "quantizer_levels": levels[0] if levels else None,
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "recall": round(float(np.mean(nearest == src)), 5),
        # what dedup's pairs hold: a pair is found from either side
        "pair_recall": round(float(np.mean((nearest == src) | source_found)), 5),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--copies", type=int, default=2000)
    p.add_argument("--cosine", type=float, default=0.97)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dominant",
        type=float,
        default=0.0,
        help="share of the rows around one centre (a collection of mostly one kind)",
    )
    p.add_argument("--budgets", default="1GB,256MB", help="memory budgets, one search each (default 1GB,256MB)")
    p.add_argument(
        "--three-level-from",
        type=int,
        default=None,
        metavar="NLIST",
        help="lists from which the quantizer has three levels (default kinds.THREE_LEVEL_LISTS; "
        "a large number keeps it at two)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args, args.child)))
        return 0
    for budget in args.budgets.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", budget]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
