"""Install layout and the command line."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, build_wheel, requirement_lines

import c3ae
from c3ae.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "c3ae.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_subpackages_import_under_c3ae():
    import c3ae.export.tflite
    import c3ae.preprocessing

    assert Path(c3ae.preprocessing.__file__).parent.name == "preprocessing"
    assert Path(c3ae.export.tflite.__file__).parent.name == "export"


@pytest.mark.slow
def test_wheel_maps_folders_into_the_c3ae_namespace(tmp_path):
    """preprocessing/ and export/ must land as c3ae/preprocessing and c3ae/export, never top level."""
    wheel = build_wheel(REPO, tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "c3ae/preprocessing/__init__.py" in names and "c3ae/export/tflite.py" in names
    assert "c3ae/models/c3ae.py" in names and "c3ae/layers.py" in names
    top_level = {name.split("/")[0] for name in names}
    assert top_level <= {"c3ae", f"c3ae-{c3ae.__version__}.dist-info"}, top_level


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"c3ae {c3ae.__version__}"


def test_models_lists_pinned_parameter_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name, params in [
        ("c3ae-paper", "36,377"),
        ("c3ae ", "48,633"),
        ("c3ae-se ", "53,993"),
        ("ssrnet ", "40,915"),
    ]:
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert params in line, line


def test_models_summary(capsys):
    assert main(["models", "ssrnet"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 40,915" in out and "BGR" in out


def test_unknown_model_is_one_clear_line_without_traceback():
    result = run_cli("models", "c3ae-huge")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "c3ae models: error: Unknown model 'c3ae-huge'; run 'c3ae models' to list the known models."
    )
    assert "Traceback" not in result.stderr


def test_no_command_prints_help_and_fails():
    result = run_cli()
    assert result.returncode == 2 and "usage: c3ae" in result.stdout


def test_models_describes_every_bundled_model_it_lists(capsys):
    """`c3ae models NAME` takes the bundled names `c3ae models` lists, from their cards (no Keras)."""
    from c3ae.bundled import DEFAULT_MODEL, available_models

    for name in available_models():
        assert main(["models", name]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{name}: bundled ") and f"{name}.tflite" in out and "test" in out, out
    assert main(["models", DEFAULT_MODEL]) == 0
    out = capsys.readouterr().out
    from c3ae.bundled import model_card

    sources = model_card(DEFAULT_MODEL)["metrics"]["test"]["sources"]  # the card's numbers, not a copy
    utk, aaf = sources["utkface"], sources["aaf"]
    assert f"test utkface: MAE {utk['mae']:.2f}, gender accuracy {utk['gender_accuracy']:.3f}" in out
    assert f"test aaf: MAE {aaf['mae']:.2f}" in out


MISSING_KERAS = "this needs the 'train' extra (keras is not installed): pip install \"c3ae[train]\""


@pytest.mark.parametrize("statement", ["from c3ae.models import build_c3ae", "import c3ae.legacy"])
def test_the_keras_api_without_keras_is_the_one_line_extra_error(statement):
    """As in the runtime install (no Keras): the README's models snippet and c3ae.legacy name the extra."""
    code = f"import sys\nsys.modules['keras'] = None  # `import keras` fails as if not installed\n{statement}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"c3ae.extras.MissingExtraError: {MISSING_KERAS}"
    assert "ModuleNotFoundError" not in result.stderr


@pytest.mark.slow
def test_build_makes_an_sdist_and_a_wheel_that_twine_passes(tmp_path):
    """`python -m build` builds the sdist, then the wheel from it (so the sdist holds what setup.py reads)."""
    import shutil
    import tarfile

    from test_runtime_install import SOURCE_IGNORE

    source, dist = tmp_path / "source", tmp_path / "dist"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*SOURCE_IGNORE))
    # no isolation: the test environment's setuptools and wheel, nothing fetched
    build = [sys.executable, "-m", "build", "--no-isolation", "--skip-dependency-check", "--outdir"]
    built = subprocess.run([*build, str(dist), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (sdist,) = dist.glob(f"c3ae-{c3ae.__version__}.tar.gz")
    (wheel,) = dist.glob(f"c3ae-{c3ae.__version__}-py3-none-any.whl")
    names = {name.split("/", 1)[-1] for name in tarfile.open(sdist).getnames()}
    assert {"requirements.txt", "constraints.txt", "CHANGELOG.md", "c3ae/_version.py"} <= names
    assert _runtime_requirements(wheel) == _requirements_section("runtime")  # not [numpy1]: built on NumPy 2
    checked = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("PASSED") == 2, checked.stdout


def _requirements_section(section: str) -> set:
    """The requirements of ``section`` of requirements.txt, as (name, specifier set) pairs."""
    from packaging.requirements import Requirement

    requirements = [Requirement(line) for line in requirement_lines(section)]
    return {(requirement.name.lower(), requirement.specifier) for requirement in requirements}


def _runtime_requirements(wheel) -> set:
    """The wheel's requirements that no extra guards, as (name, specifier set) pairs."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as archive:
        (name,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        lines = archive.read(name).decode().splitlines()
    requirements = [Requirement(line.split(":", 1)[1]) for line in lines if line.startswith("Requires-Dist:")]
    return {(r.name.lower(), r.specifier) for r in requirements if r.marker is None}
