"""Model health checks on real inputs: layers whose output is the same for every face.

A layer that outputs a constant (every unit of a ReLU layer dead, say) silently removes a path from the
model: the original SSR-Net IMDB age weights have all three stages' ``p`` and ``eta`` constant for every
face, so their age varies only through the stage-width terms. Such a layer also breaks int8 conversion: its
calibrated range is empty and the quantisation scale degenerates (LiteRT's XNNPACK delegate refuses the
graph).
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import numpy as np


def layer_spreads(model: keras.Model, inputs: Mapping[str, np.ndarray] | np.ndarray) -> dict[str, float]:
    """``{layer name: largest standard deviation across the batch of any of its output units}``.

    Covers the top-level layers called once (a nested backbone counts as one layer; a layer called on
    several tensors is left out, its outputs are checked downstream). ``inputs`` are the model's inputs
    for a batch of faces (at least two), in the model's own convention (BGR, [0, 255]).
    """
    layers = [
        layer
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer) and len(layer._inbound_nodes) == 1
    ]
    # the node's tensors, not layer.output: for a nested model that is its own inner graph's tensor
    probe = keras.Model(model.input, [layer._inbound_nodes[0].output_tensors[0] for layer in layers])
    if isinstance(inputs, Mapping) and not isinstance(model.input, dict) and len(model.inputs) == 1:
        inputs = inputs[model.inputs[0].name]
    outputs = probe.predict(inputs, verbose=0, batch_size=256)
    if len(layers) == 1:
        outputs = [outputs]
    spreads = {}
    for layer, output in zip(layers, outputs, strict=True):
        values = np.asarray(output, dtype=np.float64).reshape(len(output), -1)
        spreads[layer.name] = float(np.max(np.std(values, axis=0))) if values.size else 0.0
    return spreads


def constant_layers(
    model: keras.Model, inputs: Mapping[str, np.ndarray] | np.ndarray, tolerance: float = 1e-6
) -> list[str]:
    """Names of the layers (see :func:`layer_spreads`) whose output does not vary across ``inputs``."""
    return [name for name, spread in layer_spreads(model, inputs).items() if spread <= tolerance]
