"""Age and gender losses, and the label encodings they train against.

Everything that touches tensors is written with ``keras.ops``: it accepts numpy arrays or backend tensors,
returns backend tensors (use ``keras.ops.convert_to_numpy`` for numpy), and runs inside a ``tf.data`` map
with the TensorFlow backend. Ages are float years; gender labels follow ``c3ae.conventions``
(1 = male, 0 = female, -1 = unknown) and gender predictions are the probability of male.

Differences from the unofficial C3AE reference, on purpose:

- ``age_bin_weights`` stays finite when a bin has no training ages (the reference divides by zero, issue #5).
- Unknown-gender samples are ignored (sample weights of 0, or ``MaskedBinaryCrossentropy``) instead of
  being trained towards a label.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from c3ae.conventions import AGE_BIN_WIDTH, FEMALE, MALE, NUM_AGE_BINS, UNKNOWN_GENDER
from c3ae.errors import UsageError
from c3ae.layers import register

__all__ = [
    "NUM_AGE_BINS",
    "AGE_BIN_WIDTH",
    "two_point_encode",
    "two_point_decode",
    "kl_divergence",
    "age_bin_weights",
    "smooth_gender_labels",
    "masked_binary_crossentropy",
    "gaussian_label_distribution",
    "C3AEFocalLoss",
    "KLDivergenceLoss",
    "MaskedBinaryCrossentropy",
    "DLDLLoss",
]


_DEFAULT_EPS = 1e-7


def _as_float_vector(x) -> tuple[object, bool]:
    """Return ``x`` as a float32 tensor of shape (N,), and whether it was a scalar.

    Accepts shape (), (N,) or (N, 1).
    """
    x = ops.cast(ops.convert_to_tensor(x), "float32")
    rank = len(x.shape)
    if rank == 0:
        return ops.reshape(x, (1,)), True
    if rank == 2 and x.shape[-1] not in (1, None):
        raise UsageError(f"Expected ages of shape (N,) or (N, 1), got shape {tuple(x.shape)}")
    if rank > 2:
        raise UsageError(f"Expected ages of shape (N,) or (N, 1), got shape {tuple(x.shape)}")
    return ops.reshape(x, (-1,)), False


def _as_float_tensor(x):
    """``x`` as a tensor, cast to float32 unless it already has a float dtype."""
    x = ops.convert_to_tensor(x)
    if not keras.backend.is_float_dtype(x.dtype):
        x = ops.cast(x, "float32")
    return x


def _check_bins(num_bins: int, bin_width: float) -> None:
    if int(num_bins) != num_bins or num_bins < 2:
        raise UsageError(f"num_bins must be an integer >= 2, got {num_bins!r}")
    if not bin_width > 0:
        raise UsageError(f"bin_width must be > 0 years, got {bin_width!r}")


# ----------------------------------------------------------------------------------------------------------
# Two-point encoding (C3AE)
# ----------------------------------------------------------------------------------------------------------


def two_point_encode(ages, num_bins: int = NUM_AGE_BINS, bin_width: float = AGE_BIN_WIDTH):
    """C3AE two-point encoding of ages (years) onto bins at 0, w, 2w, ..., w*(num_bins-1) years.

    An age ``a`` (first clipped to [0, w*(num_bins-1)]) puts ``1 - r`` on bin ``floor(a/w)`` and ``r`` on the
    next bin, with ``r = (a - floor(a/w)*w) / w``. So 32 -> bin 3: 0.8, bin 4: 0.2; 110 -> bin 11: 1.0.
    Every row sums to 1 and ``two_point_decode`` inverts it exactly (up to float32 rounding).

    Args:
        ages: years, shape (N,) or (N, 1); a scalar gives a single row of shape (num_bins,).
        num_bins: number of bins (12 in C3AE).
        bin_width: years between bin centres (10 in C3AE).

    Returns:
        float32 tensor of shape (N, num_bins).
    """
    _check_bins(num_bins, bin_width)
    num_bins = int(num_bins)
    width = float(bin_width)
    ages, scalar = _as_float_vector(ages)
    ages = ops.clip(ages, 0.0, width * (num_bins - 1))
    idx = ops.clip(ops.floor(ages / width), 0.0, float(num_bins - 1))
    right = ops.clip((ages - idx * width) / width, 0.0, 1.0)
    left = 1.0 - right
    idx_int = ops.cast(idx, "int32")
    next_int = ops.minimum(idx_int + 1, num_bins - 1)
    # At the last bin right == 0, so clipping the neighbour onto it adds nothing.
    encoded = ops.one_hot(idx_int, num_bins, dtype="float32") * ops.expand_dims(left, -1) + ops.one_hot(
        next_int, num_bins, dtype="float32"
    ) * ops.expand_dims(right, -1)
    if scalar:
        encoded = ops.reshape(encoded, (num_bins,))
    return encoded


def _bin_centres(num_bins, dtype="float32"):
    if num_bins is None:
        raise UsageError("The number of bins (last axis) must be known statically")
    return np.arange(int(num_bins), dtype=dtype)


def two_point_decode(bins, bin_width: float = AGE_BIN_WIDTH):
    """Inverse of ``two_point_encode``: the expected age ``sum_i p_i * i * w`` in years.

    Args:
        bins: bin weights or probabilities, shape (N, num_bins).
        bin_width: years between bin centres.

    Returns:
        float32 tensor of shape (N,) (the bin axis is reduced away, not kept as (N, 1)).
    """
    bins = ops.cast(ops.convert_to_tensor(bins), "float32")
    centres = ops.convert_to_tensor(_bin_centres(bins.shape[-1]) * np.float32(bin_width))
    return ops.sum(bins * centres, axis=-1)


# ----------------------------------------------------------------------------------------------------------
# Distribution losses
# ----------------------------------------------------------------------------------------------------------


def kl_divergence(y_true, y_pred, eps: float = _DEFAULT_EPS):
    """Per-sample KL(y_true || y_pred) in nats over the last axis.

    Both distributions are clipped to [eps, 1] before the log, so exact zeros stay finite; terms where
    ``y_true`` is 0 contribute (almost exactly) nothing.

    Returns:
        tensor of shape (N,) for inputs of shape (N, K).
    """
    y_pred = _as_float_tensor(y_pred)
    y_true = ops.cast(ops.convert_to_tensor(y_true), y_pred.dtype)
    y_true = ops.clip(y_true, eps, 1.0)
    y_pred = ops.clip(y_pred, eps, 1.0)
    return ops.sum(y_true * ops.log(y_true / y_pred), axis=-1)


def age_bin_weights(
    ages,
    num_bins: int = NUM_AGE_BINS,
    bin_width: float = AGE_BIN_WIDTH,
    normalize: str = "samples",
) -> np.ndarray:
    """Per-bin weights for ``C3AEFocalLoss`` from the training ages (years): smoothed inverse frequency.

    ``mass_i`` is the two-point mass of the training ages on bin i (a sum of the rows of
    ``two_point_encode``). The raw weight is ``1 / (mass_i + 1)``: the +1 keeps it finite when a bin is empty
    (the reference computes ``1 / mass_i`` and divides by zero there, issue #5). It is then scaled:

    - ``normalize="samples"`` (default): so that the average weight seen by the training targets is 1
      (``sum_i mass_i * w_i == sum_i mass_i``). The loss keeps its unweighted scale even when some bins are
      (nearly) empty, which would otherwise take almost all the weight.
    - ``normalize="bins"``: so that the weights average 1 over the bins (``mean(w) == 1``).

    With no ages (or equally filled bins) every weight is 1.

    Returns:
        float32 array of shape (num_bins,), all finite and > 0.
    """
    _check_bins(num_bins, bin_width)
    if normalize not in ("samples", "bins"):
        raise UsageError(f"normalize must be 'samples' or 'bins', got {normalize!r}")
    ages_np = np.asarray(ages, dtype=np.float64).reshape(-1)
    if np.isnan(ages_np).any():
        raise UsageError(f"{int(np.isnan(ages_np).sum())} of {ages_np.size} ages are NaN")
    num_bins = int(num_bins)
    if ages_np.size == 0:
        return np.ones(num_bins, dtype=np.float32)
    mass = ops.convert_to_numpy(two_point_encode(ages_np, num_bins, bin_width)).astype(np.float64).sum(axis=0)
    weights = 1.0 / (mass + 1.0)
    if normalize == "samples":
        weights *= mass.sum() / float(np.sum(mass * weights))
    else:
        weights *= num_bins / weights.sum()
    return weights.astype(np.float32)


@register
class C3AEFocalLoss(keras.losses.Loss):
    """C3AE's focal loss on the two-point age bins, mixed with cross-entropy against a uniform distribution.

    Per sample (in nats): ``(1 - uniform_mix) * sum_{i: t_i > 0} w_i * (t_i - p_i)^2 * -log(clip(p_i, eps, 1))
    + uniform_mix * mean_i -log(clip(p_i, eps, 1))``, with ``t`` the two-point target (N, num_bins),
    ``p`` the predicted bin probabilities and ``w`` the per-bin weights (``age_bin_weights``; None = all 1).
    Finite for ``p`` with exact zeros and ones.
    """

    def __init__(
        self,
        bin_weights: Sequence[float] | None = None,
        uniform_mix: float = 0.1,
        eps: float = _DEFAULT_EPS,
        name: str = "c3ae_focal_loss",
        reduction: str | None = "sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if bin_weights is not None:
            bin_weights = [float(w) for w in np.asarray(bin_weights, dtype=np.float64).reshape(-1)]
            if not all(np.isfinite(bin_weights)) or min(bin_weights) < 0:
                raise UsageError(f"bin_weights must be finite and >= 0, got {bin_weights}")
        if not 0.0 <= uniform_mix <= 1.0:
            raise UsageError(f"uniform_mix must be in [0, 1], got {uniform_mix!r}")
        if not eps > 0:
            raise UsageError(f"eps must be > 0, got {eps!r}")
        self.bin_weights = bin_weights
        self.uniform_mix = float(uniform_mix)
        self.eps = float(eps)

    def call(self, y_true, y_pred):
        y_pred = ops.convert_to_tensor(y_pred)
        y_true = ops.cast(ops.convert_to_tensor(y_true), y_pred.dtype)
        log_p = ops.log(ops.clip(y_pred, self.eps, 1.0))
        focal = ops.where(y_true > 0, ops.square(y_true - y_pred) * -log_p, ops.zeros_like(y_pred))
        if self.bin_weights is not None:
            num_bins = y_pred.shape[-1]
            if num_bins is not None and num_bins != len(self.bin_weights):
                raise UsageError(f"{len(self.bin_weights)} bin_weights for predictions with {num_bins} bins")
            focal = focal * ops.convert_to_tensor(np.asarray(self.bin_weights), dtype=y_pred.dtype)
        focal = ops.sum(focal, axis=-1)
        uniform_ce = -ops.mean(log_p, axis=-1)
        return (1.0 - self.uniform_mix) * focal + self.uniform_mix * uniform_ce

    def get_config(self):
        return {
            **super().get_config(),
            "bin_weights": self.bin_weights,
            "uniform_mix": self.uniform_mix,
            "eps": self.eps,
        }


@register
class KLDivergenceLoss(keras.losses.Loss):
    """KL(y_true || y_pred) per sample in nats (``kl_divergence``), as a named, serializable loss."""

    def __init__(
        self,
        eps: float = _DEFAULT_EPS,
        name: str = "kl_divergence_loss",
        reduction: str | None = "sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if not eps > 0:
            raise UsageError(f"eps must be > 0, got {eps!r}")
        self.eps = float(eps)

    def call(self, y_true, y_pred):
        return kl_divergence(y_true, y_pred, eps=self.eps)

    def get_config(self):
        return {**super().get_config(), "eps": self.eps}


# ----------------------------------------------------------------------------------------------------------
# Gender
# ----------------------------------------------------------------------------------------------------------


def smooth_gender_labels(y, smoothing: float = 0.01):
    """Smooth known gender labels: ``y * (1 - 2s) + s`` (0/1 -> s / 1 - s); unknown (-1) stays -1.

    Returns:
        float32 tensor of the same shape as ``y``.
    """
    if not 0.0 <= smoothing < 0.5:
        raise UsageError(f"smoothing must be in [0, 0.5), got {smoothing!r}")
    y = ops.cast(ops.convert_to_tensor(y), "float32")
    smoothed = y * (1.0 - 2.0 * smoothing) + smoothing
    return ops.where(ops.equal(y, float(UNKNOWN_GENDER)), y, smoothed)


def masked_binary_crossentropy(y_true, y_pred, label_smoothing: float = 0.02, eps: float = _DEFAULT_EPS):
    """Per-sample binary cross-entropy (nats) on the probability of male, 0 for unknown (-1) labels.

    Labels are smoothed Keras-style: ``y * (1 - label_smoothing) + label_smoothing / 2`` (0.02 -> 0.99/0.01).
    ``y_pred`` is clipped to [eps, 1 - eps].

    Returns:
        ``(values, known)``: float tensors of shape (N,); ``known`` is 1 where the label is 0 or 1.
    """
    y_pred = _as_float_tensor(y_pred)
    y_pred = ops.reshape(y_pred, (-1,))
    y_true = ops.reshape(ops.cast(ops.convert_to_tensor(y_true), y_pred.dtype), (-1,))
    known_bool = ops.logical_or(ops.equal(y_true, float(MALE)), ops.equal(y_true, float(FEMALE)))
    known = ops.cast(known_bool, y_pred.dtype)
    # Unknown rows get a harmless label so their (discarded) values and gradients stay finite.
    labels = ops.where(known_bool, y_true, ops.zeros_like(y_true))
    labels = labels * (1.0 - label_smoothing) + 0.5 * label_smoothing
    p = ops.clip(y_pred, eps, 1.0 - eps)
    values = -(labels * ops.log(p) + (1.0 - labels) * ops.log(1.0 - p))
    return values * known, known


@register
class MaskedBinaryCrossentropy(keras.losses.Loss):
    """Gender BCE on the probability of male that ignores unknown (-1) labels.

    Samples labelled -1 contribute 0 and are left out of the mean: with the default reduction
    (``"sum_over_batch_size"``, also ``"mean"``) the loss is the mean over the known labels only, so adding
    unknown-labelled samples to a batch does not change it; a batch with no known label gives 0, not NaN.
    For that, ``call`` scales the per-sample values by ``N / n_known`` under those reductions; with
    ``"sum"`` or ``"none"`` the values are the plain per-sample losses (0 for unknown).
    Labels are smoothed to ``1 - label_smoothing/2`` and ``label_smoothing/2`` (0.99 / 0.01 by default, as
    in the reference).

    Training no longer uses it: unknown labels are sample weights of 0 for Keras' own
    ``BinaryCrossentropy`` (``c3ae.data.label_weight``, ``c3ae.task.mean_over_labelled``), which gives the
    same value, balance weights included (``tests/test_losses.py``). It stays registered so that models
    saved with it load.
    """

    def __init__(
        self,
        label_smoothing: float = 0.02,
        eps: float = _DEFAULT_EPS,
        name: str = "masked_binary_crossentropy",
        reduction: str | None = "sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if not 0.0 <= label_smoothing < 1.0:
            raise UsageError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if not 0 < eps < 0.5:
            raise UsageError(f"eps must be in (0, 0.5), got {eps!r}")
        self.label_smoothing = float(label_smoothing)
        self.eps = float(eps)

    def call(self, y_true, y_pred):
        values, known = masked_binary_crossentropy(y_true, y_pred, self.label_smoothing, self.eps)
        if self.reduction in ("sum_over_batch_size", "mean"):
            total = ops.cast(ops.shape(values)[0], values.dtype)
            values = values * ops.divide_no_nan(total, ops.sum(known))
        return values

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing, "eps": self.eps}


# ----------------------------------------------------------------------------------------------------------
# DLDL (deep label distribution learning)
# ----------------------------------------------------------------------------------------------------------


def gaussian_label_distribution(ages, num_bins: int = 101, sigma=2.0, start: float = 0.0, step: float = 1.0):
    """DLDL targets: a Gaussian over the bin centres ``start + i * step`` (years) centred on each age.

    Computed as a softmax of ``-(c_i - a)^2 / (2 sigma^2)``, so rows sum to 1 even for ages far outside the
    bins (all the mass then goes to the nearest end bin).

    Args:
        ages: years, shape (N,) or (N, 1).
        num_bins: number of bins (101 for ages 0..100 with the defaults).
        sigma: standard deviation in years, > 0: a scalar or one per sample, shape (N,) or (N, 1).
        start: centre of bin 0 in years.
        step: years between bin centres.

    Returns:
        float32 tensor of shape (N, num_bins).
    """
    if int(num_bins) != num_bins or num_bins < 1:
        raise UsageError(f"num_bins must be a positive integer, got {num_bins!r}")
    if not step > 0:
        raise UsageError(f"step must be > 0 years, got {step!r}")
    if isinstance(sigma, (int, float, np.ndarray, list, tuple)) and not np.all(np.asarray(sigma) > 0):
        raise UsageError(f"sigma must be > 0 years, got {sigma!r}")
    ages, _ = _as_float_vector(ages)
    sigma = ops.cast(ops.convert_to_tensor(sigma), "float32")
    if len(sigma.shape) > 0:
        sigma = ops.reshape(sigma, (-1, 1))
    centres = ops.convert_to_tensor(
        np.float32(start) + np.arange(int(num_bins), dtype=np.float32) * np.float32(step)
    )
    logits = -ops.square(centres - ops.expand_dims(ages, -1)) / (2.0 * ops.square(sigma))
    return ops.softmax(logits, axis=-1)


@register
class DLDLLoss(keras.losses.Loss):
    """DLDL: KL(Gaussian(age, sigma) || y_pred) per sample, in nats.

    ``y_true`` is the age in years, shape (N,) or (N, 1); the Gaussian target over the ``num_bins`` bin
    centres ``start + i * step`` is built inside (``gaussian_label_distribution``). ``y_pred`` is
    (N, num_bins) probabilities. The L1 term on the expected age is added by the training code separately.
    """

    def __init__(
        self,
        num_bins: int = 101,
        sigma: float = 2.0,
        start: float = 0.0,
        step: float = 1.0,
        eps: float = _DEFAULT_EPS,
        name: str = "dldl_loss",
        reduction: str | None = "sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if int(num_bins) != num_bins or num_bins < 1:
            raise UsageError(f"num_bins must be a positive integer, got {num_bins!r}")
        if not sigma > 0:
            raise UsageError(f"sigma must be > 0 years, got {sigma!r}")
        if not step > 0:
            raise UsageError(f"step must be > 0 years, got {step!r}")
        if not eps > 0:
            raise UsageError(f"eps must be > 0, got {eps!r}")
        self.num_bins = int(num_bins)
        self.sigma = float(sigma)
        self.start = float(start)
        self.step = float(step)
        self.eps = float(eps)

    def call(self, y_true, y_pred):
        target = gaussian_label_distribution(y_true, self.num_bins, self.sigma, self.start, self.step)
        return kl_divergence(target, y_pred, eps=self.eps)

    def get_config(self):
        return {
            **super().get_config(),
            "num_bins": self.num_bins,
            "sigma": self.sigma,
            "start": self.start,
            "step": self.step,
            "eps": self.eps,
        }


@register
class MaskedMeanAbsoluteError(keras.losses.Loss):
    """Mean absolute error over samples whose label is known (not -1): SSR-Net's gender loss (V = 1).

    The mean is over known labels only; a batch with none gives 0. Training now uses Keras' own mean
    absolute error with unknown labels as sample weights of 0 (the same value, as for
    :class:`MaskedBinaryCrossentropy`); the class stays registered so that models saved with it load.
    """

    def __init__(
        self,
        name: str = "masked_mean_absolute_error",
        reduction: str | None = "sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        y_pred = ops.reshape(_as_float_tensor(y_pred), (-1,))
        y_true = ops.reshape(ops.cast(ops.convert_to_tensor(y_true), y_pred.dtype), (-1,))
        known = ops.cast(ops.not_equal(y_true, float(UNKNOWN_GENDER)), y_pred.dtype)
        values = ops.abs(y_true - y_pred) * known
        count = ops.cast(ops.shape(values)[0], values.dtype)
        return values * count / ops.maximum(ops.sum(known), 1.0)


# ----------------------------------------------------------------------------------------------------------
# Per-output losses, for the family specs (c3ae.models.<family>.SPEC.losses)
# ----------------------------------------------------------------------------------------------------------


def losses_by_output(output_names, loss_config, family: str, special: dict | None = None) -> tuple:
    """(loss, weight) per output: ``special[name]()`` for a family's own outputs, else the standard ones:
    ``age`` MAE (years), ``gender`` binary cross-entropy on P(male) (labels smoothed by
    ``loss_config.label_smoothing``), ``age_group`` categorical cross-entropy. Weights come from
    ``loss_config`` under the output's name.

    The standard losses are Keras' own, so unknown (-1) gender labels must come as sample weights of 0,
    scaled per batch by ``c3ae.task.mean_over_labelled`` (``make_dataset(label_weights=True)`` gives
    them): the loss is then the mean over the known labels, as :class:`MaskedBinaryCrossentropy` has it."""
    special = special or {}
    standard = {
        "age": keras.losses.MeanAbsoluteError,
        "gender": lambda: keras.losses.BinaryCrossentropy(label_smoothing=loss_config.label_smoothing),
        "age_group": keras.losses.CategoricalCrossentropy,
    }
    loss, weights = {}, {}
    for name in output_names:
        make = special.get(name) or standard.get(name)
        if make is None:
            raise UsageError(f"No loss is defined for output {name!r} of family {family!r}.")
        loss[name], weights[name] = make(), float(getattr(loss_config, name))
    return loss, weights
