"""Self-describing artifacts: what a model expects as input, embedded in every exported file.

The description (:func:`describe_model`) is JSON: named inputs with shape, dtype, channel order (BGR), value
range ([0, 255], raw pixels) and crop geometry; named outputs with their units. TFLite files carry it as a
``Model.metadata`` entry named ``"c3ae"`` pointing at a buffer of UTF-8 JSON (:func:`add_tflite_metadata`);
ONNX files as ``metadata_props`` (key ``"c3ae"`` plus flat keys). Reading it needs no TensorFlow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from c3ae.errors import UsageError

METADATA_KEY = "c3ae"

# The chip keys an artifact may carry, with their allowed ranges (inclusive) and types: read from files that
# may come from anywhere, so a value outside them is refused (a chip side of 10**9 would allocate terabytes).
CHIP_RANGES: dict[str, tuple[type, float, float]] = {
    "size": (int, 16, 1024),
    "face_width": (float, 0.05, 1.0),
    "jpeg_quality": (int, 1, 100),
    "crop_size": (int, 8, 512),
    "single_margin": (float, 0.0, 2.0),
    "context": (float, 0.0, 10.0),
}


class ForeignModelError(UsageError):
    """A model file that is not a c3ae model, or whose c3ae description holds impossible values."""


def check_chip(chip: Any, origin: str) -> dict:
    """``chip`` (a ``preprocessing.chip`` read from a file) as a dict, each known key checked against
    :data:`CHIP_RANGES`; None gives {}. Raises :class:`ForeignModelError` naming the key and its range."""
    if chip is None:
        return {}
    if not isinstance(chip, Mapping):
        raise ForeignModelError(f"{origin}: preprocessing.chip is {chip!r:.60}, not a table of settings.")
    for key, value in chip.items():
        if key not in CHIP_RANGES:
            continue
        kind, low, high = CHIP_RANGES[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (
            number
            and math.isfinite(value)
            and low <= value <= high
            and (kind is float or float(value).is_integer())
        ):
            what = "an integer" if kind is int else "a number"
            raise ForeignModelError(
                f"{origin}: preprocessing.chip.{key} is {value!r:.40}; it must be {what} from {low:g} to "
                f"{high:g}."
            )
    return dict(chip)


def check_description(description: Any, origin: str) -> dict:
    """``description`` (the ``c3ae`` metadata of a ``.tflite`` / ``.onnx`` file) if it describes a c3ae
    model (a known family) with a possible face pipeline; else :class:`ForeignModelError`, one sentence
    naming the file (and the key and its allowed range for an impossible value)."""
    from c3ae.models.spec import ModelInfo

    if not isinstance(description, Mapping) or not description:
        raise ForeignModelError(
            f"{origin} is not a c3ae model: it carries no c3ae description (metadata {METADATA_KEY!r}); use "
            "a file that 'c3ae export' wrote."
        )
    try:
        ModelInfo.from_dict(description.get("model_info"))
    except (UsageError, TypeError, ValueError):
        raise ForeignModelError(
            f"{origin} is not a c3ae model: its description names no known model family (model_info); use a "
            "file that 'c3ae export' wrote."
        ) from None
    preprocessing = description.get("preprocessing")
    if preprocessing is not None and not isinstance(preprocessing, Mapping):
        raise ForeignModelError(f"{origin}: its preprocessing description is not a table; export it again.")
    check_chip((preprocessing or {}).get("chip"), origin)
    return dict(description)


OUTPUT_DESCRIPTIONS = {
    "age": "(N, 1) float32: age in years",
    "gender": "(N, 1) float32: probability of male (1 = male, 0 = female)",
    "age_bins": "(N, K) float32: distribution over age bins (C3AE: 12 bins at 0, 10, ..., 110 years)",
    "age_group": "(N, K) float32: class probabilities over age groups",
}

CROP_GEOMETRY = {
    "outer": "C3AE triple box: the aligned face box (w x h) grown by |w - h| on every side",
    "middle": "C3AE triple box: square centred on the nose, half-size nose_y - face_y1",
    "inner": "C3AE triple box: square centred on the nose, half-size w / 2",
    "image": "the aligned face box grown by 0.4 of its width and height on each side",
}


def trained_preprocessing(trained: Mapping | None) -> dict:
    """The face pipeline a model was trained with, as its artifacts carry it: ``trained`` (a model card's
    ``preprocessing``, or a ``.keras`` model's ``preprocessing``) with its chip complete, the context
    window (``ChipSpec.context``, inner-box widths; 0 = the whole chip) always stated, and ``flip`` (mirror
    test-time averaging, the estimator's default). Without ``trained``: the default chip, context 0."""
    from c3ae.faces import DEFAULT_CHIP

    record = json.loads(json.dumps(dict(trained or {})))
    record["chip"] = {**DEFAULT_CHIP.to_dict(), "context": 0.0, **(record.get("chip") or {})}
    record["chip"]["context"] = float(record["chip"]["context"] or 0.0)
    record.setdefault("flip", True)
    return record


def describe_model(model, extra: dict | None = None, preprocessing: Mapping | None = None) -> dict:
    """The preprocessing contract of a Keras model: inputs, outputs, channel order, value range, crops, and
    the face pipeline it was trained with (``preprocessing``, default the model's own ``preprocessing``
    attribute, which ``c3ae.bundled.load_model`` sets; see :func:`trained_preprocessing`)."""
    from c3ae._version import __version__
    from c3ae.conventions import CHANNEL_ORDER, PIXEL_RANGE
    from c3ae.models.base import model_info

    inputs = {}
    for tensor in model.inputs:
        size = int(tensor.shape[1])
        inputs[tensor.name] = {
            "shape": [None, size, int(tensor.shape[2]), int(tensor.shape[3])],
            "dtype": "float32",
            "layout": "NHWC",
            "channel_order": CHANNEL_ORDER,
            "value_range": list(PIXEL_RANGE),
            "crop": CROP_GEOMETRY.get(tensor.name, "see c3ae.faces"),
        }
    outputs = {name: OUTPUT_DESCRIPTIONS.get(name, "float32") for name in sorted(model.output_names)}
    trained = preprocessing if preprocessing is not None else getattr(model, "preprocessing", None)
    return {
        "format": "c3ae-model",
        "c3ae_version": __version__,
        "model": model.name,
        "model_info": model_info(model).to_dict(),
        "parameters": int(model.count_params()),
        "inputs": inputs,
        "outputs": outputs,
        "preprocessing": contract(trained),
        **(extra or {}),
    }


def contract(trained: Mapping | None) -> dict:
    """The ``preprocessing`` block of an artifact's description: the input convention and the trained face
    pipeline (:func:`trained_preprocessing`: chip, context window, detector settings, flip)."""
    from c3ae.conventions import CHANNEL_ORDER, PIXEL_RANGE
    from c3ae.faces import BOX_ASPECT, TEMPLATE_IN_BOX

    pipeline = trained_preprocessing(trained)
    return {
        **{k: v for k, v in pipeline.items() if k not in ("chip", "template_in_box", "box_aspect")},
        **{
            "dtype": "float32",
            "channel_order": CHANNEL_ORDER,
            "value_range": list(PIXEL_RANGE),
            "normalisation": "inside the model: feed raw pixel values, do not scale, centre or swap channels",
            "pipeline": "detect (MTCNN, 5 landmarks) -> 5-point similarity warp onto a square chip -> JPEG "
            "round trip -> crops cut from the chip (zero padding outside it), bilinear, resized to the input "
            "side; c3ae.faces.FacePipeline + model_crops do exactly this",
            "chip": pipeline["chip"],
            "landmark_template_in_box": TEMPLATE_IN_BOX.tolist(),
            "box_aspect": BOX_ASPECT,
            "gender_labels": {"male": 1, "female": 0},
        },
    }


def flat_properties(description: dict) -> dict[str, str]:
    """String key/value pairs for formats with flat metadata (ONNX ``metadata_props``, CoreML)."""
    inputs = description["inputs"]
    first = next(iter(inputs.values()))
    return {
        METADATA_KEY: json.dumps(description, sort_keys=True),
        "inputs": ",".join(inputs),
        "outputs": ",".join(description["outputs"]),
        "family": description["model_info"]["family"],
        "crop_layout": description["model_info"]["crop_layout"],
        "input_shape": "N,{},{},3 (NHWC)".format(first["shape"][1], first["shape"][2]),
        "input_dtype": "float32",
        "channel_order": description["preprocessing"]["channel_order"],
        "value_range": "{:g},{:g}".format(*description["preprocessing"]["value_range"]),
        "normalisation": description["preprocessing"]["normalisation"],
        "gender": "probability of male (1 = male, 0 = female)",
        "age_unit": "years",
    }


# ------------------------------------------------------------------------------------------------- TFLite
def add_tflite_metadata(flatbuffer: bytes, description: dict) -> bytes:
    """``flatbuffer`` with a ``Model.metadata`` entry ``"c3ae"`` whose buffer is ``description`` as JSON."""
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    payload = json.dumps(description, sort_keys=True, separators=(",", ":")).encode("utf-8")
    data = np.frombuffer(payload, dtype=np.uint8)
    existing = [m for m in (model.metadata or []) if _name(m.name) == METADATA_KEY]
    if existing:  # replaced in its own buffer: the graph and its weights stay as they are
        model.buffers[existing[0].buffer].data = data
        return bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    buffer = schema.BufferT()
    buffer.data = data
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_KEY
    entry.buffer = len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _name(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def tflite_metadata_entries(flatbuffer: bytes) -> dict[str, bytes]:
    """``{name: bytes}`` of every ``Model.metadata`` entry of a TFLite flatbuffer (no TensorFlow needed)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(flatbuffer, 0)
    entries = {}
    for i in range(model.MetadataLength()):
        item = model.Metadata(i)
        buffer = model.Buffers(item.Buffer())
        if buffer.Offset() > 1:  # data stored after the flatbuffer (models over 2 GB)
            data = bytes(flatbuffer[buffer.Offset() : buffer.Offset() + buffer.Size()])
        else:
            array = buffer.DataAsNumpy()
            data = array.tobytes() if hasattr(array, "tobytes") else b""
        entries[_name(item.Name())] = data
    return entries


def read_tflite_metadata(flatbuffer: bytes) -> dict:
    """The description embedded by :func:`add_tflite_metadata`, or {} when there is none."""
    try:
        raw = tflite_metadata_entries(flatbuffer).get(METADATA_KEY)
        return json.loads(raw.decode("utf-8")) if raw else {}
    except (ValueError, UnicodeDecodeError, IndexError, AttributeError):
        return {}


# --------------------------------------------------------------------------------------------------- ONNX
def add_onnx_metadata(model_proto, description: dict) -> None:
    """Set ``metadata_props``, the graph's and each input's/output's ``doc_string`` (in place)."""
    props = flat_properties(description)
    del model_proto.metadata_props[:]
    for key, value in props.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value
    model_proto.doc_string = (
        "c3ae {}: inputs {} float32 NHWC, BGR, raw pixels in [0, 255] (normalised inside the model); "
        "outputs {}.".format(description["model"], props["inputs"], props["outputs"])
    )
    model_proto.producer_name = "c3ae"
    for value in model_proto.graph.input:
        spec = description["inputs"].get(value.name)
        if spec:
            value.doc_string = (
                f"float32 NHWC BGR crop, raw pixels in [0, 255], {spec['shape'][1]}x{spec['shape'][2]}: "
                f"{spec['crop']}"
            )
    for value in model_proto.graph.output:
        if value.name in description["outputs"]:
            value.doc_string = description["outputs"][value.name]


# ---------------------------------------------------------------------------------------- restamping
def restamp(path, trained: Mapping) -> None:
    """Write the face pipeline ``trained`` (:func:`trained_preprocessing`) into the artifact at ``path``
    (``.tflite``, ``.onnx`` or ``.keras``) in place, leaving its graph and weights as they are: the TFLite
    ``c3ae`` metadata buffer, the ONNX ``metadata_props``, the ``.keras`` config's ``preprocessing`` (its
    ``model.weights.h5`` is copied byte for byte). For artifacts exported before the description carried
    the context window; ``c3ae export`` writes it itself."""
    import zipfile
    from pathlib import Path

    from c3ae.files import atomic_write_bytes

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".tflite":
        data = path.read_bytes()
        description = read_tflite_metadata(data)
        description["preprocessing"] = contract(trained)
        atomic_write_bytes(path, add_tflite_metadata(data, description))
    elif suffix == ".onnx":
        import onnx

        proto = onnx.load_from_string(path.read_bytes())
        description = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
        description["preprocessing"] = contract(trained)
        add_onnx_metadata(proto, description)
        atomic_write_bytes(path, proto.SerializeToString())
    elif suffix == ".keras":
        import io

        with zipfile.ZipFile(path) as archive:
            entries = [(info, archive.read(info)) for info in archive.infolist()]
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for info, content in entries:
                if info.filename == "config.json":
                    config = json.loads(content)
                    config["config"]["preprocessing"] = trained_preprocessing(trained)
                    content = json.dumps(config).encode("utf-8")
                archive.writestr(info, content)
        atomic_write_bytes(path, buffer.getvalue())
    else:
        raise UsageError(f"{path}: restamp takes a .tflite, .onnx or .keras file.")
