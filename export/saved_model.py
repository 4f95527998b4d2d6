"""Export a Keras model as a TensorFlow SavedModel with a named ``serving_default`` signature."""

from __future__ import annotations

import json
from pathlib import Path

import keras

METADATA_FILE = "c3ae.json"


def to_saved_model(model: keras.Model, path: str | Path, metadata: bool = True) -> Path:
    """Write ``model`` as a SavedModel folder at ``path`` and return it.

    The ``serving_default`` signature takes the named float32 inputs (``outer``/``middle``/``inner`` or
    ``image``: BGR crops, raw pixels in [0, 255], batch dimension free) and returns the named outputs
    (``age``, ``gender``, ``age_bins``, ...). With ``metadata`` the preprocessing description is written
    beside it as ``c3ae.json`` (and returned by a ``metadata`` signature as a JSON string).
    """
    import tensorflow as tf

    from c3ae.export.checks import check_finite
    from c3ae.export.metadata import describe_model
    from c3ae.export.tflite import input_specs, serving_endpoint

    check_finite(model)
    path = Path(path)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serving_endpoint(model), input_signature=[input_specs(model)])
    description = describe_model(model)
    if metadata:
        text = json.dumps(description, sort_keys=True)
        archive.add_endpoint("metadata", lambda: {"c3ae": tf.constant(text)}, input_signature=[])
    archive.write_out(str(path), verbose=False)
    if metadata:
        (path / METADATA_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return path
