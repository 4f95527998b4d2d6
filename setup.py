"""Install c3ae; preprocessing/ and export/ install as c3ae.preprocessing and c3ae.export."""

import re
import sysconfig
from importlib import metadata
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent


def read_version() -> str:
    namespace: dict = {}
    exec((HERE / "c3ae" / "_version.py").read_text(), namespace)
    return namespace["__version__"]


def read_requirements() -> dict[str, list[str]]:
    """``{section: [requirement, ...]}`` from requirements.txt's ``# [section]`` headings."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in (HERE / "requirements.txt").read_text().splitlines():
        line = line.strip()
        if line.startswith("# [") and line.endswith("]"):
            current = sections.setdefault(line[3:-1], [])
        elif line and not line.startswith("#") and current is not None:
            current.append(line)
    return sections


def installed_numpy_version() -> str | None:
    """The NumPy version already installed in the environment this is being installed into, or None.

    pip builds in an isolated environment but with the target's interpreter, whose install paths are the
    target's; ``python -m build`` builds in a fresh venv, which holds no NumPy."""
    paths = sorted({sysconfig.get_paths()[key] for key in ("purelib", "platlib")})
    for dist in metadata.distributions(path=paths):
        if (dist.metadata["Name"] or "").lower() == "numpy":
            return dist.version
    return None


def runtime_requirements(sections: dict[str, list[str]], numpy_version: str | None) -> list[str]:
    """[runtime], with [numpy1]'s lines in place of those of the same names when NumPy 1.x is installed, so
    that pip keeps that NumPy instead of upgrading it for a newer OpenCV or LiteRT."""
    runtime = sections["runtime"]
    if numpy_version is None or not numpy_version.startswith("1."):
        return runtime

    def name(requirement: str) -> str:
        return re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0).lower()

    replacements = {name(line): line for line in sections["numpy1"]}
    return [replacements.get(name(line), line) for line in runtime]


REQUIREMENTS = read_requirements()
# build and twine: tests/test_package.py builds the sdist and wheel and checks them as PyPI would
# docs: tests/test_docs.py builds the site with mkdocs build --strict
# pytest-xdist: CI runs the suite on both cores (`pytest -n 2`, one test file per worker);
# fastapi and httpx: the web-server example of docs/reliability.md runs under a test client
TEST = ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6", "ruff", "build>=1", "twine>=5"]
TEST += ["fastapi>=0.110", "httpx>=0.27"]
TEST += REQUIREMENTS["train"]
TEST += REQUIREMENTS["docs"]


setup(
    name="c3ae",
    version=read_version(),
    description="Compact face age and gender estimation (C3AE, SSR-Net, DLDL, Levi-Hassner) for Keras 3",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="BSD-2-Clause",
    python_requires=">=3.10",
    packages=["c3ae", "c3ae.models", "c3ae.preprocessing", "c3ae.export", "c3ae.assets"],
    package_dir={
        "c3ae": "c3ae",
        "c3ae.models": "c3ae/models",
        "c3ae.preprocessing": "preprocessing",
        "c3ae.export": "export",
        # the two public-domain photos `c3ae export` verifies on when no manifest is given
        "c3ae.assets": "assets",
    },
    package_data={
        "c3ae": ["weights/*", "weights/mtcnn/*", "configs/*.yaml"],
        "c3ae.assets": ["obama.jpg", "astronaut.jpg", "README.md"],
    },
    # `pip install c3ae` is the runtime: detection and inference on the shipped .tflite models, no
    # TensorFlow. The extras add ONNX Runtime, the training and export stack, CoreML, the CUDA build.
    install_requires=runtime_requirements(REQUIREMENTS, installed_numpy_version()),
    extras_require={
        "onnx": REQUIREMENTS["onnx"],
        "train": REQUIREMENTS["train"],
        "test": TEST,
        "docs": REQUIREMENTS["docs"],
        "coreml": ["coremltools>=9,<10"],
        # The CUDA build replaces tensorflow-cpu: `pip install c3ae[gpu]` then `pip uninstall tensorflow-cpu`.
        "gpu": [*REQUIREMENTS["train"], "tensorflow[and-cuda]>=2.21,<3"],
    },
    entry_points={"console_scripts": ["c3ae = c3ae.cli:main"]},
)
