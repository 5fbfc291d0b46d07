"""Benchmark of dedup's quality on real photos: planted near-copies found, distinct photos left alone.

Not a test: run it by hand, e.g.

    .venv/bin/python benchmarks/bench_dedup.py                       # ~570 photos, 57 copies
    .venv/bin/python benchmarks/bench_dedup.py --work /tmp/bd --json  # keep the workspace (features cached)

The photos are the real ones installed packages ship (scikit-image, scikit-learn, matplotlib),
each whole and cut into non-overlapping tiles at several scales, so the set holds hundreds of
distinct images of a few dozen similar scenes. A quarter goes to the test split; copies of
``--copy-fraction`` of the images (training photos, made with the nine transforms of
``imgfeat.tools.nearcopies``, in turn) are planted in the test split, under the original's
label, and one training photo's very bytes under another label (a label conflict).
EfficientNet-Lite0 features (ImageNet weights). For each criterion it reports, per
transform and overall, the share of copies grouped with their original *and* reported as a
leak of it (recall), and the share of all images grouped with an image of another photo
(false grouping).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from imgfeat.tools.nearcopies import build_photo_set, score

DATASET = "photos"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="workspace + photos folder (kept; features cached)")
    ap.add_argument("--copy-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grids", default="1,2,3,4", help="tile grids per photo (1: the whole photo)")
    ap.add_argument("--input-size", type=int, default=None, help="backbone input size (default: its own, 224)")
    ap.add_argument(
        "--thresholds", default="0.9,0.75", help="fixed cosines to compare with the default (0.9: the old default)"
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-dedup-"))
    from imgfeat.core.workspace import Workspace
    from imgfeat.extract.extract import ExtractConfig, run_extract
    from imgfeat.index.dedup import DedupConfig, run_dedup
    from imgfeat.scan.scan import ScanConfig, run_scan

    root = work / "photos"
    truth_file = work / "truth.json"
    if truth_file.is_file():
        truth = {k: tuple(v) for k, v in json.loads(truth_file.read_text()).items()}
    else:
        truth = build_photo_set(root, args.copy_fraction, args.seed, tuple(int(g) for g in args.grids.split(",")))
        truth_file.write_text(json.dumps(truth))
    ws = Workspace.resolve(work / "ws")
    run_scan(ws, ScanConfig(root=root, dataset=DATASET), "scan")
    fs = run_extract(
        ws,
        ExtractConfig(dataset=DATASET, backbone="efficientnet_lite0", weights="imagenet", input_size=args.input_size),
        "extract",
    ).featureset
    out = {"images": len(truth), "copies": sum(1 for _, t in truth.values() if t), "featureset": fs, "criteria": {}}
    for threshold in [None, *(float(t) for t in args.thresholds.split(",") if t)]:
        label = "default" if threshold is None else f"--threshold {threshold:g}"
        s = run_dedup(
            ws,
            DedupConfig(
                featureset=fs,
                dataset=DATASET,
                threshold=threshold,
                name="default" if threshold is None else f"t{threshold:g}",
            ),
            "dedup",
        ).to_json()
        out["criteria"][label] = {
            **score(truth, s["groups_table"], s["leaks_table"]),
            "criterion": s.get("criterion"),
            "seconds": s["seconds"],
        }
    if args.json:
        print(json.dumps(out))
    else:
        for label, r in out["criteria"].items():
            print(
                f"{label}: found {r['found']} copies, {r['false_grouped']} of {r['images']} images falsely "
                f"grouped ({r['false_grouping_rate']:.1%}), label conflict found {r['label_conflicts_found']}"
            )
            print("  " + ", ".join(f"{t} {v:.0%}" for t, v in r["recall"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
