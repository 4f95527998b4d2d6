"""c3ae: compact face age and gender estimation (C3AE, SSR-Net, DLDL, Levi-Hassner) for Keras 3.

Every model takes float32 BGR crops with raw pixel values in [0, 255] (see ``c3ae.conventions``).
Heavy modules (Keras, TensorFlow) load on first use, so ``import c3ae`` and ``c3ae --version`` stay fast.
"""

import importlib

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
