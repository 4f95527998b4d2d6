import keras
import numpy as np
import pytest
from model_checks import assert_keras_round_trip, assert_tflite_builtin_and_close, predict, random_inputs

from c3ae.layers import SoftStagewiseRegression
from c3ae.models import build_ssrnet


def test_official_parameter_count():
    model = build_ssrnet()
    assert model.count_params() == 40_915
    moving_statistics = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    assert moving_statistics == 384  # BN moving mean and variance: 2 x (4 x 32 + 4 x 16)


def test_stage_feature_sizes_follow_the_paper():
    model = build_ssrnet()
    assert [model.get_layer(f"stage{k}_x_flat").output.shape[-1] for k in (1, 2, 3)] == [160, 90, 90]
    assert [model.get_layer(f"stage{k}_s_flat").output.shape[-1] for k in (1, 2, 3)] == [160, 90, 90]


def test_age_and_gender_heads():
    age = build_ssrnet()
    gender = build_ssrnet(V=1)
    assert age.output_names == ["age"] and gender.output_names == ["gender"]
    assert gender.get_layer("gender").V == 1.0 and age.get_layer("age").V == 101.0
    assert gender.count_params() == 40_915


@pytest.mark.slow
def test_softmax_and_clamp_options():
    model = build_ssrnet(p_activation="softmax", clamp_output=True)
    assert model.count_params() == 40_915
    regression = model.get_layer("age")
    assert isinstance(regression, SoftStagewiseRegression) and regression.clamp
    out = predict(model, random_inputs(model, batch=8))["age"]
    assert np.isfinite(out).all() and (out >= 0).all() and (out <= 101).all()
    p = predict(keras.Model(model.input, model.get_layer("stage1_p").output), random_inputs(model))
    np.testing.assert_allclose(next(iter(p.values())).sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_keras_round_trip_safe_mode(tmp_path):
    assert_keras_round_trip(build_ssrnet(clamp_output=True), tmp_path)


def test_leaky_mix_layers_keep_the_layout_and_pass_negative_inputs():
    model = build_ssrnet(p_activation="softmax", clamp_output=True, mix_activation="leaky_relu")
    assert model.count_params() == 40_915
    for stage in (1, 2, 3):
        for kind in ("s_mix", "x_mix", "feat"):
            assert model.get_layer(f"stage{stage}_{kind}").activation.__name__ == "leaky_relu"
    mix = model.get_layer("stage1_s_mix")
    mix.bias.assign(np.full(mix.bias.shape, -1e4, "float32"))  # a unit that ReLU would kill for good
    sub = keras.Model(model.input, mix.output)
    out = np.asarray(sub(random_inputs(model, batch=4)["image"]))
    assert (out < 0).all() and np.std(out, axis=0).max() > 0  # still varies with the face


@pytest.mark.slow
def test_leaky_mix_converts_to_builtin_tflite():
    model = build_ssrnet(clamp_output=True, p_activation="softmax", mix_activation="leaky_relu")
    ops = assert_tflite_builtin_and_close(model, rtol=1e-3, atol=1e-3)
    assert "LEAKY_RELU" in ops


@pytest.mark.slow
@pytest.mark.parametrize("V", [101.0, 1.0])
def test_tflite_builtin_ops_and_numerics(V):
    # Randomly initialised SSR-Net outputs can be huge (the original's instability), hence rtol.
    ops = assert_tflite_builtin_and_close(build_ssrnet(V=V, clamp_output=True), rtol=1e-3, atol=1e-3)
    assert not {"RANGE", "GATHER"} & ops  # index vectors are constants, not arange


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stage_num": (3, 0, 3)}, "at least one bin"),
        ({"stage_num": (3, 3)}, "exactly three stages"),
        ({"input_size": 30}, "too small"),
        ({"p_activation": "sigmoid"}, "Unknown p_activation"),
        ({"V": 0}, "V must be positive"),
        ({"mix_activation": "gelu"}, "Unknown mix_activation"),
    ],
)
def test_rejects_impossible_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_ssrnet(**kwargs)


def test_gender_probability_head_gives_probabilities_trained_with_cross_entropy():
    """The original gender model (MAE on a clipped output) says 0 or 1; with gender_probability its
    unclipped score goes through a trained sigmoid, and the family's loss is cross-entropy."""
    from c3ae.config import LossConfig
    from c3ae.layers import ScoreToProbability
    from c3ae.models.ssrnet import SPEC

    model = build_ssrnet(V=1, p_activation="softmax", clamp_output=True, gender_probability=True)
    assert model.output_names == ["gender"] and model.count_params() == 40_916
    assert isinstance(model.get_layer("gender"), ScoreToProbability)
    assert not model.get_layer("gender_score").clip_output and model.get_layer("gender_score").clamp
    score = keras.Model(model.input, model.get_layer("gender_score").output)
    inputs = random_inputs(model, batch=8)
    raw, p = np.asarray(score(inputs["image"])).ravel(), predict(model, inputs)["gender"].ravel()
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-8.0 * (raw - 0.5))), rtol=1e-5)
    losses, _ = SPEC.losses(model, LossConfig())
    assert isinstance(losses["gender"], keras.losses.BinaryCrossentropy)
    plain, _ = SPEC.losses(build_ssrnet(V=1), LossConfig())
    assert isinstance(plain["gender"], keras.losses.MeanAbsoluteError)
    with pytest.raises(ValueError, match="gender_probability needs V = 1"):
        build_ssrnet(gender_probability=True)


@pytest.mark.slow
def test_gender_probability_round_trips_and_converts(tmp_path):
    model = build_ssrnet(V=1, p_activation="softmax", clamp_output=True, gender_probability=True)
    assert_keras_round_trip(model, tmp_path)
    assert "LOGISTIC" in assert_tflite_builtin_and_close(model, rtol=1e-3, atol=1e-4)
