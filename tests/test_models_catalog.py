"""``c3ae models`` prints static facts: they must be what the builders build, and need no Keras."""

import subprocess
import sys

import pytest

from c3ae.models import VARIANTS, build_variant


@pytest.mark.parametrize("name", list(VARIANTS))
def test_catalog_facts_are_the_built_model(name):
    facts, model = VARIANTS[name], build_variant(name)
    inputs = tuple(model.input) if isinstance(model.input, dict) else (model.inputs[0].name,)
    assert model.name.startswith(facts.family.split("_")[0])
    assert inputs == facts.inputs and tuple(model.output_names) == facts.outputs
    assert model.inputs[0].shape[1] == facts.input_size and model.count_params() == facts.parameters


def test_models_command_needs_no_keras():
    code = (
        "import sys, contextlib, io\n"
        "from c3ae.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): main(['models'])\n"
        "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules, 'imported Keras'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
