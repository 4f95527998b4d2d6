"""Model builders, one module per family, and a registry of named variants.

Every model takes float32 BGR crops with raw pixels in [0, 255] and has named inputs and outputs:
inputs ``outer``/``middle``/``inner`` (C3AE triple box) or ``image``; outputs among ``age`` (years),
``age_bins``, ``gender`` (probability of male) and ``age_group``.
"""

from __future__ import annotations

from c3ae.lazy import lazy_attributes

__all__ = [
    "VARIANTS",
    "Variant",
    "build_c3ae",
    "build_dldl",
    "build_levi_hassner",
    "build_ssrnet",
    "build_variant",
]

# Imported on first use, so that the variant catalog (static facts) loads without Keras.
__getattr__ = lazy_attributes(
    __name__,
    {
        "VARIANTS": "c3ae.models.catalog",
        "Variant": "c3ae.models.catalog",
        "build_variant": "c3ae.models.catalog",
        "build_c3ae": "c3ae.models.c3ae",
        "build_dldl": "c3ae.models.dldl",
        "build_levi_hassner": "c3ae.models.levi_hassner",
        "build_ssrnet": "c3ae.models.ssrnet",
    },
)
