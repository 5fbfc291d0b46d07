"""What `imgfeat run` and `imgfeat demo` print for a person at the end of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imgfeat.core.workspace import Workspace


def _rel(path: Path | str) -> str:
    p = Path(path)
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def print_run_summary(ws: Workspace, summary: dict[str, Any]) -> None:
    for name, s in summary.get("scan", {}).items():
        print(f"scan     {name:<24} {s['files']} files "
              f"({s['added']} added, {s['changed']} changed, {s['removed']} removed)")
    for key, s in summary.get("extract", {}).items():
        speed = f" at {s['images_per_s']:.1f} img/s" if s["extracted"] else ""
        print(f"extract  {key:<24} {s['extracted']} extracted{speed}, {s['reused']} reused, "
              f"{s['errors']['new']} new errors -> {_rel(ws.featureset_dir(s['featureset']))}")
    for name, s in summary.get("train", {}).items():
        print(f"train    {name:<24} test accuracy {s['metrics']['test_accuracy']:.1%}"
              f"{' (reused)' if s['reused'] else ''} -> {_rel(ws.head_dir(s['head_id']))}")
    for key, s in summary.get("predict", {}).items():
        print(f"predict  {key:<24} {s['written']} new rows")
    for name, s in summary.get("report", {}).items():
        print(f"report   {name:<24} {_rel(s['report'])}")
    for name, s in summary.get("index", {}).items():
        print(f"index    {name:<24} {s['rows']} images ({s['added']} added, kind {s['kind']})")
    for key, r in summary.get("error_rates", {}).items():
        if r["errors"]:
            print(f"errors   {key:<24} {r['errors']} of {r['images']} images ({r['rate']:.1%})")
