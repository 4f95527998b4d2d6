"""Tests for c3ae.metrics against hand-computed values."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from c3ae.conventions import AGE_BANDS, UNKNOWN_GENDER
from c3ae.metrics import cumulative_accuracy, gender_accuracy, mae, mae_by_band, summarize

# errors 0, 3, 5, 6 (signs mixed)
TRUE = [10.0, 20.0, 30.0, 40.0]
PRED = [10.0, 17.0, 35.0, 46.0]


def test_mae():
    assert mae(TRUE, PRED) == pytest.approx((0 + 3 + 5 + 6) / 4)
    assert isinstance(mae(TRUE, PRED), float)
    assert mae(np.array(TRUE)[:, None], np.array(PRED)[:, None]) == pytest.approx(3.5)


def test_cumulative_accuracy_uses_less_or_equal():
    assert cumulative_accuracy(TRUE, PRED, 3) == 0.5
    assert cumulative_accuracy(TRUE, PRED, 5) == 0.75
    assert cumulative_accuracy(TRUE, PRED, 2.99) == 0.25
    assert cumulative_accuracy(TRUE, PRED, 0) == 0.25
    assert cumulative_accuracy(TRUE, PRED, 6) == 1.0
    assert isinstance(cumulative_accuracy(TRUE, PRED, 3), float)
    with pytest.raises(ValueError):
        cumulative_accuracy(TRUE, PRED, -1)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 100), st.floats(-50, 150)), min_size=1, max_size=30),
    st.floats(0, 20),
)
def test_cumulative_accuracy_properties(pairs, n):
    t, p = (np.array(v) for v in zip(*pairs, strict=True))
    ca = cumulative_accuracy(t, p, n)
    assert 0.0 <= ca <= 1.0
    assert ca <= cumulative_accuracy(t, p, n + 1)
    assert mae(t, p) == pytest.approx(np.abs(t - p).mean())


def test_gender_accuracy_ignores_unknown():
    y = [1, 0, UNKNOWN_GENDER, 1, 0, UNKNOWN_GENDER]
    p = [0.9, 0.6, 0.9, 0.5, 0.1, 0.0]
    # known: (0.9 -> 1 ok), (0.6 -> 1 wrong), (0.5 -> 1 ok, >= threshold), (0.1 -> 0 ok)
    assert gender_accuracy(y, p) == 0.75
    assert gender_accuracy(y, p, threshold=0.95) == 0.5
    assert gender_accuracy([UNKNOWN_GENDER, UNKNOWN_GENDER], [0.2, 0.8]) is None
    with pytest.raises(ValueError, match="not 1"):
        gender_accuracy([1, 2], [0.5, 0.5])


def test_mae_by_band():
    t = [5.0, 12.9, 13.0, 25.0, 39.99, 40.0, 85.0]
    p = [6.0, 10.9, 16.0, 25.0, 40.99, 50.0, 80.0]
    bands = mae_by_band(t, p)
    assert list(bands) == [name for name, _, _ in AGE_BANDS]
    assert bands["0-12"] == {"mae": pytest.approx(1.5), "count": 2}
    assert bands["13-19"] == {"mae": pytest.approx(3.0), "count": 1}
    assert bands["20-39"] == {"mae": pytest.approx(0.5), "count": 2}
    assert bands["40-59"] == {"mae": pytest.approx(10.0), "count": 1}
    assert bands["60+"] == {"mae": pytest.approx(5.0), "count": 1}
    empty = mae_by_band([30.0], [31.0])
    assert empty["0-12"] == {"mae": None, "count": 0}
    assert isinstance(empty["20-39"]["count"], int) and isinstance(empty["20-39"]["mae"], float)
    custom = mae_by_band([5.0, 50.0], [7.0, 50.0], bands=(("young", 0.0, 18.0), ("old", 18.0, None)))
    assert custom == {"young": {"mae": 2.0, "count": 1}, "old": {"mae": 0.0, "count": 1}}


def test_summarize_keys_types_and_json():
    result = summarize(TRUE, PRED, gender_true=[1, 0, -1, 1], gender_prob=[0.8, 0.7, 0.5, 0.6])
    assert set(result) == {"mae", "ca3", "ca5", "gender_accuracy", "mae_by_band", "count"}
    assert result["mae"] == pytest.approx(3.5)
    assert result["ca3"] == 0.5 and result["ca5"] == 0.75
    assert result["gender_accuracy"] == pytest.approx(2 / 3)
    assert result["count"] == 4 and isinstance(result["count"], int)
    assert result["mae_by_band"]["20-39"] == {"mae": pytest.approx(4.0), "count": 2}
    assert json.loads(json.dumps(result)) == result
    assert summarize(TRUE, PRED)["gender_accuracy"] is None


@pytest.mark.parametrize("fn", [mae, lambda t, p: cumulative_accuracy(t, p, 3), mae_by_band, summarize])
def test_validation_errors(fn):
    with pytest.raises(ValueError, match=r"3 .*2|2 .*3"):
        fn([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match=r"2 of 3 y_pred .*2 NaN"):
        fn([1.0, 2.0, 3.0], [np.nan, 2.0, np.nan])
    with pytest.raises(ValueError, match="y_true"):
        fn([1.0, np.inf], [1.0, 2.0])


def test_gender_validation_errors():
    with pytest.raises(ValueError, match="3 .*2"):
        gender_accuracy([1, 0, 1], [0.5, 0.5])
    with pytest.raises(ValueError, match="1 of 2 prob_male"):
        gender_accuracy([1, 0], [np.nan, 0.5])
    with pytest.raises(ValueError, match="together"):
        summarize(TRUE, PRED, gender_true=[1, 0, 1, 0])
    with pytest.raises(ValueError, match="4 .*3"):
        summarize(TRUE, PRED, gender_true=[1, 0, 1], gender_prob=[0.5, 0.5, 0.5])


def test_gender_accuracy_by_band_by_hand():
    from c3ae.metrics import gender_accuracy_by_band

    ages = [2, 5, 30, 35, 70, 14]
    labels = [1, 0, 1, -1, 0, 1]
    probs = [0.2, 0.3, 0.9, 0.1, 0.6, 0.5]
    bands = gender_accuracy_by_band(ages, labels, probs)
    assert bands["0-12"] == {"accuracy": 0.5, "count": 2}  # 2 y: wrong (0.2 < 0.5), 5 y: right
    assert bands["13-19"] == {"accuracy": 1.0, "count": 1}  # 0.5 counts as male
    assert bands["20-39"] == {"accuracy": 1.0, "count": 1}  # the unknown label is ignored
    assert bands["40-59"] == {"accuracy": None, "count": 0}
    assert bands["60+"] == {"accuracy": 0.0, "count": 1}
    with pytest.raises(ValueError, match="age_true has 1 values"):
        gender_accuracy_by_band([3], labels, probs)


def test_gender_calibration_error_and_temperature():
    from c3ae.metrics import fit_gender_temperature, gender_calibration_error

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, 20000)
    labels = (rng.random(20000) < 1 / (1 + np.exp(-logits))).astype(float)  # calibrated by construction
    calibrated = 1 / (1 + np.exp(-logits))
    assert gender_calibration_error(labels, calibrated) < 0.02
    overconfident = 1 / (1 + np.exp(-3 * logits))
    assert gender_calibration_error(labels, overconfident) > 0.08
    assert fit_gender_temperature(labels, overconfident) == pytest.approx(3.0, rel=0.1)
    assert fit_gender_temperature(labels, calibrated) == pytest.approx(1.0, rel=0.1)
    # by hand: two known faces at confidence 0.9, one right and one wrong; the unknown one is ignored
    assert gender_calibration_error([1, 1, UNKNOWN_GENDER], [0.9, 0.1, 0.5]) == pytest.approx(0.4)
    assert gender_calibration_error([UNKNOWN_GENDER], [0.3]) is None
