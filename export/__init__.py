"""Export Keras models to TFLite, ONNX, SavedModel and CoreML, verified against Keras after writing.

``from c3ae.export import export_model, to_tflite, to_onnx, to_saved_model, to_coreml``. Submodules load
lazily, so importing this package (or reading an artifact's metadata) does not start TensorFlow.
"""

import importlib

__all__ = ["export_model", "to_coreml", "to_onnx", "to_saved_model", "to_tflite", "FORMATS", "QUANT_TYPES"]

_ATTRIBUTES = {
    "to_tflite": "tflite",
    "QUANT_TYPES": "tflite",
    "to_onnx": "onnx",
    "to_saved_model": "saved_model",
    "to_coreml": "coreml",
    "export_model": "verify",
    "FORMATS": "verify",
}


def __getattr__(name: str):
    if name in _ATTRIBUTES:
        return getattr(importlib.import_module(f"c3ae.export.{_ATTRIBUTES[name]}"), name)
    raise AttributeError(f"module 'c3ae.export' has no attribute {name!r}")
