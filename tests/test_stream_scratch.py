"""The streamed heads' scratch copy: the first pass reads the featureset, later passes the scratch file,
every row once a pass with its own label; and a linear fit stops once its loss settles."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

pytestmark = pytest.mark.quick


@dataclass
class _Source:
    """A stand-in for LabelledStream: fixed batches, counting its passes."""

    X: np.ndarray
    y: np.ndarray
    batch_rows: int
    shuffle: np.random.Generator | None
    passes: int = 0

    @property
    def classes(self) -> np.ndarray:
        return np.unique(self.y.astype(str)).astype(object)

    @property
    def class_counts(self) -> np.ndarray:
        return np.unique(self.y.astype(str), return_counts=True)[1]

    def __call__(self):
        self.passes += 1
        for lo in range(0, len(self.y), self.batch_rows):
            yield self.X[lo : lo + self.batch_rows], self.y[lo : lo + self.batch_rows]


def _rows(batches) -> list[tuple[tuple[float, ...], str]]:
    return sorted((tuple(x.tolist()), str(c)) for X, y in batches for x, c in zip(X, y))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_pass_holds_each_row_once_with_its_label_and_only_the_first_reads_the_source(tmp_path, dtype, shuffle):
    from imgfeat.heads.stream import ScratchStream

    rng = np.random.default_rng(0)
    X = rng.standard_normal((103, 6)).astype(dtype).astype(np.float32)  # exact in the scratch dtype
    y = rng.choice(np.array(["a", "b", "c"], dtype=object), 103)
    source = _Source(X, y, 10, np.random.default_rng(1) if shuffle else None)
    stream = ScratchStream(source, tmp_path, dtype)
    first = list(stream())
    assert _rows(first) == _rows(source()) and source.passes == 2
    second, third = list(stream()), list(stream())
    assert source.passes == 2  # later passes come from the scratch file
    assert _rows(second) == _rows(first) == _rows(third)
    assert all(len(yb) <= 10 and Xb.dtype == np.float32 for Xb, yb in second)
    flat = np.concatenate([Xb for Xb, _ in second])
    assert (not np.array_equal(flat, X)) if shuffle else np.array_equal(flat, X)
    assert list(tmp_path.iterdir()) == []  # an unnamed file: nothing left behind
    stream.close()


def test_a_linear_fit_stops_once_its_loss_settles(tmp_path, caplog):
    from imgfeat.heads.stream import LINEAR_EPOCHS, ScratchStream, fit_linear, moments
    from imgfeat.heads.train import TrainConfig

    rng = np.random.default_rng(0)
    y = rng.choice(np.array(["a", "b"], dtype=object), 2000)
    X = (rng.standard_normal((2000, 8)) + 3.0 * (y == "a")[:, None]).astype(np.float32)
    stream = ScratchStream(_Source(X, y, 256, np.random.default_rng(1)), tmp_path)
    mean, var = moments(stream, 8)
    cfg = TrainConfig(dataset="d", featureset="f", head="logreg")
    with caplog.at_level("INFO", logger="imgfeat.heads.stream"):
        est = fit_linear("logreg", 1.0, stream, ["a", "b"], len(y), mean, var, cfg, LINEAR_EPOCHS, (X[:500], y[:500]))
    epochs = est.named_steps["clf"].n_epochs_
    lines = [r.getMessage() for r in caplog.records if "(streamed): epoch" in r.getMessage()]
    assert 3 <= epochs < LINEAR_EPOCHS and len(lines) == epochs and "settled" in lines[-1]
    assert (est.predict(X) == y).mean() > 0.98


def test_a_full_disk_under_the_scratch_copy_is_one_line(tmp_path, monkeypatch):
    """The first pass writes each batch to the scratch file: a disk that fills is the stage's one
    line (ImgfeatError, exit 1), not an OSError's traceback."""
    import errno

    from imgfeat.core.errors import ImgfeatError
    from imgfeat.heads import stream as S

    rng = np.random.default_rng(0)
    source = _Source(rng.standard_normal((50, 4)).astype(np.float32), np.array(["a", "b"] * 25, dtype=object), 10, None)

    class Full:
        def write(self, _data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            pass

    monkeypatch.setattr(S, "scratch_file", lambda folder: Full())
    stream = S.ScratchStream(source, tmp_path)
    with pytest.raises(ImgfeatError, match=r"\(scratch file\): the disk is full"):
        list(stream())
    stream.close()
