"""Keras training metrics (the NumPy evaluation metrics live in ``c3ae.metrics``)."""

from __future__ import annotations

import keras
from keras import ops

from c3ae.conventions import UNKNOWN_GENDER
from c3ae.layers import register


@register
class MaskedBinaryAccuracy(keras.metrics.Metric):
    """Gender accuracy (``p >= threshold`` is male) over samples whose label is known (not -1). A soft
    label (a teacher's P(male), mixed in by distillation) counts as male from ``threshold`` on.

    Kept instead of Keras' ``BinaryAccuracy`` with unknown labels weighted 0: ``fit`` passes no sample
    weights to compiled ``metrics``, and as a ``weighted_metric`` it would get the loss's weights, so the
    accuracy would weigh rows by their balance weight and by their batch's ``batch size / known labels``
    (``c3ae.task.mean_over_labelled``) instead of counting every known label once. It ignores
    ``sample_weight``. The multi-worker loop sums its state (``stateless_update_state``) across workers.
    """

    def __init__(self, threshold: float = 0.5, name: str = "masked_binary_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.threshold = float(threshold)
        self.correct = self.add_variable(shape=(), initializer="zeros", name="correct")
        self.known = self.add_variable(shape=(), initializer="zeros", name="known")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.reshape(ops.cast(y_true, "float32"), (-1,))
        y_pred = ops.reshape(ops.cast(y_pred, "float32"), (-1,))
        known = ops.cast(ops.greater(y_true, float(UNKNOWN_GENDER)), "float32")
        predicted = y_pred >= self.threshold
        hits = ops.cast(ops.equal(predicted, y_true >= self.threshold), "float32") * known
        self.correct.assign_add(ops.sum(hits))
        self.known.assign_add(ops.sum(known))

    def result(self):
        return self.correct / ops.maximum(self.known, 1.0)

    def reset_state(self):
        self.correct.assign(0.0)
        self.known.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold}


def metrics_for_outputs(output_names) -> dict:
    """The compiled metrics per output: ``age`` MAE (years), ``gender`` accuracy on known labels,
    ``age_group`` accuracy."""
    metrics = {}
    for name in output_names:
        if name == "age":
            metrics[name] = [keras.metrics.MeanAbsoluteError(name="mae")]
        elif name == "gender":
            metrics[name] = [MaskedBinaryAccuracy(name="acc")]
        elif name == "age_group":
            metrics[name] = [keras.metrics.CategoricalAccuracy(name="acc")]
    return metrics
