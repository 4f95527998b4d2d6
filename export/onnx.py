"""Convert a Keras model to ONNX (tf2onnx) with named inputs and outputs and the preprocessing metadata."""

from __future__ import annotations

import keras

DEFAULT_OPSET = 17


def to_onnx(model: keras.Model, opset: int = DEFAULT_OPSET, metadata: bool = True) -> bytes:
    """The serialized ONNX model of ``model`` (float32, NHWC, batch dimension free).

    Inputs keep the Keras names (``outer``/``middle``/``inner`` or ``image``: float32 BGR, raw pixels in
    [0, 255]); outputs are named ``age``, ``gender``, ``age_bins``, ... With ``metadata`` the preprocessing
    contract (:func:`c3ae.export.metadata.describe_model`) goes into ``metadata_props``.
    """
    import tensorflow as tf
    import tf2onnx

    from c3ae.export.checks import check_finite
    from c3ae.export.metadata import add_onnx_metadata, describe_model
    from c3ae.export.tflite import input_specs, serving_endpoint

    check_finite(model)
    specs = input_specs(model)
    function = tf.function(serving_endpoint(model), input_signature=[specs])
    proto, _ = tf2onnx.convert.from_function(function, input_signature=[specs], opset=int(opset))
    names = {v.name for v in proto.graph.output}
    missing = set(model.output_names) - names
    if missing:
        raise RuntimeError(f"tf2onnx lost the output names {sorted(missing)} (got {sorted(names)}).")
    if metadata:
        add_onnx_metadata(proto, describe_model(model, {"opset": int(opset)}))
    return proto.SerializeToString()
