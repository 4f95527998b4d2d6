"""Package attributes imported on first use, so that importing a package does not start TensorFlow."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_attributes(package: str, modules: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` giving each name in ``modules`` from the module named there (absolute)."""

    def __getattr__(name: str):
        if name in modules:
            return getattr(importlib.import_module(modules[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
