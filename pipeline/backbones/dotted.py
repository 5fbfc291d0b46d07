"""Dotted paths (``package.module.attr``) imported on first use, so listing backbones never imports Keras."""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

from imgfeat.core.errors import ConfigError


@cache
def resolve(dotted: str) -> Any:
    """Import ``package.module.attr`` on first use, so listing backbones never imports Keras."""
    module, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {dotted!r}: {exc}") from None
