"""The train stage: labelled features -> a cross-validated head artifact and its test metrics."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from imgfeat.core import names as N
from imgfeat.core.errors import ConfigError, unknown_value
from imgfeat.core.hashing import canonical_digest
from imgfeat.core.options import opt
from imgfeat.core.ranges import C_GRID_MAX, RANGES, check_fields
from imgfeat.core.results import JsonObject, JsonResult
from imgfeat.core.storage import WAIT_HINT, FileLock
from imgfeat.core.workspace import Workspace, check_name
from imgfeat.extract.featureset import featureset_info
from imgfeat.heads import artifacts as A
from imgfeat.heads.data import LEFT_OUT_JSON_MAX, LabelledRows, read_labelled
from imgfeat.heads.versions import default_head_name, resolve_featureset
from imgfeat.heads.zeroshot import DEFAULT_PROMPT, ZERO_SHOT, check_prompt

LEFT_OUT_FILE = "left_out.parquet"  # in the head's folder: duplicates and label conflicts, by path

log = logging.getLogger(__name__)

HEAD_KINDS = ("logreg", "svm", "mlp", "auto")
SVM_KERNELS = ("linear", "rbf")
CLASS_WEIGHTS = ("balanced",)
C_CHOSEN_BY = "log_loss"  # what cross-validation minimises to choose C (heads.fit.choose_c)
# Which TrainConfig fields change each kind of head (so an unrelated flag keeps the head id).
_COMMON = ("class_weight", "random_state", "test_fraction", "cv", "cv_max_rows")
_KIND_PARAMS = {
    "logreg": ("max_iter", "c_grid"),
    "svm": ("kernel", "max_iter", "c_grid"),
    "mlp": ("epochs", "hidden", "dropout", "batch_size", "learning_rate", "patience"),
}
_KIND_PARAMS["auto"] = tuple(dict.fromkeys(p for ps in _KIND_PARAMS.values() for p in ps))
_KIND_PARAMS[ZERO_SHOT] = ("prompt",)  # after "auto": an auto head's id must not change


@dataclass(frozen=True)
class TrainConfig:
    """What to train: a head kind on one dataset's labels and one featureset (a name or a full name)."""

    dataset: str = opt(metavar="NAME", help="dataset whose labels to learn")
    featureset: str = opt(
        metavar="FS", help="featureset made by 'imgfeat extract': its full name, or a recipe name (its latest)"
    )
    head: str = opt(
        "logreg",
        choices=(*HEAD_KINDS, ZERO_SHOT),
        help="kind of head (zero-shot: CLIP/SigLIP featuresets, class prompts, no fitting)",
    )
    name: str | None = opt(
        None,
        metavar="NAME",
        help="the head's stable name (default: <dataset>-<head>); it resolves to the latest version",
    )
    kernel: str = opt("linear", choices=SVM_KERNELS, help="svm kernel (rbf: small sets)")
    cv: int = opt(5, metavar="K", help="cross-validation folds (fewer when the smallest class is smaller)")
    class_weight: str | None = opt(
        None, choices=CLASS_WEIGHTS, help="weight classes inversely to their frequency (default: unweighted)"
    )
    random_state: int = opt(0, metavar="N", help="seed for folds, splits and the net")
    test_fraction: float = opt(0.2, metavar="F", help="held-out fraction when the dataset has no test/val split")
    cv_max_rows: int = opt(
        10_000,
        metavar="N",  # choose C on a stratified subsample, then fit on all rows
        help="choose hyper-parameters on a stratified subsample of at most N rows",
    )
    max_iter: int = 1000
    c_grid: tuple[float, ...] | None = opt(  # None: a default grid
        None,
        metavar="C,C,...",
        help="logreg/svm: the C values cross-validation chooses from, by log-loss "
        "(default: 1e-4 to 10 in decades, extended past an edge the best value sits on)",
    )
    epochs: int = opt(50, metavar="N", help="mlp: most epochs")
    hidden: int = opt(256, metavar="N", help="mlp: hidden units")
    dropout: float = 0.5
    batch_size: int = 32
    learning_rate: float = 1e-3
    patience: int = 5
    n_jobs: int | None = None  # parallel CV fits for logreg/svm; None: by data size and cores
    wait: float | None = opt(
        None,
        metavar="SECONDS",
        help="wait up to this long for another process writing the same head, instead of exiting at once",
    )
    prompt: str = opt(
        DEFAULT_PROMPT, metavar="TEXT", help="zero-shot: each class's prompt, {label} standing for its name"
    )
    memory_budget: int | None = opt(
        None, metavar="SIZE", help="memory for features held at once, e.g. 256MB or 2GiB (default: a quarter of RAM)"
    )

    def __post_init__(self) -> None:
        check_name("dataset", self.dataset)
        N.check_ref(N.FEATURESETS, self.featureset)
        if self.name is not None:
            check_name("head", self.name)
        if self.c_grid is not None:
            object.__setattr__(self, "c_grid", check_c_grid(self.c_grid))
        if self.head not in (*HEAD_KINDS, ZERO_SHOT):
            raise unknown_value("head", self.head, (*HEAD_KINDS, ZERO_SHOT))
        if self.head == ZERO_SHOT:
            check_prompt(self.prompt)
        if self.kernel not in SVM_KERNELS:
            raise unknown_value("kernel", self.kernel, SVM_KERNELS)
        if self.class_weight not in (None, *CLASS_WEIGHTS):
            raise unknown_value("class weight", str(self.class_weight), CLASS_WEIGHTS)
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be from 0 to below 1, got {self.test_fraction!r}")
        for name in ("cv", "cv_max_rows", "max_iter", "epochs", "hidden", "batch_size", "patience"):
            if int(getattr(self, name)) < (2 if name == "cv" else 1):
                raise ConfigError(f"{name} must be at least {2 if name == 'cv' else 1}, got {getattr(self, name)!r}")
        if self.n_jobs is not None and int(self.n_jobs) < 1:
            raise ConfigError(f"n_jobs must be at least 1, got {self.n_jobs!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be from 0 to below 1, got {self.dropout!r}")
        if not 0 <= int(self.random_state) < 2**32:  # numpy's seed range; sklearn fails late otherwise
            raise ConfigError(f"random_state must be from 0 to 2**32 - 1, got {self.random_state!r}")
        check_fields(self)  # the ranges its flags and job-file keys have (core/ranges.py)

    @property
    def head_name(self) -> str:
        return self.name or default_head_name(self.dataset, self.head)

    def params(self) -> JsonObject:
        """The parameters that shape this kind of head (recorded and hashed into the head id)."""
        values = asdict(self)
        return {k: values[k] for k in (*_COMMON, *_KIND_PARAMS[self.head])}


def check_c_grid(values: Any) -> tuple[float, ...]:
    """A C grid as sorted unique floats; a ConfigError naming the value unless it holds 1 to C_GRID_MAX
    numbers, each in range "c"."""
    rng = RANGES["c"]
    ok = (
        isinstance(values, (list, tuple))
        and 0 < len(values) <= C_GRID_MAX
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and rng.allows(v) for v in values)
    )
    if not ok:
        raise ConfigError(f"c_grid must be a list of 1 to {C_GRID_MAX} numbers, each {rng.text()[2:]}, got {values!r}")
    return tuple(sorted({float(v) for v in values}))


def params_for(kind: str, params: dict[str, Any]) -> JsonObject:
    """The recorded parameters that shape one kind of head (an auto head records every kind's)."""
    return {k: v for k, v in params.items() if k in (*_COMMON, *_KIND_PARAMS.get(kind, ()))}


def make_head_id(cfg: TrainConfig, rows: LabelledRows) -> str:
    """``<name>-<hash8>`` of featureset, head kind, params and the training data.

    The name (``--name``, default ``<dataset>-<head>``) leads the id, so ``ls`` and every folder
    say which head a version belongs to; the hash alone decides whether a head can be reused.
    """
    key = {"featureset": cfg.featureset, "head": cfg.head, "params": cfg.params(), "rows": rows.digest()}
    if cfg.head != "mlp":
        key["c_chosen_by"] = C_CHOSEN_BY  # heads whose C accuracy chose are not reused
    return f"{cfg.head_name}-{canonical_digest(key, 8)}"


def run_train(ws: Workspace, cfg: TrainConfig, run_id: str) -> TrainSummary:
    """Train (or reuse) the head and make it the latest of its name."""
    t0 = time.perf_counter()
    cfg = replace(cfg, featureset=resolve_featureset(ws, cfg.featureset))
    N.read_index(ws, N.HEADS)  # a damaged name index stops the run here, not after the training
    info = featureset_info(ws, cfg.featureset)
    rows = read_labelled(ws, cfg.dataset, cfg.featureset, cfg.test_fraction, cfg.random_state)
    head_id = make_head_id(cfg, rows)
    reused = A.head_exists(ws, head_id)
    if reused:
        log.info("head %s already trained on these features and labels; reusing it", head_id)
    else:
        with FileLock(ws.locks_dir / f"head-{head_id}.lock", f"head {head_id}", cfg.wait, hint=WAIT_HINT):
            if not A.head_exists(ws, head_id):  # another process may have finished it while we waited
                from imgfeat.heads import fit  # scikit-learn and friends: only when a head is trained

                fit.train_and_write(ws, cfg, rows, head_id, info, run_id)
    N.record(ws, N.HEADS, cfg.head_name, head_id)
    return _summary(ws, A.read_head_meta(ws, head_id), cfg.head_name, rows, reused, time.perf_counter() - t0)


@dataclass(frozen=True)
class TrainSummary(JsonResult):
    """What train did: the head (id, name, kind), its metrics, the rows it saw and left out."""

    head_id: str
    name: str
    reused: bool
    head: str
    model_kind: str
    dataset: str
    featureset: str
    classes: list[str]
    metrics: dict[str, Any]
    chosen: dict[str, Any] | None
    n_train: int
    n_test: int
    eval_split: str | None
    left_out: dict[str, int] | None
    left_out_files: list[dict[str, Any]] = field(default_factory=list)
    head_dir: str = ""
    seconds: float = 0.0
    timings: dict[str, float] | None = None

    def to_json(self) -> JsonObject:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _summary(
    ws: Workspace, meta: dict[str, Any], name: str, rows: LabelledRows, reused: bool, seconds: float
) -> TrainSummary:
    m = meta["metrics"]
    files = rows.left_out_files
    return TrainSummary(
        head_id=meta["head_id"],
        name=name,
        reused=reused,
        head=meta["head"],
        model_kind=meta["model_kind"],
        dataset=meta["dataset"],
        featureset=meta["featureset"],
        classes=meta["classes"],
        metrics={k: m.get(k) for k in ("test_accuracy", "macro_f1", "per_class", "cv")},
        chosen=meta.get("chosen"),
        n_train=meta["n_train"],
        n_test=meta["n_test"],
        eval_split=meta.get("eval_split"),
        left_out=meta.get("left_out"),
        left_out_files=[] if files is None else files.head(LEFT_OUT_JSON_MAX).to_dict("records"),
        head_dir=str(ws.head_dir(meta["head_id"])),
        seconds=round(seconds, 3),
        timings=None if reused else meta.get("timings"),
    )
