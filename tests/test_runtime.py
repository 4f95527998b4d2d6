"""Runtime backends: Keras, TFLite and ONNX agree on the same crops; files, bundled names and errors."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from c3ae.runtime import BackendError, load_backend

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    from c3ae.models import build_c3ae

    return build_c3ae(se=True, gender=True)  # 55K parameters


@pytest.fixture(scope="module")
def crops():
    rng = np.random.default_rng(0)
    return {n: rng.uniform(0, 255, (5, 64, 64, 3)).astype(np.float32) for n in ("outer", "middle", "inner")}


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    """The model as .keras, .tflite and .onnx files."""
    from c3ae.export.onnx import to_onnx
    from c3ae.export.tflite import to_tflite

    folder = tmp_path_factory.mktemp("runtime")
    paths = {"keras": folder / "m.keras", "tflite": folder / "m.tflite", "onnx": folder / "m.onnx"}
    model.save(paths["keras"])
    paths["tflite"].write_bytes(to_tflite(model))
    paths["onnx"].write_bytes(to_onnx(model))
    return paths


def test_three_backends_agree(model, crops, files):
    results = {}
    for name in ("keras", "tflite", "onnx"):
        backend = load_backend(files[name], threads=1)
        assert backend.name == name
        assert backend.input_names == ("outer", "middle", "inner")
        assert backend.output_names == ("age", "age_bins", "gender")
        assert backend.input_size == 64
        results[name] = backend.predict(crops)
        for output, value in results[name].items():
            assert value.dtype == np.float32 and value.shape[0] == 5, (name, output)
    for name in ("tflite", "onnx"):
        for output, value in results["keras"].items():
            np.testing.assert_allclose(results[name][output], value, rtol=1e-4, atol=2e-4, err_msg=name)
    assert results["keras"]["age"].shape == (5, 1) and results["keras"]["age_bins"].shape == (5, 12)


@pytest.mark.slow
def test_keras_model_in_memory_converted_for_each_backend(model, crops):
    expected = load_backend(model).predict(crops)
    for name in ("tflite", "onnx"):
        actual = load_backend(model, name).predict(crops)
        np.testing.assert_allclose(actual["gender"], expected["gender"], atol=1e-4, err_msg=name)


def test_batch_size_changes(files, crops):
    backend = load_backend(files["tflite"], "tflite", threads=1)
    full = backend.predict(crops)["age"]
    one = backend.predict({k: v[:1] for k, v in crops.items()})["age"]
    three = backend.predict({k: v[2:] for k, v in crops.items()})["age"]
    np.testing.assert_allclose(one, full[:1], atol=1e-4)
    np.testing.assert_allclose(three, full[2:], atol=1e-4)
    assert backend.predict(crops)["age"].shape == (5, 1)


def test_artifacts_describe_their_preprocessing(files):
    for name in ("tflite", "onnx"):
        metadata = load_backend(files[name]).metadata
        assert metadata["preprocessing"]["channel_order"] == "BGR"
        assert metadata["preprocessing"]["value_range"] == [0.0, 255.0]
        assert set(metadata["inputs"]) == {"outer", "middle", "inner"}
        assert metadata["inputs"]["outer"]["shape"] == [None, 64, 64, 3]


def test_shipped_files_run_without_tensorflow(files, crops, tmp_path):
    np.save(tmp_path / "crops.npy", np.stack([crops[n] for n in ("outer", "middle", "inner")]))
    script = f"""
import sys, numpy as np
from c3ae.runtime import load_backend
stack = np.load({str(tmp_path / "crops.npy")!r})
for path in ({str(files["tflite"])!r}, {str(files["onnx"])!r}):
    out = load_backend(path, threads=1).predict(dict(zip(("outer", "middle", "inner"), stack)))
    assert out["age"].shape == (5, 1), out
assert "tensorflow" not in sys.modules and "keras" not in sys.modules, "TensorFlow was imported"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_bundled_name_prefers_the_shipped_artifact(files, crops, monkeypatch, tmp_path):
    import c3ae.bundled

    monkeypatch.setattr(c3ae.bundled, "WEIGHTS_DIR", tmp_path)  # the one weights folder
    (tmp_path / "tiny.keras").write_bytes(files["keras"].read_bytes())
    (tmp_path / "tiny.onnx").write_bytes(files["onnx"].read_bytes())
    onnx = load_backend("tiny", "onnx")
    assert onnx.name == "onnx" and onnx.metadata  # the shipped file, with its metadata
    tflite = load_backend("tiny", "tflite")  # none shipped: converted from tiny.keras
    assert tflite.name == "tflite"
    assert load_backend("tiny").name == "keras"
    np.testing.assert_allclose(tflite.predict(crops)["age"], onnx.predict(crops)["age"], atol=2e-4)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda f: load_backend(f["tflite"], "pytorch"), "Unknown backend 'pytorch'"),
        (lambda f: load_backend(f["tflite"].with_name("missing.tflite")), "does not exist"),
        (lambda f: load_backend(f["onnx"], "tflite"), "ONNX file"),
        (lambda f: load_backend("no-such-model"), "neither a .keras file nor a bundled model"),
        (lambda f: load_backend(f["tflite"], threads=0), "threads must be >= 1"),
    ],
)
def test_user_errors(files, call, message):
    with pytest.raises(BackendError, match=message):
        call(files)


def test_not_a_model_file(tmp_path):
    for suffix in (".tflite", ".onnx", ".keras"):
        path = tmp_path / f"junk{suffix}"
        path.write_bytes(b"not a model at all")
        with pytest.raises(BackendError):
            load_backend(path)


def test_wrong_inputs_are_refused(files, crops):
    backend = load_backend(files["onnx"])
    with pytest.raises(ValueError, match="Missing model inputs"):
        backend.predict({"outer": crops["outer"]})
    with pytest.raises(ValueError, match=r"\(N, 64, 64, 3\)"):
        backend.predict({n: v[:, :32] for n, v in crops.items()})


def test_tflite_uses_every_core_by_default_and_answers_the_same_to_the_bit(crops):
    """LiteRT's own default is one thread; ours is one per core (at most 4). Thread counts split the work,
    not the sums: every output is equal to the bit."""
    import os

    default = load_backend("c3ae-kd", "tflite")
    assert default.threads == min(4, os.cpu_count() or 1)
    one, two = load_backend("c3ae-kd", "tflite", threads=1), load_backend("c3ae-kd", "tflite", threads=2)
    expected = one.predict(crops)
    for backend in (default, two):
        outputs = backend.predict(crops)
        assert outputs.keys() == expected.keys()
        for name in expected:
            assert np.array_equal(outputs[name], expected[name]), name
