"""`imgfeat bench`: the input and forward limits vs end-to-end extract vs the tutorial path, as whole processes."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgfeat.backbones import get_backbone
from imgfeat.backbones.spec import BackboneSpec
from imgfeat.core.errors import ConfigError, ImgfeatError
from imgfeat.core.options import opt
from imgfeat.core.results import JsonObject
from imgfeat.core.stores import is_uri, parse_location
from imgfeat.core.workspace import Workspace
from imgfeat.extract.batches import DECODE_MODES, Batch, InputSpec
from imgfeat.extract.decode import DecodeConfig
from imgfeat.extract.executors import timed_build
from imgfeat.extract.executors.local import decoded_batches, default_workers
from imgfeat.extract.extract import DoneSets, ExtractConfig, Tally, walk_manifest
from imgfeat.extract.forward import Forward, in_flight
from imgfeat.extract.gpudecode import check_gpu_decode
from imgfeat.extract.recipe import resolve_recipe
from imgfeat.scan.probe import has_image_extension
from imgfeat.scan.scan import ScanConfig, run_scan

log = logging.getLogger(__name__)

BENCH_DATASET = "bench"
PATHS = ("input", "forward", "extract", "tutorial")


@dataclass(frozen=True)
class BenchConfig:
    """What to measure: one backbone on the images under ``images`` (the first ``limit`` of them)."""

    backbone: str = opt(metavar="NAME", help="e.g. mobilenet_v2, resnet50")
    images: Path | str = opt(
        metavar="DIR|URI",
        help="a folder of image files (searched recursively), or an object-store prefix (s3://BUCKET/PREFIX): "
        "then input and extract read the objects, and the tutorial path, which reads only folders, is left out",
    )
    batch_size: int = opt(32, metavar="N", help="images per model call")
    limit: int | None = opt(None, metavar="N", help="use the first N images (sorted by path)")
    # weights do not change speed; 'none' keeps the bench offline
    weights: str = opt("none", metavar="imagenet|none|PATH", help="weights to build with")
    input_size: int | None = opt(None, metavar="N", help="square input side")
    fast_decode: bool = opt(False, help="pass --fast-decode to extract")
    precision: str = opt("float32", metavar="float32|bfloat16|float16", help="compute precision")
    workers: int | None = opt(
        None,
        metavar="N",
        help="decoders of extract and of the input path (default: the CPU count; with --decode gpu, 4 read threads)",
    )
    # the input path decodes the same way
    decode: str = opt(
        "auto", metavar="auto|threads|processes|gpu", help="extract's --decode, also used by the input path"
    )
    paths: tuple[str, ...] = PATHS  # the flag is --skip
    logs: Path | None = opt(None, metavar="DIR", help="keep each timed process's stderr in DIR (PATH-ROUND.log)")
    repeat: int = opt(
        1,
        metavar="N",
        help="rounds of all paths, interleaved; each path's fastest round counts (use 3+ on a shared machine)",
    )

    def __post_init__(self) -> None:
        spec = get_backbone(self.backbone)
        if getattr(spec, "preset_dir", None) and "tutorial" in self.paths:
            # keras.applications' tutorial path has no keras-hub counterpart to time
            object.__setattr__(self, "paths", tuple(p for p in self.paths if p != "tutorial"))
        if is_uri(self.images):
            parse_location(str(self.images), "--images")
            object.__setattr__(self, "paths", tuple(p for p in self.paths if p != "tutorial"))
            if self.limit is not None:
                raise ConfigError(f"--limit {self.limit}: a bucket prefix is benched whole (give a smaller prefix)")
        elif not Path(self.images).is_dir():
            raise ConfigError(f"--images {str(self.images)!r} is not a folder or an s3:// gs:// az:// prefix")

        if self.decode not in DECODE_MODES:
            raise ConfigError(f"--decode {self.decode!r}: allowed are {', '.join(DECODE_MODES)}")
        if self.decode == "gpu":  # extract checks the options and the GPU itself; here, before anything runs:
            check_gpu_decode(None, probe_devices=False)  # this process must leave the GPU to the timed ones
        if self.logs is not None and Path(self.logs).exists() and not Path(self.logs).is_dir():
            raise ConfigError(f"--logs {str(self.logs)!r} is not a folder")
        if not isinstance(self.repeat, int) or self.repeat < 1:
            raise ConfigError(f"--repeat must be a positive integer, got {self.repeat!r}")
        unknown = [p for p in self.paths if p not in PATHS]
        if unknown:
            raise ConfigError(f"unknown bench path {unknown[0]!r} (allowed: {', '.join(PATHS)})")


def list_images(folder: Path, limit: int | None) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, by extension), the first ``limit``."""
    found = sorted(p for p in Path(folder).rglob("*") if p.is_file() and has_image_extension(p.name))
    return found[:limit] if limit else found


def stage_images(files: list[Path], dest: Path) -> Path:
    """Hard-link (or copy) the files into one flat folder, so every path reads the same files."""
    dest.mkdir(parents=True)
    for i, src in enumerate(files):
        target = dest / f"{i:07d}{src.suffix.lower()}"
        try:
            os.link(src, target)
        except OSError:
            shutil.copyfile(src, target)
    return dest


def run_bench(cfg: BenchConfig, run_id: str) -> JsonObject:
    """Time each path as a whole process (start-up included) on the same files; return rates and ratios."""
    remote = is_uri(cfg.images)
    files = [] if remote else list_images(Path(cfg.images), cfg.limit)
    if not remote and not files:
        raise ConfigError(f"no image files under {cfg.images}")
    with tempfile.TemporaryDirectory(prefix="imgfeat-bench-") as tmp:
        # objects are read where they are: the store's latency is part of what is measured
        images: Path | str = cfg.images if remote else stage_images(files, Path(tmp) / "images")
        runs: dict[str, list[dict[str, Any]]] = {p: [] for p in cfg.paths}
        n = len(files)
        for round_ in range(cfg.repeat):
            ws_root = Path(tmp) / f"ws{round_}"  # a cold featureset every round
            scanned_ok = _scan(ws_root, images, run_id)
            n = scanned_ok if remote else n  # a folder's n: its files, as before
            if not n:
                raise ConfigError(f"no readable images under {cfg.images}")
            for p in cfg.paths:
                log_file = Path(cfg.logs) / f"{p}-{round_ + 1}.log" if cfg.logs else None
                runs[p].append(_time_process(_command(p, cfg, images, ws_root, n), log_file))
                log.info("round %d %s: %.1f s", round_ + 1, p, runs[p][-1]["seconds"])
    return _report(cfg, n, runs)


def _scan(ws_root: Path, images: Path | str, run_id: str) -> int:
    """Scanning is its own stage and not part of extract's time: do it before the clock starts.
    Returns how many images scanned ok (what every path reads)."""
    return run_scan(Workspace(ws_root), ScanConfig(root=images, dataset=BENCH_DATASET), run_id).ok


def _command(path: str, cfg: BenchConfig, images: Path | str, ws_root: Path, n: int) -> list[str]:
    if path == "extract":
        cmd = [
            sys.executable,
            "-m",
            "imgfeat",
            "extract",
            "--workspace",
            str(ws_root),
            "--dataset",
            BENCH_DATASET,
            "--backbone",
            cfg.backbone,
            "--weights",
            cfg.weights,
            "--batch-size",
            str(cfg.batch_size),
            "--precision",
            cfg.precision,
            "--json",
        ]
        cmd += ["--input-size", str(cfg.input_size)] if cfg.input_size else []
        cmd += ["--workers", str(cfg.workers)] if cfg.workers else []
        cmd += ["--decode", cfg.decode]
        return cmd + (["--fast-decode"] if cfg.fast_decode else [])
    spec = {
        "backbone": cfg.backbone,
        "weights": cfg.weights,
        "input_size": cfg.input_size,
        "batch_size": cfg.batch_size,
        "precision": cfg.precision,
        "n": n,
        "images": str(images),
        "workspace": str(ws_root),
        "fast_decode": cfg.fast_decode,
        "decode": cfg.decode,
        "workers": cfg.workers,
    }
    code = f"import sys, json; from imgfeat.tools.bench import {path}_main; {path}_main(json.loads(sys.argv[1]))"
    return [sys.executable, "-c", code, json.dumps(spec)]


def _time_process(cmd: list[str], log_file: Path | None = None) -> JsonObject:
    env = {**os.environ, "IMGFEAT_PROGRESS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(proc.stderr)
    if proc.returncode != 0:
        raise ImgfeatError(
            f"bench step failed (exit {proc.returncode}): {' '.join(cmd[:6])} ...\n{proc.stderr[-2000:]}"
        )
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "{}"
    return {"seconds": round(seconds, 3), "inner": json.loads(last)}


def _report(cfg: BenchConfig, n: int, runs: dict[str, list[dict[str, Any]]]) -> JsonObject:
    # On a shared machine other load only ever slows a round down, so the fastest round is the measure.
    timings = {p: min(rs, key=lambda r: r["seconds"]) for p, rs in runs.items()}
    rate = {p: round(n / t["seconds"], 2) for p, t in timings.items()}
    out: dict[str, Any] = {
        "backbone": cfg.backbone,
        "images": n,
        "batch_size": cfg.batch_size,
        "weights": cfg.weights,
        "fast_decode": cfg.fast_decode,
        "precision": cfg.precision,
        "cpu_count": os.cpu_count(),
        "repeat": cfg.repeat,
        "images_per_s": rate,
        "process_seconds": {p: t["seconds"] for p, t in timings.items()},
        "all_rounds_seconds": {p: [r["seconds"] for r in rs] for p, rs in runs.items()},
        "load_average": os.getloadavg(),
    }
    if "extract" in timings:
        inner = timings["extract"]["inner"]
        out["extract_inner"] = {
            k: inner.get(k)
            for k in (
                "extracted",
                "seconds",
                "model_seconds",
                "decode_seconds",
                "input_wait_seconds",
                "build_seconds",
                "images_per_s",
                "featureset",
            )
        }
    if "forward" in rate and "extract" in rate:
        out["end_to_end_over_forward"] = round(rate["extract"] / rate["forward"], 3)
    if "input" in rate and "extract" in rate:
        out["end_to_end_over_input"] = round(rate["extract"] / rate["input"], 3)
    limits = [rate[p] for p in ("forward", "input") if p in rate]
    if limits and "extract" in rate:  # how close the pipeline gets to what this machine allows
        out["end_to_end_over_limit"] = round(rate["extract"] / min(limits), 3)
        out["limited_by"] = min(("forward", "input"), key=lambda p: rate.get(p, math.inf))
    if "tutorial" in rate and "extract" in rate:
        out["end_to_end_over_tutorial"] = round(rate["extract"] / rate["tutorial"], 3)
    return out


# ---------------------------------------------------------------- the child processes' bodies


def _build(spec: dict[str, Any]) -> tuple[BackboneSpec, Any, int]:  # (spec, the keras model, input size)
    cfg = ExtractConfig(
        dataset=BENCH_DATASET,
        backbone=spec["backbone"],
        weights=spec["weights"],
        input_size=spec["input_size"],
        precision=spec["precision"],
    )
    resolved = resolve_recipe(cfg)
    return resolved.spec, timed_build(resolved, cfg.precision)[0], resolved.recipe.input_size


def forward_main(spec: dict[str, Any]) -> None:
    """The forward limit: extract's model function (uint8 in, preprocessing on the device, batches in
    flight) on one in-memory batch, as many calls as extract makes."""
    import numpy as np

    backbone, model, size = _build(spec)
    bs = spec["batch_size"]
    raw = np.random.default_rng(0).integers(0, 256, (bs, size, size, 3), dtype=np.uint8)
    fwd = Forward(model, backbone.family, raw.shape)
    batches = (Batch(["x"] * bs, raw, [], 0.0) for _ in range(math.ceil(spec["n"] / bs)))
    t0 = time.perf_counter()
    for _ in in_flight(fwd, batches):
        pass
    print(json.dumps({"model_seconds": round(time.perf_counter() - t0, 3)}))


def input_main(spec: dict[str, Any]) -> None:
    """The input limit: extract's decode (read, content check, decode, resize into uint8 batches) on
    every core, the same decode mode, no model."""
    backbone = get_backbone(spec["backbone"])
    size = backbone.check_input_size(spec["input_size"])
    # a keras-hub preset's converter decides the crop and the interpolation, as in extract
    conv = getattr(backbone, "converter", None)
    crop, interp, aa = (conv.crop, conv.interpolation, conv.antialias) if conv else ("none", "bilinear", True)
    inputs = InputSpec(
        DecodeConfig((size, size), interp, spec["fast_decode"], crop=crop, antialias=aa),
        spec["batch_size"],
        decode=spec["decode"],
    )
    items = walk_manifest(
        Workspace(Path(spec["workspace"])), BENCH_DATASET, DoneSets(set(), set(), set()), Tally(), "bench"
    )
    t0, rows = time.perf_counter(), 0
    for batch in decoded_batches(items, inputs, "bench", spec["workers"] or default_workers(spec["decode"])):
        rows += len(batch.ids)
        if hasattr(batch.raw, "block_until_ready"):  # a device batch (--decode gpu): count it when done
            batch.raw.block_until_ready()
        if batch.release is not None:
            batch.release()
    print(json.dumps({"decoded": rows, "decode_seconds": round(time.perf_counter() - t0, 3)}))


def tutorial_main(spec: dict[str, Any]) -> None:
    """The path the Keras docs teach: image_dataset_from_directory + preprocess_input + model.predict."""
    import keras

    backbone, model, size = _build(spec)
    ds = keras.utils.image_dataset_from_directory(
        spec["images"], labels=None, image_size=(size, size), batch_size=spec["batch_size"], shuffle=False
    )
    preprocess = backbone.preprocess_fn()
    ds = ds.map(lambda x: preprocess(x))
    t0 = time.perf_counter()
    out = model.predict(ds, verbose=0)
    print(json.dumps({"rows": int(out.shape[0]), "predict_seconds": round(time.perf_counter() - t0, 3)}))
