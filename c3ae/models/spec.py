"""Model family specs: what a family needs, stated once, in its module (``c3ae.models.<family>.SPEC``).

A :class:`FamilySpec` holds a family's builder, input names and crop layout, default input size, trainable
outputs, target encoding, losses and metrics. Data, training (both loops), evaluation, export and the
estimator read it; nothing guesses a family from input names or sizes.

What travels with a saved model is its :class:`ModelInfo` (family, build options, inputs, outputs): a
``.keras`` file holds it in its config (``c3ae.models.base.FamilyModel``), a ``.tflite`` or ``.onnx`` file in
its ``c3ae`` metadata. This module imports neither Keras nor TensorFlow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from c3ae.errors import UsageError

FAMILIES = ("c3ae", "ssrnet", "dldl", "levi_hassner")
TRIPLE = ("outer", "middle", "inner")  # C3AE's three context crops, in the order the model stacks them
SINGLE = ("image",)
CROP_LAYOUTS = {"triple": TRIPLE, "single": SINGLE}
AGE_TARGETS = ("age", "age_bins", "age_group")


def _single_crop(options: Mapping) -> tuple[str, ...]:
    return SINGLE


@dataclass(frozen=True)
class FamilySpec:
    """The facts of one model family.

    ``build(**options)`` returns the family's functional Keras graph; ``input_names(options)`` the input
    names a model built with those options takes; ``targets`` the outputs it can be trained on, in order;
    ``encode_targets(name, rows)`` the target tensor of one output from decoded rows (``age`` in years,
    ``gender`` 1/0/-1, ...); ``losses(output_names, loss_config, train_ages)`` the Keras losses and their
    weights per output; ``metrics(output_names)`` the compiled metrics per output.
    """

    name: str
    build: Callable
    input_size: int
    targets: tuple[str, ...]
    losses: Callable
    encode_targets: Callable
    input_names: Callable[[Mapping], tuple[str, ...]] = _single_crop
    metrics: Callable | None = None
    description: str = ""

    def crop_layout(self, options: Mapping | None = None) -> str:
        """``"triple"`` (outer/middle/inner boxes) or ``"single"`` (one ``image`` crop)."""
        return "triple" if set(self.input_names(options or {})) == set(TRIPLE) else "single"

    def select_targets(self, outputs=None) -> tuple[str, ...]:
        """The family's targets, restricted to ``outputs`` (names) when given; the plain labels ``age`` and
        ``gender`` may be asked of any family (evaluation compares them with what the model predicts)."""
        if outputs is None:
            return self.targets
        outputs = [outputs] if isinstance(outputs, str) else list(outputs)
        unknown = [o for o in outputs if o not in (*self.targets, "age", "gender")]
        if unknown:
            raise UsageError(
                f"Model family {self.name!r} has no outputs {unknown}; "
                f"its targets are {', '.join(self.targets)}."
            )
        if not outputs:
            raise UsageError("outputs= names no target.")
        return tuple(dict.fromkeys(outputs))


def family_spec(family: str) -> FamilySpec:
    """The spec of a family (``"c3ae"``, ``"ssrnet"``, ``"dldl"``, ``"levi_hassner"``; ``-`` for ``_``)."""
    name = str(family).replace("-", "_")
    if name not in FAMILIES:
        raise UsageError(f"Unknown model family {family!r}; expected one of {', '.join(FAMILIES)}.")
    return importlib.import_module(f"c3ae.models.{name}").SPEC


@dataclass(frozen=True)
class ModelInfo:
    """What a saved model is: its family and build options, its inputs (names, square side in pixels) and
    outputs. Read from a Keras model (:func:`c3ae.models.base.model_info`) or from an exported file's
    metadata (``c3ae.runtime``), so no reader has to guess."""

    family: str
    options: dict = field(default_factory=dict)
    inputs: tuple[str, ...] = SINGLE
    input_size: int = 64
    outputs: tuple[str, ...] = ()

    def __post_init__(self):
        if set(self.inputs) == set(TRIPLE):  # in crop order, whatever order a model lists its inputs in
            object.__setattr__(self, "inputs", TRIPLE)

    @property
    def crop_layout(self) -> str:
        """``"triple"`` or ``"single"``: the crops :func:`c3ae.faces.model_crops` makes for this model."""
        return "triple" if set(self.inputs) == set(TRIPLE) else "single"

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "options": dict(self.options),
            "inputs": list(self.inputs),
            "input_size": int(self.input_size),
            "outputs": list(self.outputs),
            "crop_layout": self.crop_layout,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> ModelInfo:
        if not isinstance(data, Mapping) or data.get("family") not in FAMILIES:
            raise UsageError(f"Not a c3ae model description (no known family): {data!r:.120}.")
        return cls(
            family=str(data["family"]),
            options=dict(data.get("options") or {}),
            inputs=tuple(data.get("inputs") or SINGLE),
            input_size=int(data.get("input_size") or 64),
            outputs=tuple(data.get("outputs") or ()),
        )


def standard_target(name: str, rows):
    """The target tensor of a standard output from decoded rows: ``age`` (N, 1) years, ``gender`` (N, 1)
    1 = male, 0 = female, -1 = unknown."""
    import tensorflow as tf

    if name in ("age", "gender"):
        return tf.reshape(rows[name], (-1, 1))
    raise UsageError(f"No target encoding for output {name!r}.")
