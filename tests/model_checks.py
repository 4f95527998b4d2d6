"""Checks every model family must pass: .keras round trip and builtin-only TFLite with matching numerics."""

from pathlib import Path

import keras
import numpy as np

from c3ae.export.tflite import run_tflite, tflite_op_names, to_tflite


def random_inputs(model: keras.Model, batch: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Random BGR crops with raw pixel values in [0, 255], one array per named model input."""
    rng = np.random.default_rng(seed)
    return {
        tensor.name: rng.uniform(0, 255, size=(batch, *tensor.shape[1:])).astype("float32")
        for tensor in model.inputs
    }


def predict(model: keras.Model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    feed = inputs if isinstance(model.input, dict) else inputs[model.inputs[0].name]
    outputs = model.predict(feed, verbose=0)
    return outputs if isinstance(outputs, dict) else {model.output_names[0]: outputs}


def assert_keras_round_trip(model: keras.Model, tmp_path: Path) -> None:
    """Save to .keras, load with safe_mode=True, and get identical outputs."""
    path = tmp_path / f"{model.name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    inputs = random_inputs(model)
    expected, actual = predict(model, inputs), predict(loaded, inputs)
    assert set(actual) == set(expected)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-6, atol=1e-6, err_msg=name)
    assert loaded.count_params() == model.count_params()


def assert_tflite_builtin_and_close(model: keras.Model, rtol: float = 1e-4, atol: float = 1e-4) -> set[str]:
    """Convert to TFLite with builtin ops only and compare every named output with Keras."""
    flatbuffer = to_tflite(model)
    ops = tflite_op_names(flatbuffer)
    assert not [op for op in ops if "FLEX" in op.upper() or "CUSTOM" in op.upper()], ops
    assert not {"VAR_HANDLE", "READ_VARIABLE"} & ops, f"variables were not frozen: {ops}"
    inputs = random_inputs(model)
    expected = predict(model, inputs)
    actual = run_tflite(flatbuffer, inputs)
    assert set(actual) == set(expected)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=rtol, atol=atol, err_msg=name)
    return ops
