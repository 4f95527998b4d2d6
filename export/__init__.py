"""Export Keras models to TFLite, ONNX, SavedModel and CoreML, verified against Keras after writing.

``from c3ae.export import export_model, to_tflite, to_onnx, to_saved_model, to_coreml``. Submodules load
lazily, so importing this package (or reading an artifact's metadata) does not start TensorFlow.
"""

__all__ = ["export_model", "to_coreml", "to_onnx", "to_saved_model", "to_tflite", "FORMATS", "QUANT_TYPES"]

from c3ae.lazy import lazy_attributes

_ATTRIBUTES = {
    "to_tflite": "tflite",
    "QUANT_TYPES": "tflite",
    "to_onnx": "onnx",
    "to_saved_model": "saved_model",
    "to_coreml": "coreml",
    "export_model": "verify",
    "FORMATS": "verify",
}
__getattr__ = lazy_attributes(
    "c3ae.export", {name: f"c3ae.export.{module}" for name, module in _ATTRIBUTES.items()}
)
