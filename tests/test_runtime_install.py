"""The runtime as a user gets it: `pip install c3ae` from a built wheel, no TensorFlow anywhere.

The wheel test builds the wheel, makes a fresh virtual environment (no system site-packages), installs the
wheel with its runtime dependencies from the package index (pip's cache makes reruns quick), and runs
`c3ae predict`, `c3ae video` and `c3ae bench models` outside the repository.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from conftest import REPO, build_wheel, face_clip

pytestmark = pytest.mark.slow  # trains, converts or installs: `pytest -m 'not slow'` skips it

OBAMA = REPO / "assets" / "obama.jpg"
HEAVY = ("tensorflow", "keras", "pandas", "pyarrow", "tf2onnx", "onnx", "onnxruntime", "mtcnn", "absl")
STARTUP_NOISE = ("tensorflow", "absl", "All log messages before", "cpu_feature_guard", "XNNPACK delegate")
# not copied to build the wheel: version control, environments, build outputs, data, training runs
SOURCE_IGNORE = (".git", ".venv*", ".ci-venv", "build", "dist", "*.egg-info", "__pycache__", "prep", "runs")


def make_clip(path: Path, frames: int = 24) -> Path:
    return face_clip(path, frames, size=(640, 360), fps=24.0)


def _environment() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the inference path must be quiet without it
    return env


def test_the_inference_path_imports_no_tensorflow_and_prints_no_startup_lines(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4")
    code = f"""
import json, sys
from c3ae.cli import main
assert main(["predict", {str(OBAMA)!r}, "--json", {str(tmp_path / "faces.json")!r}]) == 0
assert main(["video", {str(clip)!r}, "--output", {str(tmp_path / "out.mp4")!r}]) == 0
from c3ae import AgeGenderEstimator
faces = AgeGenderEstimator().predict({str(OBAMA)!r})
assert len(faces) == 1 and faces[0].gender in ("male", "female")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_environment()
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    noise = [line for line in result.stderr.splitlines() if any(word in line for word in STARTUP_NOISE)]
    assert noise == []


def _run(command: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_environment()
    )


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    """A fresh venv with the built wheel installed as `pip install c3ae` would (runtime dependencies only)."""
    root = tmp_path_factory.mktemp("runtime")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*SOURCE_IGNORE))
    wheel = build_wheel(source, root)
    venv = root / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)], cwd=root).returncode == 0
    installed = _run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], cwd=root, timeout=900)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


def test_the_runtime_wheel_has_no_tensorflow(runtime_venv, tmp_path):
    result = _run([str(runtime_venv / "bin" / "python"), "-c", "import tensorflow"], cwd=tmp_path)
    assert result.returncode != 0 and "No module named 'tensorflow'" in result.stderr
    for module in ("keras", "onnxruntime", "pyarrow", "mtcnn"):
        probe = _run([str(runtime_venv / "bin" / "python"), "-c", f"import {module}"], cwd=tmp_path)
        assert probe.returncode != 0, module


def test_the_runtime_wheel_predicts_on_a_photo(runtime_venv, tmp_path):
    photo = shutil.copy(OBAMA, tmp_path / "photo.jpg")
    result = _run(
        [str(runtime_venv / "bin" / "c3ae"), "predict", str(photo), "--json", "faces.json"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "photo.jpg: " in result.stdout and " M" in result.stdout
    (record,) = json.loads((tmp_path / "faces.json").read_text())
    assert len(record["faces"]) == 1 and record["faces"][0]["gender"] == "male"
    assert not [line for line in result.stderr.splitlines() if any(w in line for w in STARTUP_NOISE)]


def test_the_runtime_wheel_annotates_a_video(runtime_venv, tmp_path):
    clip = make_clip(tmp_path / "clip.mp4")
    result = _run(
        [
            str(runtime_venv / "bin" / "c3ae"),
            "video",
            str(clip),
            "--output",
            "out.mp4",
            "--jsonl",
            "out.jsonl",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    capture = cv2.VideoCapture(str(tmp_path / "out.mp4"))
    frames = 0
    while capture.read()[0]:
        frames += 1
    assert frames == 24
    summary = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[-1])["summary"]
    assert summary["frames"] == 24


def test_the_runtime_wheel_benches_a_shipped_tflite_model(runtime_venv, tmp_path):
    find = "import c3ae.bundled as b; print(b.WEIGHTS_DIR / 'c3ae-utk.tflite')"
    model = _run([str(runtime_venv / "bin" / "python"), "-c", find], cwd=tmp_path).stdout.strip()
    result = _run(
        [
            str(runtime_venv / "bin" / "c3ae"),
            "bench",
            "models",
            model,
            "--runs",
            "5",
            "--batch",
            "1",
            "--threads",
            "1",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "c3ae-utk.tflite" in result.stdout


@pytest.mark.parametrize(
    "command",
    [
        ["export", "c3ae-utk", "--format", "tflite", "-o", "m.tflite"],
        ["train", "c3ae"],
        ["predict", str(OBAMA), "--backend", "keras"],
        ["predict", str(OBAMA), "--backend", "onnx"],
    ],
    ids=["export", "train", "keras-backend", "onnx-backend"],
)
def test_a_command_needing_a_missing_extra_says_which_in_one_line(runtime_venv, tmp_path, command):
    result = _run([str(runtime_venv / "bin" / "c3ae"), *command], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and 'pip install "c3ae[' in lines[0], lines


@pytest.mark.parametrize("statement", ["from c3ae.models import build_c3ae", "import c3ae.legacy"])
def test_the_keras_api_in_the_runtime_names_the_extra(runtime_venv, tmp_path, statement):
    """The README's models snippet and c3ae.legacy end in the one-line extra error, not a bare
    ModuleNotFoundError for keras."""
    result = _run([str(runtime_venv / "bin" / "python"), "-c", statement], cwd=tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]  # legacy imports h5py first, which is missing too
    assert re.fullmatch(
        r"c3ae\.extras\.MissingExtraError: this needs the 'train' extra \((keras|h5py) is not installed\): "
        r'pip install "c3ae\[train\]"',
        last,
    ), last
    assert "ModuleNotFoundError" not in result.stderr


def test_the_runtime_describes_a_bundled_model(runtime_venv, tmp_path):
    result = _run([str(runtime_venv / "bin" / "c3ae"), "models", "c3ae-utk-aaf"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("c3ae-utk-aaf: bundled c3ae model, 55,530 parameters")


def test_the_wheel_exports_without_the_repository(runtime_venv, tmp_path):
    """Everything `c3ae export` reads at run time is in the wheel (the verification photos included):
    unpacked outside the repository, ahead of this environment's training stack, it exports c3ae-utk
    without --calibration."""
    import zipfile

    wheel = next(runtime_venv.parent.glob("c3ae-*.whl"))
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    assert (unpacked / "c3ae" / "assets" / "obama.jpg").is_file()
    import sysconfig

    # -S: no site processing, so the editable install's import hook (a .pth file) cannot shadow the wheel;
    # this environment's site-packages only supply the dependencies, after the unpacked wheel.
    site_packages = sysconfig.get_paths()["purelib"]
    code = "import sys, c3ae; from c3ae.cli import main; print(c3ae.__file__); sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-S", "-c", code, "export", "c3ae-utk", "--format", "tflite", "-o", "m.tflite"]
    result = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**_environment(), "PYTHONPATH": os.pathsep.join([str(unpacked), site_packages])},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0].startswith(str(unpacked))  # the wheel's c3ae, not the repository's
    assert (tmp_path / "m.tflite").stat().st_size > 10_000
