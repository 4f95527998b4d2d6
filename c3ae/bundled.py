"""Models shipped inside the package (``c3ae/weights/``): loaded offline, never downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import keras

WEIGHTS_DIR = Path(__file__).parent / "weights"


class ModelNotFoundError(ValueError):
    """Neither a bundled model's name nor a readable .keras file."""


def available_models() -> list[str]:
    """Names of the bundled models."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.keras"))


def model_card(name: str) -> dict:
    """The model card of a bundled model (data, split, preprocessing, metrics, training time, license)."""
    path = WEIGHTS_DIR / f"{name}.json"
    if not path.is_file():
        raise ModelNotFoundError(
            f"No model card for {name!r}; bundled models: {', '.join(available_models())}."
        )
    return json.loads(path.read_text())


def load_model(name_or_path: str | Path) -> keras.Model:
    """A bundled model by name (``"c3ae-utk"``) or a ``.keras`` file, loaded with ``safe_mode=True``.

    Inputs are float32 BGR crops with raw pixels in [0, 255] (see ``c3ae.conventions``).
    """
    import c3ae.keras_metrics  # noqa: F401  (registers the custom objects a saved model may name)
    import c3ae.layers  # noqa: F401
    import c3ae.losses  # noqa: F401

    path = Path(name_or_path)
    if not path.is_file():
        bundled = WEIGHTS_DIR / f"{name_or_path}.keras"
        if not bundled.is_file():
            names = ", ".join(available_models()) or "none yet"
            raise ModelNotFoundError(
                f"{name_or_path!r} is neither a .keras file nor a bundled model (bundled: {names})."
            )
        path = bundled
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except (ValueError, OSError, KeyError) as error:
        raise ModelNotFoundError(f"{path} is not a loadable Keras model: {error}") from error
