"""The Keras model class every family builds: a functional model that knows its family and build options.

As keras-hub backbones do, its config is just ``{family, options, name}``: loading a ``.keras`` file calls
the family's builder with the saved options and then loads the weights, so the file says what it is and a
model loads with ``safe_mode=True``.
"""

from __future__ import annotations

import inspect
import json

import keras

from c3ae.errors import UsageError
from c3ae.models.spec import ModelInfo, family_spec


def _plain(value):
    """JSON-friendly option values (tuples become lists)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def resolved_options(builder, *args, **options) -> dict:
    """The builder's arguments with its defaults filled in, so the saved file pins every build option."""
    signature = inspect.signature(builder)
    unknown = [k for k in options if k not in signature.parameters]
    if unknown:
        known = [k for k in signature.parameters if k != "name"]
        raise UsageError(f"Unknown model option(s) {unknown}; this family takes {known}.")
    try:
        bound = signature.bind_partial(*args, **options)
    except TypeError as error:
        raise UsageError(f"Model options: {error}.") from error
    bound.apply_defaults()
    return {k: _plain(v) for k, v in bound.arguments.items() if k != "name"}


def build_family(family: str, *args, name: str | None = None, **options) -> keras.Model:
    """A :class:`FamilyModel` of ``family``; ``args`` and ``options`` are its graph builder's arguments."""
    spec = family_spec(family)
    return FamilyModel(spec.name, resolved_options(spec.build, *args, **options), name=name)


@keras.saving.register_keras_serializable(package="c3ae")
class FamilyModel(keras.Model):
    """A model of one family (``c3ae.models.spec.FAMILIES``) built with ``options`` (the builder's keyword
    arguments). Inputs, outputs and layers are those of the family's functional graph."""

    def __init__(
        self,
        family: str,
        options: dict | None = None,
        name: str | None = None,
        precision: str | None = None,
        preprocessing: dict | None = None,
        **kwargs,
    ):
        """``precision``: the Keras dtype policy the layers are built under (default: the global one, e.g.
        ``"mixed_float16"`` while ``c3ae train`` runs with ``train.precision``). ``preprocessing``: the face
        pipeline it was trained with (a model card's ``preprocessing``: chip, context window, ...), saved in
        the ``.keras`` file and written into every export (``c3ae.export.metadata``)."""
        spec = family_spec(family)
        options = resolved_options(spec.build, **dict(options or {}))
        previous = keras.config.dtype_policy()
        precision = precision or previous.name
        keras.config.set_dtype_policy(precision)
        try:
            graph = spec.build(**options, **({"name": name} if name else {}))
        finally:
            keras.config.set_dtype_policy(previous)
        super().__init__(inputs=graph.input, outputs=graph.output, name=graph.name, **kwargs)
        self.family = spec.name
        self.options = options
        self.precision = precision
        self.preprocessing = dict(preprocessing) if preprocessing else None

    def get_config(self) -> dict:
        config = {
            "family": self.family,
            "options": dict(self.options),
            "name": self.name,
            "precision": self.precision,
        }
        if getattr(self, "preprocessing", None):
            config["preprocessing"] = json.loads(json.dumps(dict(self.preprocessing)))
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects=None):
        keys = ("family", "options", "name", "precision", "preprocessing", "trainable")
        return cls(**{k: v for k, v in config.items() if k in keys})

    @property
    def info(self) -> ModelInfo:
        """Family, options, inputs and outputs (``c3ae.models.spec.ModelInfo``)."""
        return model_info(self)


def model_info(model) -> ModelInfo:
    """What a Keras model is: raises a one-sentence UsageError for a model not built by ``c3ae.models``."""
    family = getattr(model, "family", None)
    if family is None:
        raise UsageError(
            f"The Keras model {getattr(model, 'name', model)!r} was not built by c3ae.models, so it does not "
            "say which family it is; build it with c3ae.models (or wrap it with "
            "c3ae.models.base.as_family_model)."
        )
    return ModelInfo(
        family=family,
        options=dict(model.options),
        inputs=tuple(t.name for t in model.inputs),
        input_size=int(model.inputs[0].shape[1]),
        outputs=tuple(model.output_names),
    )


def as_family_model(model, family: str, options: dict | None = None) -> FamilyModel:
    """A plain Keras model (say, a ``.keras`` saved before models carried their family) as the
    :class:`FamilyModel` of ``family`` built with ``options``, with all of ``model``'s weights copied by
    path. Raises UsageError unless every weight finds its counterpart with the same shape."""
    wrapped = FamilyModel(family, options)
    donor = {weight.path: weight for weight in model.weights}
    mismatched = [
        w.path for w in wrapped.weights if w.path not in donor or tuple(donor[w.path].shape) != tuple(w.shape)
    ]
    if mismatched or len(donor) != len(wrapped.weights):
        raise UsageError(
            f"The model {model.name!r} is not a {family} model with options {options}: "
            f"{len(mismatched)} weights differ (first: {mismatched[:3]})."
        )
    for weight in wrapped.weights:
        weight.assign(donor[weight.path].numpy())
    return wrapped
