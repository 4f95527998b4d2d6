import keras
import numpy as np
import pytest
from model_checks import assert_keras_round_trip, assert_tflite_builtin_and_close, predict, random_inputs

from c3ae.layers import Mish6, SqueezeExcite, WhiteNorm
from c3ae.models import VARIANTS, build_c3ae
from c3ae.models.c3ae import CROP_NAMES


@pytest.mark.parametrize(
    "kwargs, params",
    [
        # Paper Table 1: conv1 with bias 896 + BN 4x128 + conv2..4 3x9,248 + conv5 1,056 + 6,156 + 13.
        ({"triple_box": False, "conv1_bias": True}, 36_377),
        # Reference v84: 30,176 shared backbone + Dense(1536 -> 12) 18,444 + Dense(12 -> 1) 13.
        ({}, 48_633),
        # Reference v89: + 5 SE blocks of (32x16 + 16) + (16x32 + 32) = 1,072 each.
        ({"se": True}, 53_993),
        # + gender Dense(1536 -> 1) = 1,537.
        ({"se": True, "gender": True}, 55_530),
        # Gender through a hidden layer: Dense(1536 -> 16) 24,592 + Dense(16 -> 1) 17 instead of 1,537.
        ({"se": True, "gender": True, "gender_hidden": 16}, 78_602),
        # + one trainable GeM p per SE block.
        (
            {"se": True, "se_pooling": "gem", "activation": "mish6", "white_norm": True, "gender": True},
            55_535,
        ),
    ],
)
def test_parameter_counts(kwargs, params):
    assert build_c3ae(**kwargs).count_params() == params


def test_registered_variants_match_builder():
    assert VARIANTS["c3ae"].build().count_params() == 48_633
    assert VARIANTS["c3ae-se"].build().count_params() == 53_993
    assert VARIANTS["c3ae-paper"].build().count_params() == 36_377


def test_triple_box_io_and_shared_backbone():
    model = build_c3ae(se=True, gender=True)
    assert list(model.input) == list(CROP_NAMES)
    assert sorted(model.output_names) == ["age", "age_bins", "gender"]
    backbones = [layer for layer in model.layers if layer.name == "backbone"]
    assert len(backbones) == 1 and backbones[0].output.shape[-1] == 512
    assert model.get_layer("triple_features").output.shape[-1] == 1536
    out = predict(model, random_inputs(model, batch=4))
    assert out["age"].shape == (4, 1) and out["age_bins"].shape == (4, 12) and out["gender"].shape == (4, 1)
    np.testing.assert_allclose(out["age_bins"].sum(axis=1), 1.0, rtol=1e-5)
    assert ((out["gender"] > 0) & (out["gender"] < 1)).all()


def test_crop_order_is_outer_middle_inner():
    """The 1536 features are the backbone's features of outer, middle and inner, in that order."""
    model = build_c3ae()
    features = keras.Model(model.input, model.get_layer("triple_features").output)
    backbone = model.get_layer("backbone")
    inputs = random_inputs(model)
    combined = features.predict(inputs, verbose=0)
    for block, crop in enumerate(CROP_NAMES):
        alone = backbone.predict(inputs[crop], verbose=0)
        np.testing.assert_allclose(combined[:, 512 * block : 512 * (block + 1)], alone, rtol=1e-5, atol=1e-4)


def test_options_insert_their_layers():
    backbone = build_c3ae(se=True, se_pooling="gem", activation="mish6", white_norm=True).get_layer(
        "backbone"
    )
    kinds = [type(layer) for layer in backbone.layers]
    assert kinds.count(SqueezeExcite) == 5 and kinds.count(Mish6) == 4 and kinds.count(WhiteNorm) == 1
    assert all(backbone.get_layer(f"se{i}").pooling == "gem" for i in range(1, 6))
    plain = build_c3ae().get_layer("backbone")
    assert not plain.get_layer("conv1").use_bias and plain.get_layer("conv2").use_bias


def test_single_crop_model_takes_image():
    model = build_c3ae(triple_box=False)
    assert [t.name for t in model.inputs] == ["image"]
    assert predict(model, random_inputs(model))["age"].shape == (3, 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        pytest.param(
            {"se": True, "se_pooling": "gem", "activation": "mish6", "white_norm": True, "gender": True},
            marks=pytest.mark.slow,
        ),
    ],
)
def test_keras_round_trip_safe_mode(kwargs, tmp_path):
    assert_keras_round_trip(build_c3ae(**kwargs), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs",
    [
        {"se": True, "gender": True},
        {"se": True, "se_pooling": "gem", "activation": "mish6", "white_norm": True, "gender": True},
    ],
)
def test_tflite_builtin_ops_and_numerics(kwargs):
    ops = assert_tflite_builtin_and_close(build_c3ae(**kwargs))
    assert "CONV_2D" in ops


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"activation": "swish"}, "Unknown activation 'swish'"),
        ({"se_pooling": "max"}, "Unknown se_pooling 'max'"),
        ({"input_size": 32}, "input_size=32 is too small .* at least 38"),
        ({"se": True, "se_reduction": 0}, "reduction must be >= 1"),
    ],
)
def test_rejects_impossible_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_c3ae(**kwargs)


def test_age_head_starts_as_the_two_point_decoding():
    from c3ae.losses import two_point_decode, two_point_encode

    model = build_c3ae()
    ages = np.array([0.0, 7.5, 32.0, 64.0, 110.0], "float32")
    head = model.get_layer("age")
    decoded = keras.ops.convert_to_numpy(head(two_point_encode(ages)))[:, 0]
    np.testing.assert_allclose(decoded, ages, atol=1e-4)
    np.testing.assert_allclose(
        decoded, keras.ops.convert_to_numpy(two_point_decode(two_point_encode(ages))), atol=1e-4
    )
