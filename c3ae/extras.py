"""Which optional install a missing module belongs to, and the one-line error that says how to get it.

``pip install c3ae`` is the runtime (NumPy, OpenCV, Pillow, LiteRT, tqdm): detection and age/gender
inference on the shipped ``.tflite`` models. ``pip install "c3ae[onnx]"`` adds ONNX Runtime for ``.onnx``
models; ``pip install "c3ae[train]"`` adds TensorFlow, Keras and the rest for preprocess, train, evaluate,
export, ``load_model`` and the Keras backend.
"""

from __future__ import annotations

from c3ae.errors import C3AEError

EXTRA_OF_MODULE = {
    "onnxruntime": "onnx",
    **{
        name: "train"
        for name in (
            "tensorflow",
            "keras",
            "pandas",
            "pyarrow",
            "tf2onnx",
            "onnx",
            "yaml",
            "h5py",
            "matplotlib",
            "mtcnn",
            "joblib",
            "tensorboard",
            "scipy",
        )
    },
    "coremltools": "coreml",
}


class MissingExtraError(C3AEError, ImportError):
    """A feature whose optional dependencies are not installed; the message names the pip command."""


def missing_extra(error: ImportError) -> MissingExtraError | None:
    """The :class:`MissingExtraError` for an ImportError of a module that an extra provides, else None."""
    if isinstance(error, MissingExtraError):
        return error
    name = (getattr(error, "name", None) or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(name)
    if extra is None:
        return None
    return MissingExtraError(
        f'this needs the {extra!r} extra ({name} is not installed): pip install "c3ae[{extra}]"',
        name=name,
    )


def import_optional(name: str):
    """``importlib.import_module(name)``, raising :class:`MissingExtraError` (naming the pip command) when
    the module belongs to an extra that is not installed."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as error:
        extra = missing_extra(error)
        if extra is None:
            raise
        raise extra from None
