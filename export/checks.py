"""Checks every export runs before converting, and the errors an export reports to its user."""

from __future__ import annotations

import numpy as np

from c3ae.errors import C3AEError


class ExportError(C3AEError, ValueError):
    """An export that cannot be done as asked (bad model, format, quantisation, data or output path)."""


class ConverterError(ExportError):
    """A converter that crashed or hung in its child process (:mod:`c3ae.export.convert`): the tool failed,
    not the user; the CLI exits 1."""

    exit_code = 1


class NonFiniteWeightsError(ExportError):
    """A model whose weights hold NaN or Inf: exporting it would ship a model that outputs NaN."""


def check_finite(model, action: str = "export") -> None:
    """Raise :class:`NonFiniteWeightsError` naming the first layer of a ``keras.Model`` whose weights hold
    NaN or Inf (the library's one finiteness check; ``action`` says what is refused)."""
    import keras

    for layer in _all_layers(model):
        for weight in layer.weights:
            values = keras.ops.convert_to_numpy(weight)
            if not np.all(np.isfinite(values)):
                bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
                raise NonFiniteWeightsError(
                    f"Layer {layer.name!r} holds NaN or Inf in {weight.path} ({bad} of {np.size(values)} "
                    f"values); refusing to {action} it."
                )


def _all_layers(model):
    """Every layer, nested models' layers included, innermost first (so the message names a real layer)."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
        yield layer
