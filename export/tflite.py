"""Freeze a Keras model to TFLite with named signature inputs and outputs, builtin ops only.

The flatbuffer's ``serving_default`` signature takes the model's named float32 inputs (``outer``/``middle``/
``inner`` or ``image``: BGR crops, raw pixels in [0, 255]) and returns its named outputs (``age``,
``gender``, ``age_bins``, ...), whatever the quantisation; a ``"c3ae"`` metadata buffer describes the
preprocessing (see :mod:`c3ae.export.metadata`).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping

import keras
import numpy as np

from c3ae.errors import UsageError

QUANT_TYPES = ("none", "fp16", "dynamic", "int8")
# Ops that stay float (or are quantisation boundaries) are not a sign of a failed int8 conversion.
_BOUNDARY_OPS = {"QUANTIZE", "DEQUANTIZE"}


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


def to_tflite(
    model: keras.Model,
    quant: str = "none",
    representative: Iterable[Mapping[str, np.ndarray]] | Callable[[], Iterable] | None = None,
    *,
    metadata: bool = True,
    compact: bool = True,
    float32_input_layers: bool = True,
) -> bytes:
    """Convert ``model`` to a TFLite flatbuffer restricted to builtin ops (conversion fails otherwise).

    Args:
        quant: ``"none"`` (fp32), ``"fp16"`` (fp16 weights, float compute), ``"dynamic"`` (int8 weights,
            float activations) or ``"int8"`` (int8 weights and activations, calibrated on ``representative``;
            ops without an int8 kernel, such as GeM's POW, stay float). Inputs and outputs stay float32 in
            every case, so the artifact takes the same raw BGR pixels as the Keras model.
        representative: for ``"int8"``, real crops: an iterable (or a callable returning one) of dicts
            ``{input_name: (N, S, S, 3) float32 BGR [0, 255]}``; each crop is fed on its own.
        metadata: embed the preprocessing description (:func:`c3ae.export.metadata.describe_model`).
        compact: replace the internal tensor names (about 4 KB of strings) by short ones; the signature
            and its input and output tensors keep their names.
        float32_input_layers: for ``"fp16"``, keep the weights of the first layers, which multiply raw
            pixels, in float32 (:func:`keep_input_layers_float32`; a few KB).
    """
    import tensorflow as tf

    from c3ae.export.checks import check_finite

    if quant not in QUANT_TYPES:
        raise UsageError(f"Unknown quantisation {quant!r}; expected one of {', '.join(QUANT_TYPES)}.")
    if quant == "int8" and representative is None:
        raise UsageError("int8 quantisation needs representative crops (representative=...) to calibrate.")
    check_finite(model)
    with tempfile.TemporaryDirectory(prefix="c3ae-export-") as saved_model_dir:
        write_saved_model(model, saved_model_dir)
        converter = _builtin_converter(saved_model_dir)
        if quant != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quant == "fp16":
            converter.target_spec.supported_types = [tf.float16]
        if quant == "int8":
            # int8 kernels first, float builtins where an op has none (the op then stays float).
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                tf.lite.OpsSet.TFLITE_BUILTINS,
            ]
            # Per-tensor scales for Dense layers (per-channel for convolutions, whose folded BatchNorm
            # spreads the channel ranges): 6 KB less of scales and zero points on C3AE, same accuracy.
            converter._experimental_disable_per_channel_quantization_for_dense_layers = True
            samples = list(_single_samples(representative, [t.name for t in model.inputs]))
            converter.representative_dataset = lambda: iter(samples)
        with warnings.catch_warnings():  # the calibrator's own deprecated-interpreter warning
            warnings.simplefilter("ignore")
            flatbuffer = converter.convert()
        restored = 0
        if quant == "fp16" and float32_input_layers:
            flatbuffer, restored = keep_input_layers_float32(
                flatbuffer, _builtin_converter(saved_model_dir).convert()
            )
    if compact:
        flatbuffer = compact_tensor_names(flatbuffer)
    if metadata:
        from c3ae.export.metadata import add_tflite_metadata, describe_model

        extra = {"quantisation": quant}
        if quant == "fp16":
            extra["float32_weight_tensors"] = restored  # the first layers' (see float32_input_layers)
        if quant == "int8":
            extra["float_ops"] = float_ops(flatbuffer)
        flatbuffer = add_tflite_metadata(flatbuffer, describe_model(model, extra))
    return bytes(flatbuffer)


def _builtin_converter(saved_model_dir: str):
    """A converter of the SavedModel's ``serving_default`` signature restricted to TFLite builtin ops (fp32
    until its options say otherwise)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=["serving_default"])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.allow_custom_ops = False
    return converter


def _single_samples(representative, names: list[str]):
    """One-crop float32 dicts out of batched ones, for the calibrator (which wants a fixed shape)."""
    batches = representative() if callable(representative) else representative
    count = 0
    for batch in batches:
        arrays = {name: np.asarray(batch[name], dtype=np.float32) for name in names}
        for index in range(len(arrays[names[0]])):
            count += 1
            yield {name: array[index : index + 1] for name, array in arrays.items()}
    if not count:
        raise UsageError("The representative data for int8 calibration held no crops.")


def _flatbuffer_model(flatbuffer: bytes):
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))


def compact_tensor_names(flatbuffer: bytes) -> bytes:
    """``flatbuffer`` with every tensor that is not a subgraph input or output renamed ``t<index>``."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = _flatbuffer_model(flatbuffer)
    for subgraph in model.subgraphs:
        keep = {int(i) for i in subgraph.inputs} | {int(i) for i in subgraph.outputs}
        for index, tensor in enumerate(subgraph.tensors):
            if index not in keep:
                tensor.name = f"t{index}"
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _op_name(model, operator) -> str:
    from ai_edge_litert import schema_py_generated as schema

    code = model.operatorCodes[operator.opcodeIndex]
    number = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
    if number == schema.BuiltinOperator.CUSTOM:
        return f"CUSTOM:{code.customCode}"
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    return names.get(number, str(number))


def float_ops(flatbuffer: bytes) -> dict[str, int]:
    """``{op: count}`` of the operators that compute in float32 (QUANTIZE/DEQUANTIZE boundaries aside).

    Empty for a fully int8 graph; for int8 exports these are the ops the converter could not quantise.
    """
    from ai_edge_litert import schema_py_generated as schema

    model = _flatbuffer_model(flatbuffer)
    counts: dict[str, int] = {}
    for subgraph in model.subgraphs:
        for operator in subgraph.operators:
            name = _op_name(model, operator)
            if name in _BOUNDARY_OPS:
                continue
            tensors = [subgraph.tensors[i] for i in [*operator.inputs, *operator.outputs] if i >= 0]
            if any(t.type == schema.TensorType.FLOAT32 for t in tensors):
                counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def weight_bytes(flatbuffer: bytes) -> dict[str, int]:
    """Bytes of constant tensor data per element type (``{"FLOAT16": ..., "INT8": ..., ...}``)."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    model = _flatbuffer_model(flatbuffer)
    counts: dict[str, int] = {}
    seen = set()
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            buffer = model.buffers[tensor.buffer]
            if tensor.buffer in seen or buffer.data is None or not len(buffer.data):
                continue
            seen.add(tensor.buffer)
            key = names.get(tensor.type, str(tensor.type))
            counts[key] = counts.get(key, 0) + len(buffer.data)
    return dict(sorted(counts.items()))


# Ops between a model input and its first weighted layer that do not change what the layer multiplies.
_PASS_THROUGH_OPS = {"CONCATENATION", "RESHAPE", "MUL", "ADD", "SUB", "PACK", "TRANSPOSE", "STRIDED_SLICE"}
_WEIGHTED_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"}


def _first_weighted_ops(model, subgraph) -> list:
    """The weighted ops (convolutions, dense) that read a subgraph input, directly or through ops that only
    move or rescale it, in a deterministic order."""
    consumers: dict[int, list] = {}
    for op in subgraph.operators:
        for t in op.inputs:
            consumers.setdefault(int(t), []).append(op)
    frontier, seen, first = [int(t) for t in subgraph.inputs], set(), []
    while frontier:
        tensor = frontier.pop(0)
        for op in consumers.get(tensor, []):
            if id(op) in seen:
                continue
            seen.add(id(op))
            name = _op_name(model, op)
            if name in _WEIGHTED_OPS:
                first.append(op)
            elif name in _PASS_THROUGH_OPS:
                frontier.extend(int(t) for t in op.outputs)
    return first


def keep_input_layers_float32(fp16: bytes, fp32: bytes) -> tuple[bytes, int]:
    """The ``fp16`` flatbuffer with the weights of its first layers (those reading the raw-pixel inputs)
    taken back from ``fp32``, the same model converted without quantisation; returns it and the number of
    weight tensors restored.

    fp16 keeps 11 significant bits. The first convolution multiplies raw [0, 255] pixels: on an SSR-Net its
    rounding alone moved the age by up to 0.17 years (every other layer <= 0.07), for ~1,300 weights
    (~2.7 KB in float32). Each restored weight's DEQUANTIZE op is removed and its float32 output tensor
    becomes the constant.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model, reference = _flatbuffer_model(fp16), _flatbuffer_model(fp32)
    restored = 0
    for subgraph, reference_graph in zip(model.subgraphs, reference.subgraphs, strict=True):
        producer = {int(t): op for op in subgraph.operators for t in op.outputs}
        first = _first_weighted_ops(model, subgraph)
        first_reference = _first_weighted_ops(reference, reference_graph)
        if [_op_name(model, op) for op in first] != [_op_name(reference, op) for op in first_reference]:
            raise UsageError("The fp16 and fp32 conversions differ in their first layers.")
        drop = set()
        for op, reference_op in zip(first, first_reference, strict=True):
            for slot, index in enumerate(op.inputs):
                dequantize = producer.get(int(index))
                if dequantize is None or _op_name(model, dequantize) != "DEQUANTIZE":
                    continue
                source = subgraph.tensors[int(dequantize.inputs[0])]
                original = reference_graph.tensors[int(reference_op.inputs[slot])]
                data = reference.buffers[original.buffer].data
                if source.type != schema.TensorType.FLOAT16 or original.type != schema.TensorType.FLOAT32:
                    continue
                if data is None or len(data) != 2 * len(model.buffers[source.buffer].data):
                    raise UsageError("The fp16 and fp32 conversions differ in a first layer's weights.")
                buffer = schema.BufferT()
                buffer.data = np.array(data, dtype=np.uint8)
                model.buffers.append(buffer)
                subgraph.tensors[int(index)].buffer = len(model.buffers) - 1
                drop.add(id(dequantize))
                if sum(t.buffer == source.buffer for g in model.subgraphs for t in g.tensors) == 1:
                    model.buffers[source.buffer].data = None  # the fp16 copy is no longer read
                restored += 1
        subgraph.operators = [op for op in subgraph.operators if id(op) not in drop]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), restored


def tflite_op_names(flatbuffer: bytes) -> set[str]:
    """Names of the operators in a TFLite model (``"CONV_2D"``, ...; custom/Flex ops show as such)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # No delegate: listing ops needs none, and XNNPACK can abort on some int8 graphs (c3ae.runtime).
    interpreter = Interpreter(
        model_content=flatbuffer,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    return {op["op_name"] for op in interpreter._get_ops_details()}


def run_tflite(flatbuffer: bytes, inputs: dict, num_threads: int = 1) -> dict:
    """Run the default signature on a dict of named float32 arrays; returns a dict of named outputs."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer, num_threads=num_threads)
    runner = interpreter.get_signature_runner()
    return runner(**inputs)
