"""DLDL (Gao et al., "Deep Label Distribution Learning with Label Ambiguity", TIP 2017) with DEX-style
expectation: a softmax over 1-year age bins, read out as its expected value.

Input: ``image``, float32 BGR crop, raw pixels in [0, 255], (N, S, S, 3); WhiteNorm inside the graph.
Outputs: ``age_bins`` (N, num_bins) the distribution over ages 0, 1, ..., num_bins - 1 years (rows sum to 1);
``age`` (N, 1) its expectation in years; ``gender`` (N, 1) the probability of male, when ``gender=True``.
Train ``age_bins`` with ``c3ae.losses.DLDLLoss`` (Gaussian label distributions) and/or ``age`` with L1.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import keras
from keras import layers

from c3ae.errors import UsageError
from c3ae.layers import OUTPUT_DTYPE, ExpectedValue, WhiteNorm
from c3ae.models.c3ae import smallest_input
from c3ae.models.spec import FamilySpec, standard_target

COMPACT = "compact"
COMPACT_BLOCKS = 4
EXAMPLE_APPLICATIONS = ("MobileNetV2", "MobileNetV3Small", "MobileNetV3Large", "EfficientNetB0", "ResNet50")
# Arguments build_dldl sets itself on a keras.applications constructor.
_RESERVED_APPLICATION_ARGS = (
    "include_top",
    "weights",
    "pooling",
    "input_shape",
    "input_tensor",
    "include_preprocessing",
)
WHITE_NORM_CENTER = 127.5
WHITE_NORM_SCALE = 128.0


def compact_feature_size(input_size: int) -> int:
    """Side of the compact backbone's last feature map: "same" 3x3 convolutions, three 2x2 max pools."""
    side = int(input_size)
    for _ in range(COMPACT_BLOCKS - 1):
        side //= 2
    return side


def application_names() -> list[str]:
    """Names of the ``keras.applications`` constructors usable as backbones."""
    return sorted(
        name
        for name, obj in vars(keras.applications).items()
        if not name.startswith("_") and callable(obj) and not inspect.ismodule(obj) and name[:1].isupper()
    )


def build_compact_backbone(*, input_size: int = 64, width: int = 32, name: str = "backbone") -> keras.Model:
    """(N, S, S, 3) normalised image -> (N, 8 * width) features.

    Block 1 is conv3x3-BN-ReLU with ``width`` filters; blocks 2-4 are depthwise-separable conv3x3-BN-ReLU,
    each doubling the channels. Max pooling 2x2 after blocks 1-3, then global average pooling.
    47,808 parameters at width 32.
    """
    image = keras.Input(shape=(input_size, input_size, 3), name="image_norm")
    x = image
    for block in range(1, COMPACT_BLOCKS + 1):
        filters = width * 2 ** (block - 1)
        if block == 1:
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{block}")(x)
        else:
            x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=f"conv{block}")(x)
        x = layers.BatchNormalization(name=f"bn{block}")(x)
        x = layers.ReLU(name=f"relu{block}")(x)
        if block < COMPACT_BLOCKS:
            x = layers.MaxPooling2D(2, name=f"pool{block}")(x)
    features = layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(image, features, name=name)


def build_application_backbone(
    backbone: str,
    *,
    input_size: int = 64,
    backbone_kwargs: Mapping | None = None,
) -> tuple[keras.Model, float, float]:
    """A ``keras.applications`` constructor by name, headless, average-pooled, randomly initialised.

    The nested model keeps the application's own name (EfficientNetV2 looks its blocks up by name).

    Returns the model and the (center, scale) that the WhiteNorm in front of it must use so that, composed
    with any rescaling the application still does itself, the input is normalised exactly once as
    ``(x - 127.5) / 128``.
    """
    if backbone not in application_names():
        raise UsageError(
            f"Unknown backbone {backbone!r}; expected {COMPACT!r} or the name of a keras.applications "
            f"constructor, e.g. {', '.join(EXAMPLE_APPLICATIONS)}."
        )
    extra = dict(backbone_kwargs or {})
    clashes = sorted(set(extra) & set(_RESERVED_APPLICATION_ARGS))
    if clashes:
        raise UsageError(f"backbone_kwargs may not set {clashes}: build_dldl sets them itself.")
    constructor = getattr(keras.applications, backbone)
    params = inspect.signature(constructor).parameters
    kwargs = {
        "include_top": False,
        "weights": None,
        "pooling": "avg",
        "input_shape": (input_size, input_size, 3),
    }
    if "include_preprocessing" in params:
        kwargs["include_preprocessing"] = False
    try:
        model = constructor(**kwargs, **extra)
    except (ValueError, TypeError) as err:
        raise UsageError(
            f"keras.applications.{backbone} cannot be built with input_size={input_size} "
            f"and backbone_kwargs={extra}: {err}"
        ) from err

    center, scale = WHITE_NORM_CENTER, WHITE_NORM_SCALE
    first = model.layers[1] if len(model.layers) > 1 else None
    if isinstance(first, layers.Rescaling):
        # EfficientNetB0-B7 rescale by 1/255 with no switch to turn it off: fold the inverse into WhiteNorm,
        # so that rescaling(white_norm(x)) == (x - 127.5) / 128.
        if not isinstance(first.scale, (int, float)) or not isinstance(first.offset, (int, float)):
            raise UsageError(
                f"keras.applications.{backbone} starts with a per-channel Rescaling; unsupported."
            )
        center = WHITE_NORM_CENTER + WHITE_NORM_SCALE * float(first.offset)
        scale = WHITE_NORM_SCALE * float(first.scale)
    return model, center, scale


def dldl_graph(
    *,
    backbone: str = COMPACT,
    input_size: int = 64,
    num_bins: int = 101,
    gender: bool = False,
    width: int = 32,
    dropout: float = 0.2,
    backbone_kwargs: Mapping | None = None,
    name: str = "dldl",
) -> keras.Model:
    """DLDL's functional graph: an age model of 73,765 parameters with the defaults.

    Args:
        backbone: ``"compact"`` (the small CNN of :func:`build_compact_backbone`) or the name of a
            ``keras.applications`` constructor (``"MobileNetV2"``, ``"MobileNetV3Small"``,
            ``"EfficientNetB0"``, ``"ResNet50"``, ...), built headless with ``pooling="avg"`` and
            ``weights=None``: random initialisation, nothing is downloaded. Their own preprocessing is
            switched off where they have a switch, or compensated for (EfficientNetB*), so the input is
            always BGR [0, 255] + WhiteNorm once.
        input_size: side of the square input crop in pixels.
        num_bins: number of 1-year age bins, for ages 0 .. num_bins - 1 (101: 0 to 100 years).
        gender: add a ``gender`` head, Dense(1, sigmoid) on the pooled features: P(male).
        width: filters of the compact backbone's first block (doubled in each next one); compact only.
        dropout: dropout rate on the pooled features, before the heads.
        backbone_kwargs: extra arguments for a keras.applications constructor (e.g. ``{"alpha": 0.35}``).
    """
    num_bins_int = int(num_bins)
    if num_bins_int != num_bins or num_bins_int < 2:
        raise UsageError(f"num_bins must be an integer >= 2 (101 for ages 0..100), got {num_bins!r}.")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"dropout must be in [0, 1), got {dropout}.")
    input_size = int(input_size)
    if not isinstance(backbone, str):
        raise UsageError(
            f"backbone must be a string ({COMPACT!r} or a keras.applications name), got {backbone!r}."
        )

    if backbone == COMPACT:
        if backbone_kwargs:
            raise UsageError("backbone_kwargs only apply to keras.applications backbones, not 'compact'.")
        if int(width) < 1:
            raise UsageError(f"width must be >= 1, got {width}.")
        if compact_feature_size(input_size) < 1:
            raise UsageError(
                f"input_size={input_size} is too small for the compact backbone's three 2x2 poolings; "
                f"use at least {smallest_input(compact_feature_size)}."
            )
        features_model = build_compact_backbone(input_size=input_size, width=int(width))
        center, scale = WHITE_NORM_CENTER, WHITE_NORM_SCALE
    else:
        features_model, center, scale = build_application_backbone(
            backbone, input_size=input_size, backbone_kwargs=backbone_kwargs
        )

    image = keras.Input(shape=(input_size, input_size, 3), name="image")
    x = WhiteNorm(center=center, scale=scale, name="white_norm")(image)
    features = features_model(x)
    features = layers.Dropout(dropout, name="dropout")(features)
    age_bins = layers.Dense(num_bins_int, activation="softmax", dtype=OUTPUT_DTYPE, name="age_bins")(features)
    outputs = {
        "age": ExpectedValue(num_bins_int, start=0.0, step=1.0, dtype=OUTPUT_DTYPE, name="age")(age_bins),
        "age_bins": age_bins,
    }
    if gender:
        outputs["gender"] = layers.Dense(1, activation="sigmoid", dtype=OUTPUT_DTYPE, name="gender")(features)
    return keras.Model(image, outputs, name=name)


def build_dldl(**options) -> keras.Model:
    """Build DLDL as a :class:`~c3ae.models.base.FamilyModel`; options as :func:`dldl_graph`."""
    from c3ae.models.base import build_family

    return build_family("dldl", **options)


def _encode_targets(name: str, rows):
    # The age itself: DLDLLoss builds the Gaussian label distribution from it.
    return standard_target("age" if name == "age_bins" else name, rows)


def _losses(model, loss_config, train_ages=None) -> tuple[dict, dict]:
    from c3ae import losses

    def bins_loss():
        num_bins = int(model.get_layer("age_bins").units)
        return losses.DLDLLoss(num_bins=num_bins, sigma=loss_config.dldl_sigma)

    return losses.losses_by_output(model.output_names, loss_config, "dldl", {"age_bins": bins_loss})


SPEC = FamilySpec(
    name="dldl",
    build=dldl_graph,
    input_size=64,
    targets=("age", "age_bins", "gender"),
    encode_targets=_encode_targets,
    losses=_losses,
    description="DLDL: expectation over 1-year age bins trained with Gaussian label distributions",
)
