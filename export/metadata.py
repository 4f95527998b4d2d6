"""Self-describing artifacts: what a model expects as input, embedded in every exported file.

The description (:func:`describe_model`) is JSON: named inputs with shape, dtype, channel order (BGR), value
range ([0, 255], raw pixels) and crop geometry; named outputs with their units. TFLite files carry it as a
``Model.metadata`` entry named ``"c3ae"`` pointing at a buffer of UTF-8 JSON (:func:`add_tflite_metadata`);
ONNX files as ``metadata_props`` (key ``"c3ae"`` plus flat keys). Reading it needs no TensorFlow.
"""

from __future__ import annotations

import json

METADATA_KEY = "c3ae"

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


def describe_model(model, extra: dict | None = None) -> dict:
    """The preprocessing contract of a Keras model: inputs, outputs, channel order, value range, crops."""
    from c3ae._version import __version__
    from c3ae.conventions import CHANNEL_ORDER, PIXEL_RANGE
    from c3ae.faces import BOX_ASPECT, DEFAULT_CHIP, TEMPLATE_IN_BOX
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
    return {
        "format": "c3ae-model",
        "c3ae_version": __version__,
        "model": model.name,
        "model_info": model_info(model).to_dict(),
        "parameters": int(model.count_params()),
        "inputs": inputs,
        "outputs": outputs,
        "preprocessing": {
            "dtype": "float32",
            "channel_order": CHANNEL_ORDER,
            "value_range": list(PIXEL_RANGE),
            "normalisation": "inside the model: feed raw pixel values, do not scale, centre or swap channels",
            "pipeline": "detect (MTCNN, 5 landmarks) -> 5-point similarity warp onto a square chip -> JPEG "
            "round trip -> crops cut from the chip (zero padding outside it), bilinear, resized to the input "
            "side; c3ae.faces.FacePipeline + model_crops do exactly this",
            "chip": DEFAULT_CHIP.to_dict(),
            "landmark_template_in_box": TEMPLATE_IN_BOX.tolist(),
            "box_aspect": BOX_ASPECT,
            "gender_labels": {"male": 1, "female": 0},
        },
        **(extra or {}),
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
    entries = [m for m in (model.metadata or []) if _name(m.name) != METADATA_KEY]
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(payload, dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_KEY
    entry.buffer = len(model.buffers) - 1
    model.metadata = [*entries, entry]
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
