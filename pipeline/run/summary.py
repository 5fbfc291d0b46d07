"""The typed summary of `imgfeat run`, and the one adapter that reads other stages' results."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only a type here: importing the scan stage would slow `imgfeat --help`
    from imgfeat.scan.scan import ScanSummary


def stage_json(result: Any) -> dict[str, Any]:
    """A stage's result as its JSON object: ``to_json()`` of a typed summary, else the dict itself."""
    return result.to_json() if hasattr(result, "to_json") else dict(result)


def stage_value(result: Any, name: str) -> Any:
    """One field of a stage's result, typed (an attribute) or not yet typed (a dict key)."""
    return result[name] if isinstance(result, Mapping) else getattr(result, name)


@dataclass(frozen=True)
class ErrorRate:
    """Images of one dataset x featureset that ended as error rows, against all of its images."""

    errors: int
    images: int

    @property
    def rate(self) -> float:
        return self.errors / self.images if self.images else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"errors": self.errors, "images": self.images, "rate": self.rate}


# What a stage's items are, as its results name them (summed over the stage's results) and as a
# person reads them; train and report are left out: their time is not per item.
STAGE_ITEMS: dict[str, tuple[str, str]] = {"scan": ("files", "files"), "extract": ("extracted", "img"),
                                           "predict": ("written", "rows"), "index": ("added", "rows"),
                                           "dedup": ("images", "img")}


@dataclass(frozen=True)
class RunSummary:
    """What one `imgfeat run` did, stage by stage; filled as the stages finish, so a failed run
    still reports the stages it completed.

    ``extract``, ``train``, ``predict`` and ``report`` hold each stage's own result (typed or a
    dict; read them through ``stage_value``), keyed as in the job file.
    """

    job: str
    scan: dict[str, ScanSummary] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)  # finetune name (only when the job has some)
    extract: dict[str, Any] = field(default_factory=dict)  # "<features>/<dataset>"
    train: dict[str, Any] = field(default_factory=dict)  # head name
    predict: dict[str, Any] = field(default_factory=dict)  # "<head>/<dataset>"
    report: dict[str, Any] = field(default_factory=dict)  # head name
    index: dict[str, Any] = field(default_factory=dict)  # index name (only when the job declares indexes)
    dedup: dict[str, Any] = field(default_factory=dict)  # dedup name (only when the job declares [dedup.NAME])
    no_accuracy: dict[str, str] = field(default_factory=dict)  # head name -> why it has no accuracy
    timings: dict[str, float] = field(default_factory=dict)
    error_rates: dict[str, ErrorRate] = field(default_factory=dict)  # "<features>/<dataset>"

    @property
    def model_work(self) -> bool:
        """Whether any backbone ran or any head was trained (False for a run with nothing new)."""
        return any(stage_value(s, "extracted") for s in self.extract.values()) or any(
            not stage_value(s, "reused") for s in [*self.train.values(), *self.finetune.values()]
        )

    @property
    def items_per_s(self) -> dict[str, float]:
        """Items per second of each timed stage that did some (``STAGE_ITEMS``), over the stage's whole time."""
        out: dict[str, float] = {}
        for stage, (key, _) in STAGE_ITEMS.items():
            items = sum(stage_value(r, key) or 0 for r in getattr(self, stage).values())
            seconds = self.timings.get(stage)
            if items and seconds:
                out[stage] = round(items / seconds, 1)
        return out

    def to_json(self) -> dict[str, Any]:
        train = {name: {**stage_json(s), **({"no_accuracy": self.no_accuracy[name]} if name in self.no_accuracy
                                            else {})} for name, s in self.train.items()}
        return {
            "job": self.job,
            "scan": {k: v.to_json() for k, v in self.scan.items()},
            **({"finetune": {k: stage_json(v) for k, v in self.finetune.items()}} if self.finetune else {}),
            "extract": {k: stage_json(v) for k, v in self.extract.items()},
            "train": train,
            "predict": {k: stage_json(v) for k, v in self.predict.items()},
            "report": {k: stage_json(v) for k, v in self.report.items()},
            **({"index": {k: stage_json(v) for k, v in self.index.items()}} if self.index else {}),
            **({"dedup": {k: stage_json(v) for k, v in self.dedup.items()}} if self.dedup else {}),
            "timings": dict(self.timings),
            "model_work": self.model_work,
            "error_rates": {k: v.to_json() for k, v in self.error_rates.items()},
            "items_per_s": self.items_per_s,
        }
