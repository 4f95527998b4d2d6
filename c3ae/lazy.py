"""Package attributes imported on first use, so that importing a package does not start TensorFlow."""

from __future__ import annotations

from collections.abc import Callable

from c3ae.extras import import_optional


def lazy_attributes(package: str, modules: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` giving each name in ``modules`` from the module named there (absolute); a
    module whose dependencies an extra provides raises :class:`c3ae.extras.MissingExtraError` naming it."""

    def __getattr__(name: str):
        if name in modules:
            return getattr(import_optional(modules[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
