"""Progress bars: tqdm on a terminal, silent under cron, CI and pipes."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm

ENV_PROGRESS = "IMGFEAT_PROGRESS"  # "1" forces bars on, "0" forces them off


def bars_enabled() -> bool:
    forced = os.environ.get(ENV_PROGRESS)
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty()


def progress(total: int | None = None, desc: str = "", unit: str = "img", **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr that is disabled (a no-op) when stderr is not a TTY."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not bars_enabled(),
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.1,
        **kwargs,
    )
