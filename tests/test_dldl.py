"""Tests for c3ae.models.dldl: DLDL expected-value age model, compact and keras.applications backbones."""

import keras
import numpy as np
import pytest
from keras import layers
from model_checks import assert_tflite_builtin_and_close

from c3ae.models.dldl import build_dldl, compact_feature_size

TINY = {"input_size": 16, "width": 4, "gender": True}


def bgr_batch(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 255.0, (n, size, size, 3)).astype("float32")


def perturb(model: keras.Model, seed: int = 1) -> keras.Model:
    """Move every weight off its initial value (BN statistics included) so round trips are meaningful."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        value = keras.ops.convert_to_numpy(weight)
        if "moving_variance" in weight.path:
            value = rng.uniform(0.5, 1.5, value.shape)
        else:
            value = value + rng.normal(0.0, 0.05, value.shape)
        weight.assign(value.astype(weight.dtype))
    return model


def predict(model: keras.Model, x: np.ndarray) -> dict:
    return {k: keras.ops.convert_to_numpy(v) for k, v in model(x, training=False).items()}


@pytest.fixture(scope="module")
def tiny_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = perturb(build_dldl(**TINY))
    # Sharpen the age distribution (near uniform at initialisation) so the expectation checks are not trivial.
    kernel = model.get_layer("age_bins").kernel
    kernel.assign(kernel * 30.0)
    return model


def test_default_parameter_count():
    # compact backbone, width 32, 64x64: conv1 3*9*32 = 864, bn1 4*32 = 128,
    # sep conv2 32*9 + 32*64 = 2,336, bn2 256, sep conv3 64*9 + 64*128 = 8,768, bn3 512,
    # sep conv4 128*9 + 128*256 = 33,920, bn4 1,024 -> 47,808; age_bins 256*101 + 101 = 25,957. Total 73,765.
    assert build_dldl().count_params() == 73_765
    assert build_dldl(gender=True).count_params() == 73_765 + 257


def test_tiny_parameter_count(tiny_model):
    # width 4: conv1 108 + bn 16 + sep2 68 + bn 32 + sep3 200 + bn 64 + sep4 656 + bn 128 = 1,272;
    # age_bins 32*101 + 101 = 3,333; gender 33.
    assert tiny_model.count_params() == 1_272 + 3_333 + 33


def test_outputs_names_and_shapes(tiny_model):
    assert [t.name for t in tiny_model.inputs] == ["image"]
    out = predict(tiny_model, bgr_batch(5, 16))
    assert set(out) == {"age", "age_bins", "gender"}
    assert out["age"].shape == (5, 1)
    assert out["age_bins"].shape == (5, 101)
    assert out["gender"].shape == (5, 1)
    assert np.all((out["gender"] > 0) & (out["gender"] < 1))
    assert set(predict(build_dldl(input_size=16, width=4), bgr_batch(1, 16))) == {"age", "age_bins"}


def test_age_is_expectation_of_bins(tiny_model):
    out = predict(tiny_model, bgr_batch(6, 16, seed=3))
    bins = out["age_bins"].astype("float64")
    np.testing.assert_allclose(bins.sum(axis=1), 1.0, atol=1e-5)
    expected = (bins * np.arange(101)).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out["age"], expected, rtol=1e-5, atol=1e-4)
    assert np.all((out["age"] >= 0) & (out["age"] <= 100))


def test_num_bins_sets_the_age_range():
    model = build_dldl(input_size=16, width=4, num_bins=11)
    out = predict(model, bgr_batch(3, 16))
    assert out["age_bins"].shape == (3, 11)
    np.testing.assert_allclose(out["age"], (out["age_bins"] * np.arange(11)).sum(1, keepdims=True), atol=1e-5)


def test_white_norm_inside_the_graph(tiny_model):
    norm = tiny_model.get_layer("white_norm")
    x = bgr_batch(2, 16)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(norm(x)), (x - 127.5) / 128.0, atol=1e-6)


def test_keras_file_round_trip(tiny_model, tmp_path):
    path = tmp_path / "dldl.keras"
    tiny_model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = bgr_batch(4, 16, seed=7)
    expected, got = predict(tiny_model, x), predict(loaded, x)
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-6, rtol=1e-6)


def test_config_round_trip(tiny_model):
    config = keras.saving.serialize_keras_object(tiny_model)
    rebuilt = keras.saving.deserialize_keras_object(config)
    assert rebuilt.count_params() == tiny_model.count_params()
    assert [layer.name for layer in rebuilt.layers] == [layer.name for layer in tiny_model.layers]
    clone = type(tiny_model).from_config(tiny_model.get_config())
    assert [w.shape for w in clone.weights] == [w.shape for w in tiny_model.weights]
    clone.set_weights(tiny_model.get_weights())
    x = bgr_batch(2, 16)
    np.testing.assert_allclose(predict(clone, x)["age"], predict(tiny_model, x)["age"], atol=1e-6)


@pytest.mark.slow
def test_tflite_builtin_ops_and_outputs(tiny_model):
    assert_tflite_builtin_and_close(tiny_model)


@pytest.mark.slow
def test_application_backbone_predicts_and_converts():
    keras.utils.set_random_seed(0)
    model = build_dldl(backbone="MobileNetV2", input_size=32, gender=True, backbone_kwargs={"alpha": 0.35})
    x = bgr_batch(2, 32)
    out = predict(model, x)
    assert out["age"].shape == (2, 1) and out["age_bins"].shape == (2, 101) and out["gender"].shape == (2, 1)
    np.testing.assert_allclose(
        out["age"], (out["age_bins"] * np.arange(101)).sum(1, keepdims=True), atol=1e-3
    )
    assert_tflite_builtin_and_close(model)


def test_mobilenetv3_own_preprocessing_is_off():
    model = build_dldl(backbone="MobileNetV3Small", input_size=32, backbone_kwargs={"alpha": 0.75})
    backbone = model.layers[2]
    assert not any(isinstance(layer, layers.Rescaling) for layer in backbone.layers)
    assert model.get_layer("white_norm").scale == 128.0


def test_efficientnet_rescaling_is_compensated():
    # EfficientNetB0 always starts with Rescaling(1/255) + an (identity, un-adapted) Normalization: the
    # WhiteNorm in front of it is adjusted so that the composition is exactly (x - 127.5) / 128.
    model = build_dldl(backbone="EfficientNetB0", input_size=32)
    backbone = model.layers[2]
    assert isinstance(backbone.layers[1], layers.Rescaling)
    normalized = backbone.layers[2].output
    probe = keras.Model(
        model.input, keras.Model(backbone.input, normalized)(model.get_layer("white_norm").output)
    )
    x = bgr_batch(2, 32)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(probe(x)), (x - 127.5) / 128.0, atol=1e-5)


def test_smallest_compact_input():
    assert compact_feature_size(8) == 1 and compact_feature_size(7) == 0
    assert predict(build_dldl(input_size=8, width=2), bgr_batch(1, 8))["age"].shape == (1, 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_bins": 1}, r"num_bins must be an integer >= 2"),
        ({"num_bins": 10.5}, r"num_bins must be an integer >= 2"),
        ({"input_size": 7}, r"input_size=7 is too small .* at least 8"),
        ({"width": 0}, r"width must be >= 1"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"backbone": "NoSuchNet"}, r"Unknown backbone 'NoSuchNet'.*MobileNetV2"),
        ({"backbone": "mobilenet_v2"}, r"Unknown backbone 'mobilenet_v2'"),
        ({"backbone": "compact", "backbone_kwargs": {"alpha": 0.5}}, r"backbone_kwargs only apply"),
        (
            {"backbone": "MobileNetV2", "backbone_kwargs": {"weights": "imagenet"}},
            r"may not set \['weights'\]",
        ),
        ({"backbone": "MobileNetV2", "input_size": 16}, r"MobileNetV2 cannot be built with input_size=16"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_dldl(**kwargs)
