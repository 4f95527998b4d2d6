"""The registered model variants: named, ready-made configurations of the families, with their static facts
(inputs, outputs, parameter count), so that ``c3ae models`` lists them without importing Keras.
``tests/test_models_catalog.py`` builds every variant and pins these facts to the built model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from c3ae.models.spec import SINGLE, TRIPLE


@dataclass(frozen=True)
class Variant:
    """One variant: its family's builder keyword arguments, inputs (names, square side in pixels), outputs
    and parameter count."""

    name: str
    family: str
    kwargs: dict = field(default_factory=dict)
    description: str = ""
    inputs: tuple[str, ...] = SINGLE
    input_size: int = 64
    outputs: tuple[str, ...] = ("age", "age_bins")
    parameters: int = 0

    def build(self, **overrides):
        """The Keras model (``overrides`` replace builder arguments)."""
        from c3ae.models.base import build_family

        return build_family(self.family, **{**self.kwargs, **overrides})


def _variants(*variants: Variant) -> dict[str, Variant]:
    return {v.name: v for v in variants}


VARIANTS = _variants(
    Variant(
        "c3ae-paper",
        "c3ae",
        {"triple_box": False, "conv1_bias": True},
        "paper Table 1: plain single-crop age model",
        parameters=36_377,
    ),
    Variant("c3ae", "c3ae", {}, "triple box, age (reference v84 layout)", TRIPLE, parameters=48_633),
    Variant(
        "c3ae-se",
        "c3ae",
        {"se": True},
        "triple box + SE, age (reference v89 layout)",
        TRIPLE,
        parameters=53_993,
    ),
    Variant(
        "c3ae-se-gender",
        "c3ae",
        {"se": True, "gender": True},
        "triple box + SE, age and gender",
        TRIPLE,
        outputs=("age", "age_bins", "gender"),
        parameters=55_530,
    ),
    Variant(
        "ssrnet", "ssrnet", {}, "official SSR-Net age model, V = 101", outputs=("age",), parameters=40_915
    ),
    Variant(
        "ssrnet-gender",
        "ssrnet",
        {"V": 1.0},
        "SSR-Net gender model, V = 1",
        outputs=("gender",),
        parameters=40_915,
    ),
    Variant("dldl", "dldl", {}, "compact CNN, expectation over 101 one-year bins", parameters=73_765),
    Variant(
        "dldl-gender",
        "dldl",
        {"gender": True},
        "compact DLDL with a gender head",
        outputs=("age", "age_bins", "gender"),
        parameters=74_022,
    ),
    Variant(
        "levi-hassner-age",
        "levi_hassner",
        {},
        "CVPR 2015 classifier, 8 Adience age groups",
        input_size=227,
        outputs=("age_group",),
        parameters=11_677_704,
    ),
    Variant(
        "levi-hassner-gender",
        "levi_hassner",
        {"task": "gender"},
        "CVPR 2015 classifier, gender",
        input_size=227,
        outputs=("gender",),
        parameters=11_674_113,
    ),
)


def build_variant(name: str, **overrides):
    """Build a registered variant by name, e.g. ``build_variant("c3ae-se-gender")``."""
    from c3ae.errors import UsageError

    if name not in VARIANTS:
        raise UsageError(f"Unknown model {name!r}; known models: {', '.join(VARIANTS)}.")
    return VARIANTS[name].build(**overrides)
