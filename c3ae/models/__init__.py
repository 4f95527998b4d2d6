"""Model builders, one module per family, and a registry of named variants.

Every model takes float32 BGR crops with raw pixels in [0, 255] and has named inputs and outputs:
inputs ``outer``/``middle``/``inner`` (C3AE triple box) or ``image``; outputs among ``age`` (years),
``age_bins``, ``gender`` (probability of male) and ``age_group``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import keras

from c3ae.models.c3ae import build_c3ae
from c3ae.models.dldl import build_dldl
from c3ae.models.levi_hassner import build_levi_hassner
from c3ae.models.ssrnet import build_ssrnet

__all__ = [
    "VARIANTS",
    "Variant",
    "build_c3ae",
    "build_dldl",
    "build_levi_hassner",
    "build_ssrnet",
    "build_variant",
]


@dataclass(frozen=True)
class Variant:
    """A named, ready-made configuration of one model family."""

    name: str
    family: str
    builder: Callable[..., keras.Model]
    kwargs: dict = field(default_factory=dict)
    description: str = ""

    def build(self, **overrides) -> keras.Model:
        return self.builder(**{**self.kwargs, **overrides})


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "c3ae-paper",
            "c3ae",
            build_c3ae,
            {"triple_box": False, "conv1_bias": True},
            "paper Table 1: plain single-crop age model",
        ),
        Variant("c3ae", "c3ae", build_c3ae, {}, "triple box, age (reference v84 layout)"),
        Variant("c3ae-se", "c3ae", build_c3ae, {"se": True}, "triple box + SE, age (reference v89 layout)"),
        Variant(
            "c3ae-se-gender",
            "c3ae",
            build_c3ae,
            {"se": True, "gender": True},
            "triple box + SE, age and gender",
        ),
        Variant("ssrnet", "ssrnet", build_ssrnet, {}, "official SSR-Net age model, V = 101"),
        Variant("ssrnet-gender", "ssrnet", build_ssrnet, {"V": 1.0}, "SSR-Net gender model, V = 1"),
        Variant("dldl", "dldl", build_dldl, {}, "compact CNN, expectation over 101 one-year bins"),
        Variant("dldl-gender", "dldl", build_dldl, {"gender": True}, "compact DLDL with a gender head"),
        Variant(
            "levi-hassner-age",
            "levi_hassner",
            build_levi_hassner,
            {},
            "CVPR 2015 classifier, 8 Adience age groups",
        ),
        Variant(
            "levi-hassner-gender",
            "levi_hassner",
            build_levi_hassner,
            {"task": "gender"},
            "CVPR 2015 classifier, gender",
        ),
    )
}


def build_variant(name: str, **overrides) -> keras.Model:
    """Build a registered variant by name, e.g. ``build_variant("c3ae-se-gender")``."""
    if name not in VARIANTS:
        raise ValueError(f"Unknown model {name!r}; known models: {', '.join(VARIANTS)}.")
    return VARIANTS[name].build(**overrides)
