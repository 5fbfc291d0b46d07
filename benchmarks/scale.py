"""Scale benchmark: every stage through the real CLI at growing N, with time, items/s, peak RSS and growth.

    .venv/bin/python benchmarks/scale.py                                   # 10k, 100k, 1M images; 10M features
    .venv/bin/python benchmarks/scale.py --sizes 10000,100000 --feature-sizes 100000,1000000 --out /tmp/scale
    .venv/bin/python benchmarks/scale.py --sizes 200,400 --feature-sizes 400,800 --out /tmp/tiny   # a smoke run

Two sources, each measured at every N of its list, in a fresh workspace per N:

- ``images``: N generated JPEGs (crops of the photos scikit-image and scikit-learn ship, 48-160 px,
  flipped, colour-jittered, JPEG quality 75-95, one class per photo, a fifth held out as ``test``;
  made in a process pool once and kept under ``--images-dir``), then ``scan``, ``extract``,
  ``train``, ``predict``, ``index``, ``dedup`` and ``report``, each a ``imgfeat`` subprocess.
- ``synthetic``: a manifest and a featureset of N class-dependent Gaussian vectors, written through
  extract's own shard writer (backbone ``synthetic-gaussian``: its featureset name starts with it
  and no backbone of that name exists, so it is never mistaken for real features), then the
  stages after extract. This is how the later stages are measured past what extract can make in
  an hour on a small machine.

Extract's default configuration here (``mobilenet_v3_small``, ``--weights none`` seeded, 32 px
input, ``--fast-decode``, batch 256) is the cheapest backbone at its smallest input, chosen so that
1M images fit about an hour on a 2-core machine (916 img/s over the model loop on a busy one: about
20 minutes for extract); the weights do not change the speed.

Per stage and N it prints wall time, items/s, peak RSS of the stage's process (``os.wait4``'s
``ru_maxrss``: the largest of the process and the workers it reaped) and the growth from each N to
the next (time per item ratio, peak RSS ratio: 1.0 is flat; for ``index`` the RSS ratio leaves
out the index's own size, its file's bytes, shown as "own MiB": the issue's "the index's own size
aside", which the budget bounds instead); it writes ``scale.json``,
``scale.csv`` and ``scale.png`` under ``--out``, and each stage's stderr under ``--out``/logs.
A stage that fails is a row with its exit code (its later stages at that N are skipped).
``--memory-budget SIZE`` is passed to the stages whose ``--help`` offers the flag.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("scale")

DATASET = "scale"
HEAD = "scale-logreg"
INDEX = "scale"
IMAGE_STAGES = ("scan", "extract", "train", "predict", "index", "dedup", "report")
FEATURE_STAGES = ("train", "predict", "index", "dedup", "report")
BUDGET_STAGES = ("train", "predict", "index", "dedup")  # the stages issue 26 gives --memory-budget
SYNTHETIC_BACKBONE = "synthetic-gaussian"
CHUNK = 1000  # images per generated folder and per pool task
TEST_EVERY = 5  # every fifth image is held out: a fifth in split 'test'


# ---------------------------------------------------------------- images


def _chunk_files(root: Path, start: int, stop: int, seed: int, classes: Sequence[tuple[str, str]]) -> int:
    """Write images ``start..stop-1`` (one pool task): ``root/<split>/<label>/c<chunk>/<i>.jpg``."""
    import numpy as np

    from imgfeat.tools.samples import PhotoSetSpec, augment, load_photo

    spec = PhotoSetSpec(min_side=48, max_side=160, crop_area=(0.05, 1.0), jitter=0.3)
    photos = {name: load_photo(name) for _, name in classes}
    for photo in photos.values():
        photo.thumbnail((320, 320))  # crops of a 320 px photo still fill 160 px: half the CPU per image
    for i in range(start, stop):
        label, photo = classes[i % len(classes)]
        rng = np.random.default_rng([seed, i])  # each image its own stream: same bytes whatever the pool
        split = "test" if (i // len(classes)) % TEST_EVERY == 0 else "train"
        folder = root / split / label / f"c{i // CHUNK:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        augment(photos[photo], rng, spec).save(folder / f"{i:08d}.jpg", "JPEG", quality=int(rng.integers(75, 96)))
    return stop - start


def make_images(folder: Path, n: int, seed: int, workers: int) -> Path:
    """``n`` labelled JPEGs under ``folder/images-<n>-s<seed>``, made once (a marker says complete)."""
    from imgfeat.tools.samples import DEMO_CLASSES

    root = folder / f"images-{n}-s{seed}"
    marker = root.with_name(root.name + ".complete")
    if marker.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    t0, classes = time.perf_counter(), tuple(DEMO_CLASSES.items())
    with ProcessPoolExecutor(max_workers=workers) as pool:
        done = pool.map(_chunk_files, *zip(*[(root, s, min(n, s + CHUNK), seed, classes) for s in range(0, n, CHUNK)]))
        made = sum(done)
    marker.write_text(str(made))
    log.info("made %d images in %.1f s under %s", made, time.perf_counter() - t0, root)
    return root


# ---------------------------------------------------------------- synthetic featureset


def synthetic_provenance(dim: int, dtype: str) -> Any:
    """A provenance whose backbone no registry knows: the featureset says what it is in its name."""
    from imgfeat.extract.recipe import Provenance, Recipe, WeightsId, WeightsSource

    recipe = Recipe(
        SYNTHETIC_BACKBONE, WeightsId(None, 0, "none"), 0, "avg", None, "bilinear", False, "rotate", "float32", dtype
    )
    return Provenance(recipe, WeightsSource("none", None, 0), dim, None, None, None, recipe.name())


def _synthetic_chunks(n: int, dim: int, classes: int, seed: int, chunk: int) -> Iterator[tuple[list[str], Any, Any]]:
    """(image ids, labels, float32 vectors) in chunks: Gaussian blobs around one centre per class."""
    import numpy as np

    from imgfeat.core.hashing import content_id

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32) * (4.0 / math.sqrt(2 * dim))
    for start in range(0, n, chunk):
        k = np.arange(start, min(n, start + chunk))
        y = k % classes
        X = centres[y] + rng.standard_normal((len(k), dim), dtype=np.float32)
        yield [content_id(f"{SYNTHETIC_BACKBONE}/{seed}/{i}".encode()) for i in k], y, X


def write_synthetic(ws_root: Path, n: int, dim: int, classes: int, seed: int, dtype: str, shard_rows: int) -> str:
    """Stream a manifest and a featureset of ``n`` rows into ``ws_root``; return the featureset's name."""
    import numpy as np

    from imgfeat.core import schemas as S
    from imgfeat.core.storage import write_json_atomic
    from imgfeat.core.workspace import Workspace
    from imgfeat.extract.shards import FeaturesetDirs, FeaturesetWriter
    from imgfeat.scan.manifest import make_info, manifest_writer, rows_to_table

    ws = Workspace(ws_root)
    prov = synthetic_provenance(dim, dtype)
    write_json_atomic(prov.to_json(), ws.featureset_provenance(prov.featureset))
    writer = FeaturesetWriter(FeaturesetDirs.of(ws, prov.featureset), "synthetic", prov, shard_rows)
    labels = np.array([f"class{c:02d}" for c in range(classes)])
    # paths under a folder that does not exist: stages that open files find none and say so
    info = make_info(ws_root / "no-images", DATASET, {"synthetic": SYNTHETIC_BACKBONE}, "synthetic")
    with manifest_writer(ws.manifest_path(DATASET), info) as manifest:
        done = 0
        for ids, y, X in _synthetic_chunks(n, dim, classes, seed, 65536):
            split = np.where((np.arange(len(ids)) // classes) % TEST_EVERY == 0, "test", "train")
            # paths in the order scan writes them (sorted; folders of 1,000), the features in the
            # same order, as extract writes them
            rows = [
                {
                    S.IMAGE_ID: i,
                    S.PATH: f"f{(done + k) // 1000:06d}/{done + k:09d}.jpg",
                    S.LABEL: labels[c],
                    S.SPLIT: s,
                    S.STATUS: S.STATUS_OK,
                }
                for k, (i, c, s) in enumerate(zip(ids, y, split))
            ]
            done += len(ids)
            manifest.write_table(rows_to_table(rows))
            writer.add_features(ids, X.astype(dtype))
    writer.flush()
    return prov.featureset


# ---------------------------------------------------------------- running stages


@dataclass
class Row:
    """One stage at one N: what the table, the JSON and the CSV hold."""

    source: str
    stage: str
    n: int
    rc: int
    wall_s: float
    items_per_s: float
    peak_rss_mib: float
    stage_s: float | None = None  # the stage's own seconds (its --json), without interpreter and imports
    per_item_ratio: float | None = None  # time per item at this N over the previous N's
    rss_ratio: float | None = None  # peak RSS less own_mib, at this N over the previous N's
    own_mib: float | None = None  # what the stage's output itself holds (index: its file's size), set aside
    summary: dict[str, Any] = field(default_factory=dict)  # the stage's own --json object


def run_child(cmd: list[str], log_path: Path) -> tuple[int, float, float, str]:
    """Run ``cmd``; (exit code, wall s, peak RSS MiB, stdout). Its stderr goes to ``log_path``."""
    env = {**os.environ, "IMGFEAT_PROGRESS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as err, tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        # wait4, not wait: its rusage is this child's (and its reaped workers'), not every child's
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        stdout = out.read().decode(errors="replace")
    return proc.returncode, wall, usage.ru_maxrss / 1024, stdout  # Linux: ru_maxrss in KiB


def last_json(stdout: str) -> dict[str, Any]:
    """A command's ``--json`` object: its last stdout line ({} when there is none)."""
    lines = stdout.strip().splitlines()
    try:
        obj = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}
    return obj if isinstance(obj, dict) else {}


def takes_budget(imgfeat: str, stage: str) -> bool:
    """Whether ``imgfeat STAGE`` offers --memory-budget (other work adds it stage by stage)."""
    res = subprocess.run([imgfeat, stage, "--help"], capture_output=True, text=True)
    return "--memory-budget" in res.stdout


def stage_args(stage: str, root: Path | None, featureset: str | None, args: argparse.Namespace) -> list[str]:
    """The flags of one stage (workspace, --json and the budget are added by the caller)."""
    if stage == "scan":
        return [str(root), "--dataset", DATASET]
    if stage == "extract":
        return [
            "--dataset",
            DATASET,
            "--backbone",
            args.backbone,
            "--weights",
            "none",
            "--seed",
            str(args.seed),
            "--input-size",
            str(args.input_size),
            "--batch-size",
            str(args.batch_size),
            "--fast-decode",
            "--name",
            DATASET,
        ]
    if stage == "train":
        return [
            "--dataset",
            DATASET,
            "--featureset",
            featureset,
            "--head",
            "logreg",
            "--name",
            HEAD,
            "--random-state",
            str(args.seed),
        ]
    if stage == "predict":
        return ["--head", HEAD, "--dataset", DATASET]
    if stage == "index":
        return ["--featureset", featureset, "--dataset", DATASET, "--name", INDEX]
    if stage == "dedup":
        return ["--featureset", featureset, "--dataset", DATASET]
    if stage == "report":
        return ["--head", HEAD]
    raise ValueError(stage)


def run_stages(
    source: str,
    n: int,
    ws: Path,
    stages: Sequence[str],
    root: Path | None,
    featureset: str | None,
    args: argparse.Namespace,
    budget_stages: set[str],
) -> list[Row]:
    """Each stage as ``imgfeat STAGE ... --json`` in a subprocess; stop at the first failure."""
    rows: list[Row] = []
    for stage in stages:
        if any(stage == name and n >= at for name, at in args.skip):
            log.info("%-9s %-8s %10d  skipped (--skip %s:%d)", source, stage, n, stage, n)
            continue
        cmd = [args.imgfeat, stage, *stage_args(stage, root, featureset, args), "--workspace", str(ws), "--json"]
        if args.memory_budget and stage in budget_stages:
            cmd += ["--memory-budget", args.memory_budget]
        rc, wall, rss, stdout = run_child(cmd, args.out / "logs" / f"{source}-{n}-{stage}.log")
        summary = last_json(stdout)
        rows.append(
            Row(
                source,
                stage,
                n,
                rc,
                round(wall, 3),
                round(n / wall, 3),
                round(rss, 1),
                summary.get("seconds"),
                summary=summary,
                own_mib=round(summary["index_bytes"] / 2**20, 1)
                if isinstance(summary.get("index_bytes"), int)
                else None,
            )
        )
        log.info("%-9s %-8s %10d  rc %d  %8.1f s  %9.1f items/s  %7.0f MiB", source, stage, n, rc, wall, n / wall, rss)
        if rc != 0:
            log.error("%s failed at N=%d (exit %d): see %s", stage, n, rc, args.out / "logs")
            break
        if stage == "extract":
            featureset = summary.get("featureset", DATASET)
    return rows


def run_images(n: int, args: argparse.Namespace, budget_stages: set[str]) -> list[Row]:
    root = make_images(args.images_dir, n, args.seed, args.workers)
    ws = args.work / f"images-{n}"
    shutil.rmtree(ws, ignore_errors=True)
    try:
        return run_stages("images", n, ws, IMAGE_STAGES, root, None, args, budget_stages)
    finally:
        if not args.keep:
            shutil.rmtree(ws, ignore_errors=True)


def run_synthetic(n: int, args: argparse.Namespace, budget_stages: set[str]) -> list[Row]:
    ws = args.work / f"synthetic-{n}"
    shutil.rmtree(ws, ignore_errors=True)
    try:
        cmd = [
            sys.executable,
            __file__,
            "--write-synthetic",
            str(ws),
            "--rows",
            str(n),
            "--dim",
            str(args.dim),
            "--classes",
            str(args.classes),
            "--seed",
            str(args.seed),
        ]
        rc, wall, rss, stdout = run_child(cmd, args.out / "logs" / f"synthetic-{n}-write.log")
        write = Row(
            "synthetic", "write", n, rc, round(wall, 3), round(n / wall, 3), round(rss, 1), summary=last_json(stdout)
        )
        log.info("synthetic write    %10d  rc %d  %8.1f s", n, rc, wall)
        if rc != 0:
            return [write]
        featureset = write.summary["featureset"]
        return [write, *run_stages("synthetic", n, ws, FEATURE_STAGES, None, featureset, args, budget_stages)]
    finally:
        if not args.keep:
            shutil.rmtree(ws, ignore_errors=True)


# ---------------------------------------------------------------- figures


def add_ratios(rows: list[Row]) -> None:
    """Growth from each N to the next of the same source and stage (successful runs only)."""
    last: dict[tuple[str, str], Row] = {}
    for row in sorted(rows, key=lambda r: (r.source, r.stage, r.n)):
        prev = last.get((row.source, row.stage))
        if row.rc == 0 and prev is not None:
            row.per_item_ratio = round((row.wall_s / row.n) / (prev.wall_s / prev.n), 3)
            row.rss_ratio = round(
                (row.peak_rss_mib - (row.own_mib or 0)) / (prev.peak_rss_mib - (prev.own_mib or 0)), 3
            )
        if row.rc == 0:
            last[(row.source, row.stage)] = row


def table_text(rows: list[Row]) -> str:
    head = (
        f"{'source':<10}{'stage':<9}{'N':>11}{'rc':>4}{'wall s':>10}{'stage s':>10}{'items/s':>11}"
        f"{'peak MiB':>10}{'own MiB':>9}{'per-item x':>12}{'RSS x':>8}"
    )
    lines = [head]
    for r in rows:
        ratio = "" if r.per_item_ratio is None else f"{r.per_item_ratio:.2f}"
        rss = "" if r.rss_ratio is None else f"{r.rss_ratio:.2f}"
        own = "" if r.stage_s is None else f"{r.stage_s:.1f}"
        lines.append(
            f"{r.source:<10}{r.stage:<9}{r.n:>11,}{r.rc:>4}{r.wall_s:>10.1f}{own:>10}{r.items_per_s:>11,.1f}"
            f"{r.peak_rss_mib:>10.0f}{'' if r.own_mib is None else f'{r.own_mib:.0f}':>9}{ratio:>12}{rss:>8}"
        )
    return "\n".join(lines)


def write_figures(rows: list[Row], out: Path, config: dict[str, Any]) -> None:
    """scale.json (config and rows), scale.csv (the table) and scale.png (per-item time and RSS against N)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps({"config": config, "rows": [asdict(r) for r in rows]}, indent=1))
    columns = [f for f in Row.__dataclass_fields__ if f != "summary"]
    with open(out / "scale.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows([[getattr(r, c) for c in columns] for r in rows])
    plot(rows, out / "scale.png")


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.rc == 0:
            series.setdefault((r.source, r.stage), []).append(r)
    colours = {stage: f"C{k}" for k, stage in enumerate(("write", *IMAGE_STAGES))}  # one colour per stage
    for (source, stage), rs in sorted(series.items()):
        rs.sort(key=lambda r: r.n)
        style = dict(
            color=colours[stage],
            marker="o" if source == "images" else "s",
            linestyle="-" if source == "images" else "--",
            label=f"{stage} ({source})",
        )
        ns = [r.n for r in rs]
        ax_t.plot(ns, [1e3 * r.wall_s / r.n for r in rs], **style)
        ax_m.plot(ns, [r.peak_rss_mib for r in rs], **style)
    for ax, title in ((ax_t, "ms per item (flat = linear cost)"), (ax_m, "peak RSS, MiB (flat = bounded)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- command line


def sizes(text: str) -> list[int]:
    try:
        out = sorted({int(float(s)) for s in text.split(",") if s.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 10000,100000, got {text!r}") from None
    if out and out[0] < 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive integers (0: none), got {text!r}")
    return [n for n in out if n > 0]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=sizes, default=sizes("10000,100000,1000000"), help="image counts (all stages)")
    p.add_argument(
        "--feature-sizes",
        type=sizes,
        default=None,
        help="synthetic featureset rows (stages after extract; default: --sizes and 10x the largest; '0' for none)",
    )
    p.add_argument("--out", type=Path, default=Path("scale-out"), help="where the table, plot and logs go")
    p.add_argument("--work", type=Path, default=None, help="workspaces (default: OUT/work)")
    p.add_argument("--images-dir", type=Path, default=Path("/tmp/imgfeat-scale"), help="generated images, kept")
    p.add_argument("--keep", action="store_true", help="keep each N's workspace")
    p.add_argument("--memory-budget", default=None, help="passed to the stages whose --help offers it")
    p.add_argument("--backbone", default="mobilenet_v3_small")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dim", type=int, default=1280, help="synthetic feature dimension")
    p.add_argument("--classes", type=int, default=10, help="synthetic classes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="image generator processes")
    p.add_argument("--imgfeat", default=str(Path(sys.executable).with_name("imgfeat")), help="the imgfeat command")
    p.add_argument(
        "--skip",
        type=skip_spec,
        action="append",
        default=[],
        metavar="STAGE:N",
        help="leave STAGE out at N and above, e.g. dedup:1000000 (repeatable; the row is absent, not zero)",
    )
    p.add_argument("--write-synthetic", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.feature_sizes is None:
        args.feature_sizes = sorted({*args.sizes, 10 * args.sizes[-1]}) if args.sizes else []
    args.work = args.work or args.out / "work"
    return args


def skip_spec(text: str) -> tuple[str, int]:
    stage, _, at = text.partition(":")
    if stage not in IMAGE_STAGES or not at.isdigit():
        raise argparse.ArgumentTypeError(f"expected STAGE:N with STAGE one of {', '.join(IMAGE_STAGES)}, got {text!r}")
    return stage, int(at)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    if args.write_synthetic:  # a child: one synthetic workspace
        fs = write_synthetic(args.write_synthetic, args.rows, args.dim, args.classes, args.seed, "float16", 1024)
        print(json.dumps({"featureset": fs, "rows": args.rows}))
        return 0
    budget_stages = {s for s in BUDGET_STAGES if args.memory_budget and takes_budget(args.imgfeat, s)}
    if args.memory_budget and budget_stages != set(BUDGET_STAGES):
        log.warning(
            "--memory-budget is not offered by %s: not passed there",
            ", ".join(sorted(set(BUDGET_STAGES) - budget_stages)),
        )
    config = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("write_synthetic", "rows")
    }
    config.update(cpus=os.cpu_count(), budget_stages=sorted(budget_stages))
    rows: list[Row] = []
    runs = [(run_images, n) for n in args.sizes] + [(run_synthetic, n) for n in args.feature_sizes]
    for run, n in runs:
        rows += run(n, args, budget_stages)
        add_ratios(rows)  # the figures so far, after each N: a long run that is stopped keeps them
        write_figures(rows, args.out, {**config, "load_average": os.getloadavg()})
    print(table_text(rows))
    return 0 if all(r.rc == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
