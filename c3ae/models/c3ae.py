"""C3AE (Zhang et al., CVPR 2019): a compact CNN over three context crops ("triple box").

Inputs: float32 BGR crops, raw pixels in [0, 255], 64x64x3 each, named ``outer``, ``middle``, ``inner``
(or one crop named ``image`` with ``triple_box=False``).
Outputs: ``age_bins`` (N, 12) the two-point distribution over ages 0, 10, ..., 110; ``age`` (N, 1) in years;
``gender`` (N, 1) the probability of male, when ``gender=True``.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from c3ae.conventions import AGE_BIN_WIDTH, NUM_AGE_BINS
from c3ae.errors import UsageError
from c3ae.layers import (
    ACTIVATIONS,
    OUTPUT_DTYPE,
    BatchToFeatures,
    CropsToBatch,
    SqueezeExcite,
    WhiteNorm,
    make_activation,
)
from c3ae.models.spec import SINGLE, TRIPLE, FamilySpec, standard_target

CROP_NAMES = TRIPLE
FILTERS = 32


def c3ae_feature_size(input_size: int) -> int:
    """Side of the backbone's last feature map for a square input: three (conv3x3 valid, pool 2) + conv3x3."""
    side = input_size
    for _ in range(3):
        side = (side - 2) // 2
    return side - 2


def smallest_input(feature_size) -> int:
    """The smallest square input side for which ``feature_size(side)`` is at least 1."""
    return next(side for side in range(1, 4096) if feature_size(side) >= 1)


def build_c3ae_backbone(
    *,
    input_size: int = 64,
    se: bool = False,
    se_pooling: str = "avg",
    se_reduction: int = 2,
    activation: str = "relu",
    white_norm: bool = False,
    conv1_bias: bool = False,
    filters: int = FILTERS,
    name: str = "backbone",
) -> keras.Model:
    """The per-crop backbone: (N, S, S, 3) BGR [0, 255] -> (N, F*F*filters) features (512 for S = 64 and
    the paper's 32 filters)."""
    crop = keras.Input(shape=(input_size, input_size, 3), name="crop")
    x = WhiteNorm(name="white_norm")(crop) if white_norm else crop
    for block in range(1, 5):
        use_bias = conv1_bias or block > 1
        x = layers.Conv2D(filters, 3, padding="valid", use_bias=use_bias, name=f"conv{block}")(x)
        x = layers.BatchNormalization(name=f"bn{block}")(x)
        x = make_activation(activation, f"act{block}")(x)
        if block < 4:
            x = layers.AveragePooling2D(2, name=f"pool{block}")(x)
        if se:
            x = SqueezeExcite(se_reduction, se_pooling, activation, name=f"se{block}")(x)
    x = layers.Conv2D(filters, 1, name="conv5")(x)
    if se:
        x = SqueezeExcite(se_reduction, se_pooling, activation, name="se5")(x)
    features = layers.Flatten(name="flatten")(x)
    return keras.Model(crop, features, name=name)


def c3ae_graph(
    *,
    triple_box: bool = True,
    se: bool = False,
    se_pooling: str = "avg",
    se_reduction: int = 2,
    activation: str = "relu",
    white_norm: bool = False,
    gender: bool = False,
    gender_hidden: int = 0,
    conv1_bias: bool = False,
    input_size: int = 64,
    filters: int = FILTERS,
    name: str = "c3ae",
) -> keras.Model:
    """C3AE's functional graph (:func:`build_c3ae` wraps it as a :class:`~c3ae.models.base.FamilyModel`).

    Args:
        triple_box: three crops (``outer``, ``middle``, ``inner``) through ONE shared backbone, concatenated
            in that order (1536 features); ``False`` gives the paper's single-crop model with input ``image``.
        se: squeeze-excitation after every block (after the pooling) and after conv5.
        se_pooling: ``"avg"`` (the reference) or ``"gem"`` (generalised mean, trainable p).
        activation: ``"relu"`` (the reference) or ``"mish6"``.
        white_norm: normalise inputs inside the graph with (x - 127.5) / 128.
        gender: add a ``gender`` head, Dense(1, sigmoid) on the concatenated features: P(male).
        gender_hidden: units of a ReLU layer between the features and the gender output (0: the reference's
            single linear layer). The age features are linear (conv5 has no activation), and one linear
            layer on them under-fits gender.
        conv1_bias: the paper's Table 1 gives conv1 a bias; the reference Keras code does not.
        input_size: side of each square crop in pixels (64 in the paper).
        filters: channels of every convolution (32 in the paper); a wider model has about
            ``(filters / 32) ** 2`` times the parameters and multiply-adds.
    """
    if activation not in ACTIVATIONS:
        raise UsageError(f"Unknown activation {activation!r}; expected one of {ACTIVATIONS}.")
    if se_pooling not in ("avg", "gem"):
        raise UsageError(f"Unknown se_pooling {se_pooling!r}; expected 'avg' or 'gem'.")
    if c3ae_feature_size(int(input_size)) < 1:
        raise UsageError(
            f"input_size={input_size} is too small for C3AE's valid convolutions; "
            f"use at least {smallest_input(c3ae_feature_size)} (64 in the paper)."
        )
    backbone = build_c3ae_backbone(
        input_size=input_size,
        se=se,
        se_pooling=se_pooling,
        se_reduction=se_reduction,
        activation=activation,
        white_norm=white_norm,
        conv1_bias=conv1_bias,
        filters=int(filters),
    )
    shape = (input_size, input_size, 3)
    if triple_box:
        inputs = {crop: keras.Input(shape=shape, name=crop) for crop in CROP_NAMES}
        # One backbone call over the three crops stacked on the batch axis: the weights are shared in the
        # converted graphs too (three separate calls get inlined three times by the TFLite converter).
        stacked = CropsToBatch(name="stack_crops")([inputs[crop] for crop in CROP_NAMES])
        features = BatchToFeatures(len(CROP_NAMES), name="triple_features")(backbone(stacked))
    else:
        inputs = keras.Input(shape=shape, name="image")
        features = backbone(inputs)
    age_bins = layers.Dense(NUM_AGE_BINS, activation="softmax", dtype=OUTPUT_DTYPE, name="age_bins")(features)
    # The age layer is a free Dense, as in the reference, but it starts as the exact two-point decoding
    # (kernel = the bin centres 0, 10, ..., 110): from zeros, Adam at lr 0.002 needs tens of thousands of
    # steps just to reach weights of that size, and the age output stays near 0 for many epochs.
    centres = (AGE_BIN_WIDTH * np.arange(NUM_AGE_BINS, dtype="float32")).reshape(NUM_AGE_BINS, 1)
    age = layers.Dense(
        1, kernel_initializer=keras.initializers.Constant(centres), dtype=OUTPUT_DTYPE, name="age"
    )(age_bins)
    outputs = {"age": age, "age_bins": age_bins}
    if gender:
        gender_features = features
        if gender_hidden:
            gender_features = layers.Dense(int(gender_hidden), activation="relu", name="gender_hidden")(
                features
            )
        outputs["gender"] = layers.Dense(1, activation="sigmoid", dtype=OUTPUT_DTYPE, name="gender")(
            gender_features
        )
    return keras.Model(inputs, outputs, name=name)


def build_c3ae(**options) -> keras.Model:
    """Build C3AE as a :class:`~c3ae.models.base.FamilyModel`; ``options`` as :func:`c3ae_graph`."""
    from c3ae.models.base import build_family

    return build_family("c3ae", **options)


def _input_names(options) -> tuple[str, ...]:
    return CROP_NAMES if options.get("triple_box", True) else SINGLE


def _encode_targets(name: str, rows):
    if name == "age_bins":
        import tensorflow as tf

        from c3ae.losses import two_point_encode

        return tf.cast(two_point_encode(rows["age"]), tf.float32)
    return standard_target(name, rows)


def _losses(model, loss_config, train_ages=None) -> tuple[dict, dict]:
    from c3ae import losses

    def bins_loss():
        if loss_config.bins_loss == "focal":
            weights = losses.age_bin_weights(train_ages) if train_ages is not None else None
            return losses.C3AEFocalLoss(bin_weights=weights)
        return losses.KLDivergenceLoss()

    return losses.losses_by_output(model.output_names, loss_config, "c3ae", {"age_bins": bins_loss})


SPEC = FamilySpec(
    name="c3ae",
    build=c3ae_graph,
    input_size=64,
    targets=("age", "age_bins", "gender"),
    input_names=_input_names,
    encode_targets=_encode_targets,
    losses=_losses,
    description="C3AE (CVPR 2019): triple-box context crops, age as two-point bins 10 years wide",
)
