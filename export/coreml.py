"""Convert a Keras model to a CoreML ML program (``.mlpackage``); needs the ``[coreml]`` extra.

``pip install "c3ae[coreml]"`` installs coremltools 9.0. On Linux coremltools converts but cannot run a
model, so a CoreML export is checked structurally (names, shapes, types, metadata) rather than numerically.
"""

from __future__ import annotations

import tempfile

import keras

from c3ae.errors import C3AEError, UsageError

COREML_QUANT_TYPES = ("none", "fp16")


class CoreMLUnavailableError(C3AEError, ImportError):
    """coremltools is missing or unusable on this Python."""


def _coremltools():
    try:
        import coremltools
    except Exception as error:  # ImportError, or a broken native extension
        raise CoreMLUnavailableError(
            'CoreML export needs coremltools: install the extra with pip install "c3ae[coreml]" '
            f"(coremltools==9.0); importing it failed: {error}"
        ) from error
    return coremltools


def coreml_available() -> bool:
    """Whether coremltools imports here."""
    try:
        _coremltools()
    except CoreMLUnavailableError:
        return False
    return True


def to_coreml(model: keras.Model, quant: str = "none", metadata: bool = True, max_batch: int = 64):
    """A ``coremltools.models.MLModel`` (ML program) of ``model``; save it with ``.save("x.mlpackage")``.

    Inputs keep the Keras names (float32 NHWC BGR crops, raw pixels in [0, 255], batch 1..``max_batch``),
    outputs are renamed to ``age``, ``gender``, ``age_bins``, ... ``quant``: ``"none"`` computes in float32,
    ``"fp16"`` in float16 (CoreML's default for ML programs). The preprocessing description goes into
    ``user_defined_metadata`` and the input/output descriptions.
    """
    import tensorflow as tf

    from c3ae.export.checks import check_finite
    from c3ae.export.metadata import describe_model, flat_properties
    from c3ae.export.tflite import write_saved_model

    if quant not in COREML_QUANT_TYPES:
        raise UsageError(
            f"CoreML export supports quantisation {' or '.join(COREML_QUANT_TYPES)}, not {quant!r}."
        )
    ct = _coremltools()
    check_finite(model)
    precision = ct.precision.FLOAT32 if quant == "none" else ct.precision.FLOAT16
    with tempfile.TemporaryDirectory(prefix="c3ae-coreml-") as folder:
        write_saved_model(model, folder)
        signature = tf.saved_model.load(folder).signatures["serving_default"]
        renames = _output_renames(tf, signature)
        inputs = [
            ct.TensorType(
                name=t.name,
                shape=(ct.RangeDim(1, int(max_batch), 1), *(int(d) for d in t.shape[1:])),
                dtype=float,
            )
            for t in model.inputs
        ]
        mlmodel = ct.convert(
            folder,
            source="tensorflow",
            convert_to="mlprogram",
            inputs=inputs,
            compute_precision=precision,
            minimum_deployment_target=ct.target.iOS15,
        )
    spec = mlmodel.get_spec()
    for output in list(spec.description.output):
        if output.name in renames and renames[output.name] != output.name:
            ct.utils.rename_feature(spec, output.name, renames[output.name])
    mlmodel = ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir)
    if metadata:
        description = describe_model(model, {"quantisation": quant})
        mlmodel.short_description = (
            "c3ae age/gender model: float32 BGR crops, raw pixels in [0, 255]; normalised inside the model"
        )
        mlmodel.author = "c3ae"
        for key, value in flat_properties(description).items():
            mlmodel.user_defined_metadata[key] = value
        for name, info in description["inputs"].items():
            mlmodel.input_description[name] = (
                f"float32 NHWC BGR crop, raw pixels in [0, 255], {info['shape'][1]}x{info['shape'][2]}: "
                f"{info['crop']}"
            )
        for name, text in description["outputs"].items():
            if name in {o.name for o in mlmodel.get_spec().description.output}:
                mlmodel.output_description[name] = text
    return mlmodel


def _output_renames(tf, signature) -> dict[str, str]:
    """Graph output name (``Identity_1``) -> signature output name (``age_bins``), checked on shapes."""
    specs = tf.nest.flatten(signature.structured_outputs)  # dict keys in sorted order, as graph outputs
    keys = sorted(signature.structured_outputs)
    renames = {}
    for key, spec, tensor in zip(keys, specs, signature.outputs, strict=True):
        if spec.shape.as_list() != tensor.shape.as_list():
            raise RuntimeError(f"Cannot match the CoreML output {tensor.name} to {key!r}: shapes differ.")
        renames[tensor.name.split(":")[0]] = key
    return renames


def describe_coreml(mlmodel) -> dict:
    """Names, shapes and types of an MLModel's inputs and outputs, and its user metadata (for checks)."""
    spec = mlmodel.get_spec()

    def feature(f):
        kind = f.type.WhichOneof("Type")
        info = {"type": kind}
        if kind == "multiArrayType":
            array = f.type.multiArrayType
            info["shape"] = [int(d) for d in array.shape]
            info["dtype"] = {65568: "float32", 65552: "float16", 131104: "int32"}.get(array.dataType)
        return info

    return {
        "spec_version": int(spec.specificationVersion),
        "kind": spec.WhichOneof("Type"),
        "inputs": {f.name: feature(f) for f in spec.description.input},
        "outputs": {f.name: feature(f) for f in spec.description.output},
        "metadata": dict(spec.description.metadata.userDefined),
    }
