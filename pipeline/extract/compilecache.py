"""JAX's persistent compilation cache, kept in a private folder of this user's imgfeat cache.

On a GPU a run's fixed cost is mostly compiling: the backbone's variable initialisers, its forward
function, GPU decode's resize kernels, each compiled again by every process. JAX can keep the
compiled executables on disk and load them instead (the key is the program and the device, so a
changed model or JAX version compiles afresh). Extract (and bench's timed processes) turn it on
before anything compiles; it is on only under the JAX backend.

A cached executable is code this process will run, so the folder must be as private as the
user's own installed packages: created ``0700``, used only while it is a folder (not a link)
owned by this user and writable by no one else, in a parent that others cannot write to (or a
sticky one, as /tmp is). Otherwise the cache stays off, with a warning naming the
folder. ``IMGFEAT_COMPILE_CACHE=0`` turns it off; ``$IMGFEAT_CACHE`` moves it (default
``~/.cache/imgfeat/jax``); a cache folder already set in JAX's own configuration
(``JAX_COMPILATION_CACHE_DIR``) is left as the user set it.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

from imgfeat.core.stores import cache_dir

log = logging.getLogger(__name__)

ENV_SWITCH = "IMGFEAT_COMPILE_CACHE"
OFF_VALUES = ("0", "off", "false", "no")
MAX_CACHE_BYTES = 2 << 30  # JAX evicts the least recently used entries past this
# Cache every compile, not only those over JAX's default second: a backbone's variable initialisers
# are dozens of small compiles whose sum is seconds, and reading an entry back costs milliseconds.
MIN_COMPILE_SECONDS = 0.0

_refused: set[Path] = set()  # folders already warned about: one warning a process


def cache_folder() -> Path:
    """``jax`` beside the objects and workspace mirrors of this user's imgfeat cache."""
    return cache_dir().parent / "jax"


def private_folder(folder: Path) -> str | None:
    """None when ``folder`` exists (made ``0700`` if it did not), is owned by this user and is
    writable by no one else; otherwise why it may not hold code this process runs."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.lstat()
    except OSError as exc:
        return f"cannot create it ({exc.strerror or exc})"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a folder"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return "it belongs to another user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "others may write to it (chmod 700 it to use it)"
    try:
        parent = folder.parent.stat()
    except OSError as exc:
        return f"cannot read its parent folder ({exc.strerror or exc})"
    if parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not parent.st_mode & stat.S_ISVTX:
        return "others may write to its parent folder, and so replace it"
    return None


def enable_compile_cache(config: Any = None) -> Path | None:
    """Point JAX's persistent compilation cache at ``cache_folder()``; the folder, or None when off.

    Call it before the first compile of the process (JAX reads the setting once). ``config`` is
    ``jax.config`` (tests pass their own)."""
    if os.environ.get(ENV_SWITCH, "").strip().lower() in OFF_VALUES:
        return None
    if config is None:
        import jax

        config = jax.config
    if getattr(config, "jax_compilation_cache_dir", None):  # the user's own setting stands
        return Path(config.jax_compilation_cache_dir)
    folder = cache_folder()
    problem = private_folder(folder)
    if problem is not None:
        if folder not in _refused:
            _refused.add(folder)
            log.warning("JAX compilation cache off: %s: %s", folder, problem)
        return None
    config.update("jax_compilation_cache_dir", str(folder))
    config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    config.update("jax_compilation_cache_max_size", MAX_CACHE_BYTES)
    log.debug("JAX compilation cache: %s", folder)
    return folder
