"""Dead layers: found on real inputs, reported by export, and kept away from XNNPACK at run time."""

import keras
import numpy as np
import pytest
from test_data import build_tiny_manifest
from test_export import adapt_batchnorm

from c3ae.diagnostics import constant_layers, layer_spreads
from c3ae.export.verify import compare, export_model, manifest_crops, probe_xnnpack
from c3ae.models import build_ssrnet
from c3ae.runtime import TFLiteBackend, degenerate_int8_tensors


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return build_tiny_manifest(tmp_path_factory.mktemp("manifest"))["manifest"]


def ssrnet(crops, **options):
    """An untrained SSR-Net (stable variant) whose BatchNorm statistics fit the crops, as training would."""
    model = build_ssrnet(p_activation="softmax", clamp_output=True, **options)
    adapt_batchnorm(model, crops)
    return model


def kill(model, *names, relu: bool = False):
    """Make each named Dense layer output 0 for every face, as a dead ReLU layer does.

    ``relu``: as training kills one (weights kept, a bias so negative that no face switches a unit on);
    else with zero weights and bias, for any activation.
    """
    for name in names:
        layer = model.get_layer(name)
        if relu:
            layer.bias.assign(np.full(layer.bias.shape, -1e4, "float32"))
        else:
            layer.kernel.assign(np.zeros(layer.kernel.shape, "float32"))
            layer.bias.assign(np.zeros(layer.bias.shape, "float32"))
    return model


@pytest.fixture(scope="module")
def crops(manifest):
    return manifest_crops(build_ssrnet(), manifest, "verify")["inputs"]


@pytest.mark.slow
def test_untrained_relu_mixing_layers_are_easily_dead(crops):
    # Why mix_activation exists: on these 6 faces, fresh models with 3-unit ReLU mixing layers often have a
    # whole stage that ignores the face (seeds 0-7: 4 of 8); with leaky mixing none has.
    dead = {}
    for seed in range(4):
        keras.utils.set_random_seed(seed)
        relu = constant_layers(ssrnet(crops), crops)
        keras.utils.set_random_seed(seed)
        leaky = constant_layers(ssrnet(crops, mix_activation="leaky_relu"), crops)
        assert leaky == []
        dead[seed] = [name for name in relu if name.endswith("_fuse")]
    assert sum(bool(names) for names in dead.values()) >= 1, dead  # keras 3.15: seeds 0 and 1 have one


@pytest.mark.slow
def test_healthy_model_has_no_constant_layer(crops):
    keras.utils.set_random_seed(0)
    model = ssrnet(crops, mix_activation="leaky_relu")
    assert constant_layers(model, crops) == []
    spreads = layer_spreads(model, crops)
    assert "age" in spreads and "s_conv1" in spreads and all(v > 0 for v in spreads.values())


def test_dead_layers_and_everything_they_feed_are_named(crops):
    keras.utils.set_random_seed(0)
    model = kill(ssrnet(crops, mix_activation="leaky_relu"), "stage2_s_mix")
    # s_mix x x_mix is zero, so the stage's features, p and eta no longer depend on the face.
    assert constant_layers(model, crops) == [
        "stage2_s_mix",
        "stage2_fuse",
        "stage2_feat",
        "stage2_p",
        "stage2_eta",
    ]


@pytest.mark.slow
def test_int8_export_of_a_dead_layer_is_reported_and_runs_off_xnnpack(crops, manifest, tmp_path):
    keras.utils.set_random_seed(0)
    model = kill(ssrnet(crops), "stage1_s_mix", "stage1_x_mix", relu=True)
    output = tmp_path / "dead.tflite"
    try:
        report = export_model(model, output, "tflite", "int8", calibration=manifest)
    except Exception as error:  # the untrained model may also fail the accuracy gate; the report says why
        report = error.report
    verification = report["verification"]
    assert {"stage1_s_mix", "stage1_x_mix", "stage1_p"} <= set(verification["constant_layers"])
    assert verification["xnnpack"]["passed"] is False and verification["xnnpack"]["error"]
    assert "builtin kernels" in verification["runtime"]
    artifact = output if output.exists() else tmp_path / "dead.tflite.failed"
    backend = TFLiteBackend(artifact.read_bytes())
    assert degenerate_int8_tensors(backend.interpreter) and backend.delegate is False
    assert np.isfinite(backend.predict({"image": crops["image"][:4]})["age"]).all()


@pytest.mark.slow
def test_xnnpack_probe_passes_a_healthy_int8_graph(crops, manifest, tmp_path):
    from c3ae.export.tflite import to_tflite

    keras.utils.set_random_seed(0)
    model = ssrnet(crops, mix_activation="leaky_relu")

    path = tmp_path / "ok.tflite"
    path.write_bytes(to_tflite(model, "int8", [crops]))
    assert probe_xnnpack(path) == {"passed": True}
    backend = TFLiteBackend(path.read_bytes())
    assert not degenerate_int8_tensors(backend.interpreter) and backend.delegate is True


def test_an_artifact_that_gives_every_face_the_same_age_fails():
    keras_age = np.array([[20.0], [35.0], [50.0], [65.0]])
    flat = np.full_like(keras_age, 42.5)  # within 22.5 years of each: a loose MAE gate alone might pass it
    report = compare({"age": keras_age}, {"age": flat}, "int8", tolerance=100.0)
    failed = [c["check"] for c in report["checks"] if not c["passed"]]
    assert failed == ["age spread across crops, artifact / keras"] and not report["passed"]
    assert report["outputs"]["age"]["artifact_spread"] == 0.0


def test_a_model_that_gives_every_face_the_same_age_is_warned_about():
    same = np.full((4, 1), 30.0)
    report = compare({"age": same}, {"age": same}, "none")
    assert report["passed"]  # the artifact is faithful to its Keras model...
    assert report["warnings"] == ["the Keras model itself gives every crop the same age"]  # ...which is not
