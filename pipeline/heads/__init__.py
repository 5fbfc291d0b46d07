"""Light heads on bottleneck features: train, predict and report stages (see each module)."""

from imgfeat.heads.artifacts import LoadedHead, load_head
from imgfeat.heads.estimators import HEAD_KINDS, KerasMLPClassifier
from imgfeat.heads.predict import PredictConfig, run_predict
from imgfeat.heads.report import ReportConfig, run_report
from imgfeat.heads.train import TrainConfig, run_train

__all__ = [
    "HEAD_KINDS",
    "KerasMLPClassifier",
    "LoadedHead",
    "PredictConfig",
    "ReportConfig",
    "TrainConfig",
    "load_head",
    "run_predict",
    "run_report",
    "run_train",
]
