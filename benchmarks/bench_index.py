"""Benchmark of the index stage, `similar` and `dedup` on a large synthetic featureset.

Not a test: run it by hand, e.g.

    .venv/bin/python benchmarks/bench_index.py                  # 100,000 x 1,280 float16
    .venv/bin/python benchmarks/bench_index.py --rows 20000 --dim 512

The vectors are clustered like image features (``--clusters`` centres, unit noise), with
``--copies`` planted near-duplicates (a row plus 0.1 noise: cosine ~0.995), a fifth of the rows
in the test split. Each phase runs in its own process, so the peak resident memory
(ru_maxrss) printed for it is that phase's alone. Phases: write the featureset and manifest;
build the `auto` index (IVF at this size) and an exact (flat) one; queries/s and the IVF
index's recall@10 against the exact one; an incremental add and a no-op rerun; dedup.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # test-only helpers live there

DATASET, FEATURESET = "bench", "bench-features"


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _cpu_seconds() -> float:
    """User + system CPU time of this process: on a shared machine, wall time alone says little."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def vectors(args, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32) * 1.5
    rng = np.random.default_rng(seed)
    return centres[rng.integers(0, args.clusters, n)] + rng.standard_normal((n, args.dim), dtype=np.float32)


def phase_write(ws, args) -> dict:
    from synthetic import fake_image_id, write_featureset  # test-only code, in tests/

    from imgfeat.scan.manifest import write_manifest

    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed + 1)
    n = args.rows - args.copies
    X = vectors(args, n, args.seed + 2)
    originals = rng.choice(n, args.copies, replace=False)
    X = np.concatenate([X, X[originals] + 0.1 * rng.standard_normal((args.copies, args.dim), dtype=np.float32)])
    ids = [fake_image_id(DATASET, k) for k in range(args.rows)]
    write_featureset(ws, FEATURESET, ids, X, dtype="float16", shard_rows=args.shard_rows)
    split = np.where(rng.random(args.rows) < 0.2, "test", "train")
    rows = [
        {"image_id": i, "path": f"img/{k:06d}.jpg", "split": str(split[k]), "status": "ok"} for k, i in enumerate(ids)
    ]
    write_manifest(ws, DATASET, rows, ws.root / "images")
    leaks = int(sum(split[n + j] != split[o] for j, o in enumerate(originals)))
    return {
        "rows": args.rows,
        "dim": args.dim,
        "planted_copies": args.copies,
        "planted_cross_split_pairs": leaks,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def phase_build(ws, args) -> dict:
    from imgfeat.index import IndexConfig, build_index

    out = {}
    for name, kind in (("auto", "auto"), ("flat", "flat")):
        t0 = time.perf_counter()
        s = build_index(ws, IndexConfig(FEATURESET, name=name, kind=kind), f"bench-{name}")
        out[name] = {
            "kind": s.kind,
            "rows": s.rows,
            "seconds": round(time.perf_counter() - t0, 1),
            "params": {k: v for k, v in s.params.items() if v},
        }
    return out


def phase_query(ws, args) -> dict:
    from imgfeat.index import Index

    Q = vectors(args, args.queries, args.seed + 3)
    out, got = {}, {}
    for name in ("auto", "flat"):
        index = Index.open(ws, name)
        t0 = time.perf_counter()
        got[name] = [[n.image_id for n in r.neighbours] for r in index.search(Q, k=10)]
        batch = time.perf_counter() - t0
        t0 = time.perf_counter()
        for q in Q[: args.single_queries]:
            index.search(q[None, :], k=10)
        single = time.perf_counter() - t0
        out[name] = {
            "kind": index.info.kind,
            f"batch_of_{args.queries}_queries_per_s": round(args.queries / batch, 1),
            "one_at_a_time_queries_per_s": round(args.single_queries / single, 1),
        }
    hits = [len(set(a) & set(b)) for a, b in zip(got["auto"], got["flat"])]
    out["auto_recall_at_10_vs_flat"] = round(float(np.mean(hits)) / 10, 4)
    return out


def phase_add(ws, args) -> dict:
    from synthetic import fake_image_id, write_featureset  # test-only code, in tests/

    from imgfeat.index import IndexConfig, build_index

    X = vectors(args, args.add_rows, args.seed + 4)
    ids = [fake_image_id("more", k) for k in range(args.add_rows)]
    write_featureset(ws, FEATURESET, ids, X, dtype="float16", shard_rows=args.shard_rows, run_id="more")
    t0 = time.perf_counter()
    s = build_index(ws, IndexConfig(FEATURESET, name="auto"), "bench-add")
    t1 = time.perf_counter()
    again = build_index(ws, IndexConfig(FEATURESET, name="auto"), "bench-noop")
    return {
        "added": s.added,
        "rows": s.rows,
        "add_seconds": round(t1 - t0, 2),
        "noop_written": again.written,
        "noop_seconds": round(time.perf_counter() - t1, 2),
    }


def phase_dedup(ws, args) -> dict:
    from imgfeat.index.dedup import DedupConfig, run_dedup

    t0 = time.perf_counter()
    s = run_dedup(ws, DedupConfig(FEATURESET, DATASET, page_groups=20), "bench-dedup")
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "search": s.search,
        "groups": s.groups,
        "grouped_paths": s.grouped_paths,
        "leaks": s.leaks,
        "images": s.images,
        "timings": s.timings,
    }


PHASES = {"write": phase_write, "build": phase_build, "query": phase_query, "dedup": phase_dedup, "add": phase_add}


def run_phase(args) -> None:
    from imgfeat.core.workspace import Workspace

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(message)s")
    out = PHASES[args.phase](Workspace(Path(args.workspace)), args)
    out["peak_rss_mib"] = round(_peak_mib(), 1)
    out["cpu_seconds"] = round(_cpu_seconds(), 1)
    print(json.dumps(out))


def child(args, phase: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "phase" and v is not None],
    ]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_seconds"] = round(time.perf_counter() - t0, 1)  # with interpreter and import start-up
    print(phase, json.dumps(out), file=sys.stderr, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--copies", type=int, default=1000, help="planted near-duplicates")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--single-queries", type=int, default=100)
    p.add_argument("--add-rows", type=int, default=1000)
    p.add_argument("--shard-rows", type=int, default=1024, help="rows per feature shard (extract's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phases", default="write,build,query,add,dedup")
    p.add_argument("--workspace", default=None, help="default: a temporary folder, removed afterwards")
    p.add_argument("--phase", choices=tuple(PHASES), default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        return run_phase(args)
    with tempfile.TemporaryDirectory(prefix="bench_index-") as tmp:
        args.workspace = args.workspace or tmp  # a given workspace is kept: rerun one phase with --phases
        phases = args.phases.split(",")
        del args.phases
        results = {phase: child(args, phase) for phase in phases}
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
