"""Export to every format with verification, self-describing artifacts, refusals and CLI errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from test_data import build_tiny_manifest

from c3ae.cli import main
from c3ae.export.coreml import coreml_available
from c3ae.export.metadata import read_tflite_metadata
from c3ae.export.verify import (
    ExportError,
    NonFiniteWeightsError,
    VerificationError,
    export_model,
    report_path,
)

pytestmark = pytest.mark.slow  # trains, converts or installs: `pytest -m 'not slow'` skips it

SUFFIX = {"tflite": ".tflite", "onnx": ".onnx", "saved_model": ".savedmodel", "coreml": ".mlpackage"}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return build_tiny_manifest(tmp_path_factory.mktemp("manifest"))["manifest"]


def adapt_batchnorm(model, crops: dict) -> None:
    """Set every BatchNormalization's moving statistics to those of ``crops``, as training would.

    An untrained model's BN layers pass raw [0, 255] pixels through unnormalised, and the huge activations
    make fp16/int8 errors far larger than in any trained model; with the statistics adapted, the untrained
    model is numerically realistic.
    """
    import keras

    def layers(m):
        for layer in m.layers:
            if isinstance(layer, keras.Model):
                yield from layers(layer)
            elif isinstance(layer, keras.layers.BatchNormalization):
                yield layer

    bns = list(layers(model))
    for layer in bns:
        layer.momentum = 0.0
    model(crops, training=True)
    for layer in bns:
        layer.momentum = 0.99


@pytest.fixture(scope="module")
def model(manifest):
    import keras

    from c3ae.export.verify import manifest_crops
    from c3ae.models import build_c3ae

    keras.utils.set_random_seed(0)
    model = build_c3ae(se=True, gender=True)  # 55K parameters
    adapt_batchnorm(model, manifest_crops(model, manifest, "calibrate")["inputs"])
    return model


@pytest.fixture(scope="module")
def model_path(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    model.save(path)
    return path


def run_cli(*argv) -> int:
    return main(["export", *map(str, argv)])


def only_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


FORMATS = [
    ("tflite", "none"),
    ("tflite", "fp16"),
    ("tflite", "dynamic"),
    ("tflite", "int8"),
    ("onnx", "none"),
    ("saved_model", "none"),
    pytest.param(
        "coreml",
        "none",
        marks=pytest.mark.skipif(
            not coreml_available(), reason='coremltools is not installed (pip install "c3ae[coreml]")'
        ),
    ),
]


@pytest.mark.parametrize("fmt, quant", FORMATS)
def test_every_format_exports_and_verifies(fmt, quant, model_path, manifest, tmp_path, capsys):
    output = tmp_path / f"tiny-{quant}{SUFFIX[fmt]}"
    code = run_cli(model_path, "--format", fmt, "--quant", quant, "--calibration", manifest, "-o", output)
    assert code == 0, capsys.readouterr().err
    assert output.exists()
    report = json.loads(report_path(output).read_text())
    assert report["status"] == "passed" and report["artifact"] == str(output)
    assert report["format"] == fmt and report["quantisation"] == quant
    assert report["size_bytes"] > 0
    checks = report["verification"]["checks"]
    assert checks and all(c["passed"] for c in checks)
    if fmt != "coreml":
        assert report["verification"]["crops"] > 0
        assert "manifest" in report["verification"]["data"]
        assert set(report["verification"]["outputs"]) == {"age", "age_bins", "gender"}
    if quant == "int8":
        assert report["float_ops"] == {}  # C3AE with average pooling quantises completely
        assert "train" in report["calibration"]["data"]
    assert not [p for p in only_files(tmp_path) if "partial" in p or p.endswith(".failed")]
    out = capsys.readouterr().out
    assert f"wrote {output}" in out and "report:" in out


def test_tflite_and_onnx_describe_their_inputs(model, tmp_path):
    """Named inputs and outputs, and the preprocessing contract, inside the artifacts themselves."""
    import onnx
    from ai_edge_litert.interpreter import Interpreter

    from c3ae.export.onnx import to_onnx
    from c3ae.export.tflite import to_tflite

    flatbuffer = to_tflite(model)
    signature = Interpreter(model_content=flatbuffer).get_signature_list()["serving_default"]
    assert set(signature["inputs"]) == {"outer", "middle", "inner"}
    assert set(signature["outputs"]) == {"age", "age_bins", "gender"}
    description = read_tflite_metadata(flatbuffer)
    assert description["preprocessing"]["channel_order"] == "BGR"
    assert description["preprocessing"]["value_range"] == [0.0, 255.0]
    assert description["inputs"]["middle"]["shape"] == [None, 64, 64, 3]
    assert "nose" in description["inputs"]["middle"]["crop"]

    proto = onnx.load_from_string(to_onnx(model))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["channel_order"] == "BGR" and props["value_range"] == "0,255"
    assert json.loads(props["c3ae"])["outputs"]["gender"].startswith("(N, 1)")
    assert {i.name for i in proto.graph.input} == {"outer", "middle", "inner"}
    assert {o.name for o in proto.graph.output} == {"age", "age_bins", "gender"}
    assert proto.opset_import[0].version == 17


def test_default_verification_uses_the_bundled_faces(model, tmp_path):
    report = export_model(model, tmp_path / "m.onnx", "onnx")
    verification = report["verification"]
    assert "bundled photos" in verification["data"] and "augmentations" in verification["data"]
    assert verification["crops"] == 32  # two faces, each plain and 15 augmented
    assert report["status"] == "passed"


def test_single_crop_model_exports(tmp_path, manifest):
    from c3ae.models import build_ssrnet

    model = build_ssrnet(V=1.0, p_activation="softmax", clamp_output=True)
    report = export_model(model, tmp_path / "g.tflite", "tflite", calibration=manifest)
    assert report["inputs"] == {"image": [None, 64, 64, 3]}
    assert report["status"] == "passed" and report["outputs"] == ["gender"]


def test_int8_leaves_gem_power_in_float(manifest):
    from c3ae.export.tflite import float_ops, to_tflite
    from c3ae.export.verify import manifest_crops
    from c3ae.models import build_c3ae

    model = build_c3ae(se=True, se_pooling="gem")
    crops = manifest_crops(model, manifest, "calibrate")["inputs"]
    flatbuffer = to_tflite(model, "int8", [crops])
    assert set(float_ops(flatbuffer)) == {"POW"}
    assert read_tflite_metadata(flatbuffer)["float_ops"] == {"POW": 10}


def test_fp16_keeps_the_first_convolution_in_float32(model, manifest):
    from c3ae.export.tflite import to_tflite, weight_bytes
    from c3ae.export.verify import manifest_crops
    from c3ae.runtime import TFLiteBackend

    kept = to_tflite(model, "fp16")
    plain = to_tflite(model, "fp16", float32_input_layers=False)
    assert read_tflite_metadata(kept)["float32_weight_tensors"] == 2  # conv1's kernel and bias (BN folded)
    conv1 = 3 * 3 * 3 * 32 + 32
    assert weight_bytes(kept).get("FLOAT32", 0) - weight_bytes(plain).get("FLOAT32", 0) == 4 * conv1
    assert weight_bytes(plain)["FLOAT16"] - weight_bytes(kept)["FLOAT16"] == 2 * conv1
    crops = manifest_crops(model, manifest, "verify")["inputs"]
    expected = model.predict(crops, verbose=0)["age"]
    exact = to_tflite(model, "none")
    for flatbuffer, limit in ((exact, 1e-3), (kept, 0.1)):
        got = TFLiteBackend(flatbuffer, threads=1).predict(crops)["age"]
        assert np.abs(got - expected).max() < limit


def test_nan_weights_are_refused_naming_the_layer(tmp_path, capsys):
    from c3ae.models import build_c3ae

    model = build_c3ae()
    layer = model.get_layer("backbone").get_layer("conv3")
    kernel = layer.kernel.numpy()
    kernel[0, 0, 0, 0] = np.nan
    layer.kernel.assign(kernel)
    with pytest.raises(NonFiniteWeightsError, match="'conv3'"):
        export_model(model, tmp_path / "x.tflite")
    path = tmp_path / "nan.keras"
    model.save(path)
    output = tmp_path / "out.tflite"
    assert run_cli(path, "-o", output) == 2
    err = capsys.readouterr().err
    assert "conv3" in err and "NaN" in err and "Traceback" not in err
    assert only_files(tmp_path) == {"nan.keras"}


def test_tolerance_failure_leaves_no_valid_artifact(model_path, manifest, tmp_path, capsys):
    output = tmp_path / "tight.onnx"
    # An older export (binary, as ONNX protobufs are) must not survive next to a report saying "failed".
    output.write_bytes(b"\x08\x07\x12\x00\x00an older export")
    code = run_cli(
        model_path, "--format", "onnx", "--calibration", manifest, "--tolerance", "1e-12", "-o", output
    )
    assert code != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "failed verification" in err
    assert not output.exists()
    assert (tmp_path / "tight.onnx.failed").is_file()
    report = json.loads(report_path(output).read_text())
    assert report["status"] == "failed" and report["artifact"].endswith(".failed")
    assert not all(c["passed"] for c in report["verification"]["checks"])


def test_verification_error_carries_the_report(model, manifest, tmp_path):
    with pytest.raises(VerificationError) as caught:
        export_model(model, tmp_path / "m.tflite", "tflite", "fp16", calibration=manifest, tolerance=0.0)
    assert caught.value.report["status"] == "failed"
    assert not (tmp_path / "m.tflite").exists()


def _empty_manifest(folder: Path) -> Path:
    folder.mkdir()
    path = folder / "manifest.json"
    path.write_text(json.dumps({"format": "c3ae-manifest", "version": 1, "shards": []}))
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing model", "neither a .keras file nor a bundled model"),
        ("not a model", "not a loadable Keras model"),
        ("unknown format", "Unknown format 'tensorrt'"),
        ("unknown quant", "Quantisation 'int4' is not available for tflite"),
        ("onnx int8", "Quantisation 'int8' is not available for onnx"),
        ("empty manifest", "has no rows"),
        ("missing folder", "does not exist"),
        ("folder as file", "is a folder"),
    ],
)
def test_user_mistakes_get_one_sentence_and_exit_2(case, message, model_path, tmp_path, capsys):
    output = tmp_path / "out.tflite"
    args = [model_path, "-o", output]
    if case == "missing model":
        args[0] = tmp_path / "nope.keras"
    elif case == "not a model":
        args[0] = tmp_path / "junk.keras"
        args[0].write_text("hello")
    elif case == "unknown format":
        args += ["--format", "tensorrt"]
    elif case == "unknown quant":
        args += ["--quant", "int4"]
    elif case == "onnx int8":
        args += ["--format", "onnx", "--quant", "int8"]
    elif case == "empty manifest":
        args += ["--calibration", _empty_manifest(tmp_path / "empty")]
    elif case == "missing folder":
        output = tmp_path / "no" / "such" / "out.tflite"
        args[2] = output
    elif case == "folder as file":
        args[2] = tmp_path
    before = only_files(tmp_path)
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("c3ae export: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not output.exists()
    assert only_files(tmp_path) == before  # nothing half-written


def test_refuses_to_replace_an_unrelated_folder(model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "keep.jpg").write_bytes(b"x")
    with pytest.raises(ExportError, match="refusing to replace"):
        export_model(model, folder, "saved_model")
    assert (folder / "keep.jpg").is_file()


def test_bench_models_smoke(model_path, capsys):
    from c3ae.bench import bench_models

    rows = bench_models(
        [model_path],
        quants=("none", "fp16"),
        batch_sizes=(1, 2),
        threads=(1,),
        runs=2,
        warmup=1,
        progress=False,
    )
    combos = {(r["backend"], r["quant"], r["batch"]) for r in rows}
    assert (
        ("tflite", "fp16", 2) in combos and ("onnx", "none", 1) in combos and ("keras", "none", 1) in combos
    )
    assert all(r["ms_per_face"] > 0 and r["size_kb"] > 0 for r in rows)
    argv = ["bench", "models", str(model_path), "--backends", "tflite", "--quant", "none", "--runs", "2"]
    assert main([*argv, "--batch", "1", "--threads", "1", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "| ms_per_face |" in out and "tflite" in out
    assert main(["bench", "models", str(model_path), "--backends", "tensorrt"]) == 2
    assert "Unknown backend 'tensorrt'" in capsys.readouterr().err
