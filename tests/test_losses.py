"""Tests for c3ae.losses: encodings, distribution losses, masked gender BCE, DLDL."""

import json
import math

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from keras import ops

from c3ae import losses
from c3ae.conventions import UNKNOWN_GENDER
from c3ae.losses import (
    AGE_BIN_WIDTH,
    NUM_AGE_BINS,
    C3AEFocalLoss,
    DLDLLoss,
    KLDivergenceLoss,
    MaskedBinaryCrossentropy,
    MaskedMeanAbsoluteError,
    age_bin_weights,
    gaussian_label_distribution,
    kl_divergence,
    smooth_gender_labels,
    two_point_decode,
    two_point_encode,
)

MAX_AGE = AGE_BIN_WIDTH * (NUM_AGE_BINS - 1)


def np_(x) -> np.ndarray:
    return ops.convert_to_numpy(x)


def row(pairs: dict[int, float], num_bins: int = NUM_AGE_BINS) -> np.ndarray:
    out = np.zeros(num_bins, dtype=np.float32)
    for i, v in pairs.items():
        out[i] = v
    return out


def roundtrip(obj):
    """serialize -> JSON -> deserialize, as a saved config would."""
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(obj)))
    return keras.saving.deserialize_keras_object(config)


# --------------------------------------------------------------------------------------- two-point encoding


def test_constants():
    assert NUM_AGE_BINS == 12
    assert AGE_BIN_WIDTH == 10.0


@pytest.mark.parametrize(
    "age, expected",
    [
        (32.0, {3: 0.8, 4: 0.2}),
        (0.0, {0: 1.0}),
        (110.0, {11: 1.0}),
        (105.0, {10: 0.5, 11: 0.5}),
        (30.0, {3: 1.0}),
        (9.5, {0: 0.05, 1: 0.95}),
        (-7.0, {0: 1.0}),  # clipped to 0
        (150.0, {11: 1.0}),  # clipped to 110
    ],
)
def test_two_point_encode_known_values(age, expected):
    encoded = np_(two_point_encode(np.array([age])))
    assert encoded.shape == (1, NUM_AGE_BINS)
    assert encoded.dtype == np.float32
    np.testing.assert_allclose(encoded[0], row(expected), atol=1e-6)


def test_two_point_encode_shapes_and_ints():
    ages = [32, 0, 110]
    flat = np_(two_point_encode(np.array(ages)))  # int input
    column = np_(two_point_encode(np.array(ages, dtype=np.float32).reshape(-1, 1)))
    assert flat.shape == column.shape == (3, NUM_AGE_BINS)
    np.testing.assert_allclose(flat, column)
    np.testing.assert_allclose(flat[0], row({3: 0.8, 4: 0.2}), atol=1e-6)
    assert np_(two_point_encode(32.0)).shape == (NUM_AGE_BINS,)
    with pytest.raises(ValueError, match="shape"):
        two_point_encode(np.zeros((3, 2)))


def test_two_point_encode_other_bins():
    encoded = np_(two_point_encode(np.array([7.0]), num_bins=5, bin_width=5.0))
    np.testing.assert_allclose(encoded[0], row({1: 0.6, 2: 0.4}, 5), atol=1e-6)
    np.testing.assert_allclose(np_(two_point_decode(encoded, bin_width=5.0)), [7.0], atol=1e-5)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, st.integers(1, 40), elements=st.floats(0.0, MAX_AGE, width=32)))
def test_two_point_round_trip(ages):
    encoded = two_point_encode(ages)
    decoded = np_(two_point_decode(encoded))
    assert decoded.shape == ages.shape
    np.testing.assert_allclose(decoded, ages, atol=1e-4, rtol=0)
    enc = np_(encoded)
    np.testing.assert_allclose(enc.sum(axis=1), 1.0, atol=1e-6)
    assert (enc >= 0).all()
    assert ((enc > 0).sum(axis=1) <= 2).all()


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, st.integers(1, 20), elements=st.floats(-1e4, 1e4)))
def test_two_point_clips_any_age(ages):
    decoded = np_(two_point_decode(two_point_encode(ages)))
    np.testing.assert_allclose(decoded, np.clip(ages, 0, MAX_AGE), atol=2e-3)


def test_two_point_encode_in_tf_data():
    tf = pytest.importorskip("tensorflow")
    ages = np.array([32.0, 0.0, 110.0, 105.0], dtype=np.float32)
    expected = np_(two_point_encode(ages))

    per_element = tf.data.Dataset.from_tensor_slices(ages).map(two_point_encode)
    got = np.stack([x.numpy() for x in per_element])
    np.testing.assert_allclose(got, expected, atol=1e-6)

    batched = tf.data.Dataset.from_tensor_slices(ages).batch(3).map(lambda a: (a, two_point_encode(a)))
    got = np.concatenate([enc.numpy() for _, enc in batched])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(got[0], row({3: 0.8, 4: 0.2}), atol=1e-6)


# --------------------------------------------------------------------------------------- KL and focal loss


def test_kl_zero_when_equal_and_positive_otherwise():
    p = np_(two_point_encode(np.array([32.0, 71.0, 110.0])))
    np.testing.assert_allclose(np_(kl_divergence(p, p)), 0.0, atol=1e-5)
    q = np.full_like(p, 1.0 / NUM_AGE_BINS)
    kl = np_(kl_divergence(p, q))
    assert kl.shape == (3,)
    # KL(one-hot || uniform) = log(12)
    np.testing.assert_allclose(kl[2], math.log(NUM_AGE_BINS), rtol=1e-5)
    assert (kl > 0).all()
    loss = KLDivergenceLoss()
    np.testing.assert_allclose(float(loss(p, q)), kl.mean(), rtol=1e-5)


def test_kl_finite_with_zero_predictions():
    t = row({3: 0.8, 4: 0.2})[None]
    p = row({0: 1.0})[None]
    value = np_(kl_divergence(t, p))
    assert np.isfinite(value).all() and value[0] > 10


def test_age_bin_weights_finite_with_empty_bins():
    ages = np.array([20.0, 25.0, 30.0, 30.0, 30.0, 41.0])  # bins 0-1 and 5-11 empty
    for normalize in ("samples", "bins"):
        w = age_bin_weights(ages, normalize=normalize)
        assert w.shape == (NUM_AGE_BINS,) and w.dtype == np.float32
        assert np.isfinite(w).all() and (w > 0).all()
        # inverse frequency: the crowded bin 3 gets less weight than the sparse bin 4
        assert w[3] < w[4] < w[0]
    mass = np_(two_point_encode(ages)).sum(axis=0)
    w = age_bin_weights(ages)
    np.testing.assert_allclose((mass * w).sum(), mass.sum(), rtol=1e-5)
    np.testing.assert_allclose(age_bin_weights(ages, normalize="bins").mean(), 1.0, rtol=1e-5)
    raw = 1.0 / (mass + 1.0)
    np.testing.assert_allclose(age_bin_weights(ages, normalize="bins"), raw * 12 / raw.sum(), rtol=1e-5)


def test_age_bin_weights_uniform_and_errors():
    even = np.arange(0, 111, 10, dtype=np.float64)  # one age per bin
    np.testing.assert_allclose(age_bin_weights(even), 1.0, rtol=1e-6)
    np.testing.assert_allclose(age_bin_weights([]), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        age_bin_weights([30.0, float("nan")])
    with pytest.raises(ValueError):
        age_bin_weights([30.0], normalize="other")


def focal_by_hand(t, p, w, mix, eps=1e-7):
    log_p = np.log(np.clip(p, eps, 1.0))
    focal = np.where(t > 0, w * (t - p) ** 2 * -log_p, 0.0).sum(axis=-1)
    return (1 - mix) * focal + mix * -log_p.mean(axis=-1)


def test_focal_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    t = np_(two_point_encode(np.array([32.0, 5.0, 88.0])))
    p = rng.dirichlet(np.ones(NUM_AGE_BINS), size=3).astype(np.float32)
    w = rng.uniform(0.5, 2.0, NUM_AGE_BINS)
    loss = C3AEFocalLoss(bin_weights=w, uniform_mix=0.1)
    expected = focal_by_hand(t, p, w, 0.1).mean()
    np.testing.assert_allclose(float(loss(t, p)), expected, rtol=1e-5)
    unweighted = C3AEFocalLoss(uniform_mix=0.0)
    np.testing.assert_allclose(float(unweighted(t, p)), focal_by_hand(t, p, 1.0, 0.0).mean(), rtol=1e-5)


def test_focal_loss_finite_with_exact_zeros_and_ones():
    t = np_(two_point_encode(np.array([32.0, 110.0, 0.0])))
    p = np.stack([row({0: 1.0}), row({11: 1.0}), row({5: 1.0})])  # one right, two wrong
    loss = C3AEFocalLoss(bin_weights=age_bin_weights([30.0, 40.0]))
    value = float(loss(t, p))
    assert np.isfinite(value) and value > 0
    import tensorflow as tf

    p_var = tf.Variable(p)
    with tf.GradientTape() as tape:
        out = loss(t, p_var)
    grad = tape.gradient(out, p_var).numpy()
    assert np.isfinite(grad).all()


def test_focal_loss_config_round_trip():
    t = np_(two_point_encode(np.array([32.0, 67.5])))
    p = np.full((2, NUM_AGE_BINS), 1.0 / NUM_AGE_BINS, dtype=np.float32)
    loss = C3AEFocalLoss(bin_weights=age_bin_weights([10.0, 32.0, 50.0]), uniform_mix=0.25, eps=1e-6)
    restored = roundtrip(loss)
    assert isinstance(restored, C3AEFocalLoss)
    assert restored.get_config() == loss.get_config()
    np.testing.assert_allclose(float(restored(t, p)), float(loss(t, p)), rtol=1e-6)
    assert keras.saving.serialize_keras_object(loss)["registered_name"] == "c3ae>C3AEFocalLoss"


def test_focal_loss_rejects_bad_args():
    with pytest.raises(ValueError):
        C3AEFocalLoss(uniform_mix=1.5)
    with pytest.raises(ValueError):
        C3AEFocalLoss(bin_weights=[1.0, float("inf")])
    with pytest.raises(ValueError, match="bin_weights"):
        C3AEFocalLoss(bin_weights=[1.0] * 5)(np.zeros((1, 12)), np.ones((1, 12)) / 12)


def test_kl_loss_config_round_trip():
    loss = KLDivergenceLoss(eps=1e-6)
    restored = roundtrip(loss)
    assert isinstance(restored, KLDivergenceLoss) and restored.eps == 1e-6


def test_losses_compile_by_registered_name():
    loss = keras.losses.get(keras.saving.serialize_keras_object(C3AEFocalLoss()))
    assert isinstance(loss, C3AEFocalLoss)


# --------------------------------------------------------------------------------------- gender


def bce(label: float, p: float) -> float:
    return -(label * math.log(p) + (1 - label) * math.log(1 - p))


def test_masked_bce_smoothing_matches_hand_computation():
    y = np.array([1.0, 0.0, 1.0])
    p = np.array([0.9, 0.2, 0.3], dtype=np.float32)
    expected = np.mean([bce(0.99, 0.9), bce(0.01, 0.2), bce(0.99, 0.3)])
    np.testing.assert_allclose(float(MaskedBinaryCrossentropy()(y, p)), expected, rtol=1e-5)
    # (N, 1) shapes give the same value
    np.testing.assert_allclose(float(MaskedBinaryCrossentropy()(y[:, None], p[:, None])), expected, rtol=1e-5)
    no_smoothing = np.mean([bce(1, 0.9), bce(0, 0.2), bce(1, 0.3)])
    np.testing.assert_allclose(
        float(MaskedBinaryCrossentropy(label_smoothing=0.0)(y, p)), no_smoothing, rtol=1e-5
    )


def test_masked_bce_ignores_unknown_labels():
    y = np.array([1.0, 0.0, 1.0])
    p = np.array([0.9, 0.2, 0.3], dtype=np.float32)
    loss = MaskedBinaryCrossentropy()
    base = float(loss(y, p))
    y_more = np.array([UNKNOWN_GENDER, 1.0, UNKNOWN_GENDER, 0.0, 1.0, UNKNOWN_GENDER], dtype=np.float32)
    p_more = np.array([0.01, 0.9, 0.99, 0.2, 0.3, 0.5], dtype=np.float32)
    np.testing.assert_allclose(float(loss(y_more, p_more)), base, rtol=1e-6)
    # with reduction "none" the unknown rows are exactly 0 and the known ones are the plain per-sample values
    per_sample = np_(MaskedBinaryCrossentropy(reduction="none")(y_more, p_more))
    assert per_sample[[0, 2, 5]].tolist() == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(per_sample[[1, 3, 4]], np_(MaskedBinaryCrossentropy(reduction="none")(y, p)))
    np.testing.assert_allclose(
        float(MaskedBinaryCrossentropy(reduction="sum")(y_more, p_more)), per_sample.sum(), rtol=1e-6
    )


def test_masked_bce_all_unknown_is_zero():
    y = np.full(4, UNKNOWN_GENDER, dtype=np.float32)
    p = np.array([0.0, 1.0, 0.5, 0.3], dtype=np.float32)
    value = float(MaskedBinaryCrossentropy()(y, p))
    assert value == 0.0


def test_masked_bce_finite_gradient_and_round_trip():
    import tensorflow as tf

    y = np.array([1.0, 0.0, UNKNOWN_GENDER], dtype=np.float32)
    p = tf.Variable(np.array([0.0, 1.0, 0.0], dtype=np.float32))
    loss = MaskedBinaryCrossentropy(label_smoothing=0.1)
    with tf.GradientTape() as tape:
        out = loss(y, p)
    assert np.isfinite(float(out))
    assert np.isfinite(tape.gradient(out, p).numpy()).all()
    restored = roundtrip(loss)
    assert isinstance(restored, MaskedBinaryCrossentropy) and restored.label_smoothing == 0.1
    np.testing.assert_allclose(float(restored(y, p)), float(out), rtol=1e-6)


def test_masked_bce_in_model_fit():
    x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    y = np.array([1, 0, -1, 1] * 4, dtype=np.float32)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="sgd", loss=MaskedBinaryCrossentropy())
    history = model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


# ------------------------------------------------------------------- unknown labels as sample weights
# One batch: unknown (-1) labels among the known, predictions at the clipped ends included.
GENDER = np.array([1, 0, -1, 1, -1, 0, 1, 0], dtype=np.float32)[:, None]
P_MALE = np.array([0.9, 0.2, 0.6, 0.3, 0.0, 1.0, 0.0, 0.45], dtype=np.float32)[:, None]
BALANCE = np.array([0.5, 2.0, 1.0, 1.5, 0.3, 1.0, 0.8, 3.0], dtype=np.float32)
BATCHES = {
    "mixed": (GENDER, P_MALE),
    "all known": (GENDER[GENDER[:, 0] >= 0], P_MALE[GENDER[:, 0] >= 0]),
    "no known": (np.full((4, 1), UNKNOWN_GENDER, np.float32), P_MALE[:4]),
}


def _training_gender_losses() -> dict:
    """The gender losses the family specs train with: the stock Keras ones."""
    from types import SimpleNamespace

    from c3ae.config import LossConfig
    from c3ae.models.spec import family_spec

    gender_only = SimpleNamespace(output_names=["gender"])
    bce = family_spec("c3ae").losses(gender_only, LossConfig(), None)[0]["gender"]
    assert isinstance(bce, keras.losses.BinaryCrossentropy) and bce.get_config()["label_smoothing"] == 0.02
    mae = family_spec("ssrnet").losses(gender_only, LossConfig(), None)[0]["gender"]
    assert isinstance(mae, keras.losses.MeanAbsoluteError)
    return {
        "bce": (MaskedBinaryCrossentropy(label_smoothing=0.02), bce),
        "mae": (MaskedMeanAbsoluteError(), mae),
    }


def _as_trained(stock, y, p, balance):
    """The stock loss as training computes it: unknown labels weigh 0 (``make_dataset(label_weights=True)``),
    scaled per batch to a mean over the labelled rows (``c3ae.task.mean_over_labelled``)."""
    import tensorflow as tf

    from c3ae.data import label_weight
    from c3ae.task import mean_over_labelled

    weight = tf.ones(len(y)) if balance is None else tf.constant(balance)
    weights = mean_over_labelled({"gender": label_weight("gender", tf.constant(y), weight)})
    return stock(y, p, sample_weight=weights["gender"])


@pytest.mark.parametrize("loss", ["bce", "mae"])
@pytest.mark.parametrize("balanced", [False, True], ids=["unweighted", "balance-weighted"])
@pytest.mark.parametrize("batch", BATCHES)
def test_stock_losses_with_zero_weights_equal_the_masked_losses(loss, balanced, batch):
    import tensorflow as tf

    masked, stock = _training_gender_losses()[loss]
    y, p = BATCHES[batch]
    balance = BALANCE[: len(y)] if balanced else None
    p = tf.Variable(p)
    with tf.GradientTape(persistent=True) as tape:
        old = masked(y, p, sample_weight=balance)
        new = _as_trained(stock, y, p, balance)
    np.testing.assert_allclose(float(new), float(old), rtol=1e-6, atol=1e-7)
    gradients = [tape.gradient(value, p).numpy() for value in (new, old)]
    np.testing.assert_allclose(*gradients, rtol=1e-5, atol=1e-7)
    if batch == "no known":
        assert float(new) == 0.0 == float(old)  # not NaN
    else:
        assert float(new) > 0


def test_the_stock_loss_without_the_weights_would_train_unknown_labels():
    """Why the weights are needed: fed the -1 labels as they are, the stock losses differ."""
    for masked, stock in _training_gender_losses().values():
        assert abs(float(stock(GENDER, P_MALE)) - float(masked(GENDER, P_MALE))) > 0.05


def test_smooth_gender_labels():
    out = np_(smooth_gender_labels(np.array([1, 0, UNKNOWN_GENDER])))
    np.testing.assert_allclose(out, [0.99, 0.01, -1.0], rtol=1e-6)
    np.testing.assert_allclose(np_(smooth_gender_labels(np.array([1.0, 0.0]), 0.1)), [0.9, 0.1], rtol=1e-6)


# --------------------------------------------------------------------------------------- DLDL


def test_gaussian_label_distribution_rows_and_argmax():
    ages = np.array([0.0, 25.0, 37.0, 100.0, 63.0])
    dist = np_(gaussian_label_distribution(ages))
    assert dist.shape == (5, 101) and dist.dtype == np.float32
    np.testing.assert_allclose(dist.sum(axis=1), 1.0, atol=1e-5)
    assert dist.argmax(axis=1).tolist() == [0, 25, 37, 100, 63]
    # symmetric around the centre, and matches a normalised Gaussian by hand
    assert dist[1, 24] == pytest.approx(dist[1, 26], rel=1e-5)
    centres = np.arange(101)
    g = np.exp(-((centres - 37.0) ** 2) / (2 * 2.0**2))
    np.testing.assert_allclose(dist[2], g / g.sum(), atol=1e-6)


def test_gaussian_label_distribution_options():
    # per-sample sigma: the wider one is flatter
    dist = np_(gaussian_label_distribution(np.array([[30.0], [30.0]]), sigma=np.array([1.0, 5.0])))
    assert dist[0, 30] > dist[1, 30]
    np.testing.assert_allclose(dist.sum(axis=1), 1.0, atol=1e-5)
    # custom grid: centres 10, 12, ..., 48 years
    dist = np_(gaussian_label_distribution(np.array([24.0]), num_bins=20, start=10.0, step=2.0))
    assert dist.argmax() == 7
    # far outside the bins: still a distribution, piled on the end bin
    dist = np_(gaussian_label_distribution(np.array([500.0])))
    assert np.isfinite(dist).all() and dist.argmax() == 100
    with pytest.raises(ValueError):
        gaussian_label_distribution(np.array([30.0]), sigma=0.0)


def test_dldl_loss():
    ages = np.array([25.0, 60.0])
    target = np_(gaussian_label_distribution(ages, sigma=3.0))
    loss = DLDLLoss(sigma=3.0)
    assert float(loss(ages, target)) == pytest.approx(0.0, abs=1e-4)
    assert float(loss(ages[:, None], target)) == pytest.approx(0.0, abs=1e-4)
    uniform = np.full((2, 101), 1.0 / 101, dtype=np.float32)
    assert float(loss(ages, uniform)) > 1.0
    restored = roundtrip(DLDLLoss(num_bins=50, sigma=1.5, start=10.0, step=2.0))
    assert isinstance(restored, DLDLLoss)
    assert (restored.num_bins, restored.sigma, restored.start, restored.step) == (50, 1.5, 10.0, 2.0)


def test_public_names():
    for name in losses.__all__:
        assert hasattr(losses, name), name


@pytest.mark.slow
def test_bin_losses_train_from_tf_data():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    ages = rng.uniform(0, 100, size=32).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((x, ages)).batch(16).map(lambda a, b: (a, two_point_encode(b)))
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(NUM_AGE_BINS, activation="softmax")])
    model.compile(optimizer="adam", loss=C3AEFocalLoss(bin_weights=age_bin_weights(ages)))
    assert np.isfinite(model.fit(data, epochs=1, shuffle=False, verbose=0).history["loss"]).all()
    dldl = keras.Sequential([keras.Input((4,)), keras.layers.Dense(101, activation="softmax")])
    dldl.compile(optimizer="adam", loss=DLDLLoss())
    assert np.isfinite(dldl.fit(x, ages, batch_size=16, epochs=1, verbose=0).history["loss"]).all()
