"""The shared family harness (keras-hub style): every family, in a tiny configuration, passes the same checks:
its spec agrees with the model it builds, the config round-trips, ``.keras`` save/load with ``safe_mode=True``
keeps outputs, family and options, ``make_dataset`` batches fit the model and its spec's losses, and (slow)
TFLite conversion is builtin-only with matching numerics."""

import json

import keras
import numpy as np
import pytest
from model_checks import assert_keras_round_trip, assert_tflite_builtin_and_close, predict, random_inputs
from test_data import build_tiny_manifest

from c3ae.config import LossConfig
from c3ae.data import make_dataset
from c3ae.models import VARIANTS
from c3ae.models.base import FamilyModel, as_family_model, build_family, model_info
from c3ae.models.spec import FAMILIES, ModelInfo, family_spec

# Tiny options per family: fast to build and run, still every layer type of the family.
TINY = {
    "c3ae": {"se": True, "gender": True, "filters": 8},
    "ssrnet": {"clamp_output": True},
    "dldl": {"gender": True, "width": 8},
    "levi_hassner": {"task": "gender", "input_size": 64, "fc_units": (16, 16)},
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def tiny(family):
    return build_family(family, **TINY[family])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_tiny_manifest(tmp_path_factory.mktemp("shards"))


def test_every_family_has_a_tiny_config():
    assert set(TINY) == set(FAMILIES)
    assert {v.family for v in VARIANTS.values()} <= set(FAMILIES)


def test_spec_agrees_with_the_model_it_builds(family, tiny):
    spec = family_spec(family)
    info = model_info(tiny)
    assert spec.name == family == info.family == tiny.family
    assert set(info.inputs) == set(spec.input_names(tiny.options))
    assert info.crop_layout == spec.crop_layout(tiny.options)
    assert set(info.outputs) <= set(spec.targets)
    assert info.input_size == TINY[family].get("input_size", spec.input_size)
    defaults = [v for v in VARIANTS.values() if v.family == family and not v.kwargs]
    assert all(v.input_size == spec.input_size for v in defaults)


def test_config_round_trip_rebuilds_the_same_model(tiny):
    config = json.loads(json.dumps(tiny.get_config()))  # what a .keras file stores
    rebuilt = FamilyModel.from_config(config)
    assert rebuilt.family == tiny.family and rebuilt.options == tiny.options and rebuilt.name == tiny.name
    assert [w.path for w in rebuilt.weights] == [w.path for w in tiny.weights]
    assert [tuple(w.shape) for w in rebuilt.weights] == [tuple(w.shape) for w in tiny.weights]


def test_keras_file_keeps_outputs_family_and_options(tiny, tmp_path):
    assert_keras_round_trip(tiny, tmp_path)
    loaded = keras.saving.load_model(tmp_path / f"{tiny.name}.keras", safe_mode=True)
    assert isinstance(loaded, FamilyModel)
    assert model_info(loaded) == model_info(tiny)


def test_model_info_travels_as_json(tiny):
    info = model_info(tiny)
    assert ModelInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info


def test_dataset_batches_fit_the_model_and_its_losses(family, tiny, data):
    dataset = make_dataset(data["manifest"], split="train", model=tiny, batch_size=4, augment=False)
    inputs, targets = next(iter(dataset))
    assert set(inputs) == set(model_info(tiny).inputs)
    assert set(targets) == set(tiny.output_names)
    size = model_info(tiny).input_size
    assert all(tuple(crops.shape) == (4, size, size, 3) for crops in inputs.values())
    losses, weights = family_spec(family).losses(tiny, LossConfig(), None)
    assert set(losses) == set(weights) == set(tiny.output_names)
    outputs = predict(tiny, {name: np.asarray(crops) for name, crops in inputs.items()})
    for name, loss in losses.items():
        value = keras.losses.get(loss)(targets[name], outputs[name])
        assert np.isfinite(float(keras.ops.mean(value))), name


def test_a_plain_functional_model_is_wrapped_with_its_weights(tiny):
    plain = keras.Model(tiny.input, tiny.output, name=tiny.name)
    with pytest.raises(Exception, match="does not say which family"):
        model_info(plain)
    wrapped = as_family_model(plain, tiny.family, tiny.options)
    inputs = random_inputs(tiny)
    expected, actual = predict(tiny, inputs), predict(wrapped, inputs)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name])


@pytest.mark.slow
def test_tflite_is_builtin_only_with_matching_numerics(tiny):
    assert_tflite_builtin_and_close(tiny, rtol=1e-3, atol=1e-3)
