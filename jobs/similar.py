"""`imgfeat similar (IMAGE... | --image-id ID... | --text T...) --index N`: the nearest images in an index."""

from __future__ import annotations

import argparse

from imgfeat.cli.common import JobContext, Summary, add_command, ranged, require
from imgfeat.core.storage import write_bytes_atomic
from imgfeat.index import Index
from imgfeat.index.page import render_similar_page

DESCRIPTION = """\
Print the most similar images in an index ('imgfeat index') for each query: image files
(their features are extracted into the index's featureset, cached by content, as
'imgfeat predict FILE' does) or images already in the featureset (--image-id). A query
never lists itself. --text "a red car" ranks the images by the cosine to the text's embedding,
for an index on a CLIP or SigLIP keras-hub featureset (the preset's tokenizer and text tower,
at its default sequence length). One line per query: 'query.jpg: 0.982 a.jpg, 0.951 b.jpg, ...'.

With --json the summary holds 'results': [{query, image_id, neighbours: [{image_id, path,
similarity}]}], similarity being the cosine of the two feature vectors. --html PATH also
writes the results as a page: each query's thumbnail and its neighbours', one file.
"""

EPILOG = """\
examples:
  imgfeat similar --index photos query.jpg other.png --top 5
  imgfeat similar --index photos --image-id 3fa9c2... --json
  imgfeat similar --index photos query.jpg --html similar.html
  imgfeat similar --index photos --text "a red car" --top 20
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "similar", handle, help="find the most similar images in an index", description=DESCRIPTION, epilog=EPILOG
    )
    p.add_argument("images", nargs="*", metavar="IMAGE", help="query image files")
    p.add_argument(
        "--image-id",
        dest="image_ids",
        action="append",
        default=[],
        metavar="ID",
        help="query an image already in the featureset by its image_id, or a unique prefix of "
        "8+ hex digits (repeatable)",
    )
    p.add_argument(
        "--text",
        dest="texts",
        action="append",
        default=[],
        metavar="T",
        help="query by words (CLIP / SigLIP featuresets; repeatable)",
    )
    p.add_argument("--index", required=True, metavar="NAME", help="an index from 'imgfeat index'")
    p.add_argument("--top", type=ranged("top"), default=10, metavar="K", help="neighbours per query")
    p.add_argument(
        "--featureset", default=None, metavar="FS", help="fail unless the index was built on this featureset"
    )
    p.add_argument(
        "--html",
        default=None,
        metavar="PATH",
        help="also write the results as an HTML page with thumbnails (one self-contained file)",
    )


def handle(args: argparse.Namespace, ctx: JobContext) -> Summary:
    require(
        sum(map(bool, (args.images, args.image_ids, args.texts))) == 1,
        "give image files, --image-id IDs or --text T (one of the three)",
    )
    html_target = _html_target(args.html) if args.html else None  # checked before any work
    index = Index.open(ctx.ws, args.index)
    if args.featureset:
        index.check_featureset(args.featureset)
    if args.texts:
        results = index.search_text(args.texts, args.top)
    else:
        results = (
            index.search_ids(args.image_ids, args.top)
            if args.image_ids
            else index.search_files(args.images, args.top, run_id=ctx.run_id)
        )
    page = _write_page(html_target, index, results, ctx.run_id) if html_target else None
    if not args.json:
        for r in results:
            print(format_result(r))
        if page:
            print(f"page: {page}")
    return {
        "index": index.name,
        "featureset": index.featureset,
        "top": args.top,
        "results": [r.to_json() for r in results],
        **({"page": page} if page else {}),
    }


def _html_target(path: str):
    from pathlib import Path

    target = Path(path).absolute()
    require(target.suffix.lower() in (".html", ".htm"), f"--html needs a .html file name, got {path!r}")
    require(not target.is_dir(), f"--html {path} is a folder; give a file name such as similar.html")
    return target


def _write_page(target, index, results, run_id: str) -> str:
    page = render_similar_page(index.name, index.featureset, results, index.path_of, run_id)
    write_bytes_atomic(page.encode("utf-8"), target)
    return str(target)


def format_result(result) -> str:
    if result.error:
        return f"{result.query}: error {result.error}"
    near = ", ".join(f"{n.similarity:.3f} {n.path or n.image_id}" for n in result.neighbours)
    return f"{result.query}: {near or 'no neighbours'}"
