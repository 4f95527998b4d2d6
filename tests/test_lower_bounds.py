"""The runtime at the lowest versions requirements.txt claims: installed together with the wheel into a fresh
virtual environment, `c3ae predict` and `c3ae video` work, and the ONNX extra's lowest ONNX Runtime too. And
`pip install .` into an environment that already holds NumPy 1.x, or an older OpenCV and Pillow, replaces
none of them (requirements.txt's [numpy1]).

The bounds are read from requirements.txt (``>=`` of each line of ``[runtime]`` and ``[onnx]``), so raising
one there raises it here. Each runs twice: with the lowest NumPy, and with the NumPy of constraints.txt (pip
upgrades NumPy beside an older OpenCV or ONNX Runtime when a newer dependency needs it). pip's cache makes
reruns quick (about a minute each; the first run downloads ~100 MB).
"""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO, build_wheel, requirement_lines
from test_runtime_install import OBAMA, SOURCE_IGNORE, STARTUP_NOISE, _run, make_clip

pytestmark = pytest.mark.slow  # installs: `pytest -m 'not slow'` skips it


def lower_bounds(*sections: str) -> dict[str, str]:
    """``{distribution: lowest version}`` of the requirements in ``sections`` of requirements.txt."""
    bounds = {}
    for line in requirement_lines(*sections):
        match = re.match(r"^([A-Za-z0-9_.\-]+)\s*>=\s*([^,;\s]+)", line)
        assert match, f"requirements.txt: {line!r} states no lower bound (>=)"
        bounds[match.group(1).lower()] = match.group(2)
    return bounds


def pinned_version(name: str) -> str:
    """The version constraints.txt pins ``name`` to."""
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line)[name]


@pytest.fixture(scope="module", params=["lowest", "tested"], ids=lambda numpy: f"{numpy}-numpy")
def lowest_venv(tmp_path_factory, request) -> Path:
    """A fresh venv holding the wheel and exactly the lowest supported runtime and ONNX Runtime, with the
    lowest NumPy or with the tested one."""
    root = tmp_path_factory.mktemp("lowest")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*SOURCE_IGNORE))
    wheel = build_wheel(source, root)
    venv = root / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)], cwd=root).returncode == 0
    versions = lower_bounds("runtime", "onnx")
    if request.param == "tested":
        versions["numpy"] = pinned_version("numpy")
    pins = [f"{name}=={version}" for name, version in versions.items()]
    installed = _run([str(venv / "bin" / "pip"), "install", "-q", str(wheel), *pins], cwd=root, timeout=900)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


def _installed(venv: Path, cwd: Path) -> dict[str, str]:
    listed = _run([str(venv / "bin" / "pip"), "list", "--format", "json"], cwd=cwd)
    return {row["name"].lower(): row["version"] for row in json.loads(listed.stdout)}


def test_the_lowest_versions_are_what_got_installed(lowest_venv, tmp_path):
    versions = _installed(lowest_venv, tmp_path)
    for name, version in lower_bounds("runtime", "onnx").items():
        assert versions.get(name) == version or name == "numpy", (name, versions.get(name))
    assert versions["numpy"] in (lower_bounds("runtime")["numpy"], pinned_version("numpy"))


@pytest.fixture(scope="module")
def expected() -> dict[str, dict]:
    """The default model's answer on the photo at the tested versions (this process), per backend."""
    from c3ae import AgeGenderEstimator

    return {
        backend: AgeGenderEstimator(backend=backend).predict(OBAMA)[0].to_dict()
        for backend in ("tflite", "onnx")
    }


@pytest.mark.parametrize("backend", ["tflite", "onnx"])
def test_the_lowest_runtime_predicts_on_a_photo(lowest_venv, tmp_path, backend, expected):
    photo = shutil.copy(OBAMA, tmp_path / "photo.jpg")
    command = [str(lowest_venv / "bin" / "c3ae"), "predict", str(photo), "--backend", backend]
    result = _run([*command, "--json", "faces.json"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (record,) = json.loads((tmp_path / "faces.json").read_text())
    (face,) = record["faces"]
    assert face["gender"] == expected[backend]["gender"], face
    assert abs(face["age"] - expected[backend]["age"]) < 1.0, (face, expected[backend])
    assert not [line for line in result.stderr.splitlines() if any(w in line for w in STARTUP_NOISE)]


def test_the_lowest_runtime_annotates_a_video(lowest_venv, tmp_path):
    clip = make_clip(tmp_path / "clip.mp4")
    command = [str(lowest_venv / "bin" / "c3ae"), "video", str(clip), "--output", "out.mp4"]
    result = _run([*command, "--jsonl", "out.jsonl"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[-1])["summary"]
    assert summary["frames"] == 24 and summary["faces"] == 1
    assert (tmp_path / "out.mp4").stat().st_size > 10_000


@pytest.mark.parametrize(
    "installed",
    [["numpy==1.26.4"], ["opencv-python-headless==4.10.0.84", "pillow==10.0.0"]],
    ids=["numpy-1.26.4", "older-opencv-and-pillow"],
)
def test_pip_install_from_source_replaces_nothing_installed(installed, tmp_path, expected):
    """The README's `pip install .`, as printed (no constraints), into a venv that already holds NumPy 1.26.4,
    or an OpenCV and a Pillow older than the newest in our ranges: every package that was there keeps its
    version, and `c3ae predict` gives the tested answer."""
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*SOURCE_IGNORE))
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path).returncode == 0
    pip = str(venv / "bin" / "pip")
    assert _run([pip, "install", "-q", *installed], cwd=tmp_path, timeout=900).returncode == 0
    before = _installed(venv, tmp_path)
    result = _run([pip, "install", "-q", str(source)], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    after = _installed(venv, tmp_path)
    assert {name: after.get(name) for name in before} == before
    photo = shutil.copy(OBAMA, tmp_path / "photo.jpg")
    command = [str(venv / "bin" / "c3ae"), "predict", str(photo), "--json", "faces.json"]
    predicted = _run(command, cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    ((face,),) = [record["faces"] for record in json.loads((tmp_path / "faces.json").read_text())]
    assert face["gender"] == expected["tflite"]["gender"], face
    assert abs(face["age"] - expected["tflite"]["age"]) < 1.0, (face, expected["tflite"])
