"""Shared fixtures. Tests that need ../shared (real data, legacy weights) skip with that reason."""

import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LEGACY_WEIGHTS = SHARED / "weights" / "legacy"


def face_clip(path: Path, frames: int = 6, size: tuple[int, int] = (320, 240), fps: float = 10.0) -> Path:
    """An mp4v clip of the bundled Obama photo sliding across a grey frame."""
    import cv2
    import numpy as np

    width, height = size
    face = cv2.resize(cv2.imread(str(REPO / "assets" / "obama.jpg")), (width // 2, height * 5 // 6))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    top, step = height // 12, max(width // 80, 1)
    for index in range(frames):
        frame = np.full((height, width, 3), 80, np.uint8)
        left = width // 16 + step * index
        frame[top : top + face.shape[0], left : left + face.shape[1]] = face
        writer.write(frame)
    writer.release()
    return path


def utk_faces(root: Path) -> Path:
    """Six UTKFace-style face crops in ``root`` (created): the two bundled photos at 240 px, flipped and
    trimmed, aged 48-53, genders alternating."""
    import cv2

    root.mkdir(parents=True, exist_ok=True)
    faces = []
    for name in ("obama.jpg", "astronaut.jpg"):
        image = cv2.imread(str(REPO / "assets" / name))
        scale = 240 / max(image.shape[:2])
        faces.append(cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))
    variants = [
        faces[0],
        faces[1],
        cv2.flip(faces[0], 1),
        cv2.flip(faces[1], 1),
        faces[0][10:],
        faces[1][:, 5:],
    ]
    for i, image in enumerate(variants):
        age, gender = [51, 50, 52, 49, 53, 48][i], i % 2
        cv2.imwrite(str(root / f"{age}_{gender}_0_2017011{i}000000000.jpg.chip.jpg"), image)
    return root


def slow_except(values, fast) -> list:
    """``values`` as pytest parameters, those not in ``fast`` marked slow: the quick loop
    (``pytest -m "not slow"``) keeps one case of each kind, CI runs them all."""
    return [value if value in fast else pytest.param(value, marks=pytest.mark.slow) for value in values]


def requirement_lines(*sections: str) -> list[str]:
    """The requirement lines of ``sections`` of requirements.txt (its ``# [section]`` headings, as setup.py
    reads them)."""
    lines, current = [], None
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line.startswith("# [") and line.endswith("]"):
            current = line[3:-1]
        elif current in sections and line.strip() and not line.startswith("#"):
            lines.append(line.strip())
    return lines


def build_wheel(source: Path, out_dir: Path) -> Path:
    """``pip wheel`` of the project at ``source`` into ``out_dir`` (no dependencies, no build isolation)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w"]
    subprocess.run([*command, str(out_dir), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = Path(out_dir).glob("c3ae-*.whl")
    return wheel


# not copied to build the wheel: version control, environments, build outputs, data, training runs
SOURCE_IGNORE = (
    ".git",
    ".venv*",
    ".ci-venv",
    "build",
    "dist",
    "site",
    "*.egg-info",
    "__pycache__",
    "prep",
    "runs",
    "logs",
    "teacher",
)


def clean_environment() -> dict:
    """This process's environment less Python's and the virtualenv's variables and the TensorFlow log level:
    a child sees what a user's shell would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the inference path must be quiet without it
    return env


def once_per_session(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` into a folder of this test session, once however many pytest-xdist workers ask:
    the first builds it under a file lock, the others wait and reuse it."""
    import fcntl

    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    shared = tmp_path_factory.getbasetemp().parent  # this session's folder, above each worker's own
    folder, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def runtime_venv(tmp_path_factory) -> Path:
    """A fresh venv with the built wheel installed as `pip install c3ae` would (runtime dependencies only);
    one per session, shared by tests/test_runtime_install.py and the runtime blocks of tests/test_docs.py
    (built once for all pytest-xdist workers)."""
    return once_per_session(tmp_path_factory, "runtime", _build_runtime_venv) / "venv"


def _build_runtime_venv(root: Path) -> None:
    import subprocess
    import sys

    def run(command, timeout=600):
        return subprocess.run(
            command, cwd=root, capture_output=True, text=True, timeout=timeout, env=clean_environment()
        )

    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*SOURCE_IGNORE))
    wheel = build_wheel(source, root)
    venv = root / "venv"
    assert run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    installed = run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], timeout=900)
    assert installed.returncode == 0, installed.stderr[-3000:]


@pytest.fixture(scope="session")
def legacy_weights() -> Path:
    if not LEGACY_WEIGHTS.is_dir():
        pytest.skip(
            f"needs the original weight files in {LEGACY_WEIGHTS} (../shared is not beside this checkout)"
        )
    return LEGACY_WEIGHTS


@pytest.fixture(scope="session")
def model() -> str:
    """The default bundled C3AE (age + gender) by name; it ships in the package (tests/test_bundled.py)."""
    from c3ae.bundled import DEFAULT_MODEL

    return DEFAULT_MODEL


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, so randomly initialised models are reproducible."""
    import keras

    keras.utils.set_random_seed(0)
