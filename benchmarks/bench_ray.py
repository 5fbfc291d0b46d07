"""Ray executor overhead: local vs Ray extract of the same images, each a whole fresh process.

    .venv/bin/python benchmarks/bench_ray.py                        # 2,000 photos, mobilenet_v2 at 224
    .venv/bin/python benchmarks/bench_ray.py --images 400 --input-size 96 --json

The photo set (real photos seen through random crops and jitter, 128-320 px JPEGs) and its
manifest are made once under --dir. Each executor then extracts into its own cold
workspace in a subprocess, so both sides pay interpreter, TensorFlow and (for Ray) cluster
start-up (a throughput figure counts the whole process). Weights are random and seeded: the compute is
the same as ImageNet weights and nothing is downloaded. The figure that matters is the ratio
ray / local in one run; absolute img/s on a shared machine are noisy. "model s" is the time
spent in the backbone calls (summed over actors on Ray): wall minus model is what each executor
spends starting up and waiting for input.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DIR = "/tmp/imgfeat-bench-ray"
DATASET = "bench"
EXECUTORS = ("local", "ray")


def make_dataset(folder: Path, images: int) -> Path:
    """Write ``images`` labelled JPEGs and scan them into a manifest, once; return the workspace."""
    from imgfeat.core.workspace import Workspace
    from imgfeat.scan.scan import ScanConfig, run_scan
    from imgfeat.tools.samples import DEMO_CLASSES, PhotoSetSpec, make_photo_set

    base, marker = folder / "base", folder / f"complete-{images}"
    if marker.exists():
        return base
    shutil.rmtree(folder, ignore_errors=True)
    classes = tuple(DEMO_CLASSES.items())[:5]
    per_class = -(-images // len(classes))
    paths = make_photo_set(folder / "photos", PhotoSetSpec(classes=classes, per_class=per_class, seed=1))
    for extra in paths[images:]:  # keep exactly the requested count
        extra.unlink()
    run_scan(Workspace(base), ScanConfig(root=folder / "photos", dataset=DATASET), run_id="bench-scan")
    marker.touch()
    return base


def run_one(args: argparse.Namespace) -> dict:
    """In a fresh process: extract the dataset with one executor into a copy of the base workspace."""
    from imgfeat.core.workspace import Workspace
    from imgfeat.extract.extract import ExtractConfig, run_extract

    ws = Workspace(Path(args.workspace))
    cfg = ExtractConfig(
        dataset=DATASET, backbone=args.backbone, weights="none", input_size=args.input_size, batch_size=args.batch_size
    )
    if args.one == "local":
        return run_extract(ws, cfg, f"bench-{args.one}").to_json()
    from imgfeat.extract.executors import ExecutorConfig

    return run_extract(
        ws, cfg, f"bench-{args.one}", ExecutorConfig(name="ray", address="local", actors=args.ray_workers)
    ).to_json()


def timed_run(executor: str, base: Path, folder: Path, args: argparse.Namespace) -> dict:
    ws = folder / f"ws-{executor}"
    shutil.rmtree(ws, ignore_errors=True)
    shutil.copytree(base, ws)  # the manifest only: a cold featureset every time
    cmd = [
        sys.executable,
        __file__,
        "--one",
        executor,
        "--workspace",
        str(ws),
        "--backbone",
        args.backbone,
        "--input-size",
        str(args.input_size),
        "--batch-size",
        str(args.batch_size),
    ]
    if args.ray_workers:
        cmd += ["--ray-workers", str(args.ray_workers)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "IMGFEAT_PROGRESS": "0"})
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{executor} run failed with exit code {proc.returncode}")
    summary = _last_json(proc.stdout)
    return {
        "executor": executor,
        "images": summary["extracted"],
        "wall_s": round(wall, 2),
        "img_per_s": round(summary["extracted"] / wall, 2),
        "stage_img_per_s": summary["images_per_s"],
        "model_s": summary["model_seconds"],
        "shards": summary["shards"],
    }


def _last_json(stdout: str) -> dict:
    # Ray forwards worker output to the driver's stdout, so the summary is the last JSON line, not the last line.
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"no JSON summary in the run's output: {stdout[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ray-workers", type=int, default=None, help="backbone actors (default: one per node)")
    p.add_argument("--dir", default=DEFAULT_DIR, help="where the photo set and workspaces live")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--one", choices=EXECUTORS, help=argparse.SUPPRESS)
    p.add_argument("--workspace", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.one:
        print(json.dumps(run_one(args), default=str))
        return 0
    folder = Path(args.dir)
    base = make_dataset(folder, args.images)
    rows = [timed_run(e, base, folder, args) for e in EXECUTORS]
    ratio = rows[1]["img_per_s"] / rows[0]["img_per_s"]
    stage_ratio = rows[1]["stage_img_per_s"] / rows[0]["stage_img_per_s"]
    result = {
        "cpus": os.cpu_count(),
        "backbone": args.backbone,
        "input_size": args.input_size,
        "runs": rows,
        "ray_over_local": round(ratio, 3),
        "ray_over_local_stage": round(stage_ratio, 3),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.images} images, {args.backbone} at {args.input_size}, {os.cpu_count()} CPUs (noisy if shared)")
    print(f"{'executor':<9}{'img/s':>9}{'wall s':>9}{'stage img/s':>13}{'model s':>9}{'shards':>8}")
    for r in rows:
        print(
            f"{r['executor']:<9}{r['img_per_s']:>9.2f}{r['wall_s']:>9.2f}{r['stage_img_per_s']:>13.2f}"
            f"{r['model_s']:>9.2f}{r['shards']:>8}"
        )
    print(f"ray / local: {ratio:.3f} (whole process), {stage_ratio:.3f} (inside the stage)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
