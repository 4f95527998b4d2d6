"""c3ae: compact face age and gender estimation (C3AE, SSR-Net, DLDL, Levi-Hassner) for Keras 3.

Every model takes float32 BGR crops with raw pixel values in [0, 255] (see ``c3ae.conventions``).
Heavy modules (Keras, TensorFlow) load on first use, so ``import c3ae`` and ``c3ae --version`` stay fast.
"""

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

from c3ae._version import __version__
from c3ae.conventions import CHANNEL_ORDER, PIXEL_RANGE

__all__ = [
    "__version__",
    "CHANNEL_ORDER",
    "PIXEL_RANGE",
    "load_model",
    "AgeGenderEstimator",
    "Face",
    *sorted(["layers", "losses", "metrics", "models", "legacy"]),
]

_LAZY_SUBMODULES = {
    "annotate",
    "bundled",
    "config",
    "detector",
    "data",
    "estimator",
    "evaluate",
    "export",
    "faces",
    "layers",
    "legacy",
    "losses",
    "metrics",
    "models",
    "preprocessing",
    "records",
    "runtime",
    "tracking",
    "train",
    "video",
}


# In a source checkout, c3ae.export and c3ae.preprocessing live beside this folder (setup.py maps export/ and
# preprocessing/ into the package when it installs). Python started in the repository's root imports this
# folder ahead of any installed c3ae, so a finder maps those two names to their folders here, as the install
# does; an installed package has no such folders beside it and is left alone.
_CHECKOUT = Path(__file__).resolve().parents[1]
_CHECKOUT_PACKAGES = {
    f"c3ae.{name}": _CHECKOUT / name
    for name in ("export", "preprocessing")
    if (_CHECKOUT / "setup.py").is_file()
    and (_CHECKOUT / name / "__init__.py").is_file()
    and not (Path(__file__).parent / name).exists()
}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """``c3ae.export`` and ``c3ae.preprocessing`` from the checkout's ``export/`` and ``preprocessing/``."""

    def find_spec(self, fullname, path=None, target=None):
        folder = _CHECKOUT_PACKAGES.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


if _CHECKOUT_PACKAGES and not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _CheckoutFinder())


def __getattr__(name: str):
    try:
        if name in _LAZY_SUBMODULES:
            return importlib.import_module(f"c3ae.{name}")
        if name == "load_model":
            return importlib.import_module("c3ae.bundled").load_model
        if name in ("AgeGenderEstimator", "Face"):
            return getattr(importlib.import_module("c3ae.estimator"), name)
    except ImportError as error:
        from c3ae.extras import missing_extra

        extra = missing_extra(error)
        if extra is None:
            raise
        raise extra from None
    raise AttributeError(f"module 'c3ae' has no attribute {name!r}")
