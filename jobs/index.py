"""`imgfeat index --featureset FS`: build or extend a nearest-neighbour index over a featureset."""

from __future__ import annotations

import argparse

from imgfeat.cli.common import JobContext, Summary, add_command, add_config_flags, config_values
from imgfeat.heads.versions import resolve_featureset
from imgfeat.index.build import IndexConfig, build_index

DESCRIPTION = """\
Build a FAISS nearest-neighbour index over a featureset's L2-normalised features (cosine
similarity): its image_id order in indexes/<name>/ids.parquet (image_id, dataset, path; the
only file there, so Parquet readers open the folder as its rows), the index file and its
provenance beside it in indexes/_files/<name>/ (_index-<run>.faiss, and _index.json: featureset
and its fingerprint, datasets, rows, kind and parameters).

--kind auto is exact (flat) up to 50,000 rows and an IVF index beyond, trained on a sample.
Incremental: a rerun adds only images that are new in the featureset (or datasets); with
nothing new it writes nothing. 'imgfeat similar' and the Python API (imgfeat.index.Index)
search it. --rebuild builds it again from the featureset: the way back from damaged files.
"""

EPILOG = """\
examples:
  imgfeat index --featureset efficientnet_lite0-224-avg-float16-1a2b3c4d --dataset photos
  imgfeat index --featureset FS --name photos --kind hnsw
  imgfeat similar --index photos query.jpg --top 5
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "index",
        handle,
        help="build or extend a similarity index over a featureset",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    add_config_flags(p, IndexConfig, ["featureset"])
    p.add_argument(
        "--dataset",
        dest="datasets",
        action="append",
        default=[],
        metavar="NAME",
        help="index only this dataset's images (repeatable; default: the whole featureset)",
    )
    add_config_flags(p, IndexConfig, ["name", "kind", "nlist", "nprobe", "memory_budget", "rebuild", "wait"])


def handle(args: argparse.Namespace, ctx: JobContext) -> Summary:
    values = config_values(IndexConfig, args)
    cfg = IndexConfig(
        **{**values, "featureset": resolve_featureset(ctx.ws, args.featureset)}, datasets=tuple(args.datasets)
    )
    out = build_index(ctx.ws, cfg, ctx.run_id)
    if not args.json:
        if out.written:
            how = "rebuilt" if out.rebuilt else f"{out.added} added"
            print(f"index {out.index}: {out.rows} images ({how}), kind {out.kind}, in {out.index_dir}")
        else:
            print(f"index {out.index}: {out.rows} images, nothing new")
    return out.to_json()
