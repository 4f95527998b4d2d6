"""MTCNN's three networks (Zhang et al., 2016) as plain Keras 3 models, for conversion to LiteRT.

The weights are those shipped in the ``mtcnn`` wheel (MIT; see ``c3ae/weights/mtcnn/LICENSE``). The package
feeds its networks RGB pixels normalised as ``(x - 127.5) / 128``; here that normalisation and the channel
swap are folded into each network's first convolution (all its convolutions are ``valid``, so nothing is
zero-padded), and the models follow the project's convention: **BGR raw pixels in [0, 255]**.

- ``pnet``: input ``image`` (1, H, W, 3), any H, W >= 12; outputs ``offsets`` (1, h, w, 4), box
  regression in units of the 12-pixel cell, and ``probabilities`` (1, h, w, 2), softmax (not face, face),
  with h = ceil((H - 2) / 2) - 4 (one cell every 2 pixels).
- ``rnet``: input ``image`` (N, 24, 24, 3); outputs ``offsets`` (N, 4), ``probabilities`` (N, 2).
- ``onet``: input ``image`` (N, 48, 48, 3); outputs ``offsets`` (N, 4), ``landmarks`` (N, 10) as
  (x1..x5, y1..y5) fractions of the box, ``probabilities`` (N, 2).

Pixels outside the photo are mid-grey (127.5) for R- and O-Net, as the package's normalised zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import layers

from c3ae.errors import UsageError

NETWORKS = ("pnet", "rnet", "onet")
PATCH_SIZES = {"rnet": 24, "onet": 48}
NORMALISATION = (127.5, 128.0)  # the package's (x - mean) / scale


def _conv_prelu(x, filters: int, kernel: int, name: str):
    x = layers.Conv2D(filters, kernel, padding="valid", name=f"conv{name}")(x)
    return layers.PReLU(shared_axes=[1, 2], name=f"prelu{name}")(x)


def build_pnet() -> keras.Model:
    """Proposal network: fully convolutional, one 12x12 window every 2 pixels; 6,632 parameters."""
    inputs = keras.Input((None, None, 3), name="image")
    x = _conv_prelu(inputs, 10, 3, "1")
    x = layers.MaxPooling2D(2, 2, padding="same", name="pool1")(x)
    x = _conv_prelu(x, 16, 3, "2")
    x = _conv_prelu(x, 32, 3, "3")
    offsets = layers.Conv2D(4, 1, name="offsets")(x)
    probabilities = layers.Conv2D(2, 1, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, {"offsets": offsets, "probabilities": probabilities}, name="mtcnn_pnet")


def _dense_head(x, units: int, name: str):
    # The package flattens (W, H, C), not (H, W, C): its Caffe-converted dense weights expect that order.
    x = layers.Permute((2, 1, 3), name="permute")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(units, name=f"fc{name}")(x)
    return layers.PReLU(name=f"prelu{name}")(x)


def _refinement_trunk(inputs, filters: tuple[int, int, int], last_kernel: int):
    """R- and O-Net's first three blocks: conv + PReLU, 3x3/2 'same' pool, conv, 3x3/2 pool, conv."""
    x = _conv_prelu(inputs, filters[0], 3, "1")
    x = layers.MaxPooling2D(3, 2, padding="same", name="pool1")(x)
    x = _conv_prelu(x, filters[1], 3, "2")
    x = layers.MaxPooling2D(3, 2, padding="valid", name="pool2")(x)
    return _conv_prelu(x, filters[2], last_kernel, "3")


def build_rnet() -> keras.Model:
    """Refinement network on 24x24 patches; 100,178 parameters."""
    inputs = keras.Input((24, 24, 3), name="image")
    x = _dense_head(_refinement_trunk(inputs, (28, 48, 64), 2), 128, "4")
    outputs = {
        "offsets": layers.Dense(4, name="offsets")(x),
        "probabilities": layers.Dense(2, activation="softmax", name="probabilities")(x),
    }
    return keras.Model(inputs, outputs, name="mtcnn_rnet")


def build_onet() -> keras.Model:
    """Output network on 48x48 patches, with 5 landmarks; 389,040 parameters."""
    inputs = keras.Input((48, 48, 3), name="image")
    x = _refinement_trunk(inputs, (32, 64, 64), 3)
    x = layers.MaxPooling2D(2, 2, padding="same", name="pool3")(x)
    x = _dense_head(_conv_prelu(x, 128, 2, "4"), 256, "5")
    outputs = {
        "offsets": layers.Dense(4, name="offsets")(x),
        "landmarks": layers.Dense(10, name="landmarks")(x),
        "probabilities": layers.Dense(2, activation="softmax", name="probabilities")(x),
    }
    return keras.Model(inputs, outputs, name="mtcnn_onet")


BUILDERS = {"pnet": build_pnet, "rnet": build_rnet, "onet": build_onet}
_TRUNK = ["conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3"]
# Layers in the order of the package's weight lists (the attribute order of its subclassed models).
PACKAGE_ORDER = {
    "pnet": [*_TRUNK, "offsets", "probabilities"],
    "rnet": [*_TRUNK, "fc4", "prelu4", "offsets", "probabilities"],
    "onet": [*_TRUNK, "conv4", "prelu4", "fc5", "prelu5", "offsets", "landmarks", "probabilities"],
}


def fold_input_normalisation(kernel: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First-convolution weights for raw BGR input, from weights for normalised RGB input.

    conv(W, (x - m) / s) + b = conv(W / s, x) + b - (m / s) * sum(W), exact for unpadded convolutions.
    """
    mean, scale = NORMALISATION
    kernel = np.asarray(kernel, dtype=np.float64)
    folded_bias = np.asarray(bias, dtype=np.float64) - mean / scale * kernel.sum(axis=(0, 1, 2))
    folded_kernel = kernel[:, :, ::-1, :] / scale  # RGB -> BGR input channels
    return folded_kernel.astype(np.float32), folded_bias.astype(np.float32)


def set_package_weights(model: keras.Model, network: str, weights: Sequence[np.ndarray]) -> keras.Model:
    """Load the ``mtcnn`` package's weight list for ``network`` (``PACKAGE_ORDER``) into one of our models,
    folding the input normalisation into ``conv1``. Returns the model."""
    weights = [np.asarray(w) for w in weights]
    layers_with_weights = [model.get_layer(name) for name in PACKAGE_ORDER[network]]
    expected = sum(len(layer.weights) for layer in layers_with_weights)
    if len(weights) != expected:
        raise UsageError(f"{model.name} takes {expected} weight arrays; got {len(weights)}.")
    position = 0
    for layer in layers_with_weights:
        count = len(layer.weights)
        arrays = weights[position : position + count]
        position += count
        if layer.name == "conv1":
            arrays = list(fold_input_normalisation(*arrays))
        shapes = [tuple(w.shape) for w in layer.weights]
        if [a.shape for a in arrays] != shapes:
            raise UsageError(
                f"{model.name}/{layer.name}: expected {shapes}, got {[a.shape for a in arrays]}."
            )
        layer.set_weights(arrays)
    return model


def package_weights(network: str) -> list[np.ndarray]:
    """The weight arrays of ``network`` ("pnet", "rnet", "onet") from the installed ``mtcnn`` wheel."""
    import importlib.resources

    import joblib

    try:
        folder = importlib.resources.files("mtcnn.assets.weights")
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            'Converting the detector needs the mtcnn package: pip install "c3ae[train]".'
        ) from error
    return list(joblib.load(folder / f"{network}.lz4"))


def build_mtcnn_network(network: str) -> keras.Model:
    """One of ``NETWORKS`` with the ``mtcnn`` package's weights, taking BGR raw pixels."""
    if network not in BUILDERS:
        raise UsageError(f"Unknown MTCNN network {network!r}; expected one of {', '.join(NETWORKS)}.")
    return set_package_weights(BUILDERS[network](), network, package_weights(network))
