"""`imgfeat run`: scan -> finetune -> extract -> train -> predict -> report for a job file, each only doing new work."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from imgfeat import heads as H  # H.run_predict, ...: looked up when called (tests patch them)
from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError
from imgfeat.core.results import JsonObject
from imgfeat.core.storage import WAIT_HINT, FileLock
from imgfeat.core.workspace import Workspace
from imgfeat.extract.executors import ExecutorConfig
from imgfeat.extract.extract import (
    ExtractConfig,
    ExtractSummary,
    check_error_rate,
    plan_extract,
    record_recipe_name,
    run_extract,
)
from imgfeat.extract.featureset import errored_ids
from imgfeat.finetune import FinetuneConfig, run_finetune
from imgfeat.heads.train import TrainConfig, TrainSummary
from imgfeat.index import IndexConfig, build_index
from imgfeat.index.dedup import DedupConfig, run_dedup
from imgfeat.run.jobfile import DedupJob, FeatureJob, FinetuneJob, HeadJob, IndexJob, JobSpec, build_config
from imgfeat.run.summary import ErrorRate, RunSummary
from imgfeat.scan.manifest import read_manifest
from imgfeat.scan.scan import ScanConfig, plan_scan, resolve_root, run_scan

log = logging.getLogger(__name__)

STAGES = ("scan", "finetune", "extract", "train", "predict", "report", "index", "dedup")
TUNED_PLACEHOLDER = "<tuned weights of finetune.{}>"


@contextlib.contextmanager
def stage_lock(ws: Workspace, stage: str, wait: float | None) -> Iterator[None]:
    """One lock per workspace stage: overlapping cron runs take turns instead of colliding."""
    with FileLock(ws.locks_dir / f"{stage}.lock", f"the {stage} stage of workspace {ws.root}", wait, hint=WAIT_HINT):
        yield


def scan_config(job: JobSpec, dataset: str):
    where = f"datasets.{dataset}"
    return build_config(ScanConfig, job.datasets[dataset], where, dataset=dataset, wait=job.wait)


def extract_config(job: JobSpec, fjob: FeatureJob, dataset: str, tuned: dict[str, str] | None = None):
    where = f"features.{fjob.name}"
    if fjob.finetune is None:
        return build_config(ExtractConfig, fjob.options, where, dataset=dataset, wait=job.wait)
    # Features of a fine-tune: its backbone and input size unless the section says otherwise, its weights.
    ft = finetune_config(job, next(f for f in job.finetunes if f.name == fjob.finetune))
    values = {"backbone": ft.backbone, "input_size": ft.input_size, **fjob.options}
    weights = (tuned or {}).get(fjob.finetune, TUNED_PLACEHOLDER.format(fjob.finetune))
    return build_config(ExtractConfig, values, where, dataset=dataset, wait=job.wait, weights=weights)


def finetune_config(job: JobSpec, ftjob: FinetuneJob):
    return build_config(
        FinetuneConfig, ftjob.options, f"finetune.{ftjob.name}", dataset=ftjob.dataset, name=ftjob.name, wait=job.wait
    )


def budgeted(job: JobSpec, options: dict) -> dict:
    """A stage table's options with [run] memory_budget as its default."""
    return options if job.memory_budget is None else {"memory_budget": job.memory_budget, **options}


def stage_budget(job: JobSpec, hjob: HeadJob) -> int | str | None:
    """The memory budget of a head's predict and report: its table's, else [run]'s."""
    return hjob.options.get("memory_budget", job.memory_budget)


def executor_config(job: JobSpec):
    """[run] executor and its options (workers, ray_actors, ray_address, gpus_per_worker)."""
    return ExecutorConfig(name=job.executor, **job.executor_options)


def train_config(job: JobSpec, hjob: HeadJob, featureset: str):
    return build_config(
        TrainConfig,
        budgeted(job, hjob.options),
        f"heads.{hjob.name}",
        dataset=hjob.dataset,
        featureset=featureset,
        name=hjob.name,
        wait=job.wait,
    )


def index_config(job: JobSpec, ijob: IndexJob, featureset: str):
    return build_config(
        IndexConfig,
        budgeted(job, ijob.options),
        f"indexes.{ijob.name}",
        featureset=featureset,
        datasets=ijob.datasets,
        name=ijob.name,
        wait=job.wait,
        rebuild=False,
    )


def dedup_config(djob: DedupJob, featureset: str, job: JobSpec | None = None):
    return build_config(
        DedupConfig,
        djob.options if job is None else budgeted(job, djob.options),
        f"dedup.{djob.name}",
        featureset=featureset,
        dataset=djob.dataset,
        name=djob.name,
    )


def check_job(job: JobSpec) -> None:
    """Build every stage config up front, so a typo fails before any work is done."""
    for name in job.datasets:
        scan_config(job, name)
    executor_config(job)
    for ftjob in job.finetunes:
        finetune_config(job, ftjob)
    for fjob in job.features:
        for dataset in fjob.datasets:
            extract_config(job, fjob, dataset)
    for hjob in job.heads:
        train_config(job, hjob, featureset="placeholder")
    for ijob in job.indexes:
        index_config(job, ijob, featureset="placeholder")
    for djob in job.dedups:
        dedup_config(djob, featureset="placeholder", job=job)


def check_inputs(job: JobSpec) -> None:
    """Every dataset folder and labels CSV exists: a run must not fail there after taking locks."""
    for name in job.datasets:
        cfg = scan_config(job, name)
        resolve_root(cfg.root)
        if cfg.labels_csv is not None and not Path(cfg.labels_csv).is_file():
            raise ConfigError(f"datasets.{name}.labels_csv: {cfg.labels_csv} is not a file")


def plan_job(ws: Workspace, job: JobSpec) -> JsonObject:
    """What a run would do, without hashing images or building models (``--dry-run``)."""
    check_job(job)
    plan: dict[str, Any] = {"dry_run": True, "scan": {}, "finetune": {}, "extract": {}, "heads": {}}
    for ftjob in job.finetunes:
        plan["finetune"][ftjob.name] = {
            "dataset": ftjob.dataset,
            "note": "fine-tuned unless the same configuration on the same data exists (or resumed from its checkpoint)",
        }
    scans = {name: plan_scan(ws, scan_config(job, name)) for name in job.datasets}
    plan["scan"] = {name: p.to_json() for name, p in scans.items()}
    for fjob in job.features:
        for dataset in fjob.datasets:
            key = f"{fjob.name}/{dataset}"
            p: JsonObject
            if fjob.finetune is not None:
                p = {"todo": None, "note": f"extracted with the tuned weights of finetune.{fjob.finetune}"}
            elif ws.manifest_path(dataset).exists():
                p = plan_extract(ws, extract_config(job, fjob, dataset))  # (a JSON object already)
            else:
                p = {"todo": None, "note": "dataset not scanned yet"}
            p["new_or_changed_files"] = scans[dataset].new + scans[dataset].changed
            plan["extract"][key] = p
    for hjob in job.heads:
        plan["heads"][hjob.name] = {
            "dataset": hjob.dataset,
            "features": hjob.features,
            "predict": list(hjob.predict),
            "report": hjob.report,
            "note": "trained unless an identical head (same features, labels, params) exists",
        }
    plan["indexes"] = {
        i.name: {
            "features": i.features,
            "datasets": list(i.datasets),
            "note": "extended with the rows extract adds; nothing new writes nothing",
        }
        for i in job.indexes
    }
    plan["dedup"] = {
        d.name: {
            "features": d.features,
            "dataset": d.dataset,
            "note": "new images' looks are computed, the rest cached; nothing new writes nothing",
        }
        for d in job.dedups
    }
    return plan


def run_job_spec(ws: Workspace, job: JobSpec, run_id: str, summary: RunSummary | None = None) -> RunSummary:
    """Run every stage in order; fills ``summary`` as it goes (so a failure still reports)."""
    summary = summary if summary is not None else RunSummary(job.source)
    check_job(job)
    check_inputs(job)
    timings = summary.timings
    _timed(timings, "scan", lambda: _scan_all(ws, job, run_id, summary))
    tuned = _timed(timings, "finetune", lambda: _finetune_all(ws, job, run_id, summary)) if job.finetunes else {}
    featuresets = _timed(timings, "extract", lambda: _extract_all(ws, job, run_id, summary, tuned))
    heads = _timed(timings, "train", lambda: _train_all(ws, job, featuresets, run_id, summary))
    _timed(timings, "predict", lambda: _predict_all(ws, job, heads, run_id, summary))
    _timed(timings, "report", lambda: _report_all(ws, job, heads, run_id, summary))
    if job.indexes:
        _timed(timings, "index", lambda: _index_all(ws, job, featuresets, run_id, summary))
    if job.dedups:
        _timed(timings, "dedup", lambda: _dedup_all(ws, job, featuresets, run_id, summary))
    _check_error_rate(ws, job, featuresets, summary)
    return summary


def _timed(timings: dict[str, float], stage: str, fn):
    t0 = time.perf_counter()
    out = fn()
    timings[stage] = round(time.perf_counter() - t0, 3)
    return out


def _scan_all(ws: Workspace, job: JobSpec, run_id: str, summary: RunSummary) -> None:
    with stage_lock(ws, "scan", job.wait):
        for name in job.datasets:
            summary.scan[name] = run_scan(ws, scan_config(job, name), run_id)


def _finetune_all(ws: Workspace, job: JobSpec, run_id: str, summary: RunSummary) -> dict[str, str]:
    """Returns {finetune name: path of its tuned backbone weights}."""
    tuned = {}
    with stage_lock(ws, "finetune", job.wait):
        for ftjob in job.finetunes:
            out = run_finetune(ws, finetune_config(job, ftjob), run_id)
            summary.finetune[ftjob.name] = out
            tuned[ftjob.name] = out.weights
    return tuned


def _extract_all(
    ws: Workspace, job: JobSpec, run_id: str, summary: RunSummary, tuned: dict[str, str] | None = None
) -> dict[tuple[str, str], str]:
    """Returns {(features name, dataset): featureset}."""
    featuresets: dict[tuple[str, str], str] = {}
    with stage_lock(ws, "extract", job.wait):
        for fjob in job.features:
            for dataset in fjob.datasets:
                out = _extract_one(ws, job, extract_config(job, fjob, dataset, tuned), run_id)
                summary.extract[f"{fjob.name}/{dataset}"] = out
                featuresets[(fjob.name, dataset)] = out.featureset
                record_recipe_name(ws, fjob.name, out.featureset)  # the recipe's latest
    return featuresets


def _extract_one(ws: Workspace, job: JobSpec, cfg, run_id: str) -> ExtractSummary:
    return run_extract(ws, cfg, run_id, executor_config(job))


def _train_all(ws: Workspace, job: JobSpec, featuresets: dict, run_id: str, summary: RunSummary) -> dict[str, str]:
    heads: dict[str, str] = {}
    with stage_lock(ws, "train", job.wait):
        for hjob in job.heads:
            fs = featuresets[(hjob.features, hjob.dataset)]
            out = H.run_train(ws, train_config(job, hjob, fs), run_id)
            summary.train[hjob.name] = out
            reason = no_accuracy_reason(out)
            if reason is not None:
                summary.no_accuracy[hjob.name] = reason
            heads[hjob.name] = out.head_id
    return heads


def no_accuracy_reason(train: TrainSummary) -> str | None:
    """Why a trained head has no test accuracy; None when it has one."""
    if train.metrics.get("test_accuracy") is not None:
        return None
    unseen = (train.left_out or {}).get("unseen_test_labels", 0)
    if unseen:
        return (
            f"no evaluation rows: the {unseen} test rows all have labels the training rows do not "
            "have, so none can be scored"
        )
    return "no evaluation rows: the dataset has no test or val split and test_fraction is 0"


def _predict_all(ws: Workspace, job: JobSpec, heads: dict[str, str], run_id: str, summary: RunSummary) -> None:
    with stage_lock(ws, "predict", job.wait):
        for hjob in job.heads:
            for dataset in hjob.predict:
                cfg = H.PredictConfig(
                    head_id=heads[hjob.name],
                    dataset=dataset,
                    wait=job.wait,
                    trust_pickle=job.trust_pickle,
                    memory_budget=stage_budget(job, hjob),
                )
                summary.predict[f"{hjob.name}/{dataset}"] = H.run_predict(ws, cfg, run_id)


def _report_all(ws: Workspace, job: JobSpec, heads: dict[str, str], run_id: str, summary: RunSummary) -> None:
    with stage_lock(ws, "report", job.wait):
        for hjob in job.heads:
            if hjob.report:
                cfg = H.ReportConfig(
                    head_id=heads[hjob.name],
                    wait=job.wait,
                    trust_pickle=job.trust_pickle,
                    memory_budget=stage_budget(job, hjob),
                )
                summary.report[hjob.name] = H.run_report(ws, cfg, run_id)


def _index_all(ws: Workspace, job: JobSpec, featuresets: dict, run_id: str, summary: RunSummary) -> None:
    for ijob in job.indexes:
        fs = featuresets[(ijob.features, ijob.datasets[0])]  # one recipe: the same featureset for every dataset
        summary.index[ijob.name] = build_index(ws, index_config(job, ijob, fs), run_id)


def _dedup_all(ws: Workspace, job: JobSpec, featuresets: dict, run_id: str, summary: RunSummary) -> None:
    for djob in job.dedups:
        fs = featuresets[(djob.features, djob.dataset)]
        summary.dedup[djob.name] = run_dedup(ws, dedup_config(djob, fs, job), run_id)


def error_rate(ws: Workspace, dataset: str, featureset: str) -> tuple[int, int]:
    """(images that ended as error rows, images in the manifest) for one dataset x featureset."""
    table = read_manifest(ws, dataset, columns=[S.IMAGE_ID, S.STATUS])
    errored = pa.array(sorted(errored_ids(ws, featureset)), pa.string())
    bad = pc.or_(pc.not_equal(table[S.STATUS], S.STATUS_OK), pc.is_in(table[S.IMAGE_ID], value_set=errored))
    return int(pc.sum(pc.fill_null(bad, False)).as_py() or 0), table.num_rows


def _check_error_rate(ws: Workspace, job: JobSpec, featuresets: dict, summary: RunSummary) -> None:
    rates = summary.error_rates
    for (fname, dataset), fs in featuresets.items():
        rates[f"{fname}/{dataset}"] = ErrorRate(*error_rate(ws, dataset, fs))

    check_error_rate({k: (v.errors, v.images) for k, v in rates.items()}, job.max_error_rate)
