import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from c3ae.layers import (
    BatchToFeatures,
    CropsToBatch,
    ExpectedValue,
    GeMPooling,
    LocalResponseNormalization,
    Mish6,
    SoftStagewiseRegression,
    SqueezeExcite,
    WhiteNorm,
    make_activation,
)

RNG = np.random.default_rng(0)


def call(layer, x):
    return keras.ops.convert_to_numpy(layer(x))


@pytest.mark.parametrize(
    "layer",
    [
        WhiteNorm(),
        Mish6(),
        GeMPooling(p=2.5, keepdims=True),
        SqueezeExcite(reduction=4, pooling="gem", activation="mish6"),
        ExpectedValue(12, start=0.0, step=10.0),
        SoftStagewiseRegression((3, 2, 4), 0.5, 0.75, 50.0, clamp=True),
        LocalResponseNormalization(size=3, alpha=2e-4, beta=0.5, bias=2.0),
        CropsToBatch(),
        BatchToFeatures(3),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_config_round_trip(layer):
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer)
    assert restored.get_config() == layer.get_config()


def test_white_norm_fixed_constants():
    x = np.array([[0.0, 127.5, 255.0]], "float32")
    np.testing.assert_allclose(call(WhiteNorm(), x), [[-127.5 / 128, 0.0, 127.5 / 128]], rtol=1e-6)


def test_mish6_matches_formula_and_clips():
    x = np.linspace(-50, 50, 1001).astype("float32")
    expected = np.clip(x * np.tanh(np.log1p(np.exp(np.minimum(x, 30)))), -6, 6)
    actual = call(Mish6(), x)
    np.testing.assert_allclose(actual, expected, atol=1e-5)
    assert actual.max() == pytest.approx(6.0) and np.isfinite(actual).all()


@pytest.mark.parametrize("name, expected", [("relu", keras.layers.ReLU), ("mish6", Mish6)])
def test_make_activation(name, expected):
    assert isinstance(make_activation(name), expected)


def test_unknown_activation_rejected():
    with pytest.raises(ValueError, match="Unknown activation 'gelu'"):
        make_activation("gelu")


def test_gem_pooling_formula_and_trainable_p():
    x = RNG.uniform(-1, 3, size=(2, 5, 4, 3)).astype("float32")
    layer = GeMPooling(p=3.0, eps=1e-6)
    expected = np.mean((np.maximum(x, 0) + 1e-6) ** 3, axis=(1, 2)) ** (1 / 3)
    np.testing.assert_allclose(call(layer, x), expected, rtol=1e-5)
    assert [w.name for w in layer.trainable_weights] == ["p"]
    assert float(keras.ops.convert_to_numpy(layer.p)) == 3.0


def test_gem_with_p_one_is_average_pooling():
    x = RNG.uniform(0, 3, size=(2, 4, 4, 5)).astype("float32")
    np.testing.assert_allclose(call(GeMPooling(p=1.0, eps=0.0), x), x.mean(axis=(1, 2)), rtol=1e-5)


@pytest.mark.parametrize("pooling", ["avg", "gem"])
def test_squeeze_excite_scales_channels(pooling):
    x = RNG.uniform(0, 1, size=(2, 6, 6, 8)).astype("float32")
    layer = SqueezeExcite(reduction=2, pooling=pooling)
    y = call(layer, x)
    ratio = y / x
    # one scale per (sample, channel), in (0, 1)
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1, :1, :], ratio.shape), rtol=1e-5)
    assert ((ratio > 0) & (ratio < 1)).all()
    assert layer.squeeze.units == 4 and layer.excite.units == 8


def test_squeeze_excite_rejects_bad_args():
    with pytest.raises(ValueError, match="SE pooling 'max'"):
        SqueezeExcite(pooling="max")
    with pytest.raises(ValueError, match="reduction must be >= 1"):
        SqueezeExcite(reduction=0)


def test_expected_value():
    p = RNG.dirichlet(np.ones(12), size=4).astype("float32")
    expected = p @ (10.0 * np.arange(12))
    np.testing.assert_allclose(call(ExpectedValue(12, step=10.0), p)[:, 0], expected, rtol=1e-5)


def ssr_reference(probs, etas, deltas, stage_num, lambda_local, lambda_d, V):
    """Literal transcription of the official merge_age loop."""
    total = np.zeros(probs[0].shape[0])
    denominator = np.ones(probs[0].shape[0])
    for k, size in enumerate(stage_num):
        denominator = denominator * size * (1 + lambda_d * deltas[k][:, 0])
        stage = np.zeros_like(total)
        for i in range(size):
            stage += (i + lambda_local * etas[k][:, i]) * probs[k][:, i]
        total += stage / denominator
    return V * total


@settings(max_examples=25, deadline=None)
@given(
    stage_num=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    lambda_local=st.floats(0, 2),
    lambda_d=st.floats(0, 0.9),
    V=st.sampled_from([1.0, 101.0]),
    seed=st.integers(0, 1000),
)
def test_soft_stagewise_regression_matches_official_formula(stage_num, lambda_local, lambda_d, V, seed):
    rng = np.random.default_rng(seed)
    probs = [rng.uniform(0, 1, (4, s)).astype("float32") for s in stage_num]
    etas = [rng.uniform(-1, 1, (4, s)).astype("float32") for s in stage_num]
    deltas = [rng.uniform(-1, 1, (4, 1)).astype("float32") for _ in stage_num]
    layer = SoftStagewiseRegression(stage_num, lambda_local, lambda_d, V)
    actual = call(layer, probs + etas + deltas)[:, 0]
    expected = ssr_reference(probs, etas, deltas, stage_num, lambda_local, lambda_d, V)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_soft_stagewise_regression_clamp_keeps_output_in_range():
    stage_num = (3, 3, 3)
    probs = [np.full((2, 3), 5.0, "float32")] * 3
    etas = [np.ones((2, 3), "float32")] * 3
    deltas = [np.full((2, 1), -1.0, "float32")] * 3  # 1 + delta = 0: the original divides by zero
    raw = call(SoftStagewiseRegression(stage_num), probs + etas + deltas)
    clamped = call(SoftStagewiseRegression(stage_num, clamp=True), probs + etas + deltas)
    assert not np.isfinite(raw).all()
    assert np.isfinite(clamped).all() and (clamped >= 0).all() and (clamped <= 101).all()


def test_soft_stagewise_regression_rejects_empty_stage():
    with pytest.raises(ValueError, match="every stage >= 1"):
        SoftStagewiseRegression((3, 0, 3))


def test_lrn_matches_tensorflow_caffe_semantics():
    x = RNG.uniform(-3, 3, size=(2, 5, 5, 16)).astype("float32")
    layer = LocalResponseNormalization(size=5, alpha=1e-2, beta=0.75, bias=1.0)
    # Caffe divides alpha by the window size; tf.nn.local_response_normalization does not.
    expected = tf.nn.local_response_normalization(x, depth_radius=2, bias=1.0, alpha=1e-2 / 5, beta=0.75)
    np.testing.assert_allclose(call(layer, x), expected.numpy(), rtol=1e-5)


def test_lrn_rejects_even_size():
    with pytest.raises(ValueError, match="positive odd number"):
        LocalResponseNormalization(size=4)


def test_crops_to_batch_and_back_equals_per_crop_concatenation():
    crops = [RNG.uniform(0, 1, (4, 5)).astype("float32") for _ in range(3)]
    stacked = call(CropsToBatch(), crops)
    assert stacked.shape == (12, 5)
    np.testing.assert_array_equal(call(BatchToFeatures(3), stacked), np.concatenate(crops, axis=1))


def test_batch_to_features_rejects_zero_crops():
    with pytest.raises(ValueError, match="num_crops must be >= 1"):
        BatchToFeatures(0)
