"""What `imgfeat run` and `imgfeat demo` print for a person at the end of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imgfeat.core.workspace import Workspace
from imgfeat.run.summary import STAGE_ITEMS, RunSummary


def _rel(path: Path | str) -> str:
    p = Path(path)
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _accuracy(summary: RunSummary, head: str) -> str:
    accuracy = summary.train[head].metrics.get("test_accuracy")
    if accuracy is not None:
        return f"test accuracy {accuracy:.1%}"
    reason = summary.no_accuracy.get(head)
    return f"no test accuracy: {reason}" if reason else "no test accuracy"


def print_run_summary(ws: Workspace, summary: RunSummary) -> None:
    for name, sc in summary.scan.items():
        print(f"scan     {name:<24} {sc.files} files ({sc.added} added, {sc.changed} changed, {sc.removed} removed)")
    for key, ex in summary.extract.items():
        speed = f" at {ex.images_per_s:.1f} img/s" if ex.extracted else ""
        print(
            f"extract  {key:<24} {ex.extracted} extracted{speed}, {ex.reused} reused, {ex.errors_new} new errors "
            f"-> {_rel(ws.featureset_dir(ex.featureset))}"
        )
    for name, tr in summary.train.items():
        print(
            f"train    {name:<24} {_accuracy(summary, name)}"
            f"{' (reused)' if tr.reused else ''} -> {_rel(ws.head_dir(tr.head_id))}"
        )
    for key, pr in summary.predict.items():
        print(f"predict  {key:<24} {pr.written} new rows")
    for name, rp in summary.report.items():
        print(f"report   {name:<24} {_rel(rp.report)}")
    for name, ix in summary.index.items():
        print(f"index    {name:<24} {ix.rows} images ({ix.added} added, kind {ix.kind})")
    for key, r in summary.error_rates.items():
        if r.errors:
            print(f"errors   {key:<24} {r.errors} of {r.images} images ({r.rate:.1%})")
    if rates := summary.items_per_s:
        print(
            "speed    " + ", ".join(f"{stage} {rate:,.1f} {STAGE_ITEMS[stage][1]}/s" for stage, rate in rates.items())
        )


def print_plan(plan: dict[str, Any]) -> None:
    """``run --dry-run`` for a person: one aligned line per stage and name (``--json`` has it all)."""
    print("dry run: nothing was read beyond file stats, nothing written")
    for name, s in plan["scan"].items():
        skipped = sum((s.get("skipped") or {}).values())
        print(
            f"scan     {name:<24} {s['new']} new, {s['changed']} changed, {s['unchanged']} unchanged, "
            f"{s['removed']} removed files{f' ({skipped} skipped)' if skipped else ''} in {_rel(s['root'])}"
        )
    for name, s in plan["finetune"].items():
        print(f"finetune {name:<24} on {s['dataset']}: {s['note']}")
    for key, s in plan["extract"].items():
        if s.get("todo") is None:
            print(f"extract  {key:<24} {s.get('new_or_changed_files', 0)} new or changed files; {s['note']}")
        else:
            print(
                f"extract  {key:<24} {s['todo']} to extract, {s['done']} done "
                f"(+{s.get('new_or_changed_files', 0)} new or changed files) -> {s['featureset']}"
            )
    for name, s in plan["heads"].items():
        steps = [f"predict {', '.join(s['predict'])}"] if s["predict"] else []
        steps += ["report"] if s["report"] else []
        then = ", ".join(steps)
        print(
            f"train    {name:<24} {s['features']} on {s['dataset']}, then {then or 'nothing'}; "
            "reused when the features, labels and parameters are the same"
        )
    for name, s in plan.get("indexes", {}).items():
        print(f"index    {name:<24} {s['features']} over {', '.join(s['datasets'])}: new rows only")
