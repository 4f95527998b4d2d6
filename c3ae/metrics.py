"""Evaluation metrics for age (years) and gender (1 = male, 0 = female, -1 = unknown).

Plain numpy, no Keras. Every function returns plain Python floats / ints / None (and dicts of them), so
results go straight into ``json.dumps``. Inputs may be lists or arrays of shape (N,) or (N, 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from c3ae.conventions import AGE_BANDS, FEMALE, MALE, UNKNOWN_GENDER
from c3ae.errors import UsageError

__all__ = [
    "mae",
    "cumulative_accuracy",
    "gender_accuracy",
    "gender_accuracy_by_band",
    "gender_accuracy_by_gender",
    "gender_calibration_error",
    "fit_gender_temperature",
    "mae_by_band",
    "summarize",
]


def _vector(x, what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    elif arr.ndim > 1:
        raise UsageError(f"{what} must have shape (N,) or (N, 1), got {arr.shape}")
    return arr.reshape(-1)


def _finite(arr: np.ndarray, what: str) -> None:
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        nans = int(np.count_nonzero(np.isnan(arr)))
        raise UsageError(f"{bad} of {arr.size} {what} are not finite ({nans} NaN, {bad - nans} infinite)")


def _pair(a, b, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate two per-sample arrays: same length, not empty, all finite."""
    a_arr = _vector(a, name_a)
    b_arr = _vector(b, name_b)
    if a_arr.size != b_arr.size:
        raise UsageError(f"{name_a} has {a_arr.size} values but {name_b} has {b_arr.size}")
    if a_arr.size == 0:
        raise UsageError(f"{name_a} and {name_b} are empty")
    _finite(a_arr, name_a)
    _finite(b_arr, name_b)
    return a_arr, b_arr


def _ages(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    return _pair(y_true, y_pred, "y_true", "y_pred")


def mae(y_true, y_pred) -> float:
    """Mean absolute error in years: mean |y_pred - y_true|."""
    t, p = _ages(y_true, y_pred)
    return float(np.mean(np.abs(p - t)))


def cumulative_accuracy(y_true, y_pred, n: float) -> float:
    """CA(n): the share of samples with |y_pred - y_true| <= n years.

    Uses ``<=`` as the MegaAge-Asian evaluation script does (the SSR-Net paper says "smaller than").
    """
    if not n >= 0:
        raise UsageError(f"n must be >= 0 years, got {n!r}")
    t, p = _ages(y_true, y_pred)
    return float(np.mean(np.abs(p - t) <= n))


def _gender_labels(y_true, what: str = "gender_true") -> np.ndarray:
    labels = _vector(y_true, what)
    valid = np.isin(labels, (MALE, FEMALE, UNKNOWN_GENDER))
    if not valid.all():
        raise UsageError(
            f"{int((~valid).sum())} of {labels.size} {what} are not {MALE} (male), {FEMALE} (female) "
            f"or {UNKNOWN_GENDER} (unknown)"
        )
    return labels


def gender_accuracy(y_true, prob_male, threshold: float = 0.5) -> float | None:
    """Share of known-gender samples with ``(prob_male >= threshold) == y_true``; labels -1 are ignored.

    Returns None when no sample has a known label.
    """
    labels, probs = _pair(y_true, prob_male, "gender_true", "prob_male")
    labels = _gender_labels(labels)
    known = labels != UNKNOWN_GENDER
    if not known.any():
        return None
    predicted = (probs[known] >= threshold).astype(np.float64)
    return float(np.mean(predicted == labels[known]))


def gender_calibration_error(y_true, prob_male, bins: int = 10) -> float | None:
    """Expected calibration error of P(male) over known-gender samples: the confidence of the predicted
    gender (max(p, 1 - p)) in ``bins`` equal-width bins over [0.5, 1], |accuracy - confidence| per bin
    weighted by its share of the samples. 0 is perfectly calibrated; None without known labels."""
    labels, probs = _pair(y_true, prob_male, "gender_true", "prob_male")
    labels = _gender_labels(labels)
    known = labels != UNKNOWN_GENDER
    if not known.any():
        return None
    probs, labels = probs[known], labels[known]
    confidence = np.maximum(probs, 1 - probs)
    correct = ((probs >= 0.5) == (labels == 1)).astype(np.float64)
    index = np.minimum(((confidence - 0.5) * 2 * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(error)


def fit_gender_temperature(y_true, prob_male) -> float:
    """The temperature T that minimises the cross-entropy of ``sigmoid(logit(p) / T)`` on known-gender
    samples (temperature scaling, Guo et al. 2017): T > 1 softens over-confident probabilities."""
    labels, probs = _pair(y_true, prob_male, "gender_true", "prob_male")
    labels = _gender_labels(labels)
    known = labels != UNKNOWN_GENDER
    p = np.clip(probs[known], 1e-7, 1 - 1e-7)
    logits, y = np.log(p / (1 - p)), (labels[known] == 1).astype(np.float64)

    def loss(t: float) -> float:
        q = np.clip(1 / (1 + np.exp(-logits / t)), 1e-12, 1 - 1e-12)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))

    grid = np.exp(np.linspace(np.log(0.25), np.log(16), 241))
    return float(grid[int(np.argmin([loss(t) for t in grid]))])


def mae_by_band(
    y_true, y_pred, bands: Sequence[tuple[str, float, float | None]] = AGE_BANDS
) -> dict[str, dict]:
    """MAE (years) per band of the TRUE age, bands [low, high) with high None = open-ended.

    Returns ``{name: {"mae": float or None (empty band), "count": int}}`` in the order of ``bands``.
    """
    t, p = _ages(y_true, y_pred)
    errors = np.abs(p - t)
    result: dict[str, dict] = {}
    for name, low, high in bands:
        in_band = t >= low
        if high is not None:
            in_band &= t < high
        count = int(np.count_nonzero(in_band))
        result[name] = {"mae": float(errors[in_band].mean()) if count else None, "count": count}
    return result


def gender_accuracy_by_band(
    age_true, gender_true, prob_male, bands: Sequence[tuple[str, float, float | None]] = AGE_BANDS
) -> dict[str, dict]:
    """Gender accuracy per band of the TRUE age (children's gender is where models fail).

    Returns ``{name: {"accuracy": float or None (no known label), "count": int}}``; labels -1 are ignored.
    """
    ages = _vector(age_true, "age_true")
    labels, probs = _pair(gender_true, prob_male, "gender_true", "prob_male")
    labels = _gender_labels(labels)
    if ages.size != labels.size:
        raise UsageError(f"age_true has {ages.size} values but gender_true has {labels.size}")
    result: dict[str, dict] = {}
    for name, low, high in bands:
        in_band = (ages >= low) & (labels != UNKNOWN_GENDER)
        if high is not None:
            in_band &= ages < high
        count = int(np.count_nonzero(in_band))
        correct = (probs[in_band] >= 0.5) == (labels[in_band] == MALE)
        result[name] = {"accuracy": float(correct.mean()) if count else None, "count": count}
    return result


def gender_accuracy_by_gender(gender_true, prob_male) -> dict[str, dict]:
    """Accuracy on women and on men apart (the share of each called right): ``{"female": {"accuracy",
    "count"}, "male": {...}}``, accuracy None for a gender without samples; labels -1 are ignored."""
    labels, probs = _pair(gender_true, prob_male, "gender_true", "prob_male")
    labels = _gender_labels(labels)
    result: dict[str, dict] = {}
    for name, value in (("female", FEMALE), ("male", MALE)):
        chosen = labels == value
        count = int(np.count_nonzero(chosen))
        correct = (probs[chosen] >= 0.5) == (value == MALE)
        result[name] = {"accuracy": float(correct.mean()) if count else None, "count": count}
    return result


def summarize(age_true, age_pred, gender_true=None, gender_prob=None) -> dict:
    """All metrics at once: keys ``mae``, ``ca3``, ``ca5``, ``gender_accuracy``, ``mae_by_band``, ``count``.

    ``gender_accuracy`` is None when no gender data is given (or no label is known). The gender arrays go
    together and have one value per age.
    """
    t, p = _ages(age_true, age_pred)
    if (gender_true is None) != (gender_prob is None):
        raise UsageError("gender_true and gender_prob must be given together")
    g_acc = None
    if gender_true is not None:
        labels, probs = _pair(gender_true, gender_prob, "gender_true", "gender_prob")
        if labels.size != t.size:
            raise UsageError(f"age_true has {t.size} values but gender_true has {labels.size}")
        g_acc = gender_accuracy(labels, probs)
    return {
        "mae": mae(t, p),
        "ca3": cumulative_accuracy(t, p, 3),
        "ca5": cumulative_accuracy(t, p, 5),
        "gender_accuracy": g_acc,
        "mae_by_band": mae_by_band(t, p),
        "count": int(t.size),
    }
