"""The typed summary of `imgfeat run`: each stage's typed result by job-file name, and its JSON both ways."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from imgfeat.core.results import JsonObject
from imgfeat.extract.extract import ExtractSummary
from imgfeat.finetune.train import FinetuneSummary
from imgfeat.heads.predict import PredictSummary
from imgfeat.heads.report import ReportSummary
from imgfeat.heads.train import TrainSummary
from imgfeat.index.build import IndexSummary
from imgfeat.index.dedup import DedupSummary
from imgfeat.scan.scan import ScanSummary

NO_ACCURACY = "no_accuracy"  # the key a head's train entry carries when it has no test accuracy


@dataclass(frozen=True)
class ErrorRate:
    """Images of one dataset x featureset that ended as error rows, against all of its images."""

    errors: int
    images: int

    @property
    def rate(self) -> float:
        return self.errors / self.images if self.images else 0.0

    def to_json(self) -> JsonObject:
        return {"errors": self.errors, "images": self.images, "rate": self.rate}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ErrorRate:
        return cls(obj["errors"], obj["images"])


# What a stage's items are, as its results name them (summed over the stage's results) and as a
# person reads them; train and report are left out: their time is not per item.
STAGE_ITEMS: dict[str, tuple[str, str]] = {
    "scan": ("files", "files"),
    "extract": ("extracted", "img"),
    "predict": ("written", "rows"),
    "index": ("added", "rows"),
    "dedup": ("images", "img"),
}


@dataclass(frozen=True)
class RunSummary:
    """What one `imgfeat run` did, stage by stage; filled as the stages finish, so a failed run
    still reports the stages it completed. Each stage's typed result, keyed as in the job file.
    """

    job: str
    scan: dict[str, ScanSummary] = field(default_factory=dict)
    finetune: dict[str, FinetuneSummary] = field(default_factory=dict)  # only when the job has some
    extract: dict[str, ExtractSummary] = field(default_factory=dict)  # "<features>/<dataset>"
    train: dict[str, TrainSummary] = field(default_factory=dict)  # head name
    predict: dict[str, PredictSummary] = field(default_factory=dict)  # "<head>/<dataset>"
    report: dict[str, ReportSummary] = field(default_factory=dict)  # head name
    index: dict[str, IndexSummary] = field(default_factory=dict)  # only when the job declares indexes
    dedup: dict[str, DedupSummary] = field(default_factory=dict)  # only when the job declares [dedup.NAME]
    no_accuracy: dict[str, str] = field(default_factory=dict)  # head name -> why it has no accuracy
    timings: dict[str, float] = field(default_factory=dict)
    error_rates: dict[str, ErrorRate] = field(default_factory=dict)  # "<features>/<dataset>"

    @property
    def model_work(self) -> bool:
        """Whether any backbone ran or any head was trained (False for a run with nothing new)."""
        return (
            any(s.extracted for s in self.extract.values())
            or any(not s.reused for s in self.train.values())
            or any(not s.reused for s in self.finetune.values())
        )

    @property
    def items_per_s(self) -> dict[str, float]:
        """Items per second of each timed stage that did some (``STAGE_ITEMS``), over the stage's whole time."""
        out: dict[str, float] = {}
        for stage, (key, _) in STAGE_ITEMS.items():
            items = sum(getattr(r, key) or 0 for r in getattr(self, stage).values())
            seconds = self.timings.get(stage)
            if items and seconds:
                out[stage] = round(items / seconds, 1)
        return out

    def to_json(self) -> JsonObject:
        train: JsonObject = {
            name: {**s.to_json(), **({NO_ACCURACY: self.no_accuracy[name]} if name in self.no_accuracy else {})}
            for name, s in self.train.items()
        }
        return {
            "job": self.job,
            "scan": {k: v.to_json() for k, v in self.scan.items()},
            **({"finetune": {k: v.to_json() for k, v in self.finetune.items()}} if self.finetune else {}),
            "extract": {k: v.to_json() for k, v in self.extract.items()},
            "train": train,
            "predict": {k: v.to_json() for k, v in self.predict.items()},
            "report": {k: v.to_json() for k, v in self.report.items()},
            **({"index": {k: v.to_json() for k, v in self.index.items()}} if self.index else {}),
            **({"dedup": {k: v.to_json() for k, v in self.dedup.items()}} if self.dedup else {}),
            "timings": dict(self.timings),
            "model_work": self.model_work,
            "error_rates": {k: v.to_json() for k, v in self.error_rates.items()},
            "items_per_s": dict(self.items_per_s),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> RunSummary:
        """The summary back from its JSON object (runs/<run_id>.json holds it)."""
        # The stages load here, not at import: `imgfeat --help` imports this module.

        return cls(
            job=obj["job"],
            scan=_each(obj, "scan", ScanSummary.from_json),
            finetune=_each(obj, "finetune", FinetuneSummary.from_json),
            extract=_each(obj, "extract", ExtractSummary.from_json),
            train=_each(obj, "train", TrainSummary.from_json),
            predict=_each(obj, "predict", PredictSummary.from_json),
            report=_each(obj, "report", ReportSummary.from_json),
            index=_each(obj, "index", IndexSummary.from_json),
            dedup=_each(obj, "dedup", DedupSummary.from_json),
            no_accuracy={k: v[NO_ACCURACY] for k, v in obj.get("train", {}).items() if NO_ACCURACY in v},
            timings=dict(obj.get("timings", {})),
            error_rates=_each(obj, "error_rates", ErrorRate.from_json),
        )


R = TypeVar("R")


def _each(obj: Mapping[str, Any], key: str, from_json: Callable[[Mapping[str, Any]], R]) -> dict[str, R]:
    """One stage's results by name, back from their JSON objects (a stage the run did not have: none)."""
    return {name: from_json(value) for name, value in obj.get(key, {}).items()}
