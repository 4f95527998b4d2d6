"""Keras 3 layers shared by every model family.

All layers are written with ``keras.ops`` (backend-agnostic), are registered as serializable under the
``c3ae`` package, round-trip through ``get_config``, and lower to builtin TFLite / ONNX / CoreML ops only
(no ``Lambda``, no ``arange``, no data-dependent Python loops).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import layers, ops

from c3ae.errors import UsageError

PACKAGE = "c3ae"

ACTIVATIONS = ("relu", "mish6")

# Output heads compute in float32 even under a mixed_float16 policy (softmax and the age regression are
# the numerically touchy parts); with the default float32 policy this changes nothing.
OUTPUT_DTYPE = "float32"


def register(cls):
    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)


def _stable_softplus(x):
    # log(1 + exp(x)) written as relu(x) + log(1 + exp(-|x|)): no overflow, and no SOFTPLUS/LOG1P op,
    # which not every converter has as a builtin.
    return ops.relu(x) + ops.log(1.0 + ops.exp(-ops.abs(x)))


@register
class WhiteNorm(layers.Layer):
    """C3AE's "white norm": ``(x - 127.5) / 128`` with fixed constants.

    Input: pixels in [0, 255] (any channel order). Output: values in about [-1, 1].
    """

    def __init__(self, center: float = 127.5, scale: float = 128.0, **kwargs):
        super().__init__(**kwargs)
        self.center = float(center)
        self.scale = float(scale)

    def call(self, inputs):
        return (inputs - self.center) / self.scale

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "center": self.center, "scale": self.scale}


@register
class Mish6(layers.Layer):
    """Mish clipped to [-6, 6]: ``min(max(x * tanh(softplus(x)), -6), 6)``."""

    def __init__(self, limit: float = 6.0, **kwargs):
        super().__init__(**kwargs)
        self.limit = float(limit)

    def call(self, inputs):
        mish = inputs * ops.tanh(_stable_softplus(inputs))
        return ops.minimum(ops.maximum(mish, -self.limit), self.limit)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "limit": self.limit}


def make_activation(name: str, layer_name: str | None = None) -> layers.Layer:
    """An activation layer by name: ``"relu"`` or ``"mish6"``."""
    if name == "relu":
        return layers.ReLU(name=layer_name)
    if name == "mish6":
        return Mish6(name=layer_name)
    raise UsageError(f"Unknown activation {name!r}; expected one of {ACTIVATIONS}.")


@register
class GeMPooling(layers.Layer):
    """Generalised-mean pooling over H x W of an NHWC tensor.

    ``(mean_{H,W} (relu(x) + eps)^p)^(1/p)`` with a trainable scalar ``p`` (initialised at ``p``).
    Output shape: (N, C), or (N, 1, 1, C) with ``keepdims=True``.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, keepdims: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.initial_p = float(p)
        self.eps = float(eps)
        self.keepdims = bool(keepdims)

    def build(self, input_shape):
        self.p = self.add_weight(
            name="p",
            shape=(),
            initializer=keras.initializers.Constant(self.initial_p),
            trainable=True,
        )

    def call(self, inputs):
        powered = ops.power(ops.relu(inputs) + self.eps, self.p)
        pooled = ops.mean(powered, axis=(1, 2), keepdims=self.keepdims)
        return ops.power(pooled, 1.0 / self.p)

    def compute_output_shape(self, input_shape):
        if self.keepdims:
            return (input_shape[0], 1, 1, input_shape[-1])
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "p": self.initial_p, "eps": self.eps, "keepdims": self.keepdims}


@register
class SqueezeExcite(layers.Layer):
    """Squeeze-and-excitation on an NHWC tensor.

    global pool (``"avg"`` or ``"gem"``) -> Dense(C / reduction) -> activation -> Dense(C, sigmoid)
    -> channel-wise scale of the input.
    """

    def __init__(self, reduction: int = 2, pooling: str = "avg", activation: str = "relu", **kwargs):
        super().__init__(**kwargs)
        if pooling not in ("avg", "gem"):
            raise UsageError(f"Unknown SE pooling {pooling!r}; expected 'avg' or 'gem'.")
        if activation not in ACTIVATIONS:
            raise UsageError(f"Unknown activation {activation!r}; expected one of {ACTIVATIONS}.")
        if int(reduction) < 1:
            raise UsageError(f"SE reduction must be >= 1, got {reduction}.")
        self.reduction = int(reduction)
        self.pooling = pooling
        self.activation = activation

    def build(self, input_shape):
        channels = int(input_shape[-1])
        hidden = max(1, channels // self.reduction)
        if self.pooling == "gem":
            self.pool = GeMPooling(name="gem")
            self.pool.build(input_shape)
        self.squeeze = layers.Dense(hidden, name="squeeze")
        self.squeeze.build((input_shape[0], channels))
        self.act = make_activation(self.activation, "act")
        self.excite = layers.Dense(channels, activation="sigmoid", name="excite")
        self.excite.build((input_shape[0], hidden))

    def call(self, inputs):
        if self.pooling == "gem":
            pooled = self.pool(inputs)
        else:
            pooled = ops.mean(inputs, axis=(1, 2))
        weights = self.excite(self.act(self.squeeze(pooled)))
        return inputs * weights[:, None, None, :]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "reduction": self.reduction,
            "pooling": self.pooling,
            "activation": self.activation,
        }


@register
class ExpectedValue(layers.Layer):
    """Expectation of a distribution over evenly spaced bins: ``sum_i p_i * (start + i * step)``.

    Input: (N, num_bins) probabilities. Output: (N, 1), in the bins' unit (years for ages).
    """

    def __init__(self, num_bins: int, start: float = 0.0, step: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if int(num_bins) < 1:
            raise UsageError(f"num_bins must be >= 1, got {num_bins}.")
        self.num_bins = int(num_bins)
        self.start = float(start)
        self.step = float(step)

    def bin_values(self) -> np.ndarray:
        return (self.start + self.step * np.arange(self.num_bins)).astype("float32")

    def call(self, inputs):
        values = ops.convert_to_tensor(self.bin_values(), dtype=inputs.dtype)
        return ops.sum(inputs * values, axis=-1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1)

    def get_config(self):
        return {**super().get_config(), "num_bins": self.num_bins, "start": self.start, "step": self.step}


@register
class SoftStagewiseRegression(layers.Layer):
    """SSR-Net's soft stagewise regression (IJCAI 2018, eq. 5 with dynamic range).

        y = V * sum_k [ sum_i (i + lambda_local * eta_i^(k)) * p_i^(k) ]
                      / prod_{j<=k} (s_j * (1 + lambda_d * delta_j))

    Call on a list ``[p_1..p_K, eta_1..eta_K, delta_1..delta_K]`` with p_k, eta_k of shape (N, s_k) and
    delta_k of shape (N, 1). Output: (N, 1) in [0, V] when ``clamp`` is set (unbounded otherwise, as the
    original). With ``clamp`` each ``1 + lambda_d * delta`` is also kept >= ``min_range``. The index vectors
    are constants baked at build time, so converters see only MUL/ADD/SUM/DIV.
    """

    min_range = 1e-2

    def __init__(
        self,
        stage_num: Sequence[int] = (3, 3, 3),
        lambda_local: float = 1.0,
        lambda_d: float = 1.0,
        V: float = 101.0,
        clamp: bool = False,
        clip_output: bool | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # clamp keeps every stage's dynamic range positive and, unless clip_output says otherwise, the
        # output in [0, V]; a score that feeds a probability stays unclipped so its gradient never stops.
        self.clip_output = bool(clamp) if clip_output is None else bool(clip_output)
        self.stage_num = tuple(int(s) for s in stage_num)
        if not self.stage_num or any(s < 1 for s in self.stage_num):
            raise UsageError(f"stage_num needs at least one stage and every stage >= 1, got {stage_num}.")
        self.lambda_local = float(lambda_local)
        self.lambda_d = float(lambda_d)
        self.V = float(V)
        self.clamp = bool(clamp)

    def call(self, inputs):
        stages = len(self.stage_num)
        if len(inputs) != 3 * stages:
            raise UsageError(f"Expected {3 * stages} tensors [p.., eta.., delta..], got {len(inputs)}.")
        probs, etas, deltas = inputs[:stages], inputs[stages : 2 * stages], inputs[2 * stages :]
        total = 0.0
        denominator = 1.0
        for k, size in enumerate(self.stage_num):
            index = ops.convert_to_tensor(np.arange(size, dtype="float32"), dtype=probs[k].dtype)
            dynamic_range = 1.0 + self.lambda_d * deltas[k]
            if self.clamp:
                # The original divides by 1 + lambda_d * delta with delta = tanh(.) free to reach -1: ages of
                # 10,000 or NaN. The clamped variant keeps each stage's range positive.
                dynamic_range = ops.maximum(dynamic_range, self.min_range)
            denominator = denominator * (size * dynamic_range)
            stage_sum = ops.sum((index + self.lambda_local * etas[k]) * probs[k], axis=-1, keepdims=True)
            total = total + stage_sum / denominator
        output = self.V * total
        if self.clip_output:
            output = ops.minimum(ops.maximum(output, 0.0), self.V)
        return output

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], 1)

    def get_config(self):
        return {
            **super().get_config(),
            "stage_num": list(self.stage_num),
            "lambda_local": self.lambda_local,
            "lambda_d": self.lambda_d,
            "V": self.V,
            "clamp": self.clamp,
            "clip_output": self.clip_output,
        }


@register
class LocalResponseNormalization(layers.Layer):
    """Caffe-style across-channel LRN (Levi & Hassner, AlexNet) on an NHWC tensor.

    ``x_c / (bias + alpha / size * sum_{|c' - c| <= size // 2} x_{c'}^2) ^ beta``. The windowed sum is a
    1x1 convolution with a constant banded kernel, so it lowers to CONV_2D + POW on every converter.
    """

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, bias: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if int(size) < 1 or int(size) % 2 == 0:
            raise UsageError(f"LRN size must be a positive odd number, got {size}.")
        self.size = int(size)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.bias = float(bias)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        half = self.size // 2
        index = np.arange(channels)
        band = (np.abs(index[:, None] - index[None, :]) <= half).astype("float32")
        self._band = band.reshape(1, 1, channels, channels)

    def call(self, inputs):
        kernel = ops.convert_to_tensor(self._band, dtype=inputs.dtype)
        window_sum = ops.conv(ops.square(inputs), kernel, strides=1, padding="valid")
        return inputs / ops.power(self.bias + (self.alpha / self.size) * window_sum, self.beta)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "size": self.size,
            "alpha": self.alpha,
            "beta": self.beta,
            "bias": self.bias,
        }


@register
class CropsToBatch(layers.Layer):
    """Stack K same-shaped inputs along the batch axis: K x (N, ...) -> (K * N, ...), in list order.

    With :class:`BatchToFeatures` this runs ONE shared backbone call over all crops, so a converted graph
    holds the backbone's weights once instead of once per crop.
    """

    def call(self, inputs):
        return ops.concatenate(list(inputs), axis=0)

    def compute_output_shape(self, input_shape):
        first = input_shape[0]
        batch = None if first[0] is None else first[0] * len(input_shape)
        return (batch, *first[1:])


@register
class BatchToFeatures(layers.Layer):
    """Undo :class:`CropsToBatch` on features: (K * N, F) -> (N, K * F).

    Crop k lands in columns [k * F, (k + 1) * F), i.e. the concatenation of the per-crop features in order.
    """

    def __init__(self, num_crops: int, **kwargs):
        super().__init__(**kwargs)
        if int(num_crops) < 1:
            raise UsageError(f"num_crops must be >= 1, got {num_crops}.")
        self.num_crops = int(num_crops)

    def call(self, inputs):
        features = inputs.shape[-1]
        per_crop = ops.reshape(inputs, (self.num_crops, -1, features))
        return ops.reshape(ops.transpose(per_crop, (1, 0, 2)), (-1, self.num_crops * features))

    def compute_output_shape(self, input_shape):
        batch = None if input_shape[0] is None else input_shape[0] // self.num_crops
        return (batch, self.num_crops * input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "num_crops": self.num_crops}


@register
class ScoreToProbability(layers.Layer):
    """A score around ``centre`` as a probability: ``sigmoid(scale * (score - centre))``, ``scale`` trained.

    SSR-Net's gender model regresses 0 (female) to 1 (male); trained with MAE, clipped to [0, 1], it says
    exactly 0 or 1 for almost every face. This head turns the unclipped score into P(male), trained with
    binary cross-entropy, so the probability means something and can be calibrated.
    """

    def __init__(self, centre: float = 0.5, initial_scale: float = 8.0, **kwargs):
        super().__init__(**kwargs)
        self.centre = float(centre)
        self.initial_scale = float(initial_scale)

    def build(self, input_shape):
        self.scale = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(self.initial_scale), name="scale"
        )

    def call(self, inputs):
        return ops.sigmoid(ops.cast(self.scale, inputs.dtype) * (inputs - self.centre))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "centre": self.centre, "initial_scale": self.initial_scale}
