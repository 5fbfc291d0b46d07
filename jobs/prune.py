"""`imgfeat prune [--yes]`: remove superseded heads (with their predictions and reports) and unused featuresets."""

from __future__ import annotations

import argparse

from imgfeat.cli.common import JobContext, Summary, add_command
from imgfeat.tools.catalog import run_prune

DESCRIPTION = """\
Remove what nothing points to any more:

  heads        every version that is not the latest of its name, with its predictions
               (predictions/, file_predictions/) and its report
  featuresets  those no kept head was trained on and that are not the latest of a recipe
               name (a job file's [features.NAME], 'imgfeat extract --name')

A dry run by default: it lists what it would remove and how much space that frees. With
--yes it deletes, holding every lock of the workspace: if any writer (a run, an extract,
a train) holds one, prune exits 1 at once, naming it, and deletes nothing. The latest
version of a name is never removed.
"""

EPILOG = """\
examples:
  imgfeat prune              # what would go
  imgfeat prune --yes        # remove it
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "prune",
        handle,
        help="remove superseded heads and unused featuresets (dry run)",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    p.add_argument("--yes", action="store_true", help="delete (default: only list what would be deleted)")


def handle(args: argparse.Namespace, ctx: JobContext) -> Summary:
    out = run_prune(ctx.ws, yes=args.yes).to_json()
    if not args.json:
        print_prune(out)
    return out


def print_prune(out: dict) -> None:
    verb = "removed" if out["deleted"] else "would remove"
    if not out["folders"]:
        print("nothing to prune: every head is the latest of its name and every featureset is used")
        return
    for h in out["heads"]:
        print(f"{verb} head {h} (and its predictions and report)")
    for f in out["featuresets"]:
        print(f"{verb} featureset {f}")
    print(
        f"{len(out['folders'])} folders, {out['bytes'] / 2**20:.1f} MiB"
        + ("" if out["deleted"] else "; run 'imgfeat prune --yes' to delete")
    )
