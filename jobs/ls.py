"""`imgfeat ls`: the datasets, featuresets, heads (and indexes) a workspace holds."""

from __future__ import annotations

import argparse

from imgfeat.cli.common import JobContext, Summary, add_command
from imgfeat.tools.catalog import list_workspace

DESCRIPTION = """\
List what the workspace holds, newest first:

  datasets     rows, readable images, labels, when scanned
  featuresets  recipe name(s), backbone, feature rows, error rows, datasets covered, created
  heads        name, kind, test accuracy, created, and which version is the latest of its name
  indexes      nearest-neighbour indexes ('imgfeat index'), when there are any
  damaged      a line for each unreadable file (a name index, a head.json, a manifest, ...),
               naming it; everything else is still listed

A head's name (a job file's [heads.NAME], 'imgfeat train --name', default <dataset>-<kind>)
always means its latest version; NAME@ID pins one. 'imgfeat prune' removes the rest.
"""

EPILOG = """\
examples:
  imgfeat ls
  imgfeat ls --json | jq '.heads[] | select(.latest)'
"""


def register(sub: argparse._SubParsersAction) -> None:
    add_command(
        sub,
        "ls",
        handle,
        help="list datasets, featuresets, heads and indexes",
        description=DESCRIPTION,
        epilog=EPILOG,
        record_run=False,
    ).set_defaults(reads_workspace=True)  # no run record, but a bucket workspace is pulled first


def handle(args: argparse.Namespace, ctx: JobContext) -> Summary:
    out = list_workspace(ctx.ws).to_json()
    if not args.json:
        print_catalog(out)
    return out


def _pct(value) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "-"


def _day(text: str | None) -> str:
    return (text or "-")[:16].replace("T", " ")


def print_catalog(out: dict) -> None:
    print(f"workspace {out['root']}")
    print("\ndatasets" if out["datasets"] else "\ndatasets: none ('imgfeat scan' makes one)")
    for d in out["datasets"]:
        print(
            f"  {d['name']:<24} {d['rows']:>8,} rows {d['ok']:>8,} readable {d['labels']:>4} labels  "
            f"{_day(d['created'])}"
        )
    print("\nfeaturesets" if out["featuresets"] else "\nfeaturesets: none ('imgfeat extract' makes one)")
    for f in out["featuresets"]:
        recipe = ",".join(f["recipes"]) or "-"
        covered = ", ".join(f"{d} {n:,}" for d, n in f["datasets"].items()) or "no dataset"
        print(
            f"  {f['featureset']:<48} recipe {recipe:<12} {f['rows']:>8,} rows {f['errors']:>5,} errors  "
            f"{_day(f['created'])}  ({covered})"
        )
    print("\nheads" if out["heads"] else "\nheads: none ('imgfeat train' makes one)")
    for h in out["heads"]:
        mark = "latest" if h["latest"] else "      "
        kind = h["model_kind"] if h["kind"] == h["model_kind"] else f"{h['kind']}->{h['model_kind']}"
        print(f"  {h['name']:<24} {mark} {h['head_id']:<36} {kind:<12} {_pct(h['accuracy']):>6}  {_day(h['created'])}")
    if out.get("damaged"):
        print("\ndamaged files (what each describes is left out above, or listed by id)")
        for line in out["damaged"]:
            print(f"  {line}")
    if out["indexes"]:
        print("\nindexes")
        for i in out["indexes"]:
            if "error" in i:  # damaged: its name and what is wrong
                print(f"  {i.get('name', '-'):<24} damaged: {i['error']}")
                continue
            print(
                f"  {i.get('name', '-'):<24} {i.get('rows', 0):>8,} rows  {_index_kind(i):<28} "
                f"featureset {i.get('featureset', '-')}  ({', '.join(i.get('datasets') or []) or 'the whole featureset'})"
            )


def _index_kind(info: dict) -> str:
    """``ivf (nlist 1025, nprobe 64)``: the kind and the parameters it has, not a raw dict."""
    params = info.get("params") or {}
    kind = info.get("kind") or params.get("kind") or "-"
    # a flat index's training fields are all 0: only what tells something is said
    said = [f"{k} {v}" for k, v in params.items() if k != "kind" and v not in (None, "", [], {}, 0)]
    return f"{kind} ({', '.join(said)})" if said else kind
