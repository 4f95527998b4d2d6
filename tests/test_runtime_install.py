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
from conftest import REPO, SOURCE_IGNORE, clean_environment, face_clip  # noqa: F401 (SOURCE_IGNORE: re-exported)

pytestmark = pytest.mark.slow  # trains, converts or installs: `pytest -m 'not slow'` skips it

OBAMA = REPO / "assets" / "obama.jpg"
HEAVY = ("tensorflow", "keras", "pandas", "pyarrow", "tf2onnx", "onnx", "onnxruntime", "mtcnn", "absl")
STARTUP_NOISE = ("tensorflow", "absl", "All log messages before", "cpu_feature_guard", "XNNPACK delegate")


def make_clip(path: Path, frames: int = 24) -> Path:
    return face_clip(path, frames, size=(640, 360), fps=24.0)


_environment = clean_environment  # what a user's shell would pass (the runtime venv's fixture uses it too)


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


def test_the_runtime_wheel_finds_its_bundled_photo_for_bench_runtime(runtime_venv, tmp_path):
    """`c3ae bench runtime` without --photo times predict on the photo the wheel ships as c3ae/assets (issue
    20, point 2: it looked for site-packages/assets/obama.jpg)."""
    code = "from c3ae.cli import _asset; print(_asset('obama.jpg'))"
    result = _run([str(runtime_venv / "bin" / "python"), "-c", code], cwd=tmp_path)
    photo = Path(result.stdout.strip())
    assert result.returncode == 0 and photo.is_file(), result.stderr
    assert photo.parent.name == "assets" and photo.parent.parent.name == "c3ae"
    help_text = _run([str(runtime_venv / "bin" / "c3ae"), "bench", "runtime", "--help"], cwd=tmp_path)
    assert "the bundled obama.jpg" in help_text.stdout


def test_the_runtime_wheel_benches_a_bundled_model_by_name_on_its_shipped_tflite(runtime_venv, tmp_path):
    """`c3ae bench models NAME --backends tflite` in the runtime install times the shipped .tflite (issue 20,
    point 4: it needed the train extra to convert)."""
    command = [str(runtime_venv / "bin" / "c3ae"), "bench", "models", "c3ae-utk-aaf", "--backends", "tflite"]
    result = _run([*command, "--runs", "3", "--batch", "1", "--threads", "1"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "c3ae-utk-aaf.tflite" in line]
    assert len(rows) == 1 and "| none |" in rows[0], result.stdout
