"""Benchmark of the heads: logreg training and prediction throughput on a large synthetic featureset.

Not a test: run it by hand, e.g.

    .venv/bin/python benchmarks/bench_heads.py                       # 100,000 x 1,280 float16, 10 classes
    .venv/bin/python benchmarks/bench_heads.py --rows 20000 --dim 512

Each phase (write the featureset, train, predict) runs in its own process, so the peak
resident memory (ru_maxrss) printed for it is that phase's alone. The featureset is written
exactly as extract writes it (Parquet shards of fixed_size_list<float16>), so training also
measures the load path.
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

DATASET, FEATURESET = "bench", "bench-features"


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def phase_write(ws, args) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # test-only code lives there
    from synthetic import BlobSpec, write_blob_dataset

    per_class = args.rows // args.classes
    spec = BlobSpec(
        classes=tuple(f"class{k:02d}" for k in range(args.classes)),
        per_class=per_class,
        dim=args.dim,
        separation=args.separation,
        test_fraction=0.2,
        dtype="float16",
        shard_rows=args.shard_rows,
    )
    t0 = time.perf_counter()
    write_blob_dataset(ws, DATASET, FEATURESET, spec)
    return {"rows": per_class * args.classes, "dim": args.dim, "seconds": time.perf_counter() - t0}


def phase_train(ws, args) -> dict:
    from imgfeat.heads import TrainConfig, run_train

    cfg = TrainConfig(
        DATASET, FEATURESET, head="logreg", cv=args.cv, cv_max_rows=args.cv_max_rows, random_state=args.seed
    )
    t0 = time.perf_counter()
    out = run_train(ws, cfg, "bench-train")
    return {
        "seconds": time.perf_counter() - t0,
        "head_id": out.head_id,
        "reused": out.reused,
        "test_accuracy": out.metrics["test_accuracy"],
        "cv": out.metrics["cv"]["logreg"]["mean"],
        "chosen": out.chosen,
        "n_train": out.n_train,
        "n_test": out.n_test,
        "timings": out.timings,
    }


def phase_predict(ws, args) -> dict:
    from imgfeat.heads import PredictConfig, run_predict

    t0 = time.perf_counter()
    out = run_predict(ws, PredictConfig(args.head_id, dataset=DATASET), "bench-predict")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "written": out.written, "rows_per_s": out.written / seconds}


def phase_rerun(ws, args) -> dict:
    """Nothing new: train must reuse the head and predict must write nothing (imgfeat run reruns)."""
    t0 = time.perf_counter()
    train = phase_train(ws, args)
    t1 = time.perf_counter()
    predict = phase_predict(ws, args)
    return {
        "train_seconds": t1 - t0,
        "train_reused": train["reused"],
        "predict_seconds": time.perf_counter() - t1,
        "predict_written": predict["written"],
    }


PHASES = {"write": phase_write, "train": phase_train, "predict": phase_predict, "rerun": phase_rerun}


def run_phase(args) -> None:
    from imgfeat.core.workspace import Workspace

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    out = PHASES[args.phase](Workspace(Path(args.workspace)), args)
    out["peak_rss_mib"] = round(_peak_mib(), 1)
    print(json.dumps(out))


def child(args, phase: str, **extra) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--workspace",
        args.workspace,
        *[
            f"--{k.replace('_', '-')}={v}"
            for k, v in vars(args).items()
            if k not in ("phase", "workspace", "head_id") and v is not None
        ],
    ]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in extra.items()]
    res = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--separation", type=float, default=4.0)
    p.add_argument("--shard-rows", type=int, default=1024, help="rows per feature shard (extract's default)")
    p.add_argument("--cv", type=int, default=5)
    p.add_argument("--cv-max-rows", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workspace", default=None, help="default: a temporary folder, removed afterwards")
    p.add_argument("--phase", choices=tuple(PHASES), default=None, help=argparse.SUPPRESS)
    p.add_argument("--head-id", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        return run_phase(args)
    with tempfile.TemporaryDirectory(prefix="bench_heads-") as tmp:
        args.workspace = args.workspace or tmp
        results = {"write": child(args, "write")}
        results["train"] = child(args, "train")
        results["predict"] = child(args, "predict", head_id=results["train"]["head_id"])
        results["rerun"] = child(args, "rerun", head_id=results["train"]["head_id"])
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
