"""Benchmark of reading a large featureset: what commit records and their checks cost readers.

Not a test: run it by hand, e.g.

    .venv/bin/python benchmarks/bench_featureset_read.py                  # 100,000 x 1,280 float32
    .venv/bin/python benchmarks/bench_featureset_read.py --rows 20000 --legacy

Writes the featureset once through extract's own FeaturesetWriter (1,024-row shards, so each shard has
its commit record), then times, each in a fresh process, with the files in the page cache (a
warm-up read first): the ids a resume plan reads (``committed_ids``: id columns and footers only),
the whole matrix (``load_features``: every shard read once and its checksum compared), the
index's normalised vectors (``read_vectors``) and ``Featureset.to_arrow``. ``--legacy`` removes the
records first (a featureset written before they existed: read unchecked, with a warning).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # test-only helpers live there

FEATURESET = "bench-features"
READS = ("committed_ids", "load_features", "read_vectors", "to_arrow")


def write(root: Path, rows: int, dim: int) -> None:
    from synthetic import write_featureset

    from imgfeat.core.workspace import Workspace

    rng = np.random.default_rng(0)
    X = rng.standard_normal((rows, dim), dtype=np.float32)
    write_featureset(Workspace(root), FEATURESET, [f"{k:032x}" for k in range(rows)], X, "float32", 1024)


def read(root: Path, what: str, repeat: int) -> list[tuple[float, float]]:
    from imgfeat.core.workspace import Workspace

    ws = Workspace(root)
    calls = {
        "committed_ids": lambda: __import__("imgfeat.extract.featureset", fromlist=["x"]).committed_ids(ws, FEATURESET),
        "load_features": lambda: __import__("imgfeat.extract.featureset", fromlist=["x"]).load_features(ws, FEATURESET),
        "read_vectors": lambda: __import__("imgfeat.index.vectors", fromlist=["x"]).read_vectors(ws, FEATURESET),
        "to_arrow": lambda: __import__("imgfeat.api", fromlist=["x"]).Featureset(FEATURESET, workspace=root).to_arrow(),
    }
    calls[what]()  # warm-up: files in the page cache, modules imported
    seconds = []  # (wall, CPU of this process): on a shared machine the CPU time is the steadier figure
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        calls[what]()
        seconds.append((time.perf_counter() - t0, time.process_time() - c0))
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--legacy", action="store_true", help="remove the commit records before reading")
    ap.add_argument("--workspace", type=Path, help="reuse (or keep) a workspace here")
    ap.add_argument("--phase", choices=("write", *READS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase == "write":
        write(args.workspace, args.rows, args.dim)
        return
    if args.phase:
        print(json.dumps(read(args.workspace, args.phase, args.repeat)))
        return
    root = args.workspace or Path(tempfile.mkdtemp(prefix="bench_fs_read_")) / "ws"
    me = [sys.executable, __file__, "--workspace", str(root), "--rows", str(args.rows), "--dim", str(args.dim)]
    if not (root / "features" / FEATURESET).is_dir():
        t0 = time.perf_counter()
        subprocess.run([*me, "--phase", "write"], check=True)
        print(f"write: {args.rows:,} x {args.dim} float32 in {time.perf_counter() - t0:.1f} s")
    if args.legacy:
        shutil.rmtree(root / "features" / ".commits", ignore_errors=True)
    results = {}
    for what in READS:
        out = subprocess.run(
            [*me, "--phase", what, "--repeat", str(args.repeat)], check=True, capture_output=True, text=True
        ).stdout
        runs = json.loads(out.strip().splitlines()[-1])
        wall, cpu = (round(statistics.median(r[k] for r in runs), 3) for k in (0, 1))
        results[what] = {"wall": wall, "cpu": cpu}
        print(f"{what:14s} median wall {wall:.3f} s, CPU {cpu:.3f} s  (wall: {', '.join(f'{r[0]:.3f}' for r in runs)})")
    print(json.dumps({"rows": args.rows, "dim": args.dim, "legacy": args.legacy, "seconds": results}))


if __name__ == "__main__":
    main()
