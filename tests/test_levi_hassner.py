"""Tests for c3ae.models.levi_hassner: the Levi & Hassner (2015) Adience age-group / gender CNN."""

import keras
import numpy as np
import pytest
from keras import layers
from model_checks import assert_tflite_builtin_and_close

from c3ae.models.levi_hassner import (
    ADIENCE_AGE_GROUPS,
    ADIENCE_MEAN_BGR,
    _caffe_pool_padding,
    build_levi_hassner,
    levi_hassner_feature_sizes,
)

# 59 pixels: conv1 -> 14 (even: "same" pooling), pool1 -> 7 (odd: "valid"), pool2 -> 3, pool3 -> 1.
TINY = {"input_size": 59, "fc_units": (16,)}
# conv1..conv3 are fixed: 14,208 + 614,656 + 885,120 = 1,513,984; fc1 384*16 + 16 = 6,160.
TINY_TRUNK = 1_513_984 + 6_160


def bgr_batch(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 255.0, (n, size, size, 3)).astype("float32")


def predict(model: keras.Model, x: np.ndarray) -> dict:
    return {k: keras.ops.convert_to_numpy(v) for k, v in model(x, training=False).items()}


def caffe_max_pool(x: np.ndarray, size: int = 3, stride: int = 2) -> np.ndarray:
    """Caffe's ceil-mode max pooling (no padding), NHWC."""
    side = x.shape[1]
    out = int(np.ceil((side - size) / stride)) + 1
    result = np.empty((x.shape[0], out, out, x.shape[3]), x.dtype)
    for i in range(out):
        for j in range(out):
            window = x[:, i * stride : i * stride + size, j * stride : j * stride + size]
            result[:, i, j] = window.max(axis=(1, 2))
    return result


def soften_head(model: keras.Model, head: str) -> keras.Model:
    # Raw mean-subtracted pixels through random weights saturate the head; scale it down so the comparisons
    # below look at probabilities away from 0 and 1.
    kernel = model.get_layer(head).kernel
    kernel.assign(kernel * 0.03)
    return model


@pytest.fixture(scope="module")
def tiny_age() -> keras.Model:
    keras.utils.set_random_seed(0)
    return soften_head(build_levi_hassner(**TINY), "age_group")


@pytest.fixture(scope="module")
def tiny_gender() -> keras.Model:
    keras.utils.set_random_seed(1)
    return soften_head(build_levi_hassner(task="gender", **TINY), "gender")


def test_default_parameter_count():
    # conv1 7*7*3*96 + 96 = 14,208; conv2 5*5*96*256 + 256 = 614,656; conv3 3*3*256*384 + 384 = 885,120;
    # 227 px: conv1 56 -> pool1 28 -> pool2 14 -> pool3 7 (Caffe ceil mode), flatten 7*7*384 = 18,816;
    # fc1 18,816*512 + 512 = 9,634,304; fc2 = fc3 = 512*512 + 512 = 262,656; age_group 512*8 + 8 = 4,104.
    # Total 11,677,704 (the paper's two fc layers: 11,415,048). LRN and the mean have no weights.
    model = build_levi_hassner()
    assert model.count_params() == 11_677_704
    assert model.get_layer("flatten").output.shape == (None, 18_816)
    assert build_levi_hassner(fc_units=(512, 512)).count_params() == 11_415_048
    assert build_levi_hassner(task="gender").count_params() == 11_677_704 - 4_104 + 513


def test_tiny_parameter_count(tiny_age, tiny_gender):
    assert levi_hassner_feature_sizes(59) == (14, 7, 3, 1)
    assert tiny_age.count_params() == TINY_TRUNK + 16 * 8 + 8
    assert tiny_gender.count_params() == TINY_TRUNK + 16 + 1


def test_outputs(tiny_age, tiny_gender):
    assert len(ADIENCE_AGE_GROUPS) == 8 and ADIENCE_AGE_GROUPS[0] == "0-2" and ADIENCE_AGE_GROUPS[-1] == "60+"
    x = bgr_batch(3, 59)
    assert [t.name for t in tiny_age.inputs] == ["image"]
    age = predict(tiny_age, x)
    assert set(age) == {"age_group"} and age["age_group"].shape == (3, 8)
    np.testing.assert_allclose(age["age_group"].sum(axis=1), 1.0, atol=1e-5)
    gender = predict(tiny_gender, x)
    assert set(gender) == {"gender"} and gender["gender"].shape == (3, 1)
    assert np.all((gender["gender"] > 0.01) & (gender["gender"] < 0.99))
    five = build_levi_hassner(5, input_size=59, fc_units=(4, 4))
    assert predict(five, x)["age_group"].shape == (3, 5)


def test_layers_follow_the_caffe_model(tiny_age):
    assert isinstance(tiny_age.get_layer("norm1"), layers.Layer)
    lrn = tiny_age.get_layer("norm2").get_config()
    assert (lrn["size"], lrn["alpha"], lrn["beta"]) == (5, 1e-4, 0.75)
    conv1 = tiny_age.get_layer("conv1").get_config()
    assert (conv1["filters"], conv1["kernel_size"], conv1["strides"]) == (96, (7, 7), (4, 4))
    assert tiny_age.get_layer("drop1").rate == 0.5
    names = [layer.name for layer in build_levi_hassner(input_size=59, fc_units=(8,), lrn=False).layers]
    assert "norm1" not in names and "norm2" not in names


def test_mean_is_subtracted_inside_the_graph(tiny_age):
    x = bgr_batch(2, 59)
    got = keras.ops.convert_to_numpy(tiny_age.get_layer("mean_subtract")(x))
    np.testing.assert_allclose(got, x - np.array(ADIENCE_MEAN_BGR, "float32"), atol=1e-4)


@pytest.mark.parametrize("side", [3, 4, 5, 6, 13, 14, 27, 28, 55, 56])
def test_pooling_matches_caffe_ceil_mode(side):
    x = np.random.default_rng(side).normal(size=(2, side, side, 4)).astype("float32")
    pool = layers.MaxPooling2D(3, 2, padding=_caffe_pool_padding(side))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(pool(x)), caffe_max_pool(x))


def test_keras_file_round_trip(tiny_age, tiny_gender, tmp_path):
    x = bgr_batch(3, 59, seed=5)
    for model in (tiny_age, tiny_gender):
        path = tmp_path / f"{model.name}_{model.output_names[0]}.keras"
        model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
        expected, got = predict(model, x), predict(loaded, x)
        assert set(got) == set(expected)
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], atol=1e-6)


def test_config_round_trip(tiny_age):
    rebuilt = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(tiny_age))
    assert [layer.name for layer in rebuilt.layers] == [layer.name for layer in tiny_age.layers]
    clone = type(tiny_age).from_config(tiny_age.get_config())
    assert clone.count_params() == tiny_age.count_params()
    clone.set_weights(tiny_age.get_weights())
    x = bgr_batch(2, 59)
    np.testing.assert_allclose(predict(clone, x)["age_group"], predict(tiny_age, x)["age_group"], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["age_group", "gender"])
def test_tflite_builtin_ops_and_outputs(task, tiny_age, tiny_gender):
    model = tiny_age if task == "age_group" else tiny_gender
    assert model.output_names == [task]
    assert_tflite_builtin_and_close(model)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 1}, r"num_classes must be an integer >= 2"),
        ({"num_classes": 1, "task": "gender"}, r"num_classes must be an integer >= 2"),
        ({"task": "age"}, r"Unknown task 'age'"),
        ({"input_size": 50}, r"input_size=50 is too small .* at least 51"),
        ({"fc_units": ()}, r"fc_units must be a non-empty sequence of positive integers"),
        ({"fc_units": (512, 0)}, r"fc_units must be a non-empty sequence of positive integers"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_levi_hassner(**kwargs)
