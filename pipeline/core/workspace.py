"""Where every table lives: the workspace layout (README, "Tables"), and name checks."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from imgfeat.core.errors import ConfigError
from imgfeat.core.mirror import Mirror, mirror_of, open_mirror
from imgfeat.core.stores import is_uri, parse_location

ENV_WORKSPACE = "IMGFEAT_WORKSPACE"
DEFAULT_WORKSPACE = "data"
# fullmatch, not match with '$': '$' also matches before a trailing newline.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(kind: str, name: str) -> str:
    """Reject names that would escape the workspace or break shard globs."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"invalid {kind} name {name!r}: use letters, digits, '.', '_' and '-' "
            "(at most 128, starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True)
class Workspace:
    """A workspace root and the paths of the tables under it."""

    root: Path

    @classmethod
    def resolve(cls, value: str | os.PathLike[str] | None = None) -> Workspace:
        """``--workspace`` beats ``$IMGFEAT_WORKSPACE`` beats ``./data``."""
        chosen = value or os.environ.get(ENV_WORKSPACE) or DEFAULT_WORKSPACE
        if is_uri(chosen):  # a workspace in a bucket: this machine's mirror of it (core/mirror.py)
            return cls(open_mirror(parse_location(str(chosen), "workspace")).root)
        return cls(Path(chosen).expanduser().absolute())

    @property
    def mirror(self) -> Mirror | None:
        """The bucket this workspace mirrors, or None for a plain folder."""
        found = mirror_of(self.root)
        return found if found is not None and found.root == self.root else None

    def check_usable(self) -> None:
        """Raise a ConfigError when the root (or the nearest existing folder above it) is not a folder."""
        path = self.root
        while not path.exists() and path != path.parent:
            if path.is_symlink():
                raise ConfigError(
                    f"workspace {self.root}: {path} is a broken symbolic link "
                    f"(to {os.readlink(path)}); give a folder path (a missing folder is created)"
                )
            path = path.parent
        if not path.is_dir():
            what = "it" if path == self.root else f"{path} above it"
            raise ConfigError(
                f"workspace {self.root} (from --workspace or ${ENV_WORKSPACE}): {what} is {_kind(path)}, "
                "not a folder; give a folder path (a missing folder is created)"
            )

    # datasets
    def dataset_dir(self, dataset: str) -> Path:
        return self.root / "datasets" / check_name("dataset", dataset)

    def manifest_path(self, dataset: str) -> Path:
        return self.dataset_dir(dataset) / "manifest.parquet"

    # features
    def featureset_dir(self, featureset: str) -> Path:
        return self.root / "features" / check_name("featureset", featureset)

    # A featureset folder holds only its feature shards, so every Parquet reader opens it as exactly
    # its rows; its provenance, error rows and NPY sidecars live beside it, under features/_provenance/,
    # features/_errors/ and features/_npy/ ('_' names are never featureset names).
    def featureset_provenance(self, featureset: str) -> Path:
        """The featureset's provenance JSON (written first: it is what makes a featureset exist)."""
        return self.root / "features" / "_provenance" / f"{check_name('featureset', featureset)}.json"

    def featureset_errors_dir(self, featureset: str) -> Path:
        return self.root / "features" / "_errors" / check_name("featureset", featureset)

    def featureset_npy_dir(self, featureset: str) -> Path:
        return self.root / "features" / "_npy" / check_name("featureset", featureset)

    def featureset_lock(self, featureset: str) -> Path:
        """Outside the featureset folder: a lock file there would be one more file for readers to trip on."""
        return self.locks_dir / f"features-{check_name('featureset', featureset)}.lock"

    # heads, predictions, reports
    def head_dir(self, head_id: str) -> Path:
        return self.root / "heads" / check_name("head", head_id)

    def predictions_dir(self, head_id: str) -> Path:
        return self.root / "predictions" / check_name("head", head_id)

    def file_predictions_dir(self, head_id: str) -> Path:
        """Predictions of ad-hoc image files (``imgfeat predict FILE...``), apart from datasets'."""
        return self.root / "file_predictions" / check_name("head", head_id)

    def report_dir(self, head_id: str) -> Path:
        return self.root / "reports" / check_name("head", head_id)

    # nearest-neighbour indexes and near-duplicate reports
    def index_dir(self, index: str) -> Path:
        """Only the index's ids table (``ids.parquet``), so every Parquet reader opens it as its rows."""
        return self.root / "indexes" / check_name("index", index)

    def index_files_dir(self, index: str) -> Path:
        """The index's FAISS file and provenance, beside its folder (``_files`` is never an index name)."""
        return self.root / "indexes" / "_files" / check_name("index", index)

    def dedup_dir(self, name: str) -> Path:
        return self.root / "dedup" / check_name("dedup", name)

    # runs and locks
    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def locks_dir(self) -> Path:
        return self.root / ".locks"

    def list_names(self, kind: str) -> list[str]:
        """Names of existing datasets / features / heads (for 'did you mean')."""
        folder = self.root / kind
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name[0] not in "_.")


def _kind(path: Path) -> str:
    if path.is_file():
        return "a file"
    if path.is_char_device() or path.is_block_device():
        return "a device"
    return "not a folder"
