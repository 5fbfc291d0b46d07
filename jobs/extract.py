"""`imgfeat extract --dataset NAME --backbone NAME`: a dataset manifest into a featureset."""

from __future__ import annotations

import argparse

from imgfeat.cli.common import JobContext, Summary, add_command, add_config_flags, config_values, ranged
from imgfeat.extract.executors import ExecutorConfig
from imgfeat.extract.extract import (
    ExtractConfig,
    ExtractSummary,
    check_extract_error_rate,
    check_recipe_name,
    record_recipe_name,
    run_extract,
)

DESCRIPTION = """\
Run a Keras backbone (include_top=False, pooled) over every image of a scanned dataset
and write the features as Parquet shards under the workspace's features/:

  FEATURESET/part-*.parquet          image_id, feature (fixed_size_list<float32|float16>[dim])
  _provenance/FEATURESET.json        provenance, written first (also in every shard's metadata)
  _errors/FEATURESET/part-*.parquet  images that could not be read or decoded, bad scan rows
  _npy/FEATURESET/part-*.npy         with --npy: the same rows as a NumPy array

features/FEATURESET/ holds nothing but its feature shards, so it opens as exactly its rows
with any reader given the folder, no glob: pandas, pyarrow, Polars (read and scan), DuckDB,
Spark (float32 only), Hugging Face datasets, Ray Data. The writer's lock lives under the
workspace's .locks/; a featureset of an older layout is moved to this one when opened.

FEATURESET is <backbone>-<size>-<pooling or layer>-<dtype>-<fingerprint8>; the fingerprint
covers everything that changes the numbers (backbone, weights file hash or 'none' + seed,
input size, pooling or layer, interpolation, --fast-decode, EXIF mode, precision, storage
dtype, and the decoder when it is the GPU's).

Decoded uint8 batches go to the model as they are: the backbone family's preprocess_input runs
inside the compiled model call, and --in-flight batches are kept submitted to the device while
the host fetches results and writes shards.

Features are keyed by image content, so a featureset is a cache shared by all datasets:
an image already extracted (under any path, for any dataset) is never extracted again, a
rerun with nothing new builds no model, and an interrupted run resumes where its last
committed shard ended. Bad images become error rows, never a failed run. A file whose bytes
changed since the scan is an error row (changed_since_scan), never a feature under the old
id; it and files that could not be read (gone, no permission, not a regular file) are tried
again from another copy of the same bytes, and by the next run, while images whose bytes
failed to decode stay error rows.
"""

EPILOG = """\
examples:
  imgfeat extract --dataset photos --backbone mobilenet_v2
  imgfeat extract --dataset photos --backbone resnet50 --precision bfloat16 --batch-size 64
  imgfeat extract --dataset shots --backbone efficientnet_lite0 --fast-decode --npy --json
  imgfeat extract --dataset photos --backbone mobilenet_v2 --layer block_13_expand_relu
  imgfeat extract --dataset tiny --backbone mobilenet_v2 --weights none --input-size 32
  imgfeat extract --dataset photos --backbone resnet50 --executor ray --ray-address auto --ray-actors 4

query the folder with anything that reads Parquet, e.g.
  python -c "import pandas as pd; print(pd.read_parquet('data/features/FEATURESET').shape)"

exit codes: 0 done (bad images are error rows), 2 bad flag or unknown dataset/backbone,
3 finished but more than --max-error-rate of the images are error rows, 1 other failure
(e.g. another extract is writing the same featureset: see --wait; or the disk is full)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "extract",
        handle,
        help="extract backbone features of a dataset into a featureset",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    add_config_flags(p, ExtractConfig, ["dataset"])
    p.add_argument(
        "--name",
        metavar="RECIPE",
        help="a recipe name for this featureset (as a job file's [features.NAME]); "
        "'train --featureset RECIPE' then means its latest featureset",
    )
    add_config_flags(
        p,
        ExtractConfig,
        [
            "backbone",
            "weights",
            "seed",
            "pooling",
            "layer",
            "input_size",
            "batch_size",
            "precision",
            "dtype",
            "shard_size",
            "npy",
            "interpolation",
            "fast_decode",
            "exif",
            "workers",
            "decode",
        ],
    )
    add_config_flags(p, ExecutorConfig, ["in_flight"])
    add_config_flags(p, ExtractConfig, ["max_file_bytes", "wait"])
    p.add_argument(
        "--max-error-rate",
        type=ranged("max_error_rate"),
        metavar="F",
        help="exit 3 when more than this fraction of the dataset's images are error rows",
    )
    r = p.add_argument_group("scaling out (pip install 'imgfeat[ray]')")
    add_config_flags(r, ExecutorConfig, ["name", "address", "actors", "gpus_per_worker"])


def handle(args: argparse.Namespace, ctx: JobContext) -> Summary:
    if args.name:
        check_recipe_name(args.name)  # before any work, not after it
    cfg = ExtractConfig(**config_values(ExtractConfig, args))
    executor = ExecutorConfig(**config_values(ExecutorConfig, args), workers=args.workers)
    summary = run_extract(ctx.ws, cfg, ctx.run_id, executor)
    ctx.record.summary.update(summary.to_json())
    if args.name:
        record_recipe_name(ctx.ws, args.name, summary.featureset)
    if not args.json:
        print(_human(summary))
    check_extract_error_rate(summary, args.max_error_rate)
    return summary


def _human(s: ExtractSummary) -> str:
    codes = ", ".join(f"{k} {v}" for k, v in s.errors_by_code.items())
    work = (
        f"{s.extracted} extracted, {s.images_per_s_loop} img/s over the model loop and "
        f"{s.images_per_s} img/s over the whole run (model build {s.build_seconds} s, model "
        f"{s.model_seconds} s, decode {s.decode_seconds} s)"
        if s.model_built
        else "nothing new: no model work"
    )
    return (
        f"{s.dataset} -> {s.featureset}: {work}; {s.reused} reused, "
        f"{s.duplicates} duplicates, {s.errors_new} new error rows"
        + (f" ({codes})" if codes else "")
        + f", {s.shards} shards written"
    )
