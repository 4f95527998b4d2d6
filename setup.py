"""Install c3ae; preprocessing/ and export/ install as c3ae.preprocessing and c3ae.export."""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent


def read_version() -> str:
    namespace: dict = {}
    exec((HERE / "c3ae" / "_version.py").read_text(), namespace)
    return namespace["__version__"]


def read_requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="c3ae",
    version=read_version(),
    description="Compact face age and gender estimation (C3AE, SSR-Net, DLDL, Levi-Hassner) for Keras 3",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="BSD-2-Clause",
    python_requires=">=3.10",
    packages=["c3ae", "c3ae.models", "c3ae.preprocessing", "c3ae.export"],
    package_dir={
        "c3ae": "c3ae",
        "c3ae.models": "c3ae/models",
        "c3ae.preprocessing": "preprocessing",
        "c3ae.export": "export",
    },
    package_data={"c3ae": ["weights/*", "configs/*.yaml"]},
    install_requires=read_requirements(),
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6", "ruff"],
        "coreml": ["coremltools==9.0"],
        # The CUDA build replaces tensorflow-cpu: `pip install c3ae[gpu]` then `pip uninstall tensorflow-cpu`.
        "gpu": ["tensorflow[and-cuda]==2.21.0"],
    },
    entry_points={"console_scripts": ["c3ae = c3ae.cli:main"]},
)
