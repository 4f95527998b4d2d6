"""Levi & Hassner, "Age and Gender Classification using Convolutional Neural Networks" (CVPR 2015 workshops).

The released Caffe model: three convolutions (two followed by LRN), max pooling in Caffe's ceil mode, and
fully connected layers with dropout.
Input: ``image``, float32 BGR crop, raw pixels in [0, 255], 227x227x3; the Adience mean BGR colour is
subtracted inside the graph (no scaling, as in Caffe).
Output: ``age_group`` (N, num_classes), a softmax over the Adience age groups, or ``gender`` (N, 1), the
probability of male.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from c3ae.errors import UsageError
from c3ae.layers import OUTPUT_DTYPE, LocalResponseNormalization
from c3ae.models.c3ae import smallest_input
from c3ae.models.spec import FamilySpec, standard_target

TASKS = ("age_group", "gender")
# Adience's eight age groups, in years, in output order.
ADIENCE_AGE_GROUPS = ("0-2", "4-6", "8-13", "15-20", "25-32", "38-43", "48-53", "60+")
# Mean BGR pixel of the Adience training crops: the values OpenCV's sample subtracts for the released models.
ADIENCE_MEAN_BGR = (78.4263377603, 87.7689143744, 114.895847746)
POOL_SIZE = 3
POOL_STRIDE = 2


def _caffe_pool_size(side: int) -> int:
    """Output side of Caffe's ceil-mode 3x3 / 2 max pooling (0 when the window does not fit)."""
    return side // 2 if side >= POOL_SIZE else 0


def _caffe_pool_padding(side: int) -> str:
    # Caffe rounds pooled sizes up: ceil((side - 3) / 2) + 1 == side // 2. For an odd side that is Keras's
    # "valid"; for an even side it is "same", which pads one column of -inf on the right/bottom only, i.e.
    # exactly Caffe's clipped last window.
    return "same" if side % 2 == 0 else "valid"


def levi_hassner_feature_sizes(input_size: int) -> tuple[int, int, int, int]:
    """Sides after conv1 (7x7 stride 4 valid) and after each of the three pools (convs 2-3 keep the side)."""
    conv1 = (input_size - 7) // 4 + 1 if input_size >= 7 else 0
    pool1 = _caffe_pool_size(conv1)
    pool2 = _caffe_pool_size(pool1)
    pool3 = _caffe_pool_size(pool2)
    return conv1, pool1, pool2, pool3


def _final_feature_size(input_size: int) -> int:
    return levi_hassner_feature_sizes(input_size)[-1]


def levi_hassner_graph(
    num_classes: int = len(ADIENCE_AGE_GROUPS),
    *,
    task: str = "age_group",
    input_size: int = 227,
    fc_units: Sequence[int] = (512, 512, 512),
    dropout: float = 0.5,
    lrn: bool = True,
    name: str = "levi_hassner",
) -> keras.Model:
    """The Levi-Hassner network's functional graph (11,677,704 parameters with the defaults).

    conv1 96x7x7 stride 4 + ReLU -> max pool 3/2 -> LRN(5, 1e-4, 0.75);
    conv2 256x5x5 "same" + ReLU -> max pool 3/2 -> LRN;
    conv3 384x3x3 "same" + ReLU -> max pool 3/2;
    flatten (7x7x384 at 227 pixels, as Caffe's ceil-mode pooling gives; 6x6 with floor-mode pooling)
    -> ``fc_units`` x (Dense + ReLU + Dropout) -> head.

    Input ``image`` is BGR [0, 255]; the ``mean_subtract`` layer subtracts :data:`ADIENCE_MEAN_BGR` per
    channel without scaling (rather than WhiteNorm), so the input matches the released Caffe models' and the
    LRN constants keep their meaning.

    Args:
        num_classes: age groups for ``task="age_group"`` (Adience's 8, :data:`ADIENCE_AGE_GROUPS`); must be
            >= 2, otherwise unused for ``task="gender"``.
        task: ``"age_group"`` (output ``age_group``, softmax) or ``"gender"`` (output ``gender``,
            Dense(1, sigmoid) = P(male): equivalent to the paper's 2-way softmax, in the library's single
            gender convention).
        input_size: side of the square input crop (227 in the paper).
        fc_units: widths of the fully connected layers. The paper has ``(512, 512)``; this project's seed
            variant adds a third 512-unit layer, hence the default.
        dropout: dropout rate after each fully connected layer (0.5 in the paper).
        lrn: local response normalisation after pools 1 and 2 (the paper's); ``False`` drops it.
    """
    if task not in TASKS:
        raise UsageError(f"Unknown task {task!r}; expected one of {TASKS}.")
    if int(num_classes) != num_classes or num_classes < 2:
        raise UsageError(f"num_classes must be an integer >= 2 (8 Adience age groups), got {num_classes!r}.")
    fc_units = tuple(fc_units)
    if not fc_units or any(int(units) != units or units < 1 for units in fc_units):
        raise UsageError(f"fc_units must be a non-empty sequence of positive integers, got {fc_units!r}.")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"dropout must be in [0, 1), got {dropout}.")
    input_size = int(input_size)
    if _final_feature_size(input_size) < 1:
        raise UsageError(
            f"input_size={input_size} is too small for Levi-Hassner's stride-4 conv1 and three 3x3 poolings; "
            f"use at least {smallest_input(_final_feature_size)} (227 in the paper)."
        )
    conv1_side, pool1_side, pool2_side, _ = levi_hassner_feature_sizes(input_size)

    image = keras.Input(shape=(input_size, input_size, 3), name="image")
    x = layers.Normalization(mean=ADIENCE_MEAN_BGR, variance=(1.0, 1.0, 1.0), name="mean_subtract")(image)
    x = layers.Conv2D(96, 7, strides=4, padding="valid", activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(POOL_SIZE, POOL_STRIDE, padding=_caffe_pool_padding(conv1_side), name="pool1")(x)
    if lrn:
        x = LocalResponseNormalization(5, 1e-4, 0.75, name="norm1")(x)
    x = layers.Conv2D(256, 5, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(POOL_SIZE, POOL_STRIDE, padding=_caffe_pool_padding(pool1_side), name="pool2")(x)
    if lrn:
        x = LocalResponseNormalization(5, 1e-4, 0.75, name="norm2")(x)
    x = layers.Conv2D(384, 3, padding="same", activation="relu", name="conv3")(x)
    x = layers.MaxPooling2D(POOL_SIZE, POOL_STRIDE, padding=_caffe_pool_padding(pool2_side), name="pool3")(x)
    x = layers.Flatten(name="flatten")(x)
    for index, units in enumerate(fc_units, start=1):
        x = layers.Dense(int(units), activation="relu", name=f"fc{index}")(x)
        x = layers.Dropout(dropout, name=f"drop{index}")(x)
    if task == "gender":
        outputs = {"gender": layers.Dense(1, activation="sigmoid", dtype=OUTPUT_DTYPE, name="gender")(x)}
    else:
        outputs = {
            "age_group": layers.Dense(
                int(num_classes), activation="softmax", dtype=OUTPUT_DTYPE, name="age_group"
            )(x)
        }
    return keras.Model(image, outputs, name=name)


def build_levi_hassner(*args, **options) -> keras.Model:
    """Build Levi-Hassner as a :class:`~c3ae.models.base.FamilyModel`; arguments as
    :func:`levi_hassner_graph`."""
    from c3ae.models.base import build_family

    return build_family("levi_hassner", *args, **options)


def _encode_targets(name: str, rows):
    if name == "age_group":
        import tensorflow as tf

        return tf.one_hot(rows["age_group"], len(ADIENCE_AGE_GROUPS), dtype=tf.float32)
    return standard_target(name, rows)


def _losses(model, loss_config, train_ages=None) -> tuple[dict, dict]:
    from c3ae import losses

    return losses.losses_by_output(model.output_names, loss_config, "levi_hassner")


SPEC = FamilySpec(
    name="levi_hassner",
    build=levi_hassner_graph,
    input_size=227,
    targets=("age_group", "gender"),
    encode_targets=_encode_targets,
    losses=_losses,
    description="Levi & Hassner (CVPR 2015): Adience age-group or gender classifier on 227-pixel crops",
)
