"""Freeze a Keras model to TFLite with named signature inputs and outputs, builtin ops only."""

from __future__ import annotations

import tempfile

import keras

QUANT_TYPES = ("none", "fp16", "dynamic")


def input_specs(model: keras.Model) -> dict:
    """``{input_name: tf.TensorSpec}`` with a free batch dimension, float32."""
    import tensorflow as tf

    return {
        tensor.name: tf.TensorSpec((None, *tensor.shape[1:]), tf.float32, name=tensor.name)
        for tensor in model.inputs
    }


def serving_endpoint(model: keras.Model):
    """A function taking a dict of named inputs and returning the model's dict of named outputs."""
    takes_dict = isinstance(model.input, dict)
    first_input = model.inputs[0].name

    def serve(inputs):
        outputs = model(inputs if takes_dict else inputs[first_input], training=False)
        return dict(outputs) if isinstance(outputs, dict) else {model.output_names[0]: outputs}

    return serve


def write_saved_model(model: keras.Model, path: str) -> None:
    """Write a SavedModel whose ``serving_default`` signature has the model's input and output names.

    Goes through ``keras.export.ExportArchive`` so that the variables are tracked and the TFLite converter
    can freeze them into constants (a bare ``tf.function`` leaves VAR_HANDLE ops that read uninitialised
    resources and output NaN).
    """
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serving_endpoint(model), input_signature=[input_specs(model)])
    archive.write_out(path, verbose=False)


def to_tflite(model: keras.Model, quant: str = "none") -> bytes:
    """Convert ``model`` to a TFLite flatbuffer restricted to builtin ops (conversion fails otherwise).

    ``quant``: ``"none"`` (fp32), ``"fp16"`` (fp16 weights) or ``"dynamic"`` (int8 weights, float
    activations).
    """
    import tensorflow as tf

    if quant not in QUANT_TYPES:
        raise ValueError(f"Unknown quantisation {quant!r}; expected one of {QUANT_TYPES}.")
    with tempfile.TemporaryDirectory(prefix="c3ae-export-") as saved_model_dir:
        write_saved_model(model, saved_model_dir)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            saved_model_dir, signature_keys=["serving_default"]
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.allow_custom_ops = False
        if quant in ("fp16", "dynamic"):
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quant == "fp16":
            converter.target_spec.supported_types = [tf.float16]
        return converter.convert()


def tflite_op_names(flatbuffer: bytes) -> set[str]:
    """Names of the operators in a TFLite model (``"CONV_2D"``, ...; custom/Flex ops show as such)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    return {op["op_name"] for op in interpreter._get_ops_details()}


def run_tflite(flatbuffer: bytes, inputs: dict, num_threads: int = 1) -> dict:
    """Run the default signature on a dict of named float32 arrays; returns a dict of named outputs."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer, num_threads=num_threads)
    runner = interpreter.get_signature_runner()
    return runner(**inputs)
