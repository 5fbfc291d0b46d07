"""`imgfeat extract --dataset NAME --backbone NAME`: a dataset manifest into a featureset."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from imgfeat.cli.common import JobContext, Summary, add_command, ranged, seconds

if TYPE_CHECKING:  # a type only: --help imports nothing heavy
    from imgfeat.extract.extract import ExtractSummary

PROCESS_DECODE_MIN_WORKERS = 8  # imgfeat.extract.batches' auto rule, here so --help imports nothing heavy
MAX_FILE_MIB = 1024  # the default of --max-file-bytes, in MiB (kept here so --help imports no Pillow)

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
    p = add_command(sub, "extract", handle, help="extract backbone features of a dataset into a featureset",
                    description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--dataset", required=True, metavar="NAME", help="a dataset made by 'imgfeat scan'")
    p.add_argument("--name", default=None, metavar="RECIPE",
                   help="a recipe name for this featureset (as a job file's [features.NAME]); "
                        "'train --featureset RECIPE' then means its latest featureset")
    p.add_argument("--backbone", required=True, metavar="NAME", help="e.g. mobilenet_v2, resnet50 "
                   "('imgfeat backbones' lists them)")
    p.add_argument("--weights", default="imagenet", metavar="imagenet|none|PATH",
                   help="ImageNet weights from the Keras cache, 'none' (seeded random, for tests), "
                        "or a .weights.h5 file")
    p.add_argument("--seed", type=ranged("seed"), default=0, metavar="N",
                   help="seed of the random init with --weights none")
    p.add_argument("--pooling", default="avg", metavar="avg|max", help="global pooling of the last feature map")
    p.add_argument("--layer", default=None, metavar="NAME",
                   help="tap this inner layer (pooled with --pooling) instead of the last one")
    p.add_argument("--input-size", type=ranged("input_size"), default=None, metavar="N",
                   help="square input side (default: the backbone's, e.g. 224)")
    p.add_argument("--batch-size", type=ranged("batch_size"), default=32, metavar="N", help="images per model call")
    p.add_argument("--precision", default="float32", metavar="float32|bfloat16|float16",
                   help="compute precision (mixed policy); bfloat16 can help on recent CPUs, "
                        "float16 is for GPUs")
    p.add_argument("--dtype", default="float32", metavar="float32|float16",
                   help="storage dtype of the features (default float32; float16 halves the disk but "
                        "Spark cannot read it: 'Illegal Parquet type: FIXED_LEN_BYTE_ARRAY (FLOAT16)')")
    p.add_argument("--shard-size", type=ranged("shard_size"), default=1024, metavar="N", help="rows per shard")
    p.add_argument("--npy", action="store_true", help="also write part-*.npy sidecars (same row order)")
    p.add_argument("--interpolation", default="bilinear", metavar="NAME",
                   help="resize filter: bilinear, nearest, bicubic, lanczos, box, hamming")
    p.add_argument("--fast-decode", action="store_true",
                   help="decode large JPEGs at 1/2, 1/4 or 1/8 scale before resizing (much faster, "
                        "close to but not equal to a full decode; part of the fingerprint)")
    p.add_argument("--exif", default="rotate", metavar="rotate|ignore",
                   help="apply the EXIF orientation tag (rotate) or not, like keras.utils.load_img (ignore)")
    p.add_argument("--workers", type=ranged("workers"), default=None, metavar="N",
                   help="decoders: threads or processes here (default: the CPU count), concurrent "
                        "decode tasks with --executor ray (default: as many as the cluster fits)")
    p.add_argument("--decode", default="auto", metavar="auto|threads|processes|gpu",
                   help="where images are decoded: Pillow in threads, or in worker processes writing "
                        "into shared batch buffers (auto: processes from %d workers up, where threads "
                        "stop scaling); gpu: JPEGs decoded and resized in batches on the GPU, other "
                        "files on the CPU (pip install 'imgfeat[gpu]', KERAS_BACKEND=jax; its numbers "
                        "differ slightly from Pillow's, so it is part of the fingerprint)"
                   % PROCESS_DECODE_MIN_WORKERS)
    p.add_argument("--in-flight", type=ranged("in_flight"), default=2, metavar="N",
                   help="batches submitted to the model before the oldest result is fetched "
                        "(default 2; changes no numbers)")
    p.add_argument("--max-file-bytes", type=ranged("max_file_bytes"), default=MAX_FILE_MIB << 20, metavar="N",
                   help="a file larger than this is an error row (file_too_large), never read whole "
                        f"(default {MAX_FILE_MIB} MiB; changes no numbers)")
    p.add_argument("--wait", type=seconds, default=None, metavar="SECONDS",
                   help="wait this long for another writer of the same featureset instead of failing")
    p.add_argument("--max-error-rate", type=ranged("max_error_rate"), default=None, metavar="F",
                   help="exit 3 when more than this fraction of the dataset's images are error rows")
    r = p.add_argument_group("scaling out (pip install 'imgfeat[ray]')")
    r.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="run here, or on Ray Data: decode as CPU tasks, the backbone in an actor pool")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="'auto' (an existing cluster), 'local', 'ray://HOST:PORT' or HOST:PORT "
                        "(default: $RAY_ADDRESS, a cluster on this machine, else a private one)")
    r.add_argument("--ray-actors", type=ranged("ray_actors"), default=None, metavar="N",
                   help="backbone actors (default: one per GPU, or one per node without GPUs)")
    r.add_argument("--gpus-per-worker", type=ranged("gpus_per_worker"), default=None, metavar="G",
                   help="GPUs per backbone actor (default: 1 when the cluster has GPUs, else 0)")


def handle(args: argparse.Namespace, ctx: JobContext) -> Summary:
    from imgfeat.core.workspace import check_name
    from imgfeat.extract.executors import ExecutorConfig
    from imgfeat.extract.extract import ExtractConfig, check_error_rate, run_extract

    if args.name:
        check_name("featureset recipe", args.name)  # before any work, not after it
    cfg = ExtractConfig(
        dataset=args.dataset, backbone=args.backbone, weights=args.weights, pooling=args.pooling,
        layer=args.layer, input_size=args.input_size, batch_size=args.batch_size,
        precision=args.precision, dtype=args.dtype, shard_size=args.shard_size, npy=args.npy,
        interpolation=args.interpolation, fast_decode=args.fast_decode, exif=args.exif,
        seed=args.seed, workers=args.workers, wait=args.wait, max_file_bytes=args.max_file_bytes,
        decode=args.decode,
    )
    executor = ExecutorConfig(name=args.executor, workers=args.workers, actors=args.ray_actors,
                              address=args.ray_address, gpus_per_worker=args.gpus_per_worker,
                              in_flight=args.in_flight)
    summary = run_extract(ctx.ws, cfg, ctx.run_id, executor)
    ctx.record.summary.update(summary.to_json())
    if args.name:
        from imgfeat.core import names

        names.record(ctx.ws, names.FEATURESETS, args.name, summary.featureset)
    if not args.json:
        print(_human(summary))
    check_error_rate({f"{summary.dataset} -> {summary.featureset}": (summary.error_rows, summary.manifest_rows)},
                     args.max_error_rate)
    return summary


def _human(s: ExtractSummary) -> str:
    codes = ", ".join(f"{k} {v}" for k, v in s.errors_by_code.items())
    work = (f"{s.extracted} extracted, {s.images_per_s_loop} img/s over the model loop and "
            f"{s.images_per_s} img/s over the whole run (model build {s.build_seconds} s, model "
            f"{s.model_seconds} s, decode {s.decode_seconds} s)" if s.model_built
            else "nothing new: no model work")
    return (f"{s.dataset} -> {s.featureset}: {work}; {s.reused} reused, "
            f"{s.duplicates} duplicates, {s.errors_new} new error rows"
            + (f" ({codes})" if codes else "") + f", {s.shards} shards written")
