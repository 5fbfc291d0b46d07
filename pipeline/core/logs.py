"""Logging to stderr as text for people or JSON lines for log collectors; native library noise kept out."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.abc
import importlib.util
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

from imgfeat.core.stores import redact

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
NATIVE_LOGGER = "imgfeat.native"  # lines C/C++ libraries (TensorFlow, absl, CUDA) write to fd 2
# Python loggers of libraries that are chatty at INFO: kept to warnings unless --log-level debug.
NOISY = ("tensorflow", "absl", "h5py", "PIL", "matplotlib", "jax", "ray", "numba")
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        run_id = getattr(record, "run_id", None)
        if run_id:
            obj["run_id"] = run_id
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False)


def quiet_native_logs(level: str = "info") -> None:
    """Set the environment TensorFlow reads at import: only its fatal errors, unless debugging.

    Must run before TensorFlow is imported; an explicit value in the environment wins.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if level == "debug" else "3")
    os.environ.setdefault("GRPC_VERBOSITY", "DEBUG" if level == "debug" else "ERROR")


# Warnings of other packages that say nothing to a user of imgfeat, shown only at --log-level debug.
# scikit-learn's one-vs-rest threads (SGDClassifier n_jobs) intermittently warn that `delayed` ran
# outside its Parallel (its captured warning filters were empty): hundreds of lines per streamed fit.
SPURIOUS_WARNINGS = (
    "`sklearn.utils.parallel.delayed` should be used with",
    # Pillow's, for an image between its pixel limit and twice it: scan and extract make such a
    # file a too_large error row themselves, so the warning only repeats it
    "DecompressionBombWarning",
)


# Python warnings said once, in our words ({reason}: the failure the warning names); repeats are dropped.
ONCE_WARNINGS = {
    # JAX's, per compile it could not keep (a full disk, a folder gone): the run goes on compiling
    "Error writing persistent compilation cache entry": "the JAX compilation cache cannot keep compiles "
    "({reason}); this run compiles as if it had none",
}


class DemoteSpurious(logging.Filter):
    """A Python warning in ``SPURIOUS_WARNINGS`` becomes a debug line (dropped at info); one in
    ``ONCE_WARNINGS`` becomes its one line of ours, the first time only."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level
        self.said: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "py.warnings":
            return True
        text = record.getMessage()
        for key, line in ONCE_WARNINGS.items():
            if key in text:
                if key in self.said:
                    return False
                self.said.add(key)
                first = next((ln for ln in text.splitlines() if key in ln), key)
                reason = first.partition(key)[2].partition(": ")[2].strip() or "an error"
                record.msg, record.args = line.format(reason=reason[:200]), None
                return True
        if not any(t in text for t in SPURIOUS_WARNINGS):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return self.level <= logging.DEBUG


class RedactSecrets(logging.Filter):
    """No secret of an object store (its key, token or signature) reaches a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = redact(text)
        if clean != text:
            record.msg, record.args = clean, None
        return True


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """One handler on the root logger, as text or JSON lines, at ``level``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactSecrets())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT, "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    handler.addFilter(DemoteSpurious(root.level))
    logging.captureWarnings(True)  # Python warnings become log records (JSON lines with --log-format json)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def ensure_notebook_logging(level: str = "info") -> None:
    """For the Python API: if nobody configured logging, show our info lines (e.g. in a notebook)."""
    root = logging.getLogger()
    ours = logging.getLogger("imgfeat")
    if root.handlers or ours.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(TEXT_FORMAT, "%H:%M:%S"))
    ours.addHandler(handler)
    ours.setLevel(level.upper())
    ours.propagate = False


def capture_native_stderr() -> None:
    """Route what native code writes to file descriptor 2 through logging, one record per line.

    TensorFlow, absl and CUDA write straight to fd 2 (``I0000 ... cudart_stub.cc``, ``E0000 ...
    failed call to cuInit``), before and regardless of TF_CPP_MIN_LOG_LEVEL. Here fd 2 becomes a
    pipe read by a thread that logs each line at debug (fatal ``F`` lines at error), while
    Python's ``sys.stderr`` (our handler, progress bars, tracebacks) keeps the real terminal.
    Call once, in a command-line process, before the log handler is made.
    """
    real = os.dup(2)
    read_fd, write_fd = os.pipe()
    # Native code may write while holding the GIL that the reader thread needs: a full pipe must
    # never block it (a lost debug line is better than a hung job), so a big, non-blocking pipe.
    with contextlib.suppress(AttributeError, OSError):
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    os.set_blocking(write_fd, False)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stderr = os.fdopen(real, "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    threading.Thread(target=_pump, args=(read_fd,), name="native-stderr", daemon=True).start()


def _pump(read_fd: int) -> None:
    log = logging.getLogger(NATIVE_LOGGER)
    with os.fdopen(read_fd, "r", encoding="utf-8", errors="replace") as pipe:
        for line in pipe:
            line = line.rstrip()
            if line:
                log.log(logging.ERROR if _fatal(line) else logging.DEBUG, "%s", line)


def _fatal(line: str) -> bool:
    """absl's ``F0000 ...`` lines and Python's own fatal errors still reach the user."""
    return (line[:1] == "F" and line[1:5].isdigit()) or line.startswith("Fatal Python error")


# --- the Python API: no fd-2 pipe for the whole process (that is the command's), only Keras's start ---

FRAMEWORKS = ("keras", "tensorflow")


@contextlib.contextmanager
def quiet_framework_start() -> Iterator[None]:
    """During the block, a first import of Keras or TensorFlow logs its native lines at debug.

    TensorFlow writes its start-up lines (absl's "All log messages before absl::InitializeLog()",
    oneDNN, cudart_stub, cpu_feature_guard, and "failed call to cuInit" on the first device query)
    straight to file descriptor 2 while it is imported, whatever TF_CPP_MIN_LOG_LEVEL says once
    the process runs. The command pipes fd 2 for its whole life; a library must not, so this
    only wraps that import (fd 2 points at a temporary file while it runs, no Python of ours
    runs then) and leaves sys.meta_path as it found it when the block ends.
    """
    if any(name in sys.modules for name in FRAMEWORKS):
        yield
        return
    finder = _QuietImport()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(finder)


class _QuietImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in FRAMEWORKS:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)  # once: the framework imports the other one itself
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        with native_stderr_to_debug():
            self.inner.exec_module(module)
            tf = sys.modules.get("tensorflow")
            if tf is not None and hasattr(tf, "config"):
                tf.config.list_physical_devices()  # cuInit's error line comes with the first device query


@contextlib.contextmanager
def native_stderr_to_debug() -> Iterator[None]:
    """Point fd 2 at a temporary file during the block; then log each line it got at debug (fatal at error)."""
    log = logging.getLogger(NATIVE_LOGGER)
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode("utf-8", "replace").splitlines():
                if line.strip():
                    log.log(logging.ERROR if _fatal(line) else logging.DEBUG, "%s", line.rstrip())


_SAID: set[tuple[str, str]] = set()  # (logger, message) already warned in this process


def warn_once(log: logging.Logger, msg: str, *args: Any) -> None:
    """A warning about a lasting state (a stray file, a flag), said once per process, not at every read.

    Readers run many times in one run (plan, extract, train, predict, report, error rate each
    list a featureset's shards): the same warning six times buries the rest of the log.
    """
    key = (log.name, msg % args if args else msg)
    if key not in _SAID:
        _SAID.add(key)
        log.warning(msg, *args)
