"""SSR-Net (Yang et al., IJCAI 2018): soft stagewise regression in about 41K parameters.

Input: ``image``, float32 BGR crop, raw pixels in [0, 255], 64x64x3 (no normalisation: the first
BatchNormalization does it, as in the official code).
Output: ``age`` (N, 1) in years (V = 101), or ``gender`` (N, 1), the probability of male (V = 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from c3ae.errors import UsageError
from c3ae.layers import OUTPUT_DTYPE, ScoreToProbability, SoftStagewiseRegression
from c3ae.models.c3ae import smallest_input
from c3ae.models.spec import FamilySpec, standard_target

P_ACTIVATIONS = ("relu", "softmax")
MIX_ACTIVATIONS = ("relu", "leaky_relu")


def ssrnet_feature_sizes(input_size: int) -> tuple[int, int, int]:
    """Sides of the feature maps the three stages tap: block 4, pooled block 2, pooled block 1."""
    pooled1 = (input_size - 2) // 2
    pooled2 = (pooled1 - 2) // 2
    pooled3 = (pooled2 - 2) // 2
    block4 = pooled3 - 2
    return block4, pooled2 // 4, pooled1 // 8


def _smallest_feature(input_size: int) -> int:
    return min(ssrnet_feature_sizes(input_size))


def _stream(inputs, prefix: str, filters: int, activation: str, pool_cls):
    """Four 3x3 valid conv blocks; returns the outputs of block 4 and of pooled blocks 1 and 2."""
    x = inputs
    taps = []
    for block in range(1, 5):
        x = layers.Conv2D(filters, 3, padding="valid", name=f"{prefix}_conv{block}")(x)
        x = layers.BatchNormalization(name=f"{prefix}_bn{block}")(x)
        x = layers.Activation(activation, name=f"{prefix}_act{block}")(x)
        if block < 4:
            x = pool_cls(2, name=f"{prefix}_pool{block}")(x)
            taps.append(x)
    return x, taps[0], taps[1]


def ssrnet_graph(
    stage_num: Sequence[int] = (3, 3, 3),
    lambda_local: float = 1.0,
    lambda_d: float = 1.0,
    V: float = 101.0,
    *,
    input_size: int = 64,
    p_activation: str = "relu",
    clamp_output: bool = False,
    mix_activation: str = "relu",
    dropout: float = 0.2,
    gender_probability: bool = False,
    output_name: str | None = None,
    name: str = "ssrnet",
) -> keras.Model:
    """SSR-Net's functional graph as in the official Keras code (40,915 parameters with the defaults).

    Args:
        stage_num: bins per stage, three stages (stage 1 on the deepest features).
        lambda_local, lambda_d: weights of the index shift eta and of the dynamic range delta.
        V: output range: 101 for age in years, 1 for gender.
        p_activation: ``"relu"`` (official: unnormalised, prone to dead units) or ``"softmax"`` (stabler).
        clamp_output: clip the output to [0, V] (the original can output negative or huge ages).
        mix_activation: of each stage's stream-mixing and feature layers (``*_s_mix``, ``*_x_mix``,
            ``*_feat``): ``"relu"`` (official) or ``"leaky_relu"`` (slope 0.2). Those layers have only 3-6
            units and ReLU kills them: the authors' IMDB age weights output the same ``p`` and ``eta`` for
            every face in all three stages, and retraining from them killed stage 2 again within 2 epochs.
        gender_probability: (V = 1) turn the unclipped score into P(male) with a trained sigmoid
            (:class:`~c3ae.layers.ScoreToProbability`), trained with cross-entropy; the original (False) is
            trained with MAE and its clipped output is 0 or 1 for almost every face.
        output_name: defaults to ``"gender"`` when V == 1, else ``"age"``.
    """
    stage_num = tuple(int(s) for s in stage_num)
    if len(stage_num) != 3:
        raise UsageError(f"SSR-Net has exactly three stages; stage_num={stage_num} has {len(stage_num)}.")
    if any(s < 1 for s in stage_num):
        raise UsageError(f"Every stage needs at least one bin; got stage_num={stage_num}.")
    if p_activation not in P_ACTIVATIONS:
        raise UsageError(f"Unknown p_activation {p_activation!r}; expected one of {P_ACTIVATIONS}.")
    if mix_activation not in MIX_ACTIVATIONS:
        raise UsageError(f"Unknown mix_activation {mix_activation!r}; expected one of {MIX_ACTIVATIONS}.")
    if V <= 0:
        raise UsageError(f"V must be positive (101 for age, 1 for gender), got {V}.")
    if _smallest_feature(int(input_size)) < 1:
        raise UsageError(
            f"input_size={input_size} is too small for SSR-Net's valid convolutions and 8x8 pooling; "
            f"use at least {smallest_input(_smallest_feature)} (64 in the paper)."
        )
    output_name = output_name or ("gender" if V == 1 else "age")
    if gender_probability and V != 1:
        raise UsageError("gender_probability needs V = 1 (the gender model).")

    image = keras.Input(shape=(input_size, input_size, 3), name="image")
    x4, x1, x2 = _stream(image, "x", 32, "relu", layers.AveragePooling2D)
    s4, s1, s2 = _stream(image, "s", 16, "tanh", layers.MaxPooling2D)

    probs, etas, deltas = [], [], []
    taps = ((x4, s4, None), (x2, s2, 4), (x1, s1, 8))
    for stage, ((x_feat, s_feat, pool), size) in enumerate(zip(taps, stage_num, strict=True), start=1):
        tag = f"stage{stage}"
        s_vec = layers.Conv2D(10, 1, activation="relu", name=f"{tag}_s_conv")(s_feat)
        x_vec = layers.Conv2D(10, 1, activation="relu", name=f"{tag}_x_conv")(x_feat)
        if pool:
            s_vec = layers.MaxPooling2D(pool, name=f"{tag}_s_pool")(s_vec)
            x_vec = layers.AveragePooling2D(pool, name=f"{tag}_x_pool")(x_vec)
        s_vec = layers.Flatten(name=f"{tag}_s_flat")(s_vec)
        x_vec = layers.Flatten(name=f"{tag}_x_flat")(x_vec)
        s_mix = layers.Dropout(dropout, name=f"{tag}_s_drop")(s_vec)
        s_mix = layers.Dense(size, activation=mix_activation, name=f"{tag}_s_mix")(s_mix)
        x_mix = layers.Dropout(dropout, name=f"{tag}_x_drop")(x_vec)
        x_mix = layers.Dense(size, activation=mix_activation, name=f"{tag}_x_mix")(x_mix)
        fused_pre = layers.Multiply(name=f"{tag}_fuse_pre")([s_vec, x_vec])
        deltas.append(layers.Dense(1, activation="tanh", name=f"{tag}_delta")(fused_pre))
        fused = layers.Multiply(name=f"{tag}_fuse")([s_mix, x_mix])
        fused = layers.Dense(2 * size, activation=mix_activation, name=f"{tag}_feat")(fused)
        probs.append(layers.Dense(size, activation=p_activation, name=f"{tag}_p")(fused))
        etas.append(layers.Dense(size, activation="tanh", name=f"{tag}_eta")(fused))

    regression = SoftStagewiseRegression(
        stage_num,
        lambda_local,
        lambda_d,
        V,
        clamp=clamp_output,
        clip_output=False if gender_probability else None,
        dtype=OUTPUT_DTYPE,
        name=f"{output_name}_score" if gender_probability else output_name,
    )
    output = regression(probs + etas + deltas)
    if gender_probability:
        output = ScoreToProbability(dtype=OUTPUT_DTYPE, name=output_name)(output)
    return keras.Model(image, {output_name: output}, name=name)


def build_ssrnet(*args, **options) -> keras.Model:
    """Build SSR-Net as a :class:`~c3ae.models.base.FamilyModel`; arguments as :func:`ssrnet_graph`."""
    from c3ae.models.base import build_family

    return build_family("ssrnet", *args, **options)


def _losses(model, loss_config, train_ages=None) -> tuple[dict, dict]:
    from c3ae import losses

    # The original trains its V = 1 gender output with MAE (unknown labels weigh 0, as for the BCE); with
    # gender_probability the output is P(male), trained with the standard cross-entropy.
    probability = any(isinstance(layer, ScoreToProbability) for layer in getattr(model, "layers", ()))
    special = {} if probability else {"gender": keras.losses.MeanAbsoluteError}
    return losses.losses_by_output(model.output_names, loss_config, "ssrnet", special)


SPEC = FamilySpec(
    name="ssrnet",
    build=ssrnet_graph,
    input_size=64,
    targets=("age", "gender"),
    encode_targets=standard_target,
    losses=_losses,
    description="SSR-Net (IJCAI 2018): soft stagewise regression; age (V = 101) or gender (V = 1)",
)
