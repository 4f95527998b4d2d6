"""Shared fixtures. Tests that need ../shared (real data, legacy weights) skip with that reason."""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LEGACY_WEIGHTS = SHARED / "weights" / "legacy"


@pytest.fixture(scope="session")
def legacy_weights() -> Path:
    if not LEGACY_WEIGHTS.is_dir():
        pytest.skip(
            f"needs the original weight files in {LEGACY_WEIGHTS} (../shared is not beside this checkout)"
        )
    return LEGACY_WEIGHTS
