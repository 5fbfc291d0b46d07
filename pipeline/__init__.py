"""imgfeat: batch, offline image feature extraction with Keras backbones; the Python API (loaded lazily)."""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# The API's names, each imported from imgfeat.api on first use, so `import imgfeat` stays fast.
API = (
    "scan",
    "extract",
    "train",
    "predict",
    "report",
    "ls",
    "Featureset",
    "FeatureTransformer",
    "ScanResult",
    "ExtractResult",
)
# Stage subpackages that share their name with an API function: the subpackage is made callable.
CALLABLE_PACKAGES = ("scan", "extract")
__all__ = [*API, "__version__"]


class _CallablePackage(types.ModuleType):
    """``imgfeat.scan(...)`` runs the stage (``imgfeat.api.scan``); ``imgfeat.scan.walk`` is still a module."""

    def __call__(self, *args, **kwargs):
        return getattr(importlib.import_module("imgfeat.api"), self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        # The import system sets imgfeat.scan to the subpackage once it is loaded: make it callable.
        if name in CALLABLE_PACKAGES and type(value) is types.ModuleType:
            value.__class__ = _CallablePackage
        super().__setattr__(name, value)


def __getattr__(name: str):
    if name in CALLABLE_PACKAGES:
        return importlib.import_module(f"imgfeat.{name}")
    if name in API:
        value = getattr(importlib.import_module("imgfeat.api"), name)
        setattr(sys.modules[__name__], name, value)
        return value
    raise AttributeError(f"module 'imgfeat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *API})


sys.modules[__name__].__class__ = _Package
