"""What `imgfeat run` and `imgfeat demo` print for a person at the end of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.workspace import Workspace


def _rel(path: Path | str) -> str:
    p = Path(path)
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _count(value: Any) -> int:
    """Error counts come as a number or as {'new': n, 'by_code': {...}, ...}."""
    return int(value.get("new", 0)) if isinstance(value, dict) else int(value or 0)


def print_run_summary(ws: Workspace, summary: dict[str, Any]) -> None:
    for name, s in summary.get("scan", {}).items():
        print(f"scan     {name:<24} {s.get('files', s.get('rows', '?'))} files "
              f"({s.get('added', 0)} added, {s.get('changed', 0)} changed, {s.get('removed', 0)} removed)")
    for key, s in summary.get("extract", {}).items():
        rate = s.get("images_per_s")
        speed = f" at {rate:.1f} img/s" if rate and s.get("extracted") else ""
        print(f"extract  {key:<24} {s.get('extracted', 0)} extracted{speed}, {s.get('reused', 0)} reused, "
              f"{_count(s.get('errors', 0))} new errors -> {_rel(ws.featureset_dir(s['featureset']))}")
    for name, s in summary.get("train", {}).items():
        m = s.get("metrics", {})
        acc = m.get("test_accuracy")
        acc_text = f"test accuracy {acc:.1%}" if isinstance(acc, (int, float)) else ""
        print(f"train    {name:<24} {acc_text}{' (reused)' if s.get('reused') else ''} "
              f"-> {_rel(ws.head_dir(s['head_id']))}")
    for key, s in summary.get("predict", {}).items():
        print(f"predict  {key:<24} {s.get('written', s.get('rows', 0))} new rows")
    for name, s in summary.get("report", {}).items():
        print(f"report   {name:<24} {_rel(s.get('report', s.get('path', '')))}")
    for key, r in summary.get("error_rates", {}).items():
        if r["errors"]:
            print(f"errors   {key:<24} {r['errors']} of {r['images']} images ({r['rate']:.1%})")
