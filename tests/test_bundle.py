"""`c3ae export NAME --bundle DIR`: a folder a phone app can use, and its reference implementation."""

import importlib.util
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import REPO, SHARED

from c3ae.estimator import AgeGenderEstimator
from c3ae.export.bundle import write_bundle

pytestmark = pytest.mark.slow  # trains, converts or installs: `pytest -m 'not slow'` skips it

PHOTOS = sorted((REPO / "assets").glob("*.jpg")) + sorted((SHARED / "media").glob("t1.jpg"))


def load_reference(folder):
    spec = importlib.util.spec_from_file_location(f"reference_{folder.name}", folder / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=["c3ae-utk", "ssrnet-utk"])
def bundle(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    write_bundle(request.param, folder)
    return request.param, folder


def test_the_bundle_holds_every_network_and_the_whole_spec(bundle):
    name, folder = bundle
    spec = json.loads((folder / "bundle.json").read_text())
    assert spec["format"] == "c3ae-bundle" and spec["model"] == name
    for file in spec["detector"]["files"].values():
        assert (folder / file).stat().st_size > 10_000
    assert "MIT License" in (folder / spec["detector"]["license"]).read_text()
    files = [m["file"] for m in spec["models"]]
    assert files == (
        [f"{name}.tflite"] if name == "c3ae-utk" else [f"{name}.tflite", f"{name}-gender.tflite"]
    )
    assert all((folder / file).is_file() for file in files)
    assert (
        "BGR" in spec["input_convention"]["networks"] and "[0, 255]" in spec["input_convention"]["networks"]
    )
    assert len(spec["alignment"]["template_in_box"]) == 5 and spec["alignment"]["chip"]["size"] == 160
    assert set(spec["outputs"]) == {"age", "age_std", "gender"}
    assert (folder / "reference.py").is_file() and (folder / "README.md").is_file()


@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.name)
def test_the_reference_implementation_reproduces_the_estimator(bundle, photo):
    name, folder = bundle
    image = cv2.imread(str(photo), cv2.IMREAD_COLOR)
    expected = [face.to_dict() for face in AgeGenderEstimator(name, backend="tflite").predict(image)]
    found = load_reference(folder).estimate(image, folder)
    assert len(found) == len(expected) >= 1
    for ours, theirs in zip(found, expected, strict=True):
        np.testing.assert_allclose(ours["box"], theirs["box"], atol=0.11)
        assert ours["gender"] == theirs["gender"]
        assert ours["age"] == pytest.approx(theirs["age"], abs=0.05)
        assert ours["gender_prob"] == pytest.approx(theirs["gender_prob"], abs=0.002)
        if theirs["age_std"] is not None:
            assert ours["age_std"] == pytest.approx(theirs["age_std"], abs=0.05)


def test_the_reference_runs_from_the_folder_alone(bundle, tmp_path):
    name, folder = bundle
    photo = tmp_path / "photo.jpg"
    photo.write_bytes((REPO / "assets" / "obama.jpg").read_bytes())
    result = subprocess.run(
        [sys.executable, "-I", str(folder / "reference.py"), str(photo)],  # -I: isolated from the environment
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (face,) = json.loads(result.stdout)
    assert face["gender"] == "male" and 20 < face["age"] < 90


def test_the_cli_writes_a_bundle_and_refuses_a_file_as_the_folder(tmp_path, capsys):
    from c3ae.cli import main

    assert main(["export", "c3ae-utk", "--bundle", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "bundle.json").is_file()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["export", "c3ae-utk", "--bundle", str(blocker)]) == 2
    assert "not a folder" in capsys.readouterr().err
