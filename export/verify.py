"""Export with verification always on: convert, run the artifact on real crops, compare with Keras, then
publish under the final name (or not).

:func:`export_model` writes the artifact under a temporary name in the output folder, runs it (TFLite with
LiteRT's Interpreter, ONNX with ONNX Runtime, a SavedModel with TensorFlow; a CoreML package can only be
checked structurally on Linux) on a batch of real face crops, compares every output with the Keras model,
and writes ``<artifact>.report.json``. Only an artifact within tolerance is renamed to the requested path;
one that fails is kept as ``<artifact>.failed`` (never under a name that looks valid; an older file at the
requested path is removed, since the report no longer describes it) and the report says
``"status": "failed"``.

Crops come from a manifest (``c3ae preprocess`` output) when one is given, else from the photos in
``assets/`` through :class:`c3ae.faces.FacePipeline` plus deterministic augmentations of them (flip,
rotation, box jitter, brightness/contrast): real faces, never noise.

Tolerances (one knob, ``tolerance``, sets the first number of each line; the others scale with it):

- fp32 (``quant="none"``): every output's max |artifact - keras| <= tolerance * max(1, |keras|)
  (default 1e-4: 1e-4 absolute for probabilities, relative for ages above 1 year).
- ``"fp16"``: max |age difference| <= tolerance years (default 0.1); probability outputs
  (gender, age_bins, age_group) max |difference| <= tolerance / 10.
- ``"int8"``, ``"dynamic"``: age MAE delta <= tolerance years (default 0.5): the artifact's MAE minus the
  Keras model's against the labels when the crops have ages, else the mean |artifact - keras| age (an upper
  bound of the delta); probability outputs mean |difference| <= tolerance / 10.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from c3ae.diagnostics import constant_layers
from c3ae.export.checks import ConverterError, ExportError, NonFiniteWeightsError, check_finite
from c3ae.files import atomic_path, remove_path
from c3ae.models.spec import CROP_LAYOUTS, ModelInfo
from c3ae.records import FAILED_SUFFIX, ExportReport, report_path

FORMATS = ("tflite", "onnx", "saved_model", "coreml")
FORMAT_QUANTS = {
    "tflite": ("none", "fp16", "dynamic", "int8"),
    "onnx": ("none",),
    "saved_model": ("none",),
    "coreml": ("none", "fp16"),
}
SUFFIXES = {"tflite": ".tflite", "onnx": ".onnx", "saved_model": "", "coreml": ".mlpackage"}
DEFAULT_TOLERANCE = {"none": 1e-4, "fp16": 0.1, "dynamic": 0.5, "int8": 0.5}
PROBABILITY_OUTPUTS = ("gender", "age_bins", "age_group")
SPREAD_OUTPUTS = ("age", "gender")
MIN_SPREAD = 0.5  # the artifact's std of an output across the crops, as a fraction of the Keras model's
ASSET_PHOTOS = ("obama.jpg", "astronaut.jpg")
ASSET_AUGMENTATIONS = 15  # per photo, besides the unaugmented crops
VERIFY_LIMIT = 256
CALIBRATION_LIMIT = 200

__all__ = [
    "ConverterError",
    "DEFAULT_TOLERANCE",
    "ExportError",
    "ExportReport",
    "FORMATS",
    "FORMAT_QUANTS",
    "NonFiniteWeightsError",
    "VerificationError",
    "asset_crops",
    "export_model",
    "manifest_crops",
]


class VerificationError(ExportError):
    """The artifact's outputs differ from Keras beyond the tolerance; ``report`` holds the numbers."""

    def __init__(self, message: str, report: ExportReport):
        super().__init__(message)
        self.report = report


# ------------------------------------------------------------------------------------------------- data
def _layout(model) -> tuple[ModelInfo, tuple[str, ...]]:
    """(what the model is, the labels to collect: its age / gender / age_group outputs, else gender)."""
    from c3ae.models.base import model_info

    info = model_info(model)
    targets = tuple(o for o in ("age", "gender", "age_group") if o in info.outputs) or ("gender",)
    return info, targets


def _layout_key(layout: tuple[ModelInfo, tuple[str, ...]]) -> str:
    return json.dumps([layout[0].to_dict(), layout[1]], sort_keys=True)


def _assets_dir() -> Path | None:
    import c3ae

    for folder in (
        Path(c3ae.__file__).resolve().parent / "assets",
        Path(c3ae.__file__).resolve().parents[1] / "assets",
    ):
        if all((folder / photo).is_file() for photo in ASSET_PHOTOS):
            return folder
    return None


_ASSET_FACES: list | None = None


def _asset_faces() -> list:
    """The aligned faces of the bundled photos (MTCNN, most confident face per photo), computed once."""
    global _ASSET_FACES
    if _ASSET_FACES is None:
        from c3ae.faces import FacePipeline, read_image

        folder = _assets_dir()
        if folder is None:
            raise ExportError(
                "The bundled photos (assets/obama.jpg, assets/astronaut.jpg) are not installed; pass a "
                "manifest (--calibration) to verify on."
            )
        pipeline = FacePipeline()
        faces = []
        for photo in ASSET_PHOTOS:
            faces += pipeline.process(read_image(folder / photo), max_faces=1, fallback_full_image=True)
        _ASSET_FACES = faces
    return _ASSET_FACES


_CROP_CACHE: dict[tuple, dict] = {}


def _cached(key: tuple, make) -> dict:
    """Crops are read once per process for a given source and layout (exports in a row reuse them)."""
    if key not in _CROP_CACHE:
        if len(_CROP_CACHE) >= 8:
            _CROP_CACHE.pop(next(iter(_CROP_CACHE)))
        _CROP_CACHE[key] = make()
    data = _CROP_CACHE[key]
    return {**data, "inputs": dict(data["inputs"]), "labels": dict(data["labels"])}


def asset_crops(model, augmentations: int = ASSET_AUGMENTATIONS, seed: int = 0) -> dict:
    """Crops of the faces in ``assets/`` for ``model``: each face as the pipeline cuts it, then
    ``augmentations`` deterministic variants (flip, rotation, box jitter, brightness/contrast, no erasing).

    Returns ``{"inputs": {name: (N, S, S, 3) float32 BGR [0, 255]}, "labels": {}, "source": str}``.
    """
    layout = _layout(model)
    key = ("assets", _layout_key(layout), int(augmentations), int(seed))
    return _cached(key, lambda: _asset_crops(layout[0], augmentations, seed))


def _asset_crops(info: ModelInfo, augmentations: int, seed: int) -> dict:
    from c3ae.data import Augmentation, augment_crops
    from c3ae.faces import model_crops

    params = Augmentation(max_rotation=10.0, erase=0.0)
    rng = np.random.default_rng(seed)
    order = CROP_LAYOUTS[info.crop_layout]
    samples = []
    for face in _asset_faces():
        plain = model_crops(face.chip, face.boxes, face.single_box, info.crop_layout, info.input_size)
        samples.append(np.stack([plain[n] for n in order]))
        boxes = face.boxes if info.crop_layout == "triple" else face.single_box.reshape(1, 4)
        centre = (
            (face.single_box[0] + face.single_box[2]) / 2,
            (face.single_box[1] + face.single_box[3]) / 2,
        )
        for _ in range(augmentations):
            crops = augment_crops(face.chip, boxes, info.input_size, rng, centre=centre, params=params)
            samples.append(crops)
    stacked = np.stack(samples).astype(np.float32)  # (N, K, S, S, 3)
    inputs = {name: stacked[:, order.index(name)] for name in info.inputs}
    photos = ", ".join(f"assets/{p}" for p in ASSET_PHOTOS)
    return {
        "inputs": inputs,
        "labels": {},
        "source": f"bundled photos ({photos}) through FacePipeline + model_crops, {len(samples)} crops: "
        f"{len(samples) // max(len(_asset_faces()), 1)} per face, {augmentations} of them deterministic "
        f"augmentations (seed {seed}); no calibration manifest was given",
    }


def _pick_split(info: dict, preference: tuple[str, ...]) -> str | None:
    from c3ae.data import manifest_splits, split_size

    splits = [s for s in manifest_splits(info) if split_size(info, s) > 0]
    ordered = [s for s in preference if s in splits] + [s for s in splits if s not in preference]
    return ordered[0] if ordered else None


def manifest_crops(model, manifest, purpose: str = "verify", limit: int | None = None, seed: int = 0) -> dict:
    """Up to ``limit`` unaugmented crops (with labels) from a manifest, shuffled with ``seed``.

    ``purpose="verify"`` reads the test split (else val, else train), ``"calibrate"`` the train split (else
    val, else test). Raises :class:`ExportError` for a manifest that cannot be read or has no usable rows.
    """
    from c3ae.data import read_manifest

    limit = int(limit or (VERIFY_LIMIT if purpose == "verify" else CALIBRATION_LIMIT))
    layout = _layout(model)
    try:
        info = read_manifest(manifest)
    except (OSError, ValueError) as error:
        raise ExportError(f"Cannot read the manifest {manifest}: {error}") from error
    stamp = Path(info["manifest_path"]).stat().st_mtime_ns
    key = ("manifest", info["manifest_path"], stamp, purpose, limit, int(seed), _layout_key(layout))
    return _cached(key, lambda: _manifest_crops(info, layout, purpose, limit, seed))


def _manifest_crops(info: dict, layout: tuple, purpose: str, limit: int, seed: int) -> dict:
    from c3ae.data import make_dataset

    model_described, targets = layout
    names = model_described.inputs
    preference = ("test", "val", "train") if purpose == "verify" else ("train", "val", "test")
    split = _pick_split(info, preference)
    if split is None:
        raise ExportError(f"The manifest {info['manifest_path']} has no rows; give one with faces in it.")
    try:
        dataset = make_dataset(
            info,
            split=split,
            model=model_described,
            batch_size=64,
            augment=False,
            shuffle=True,
            seed=seed,
            outputs=list(targets),
        )
        inputs: dict[str, list] = {n: [] for n in names}
        labels: dict[str, list] = {t: [] for t in targets}
        count = 0
        for batch_inputs, batch_targets in dataset:
            for name in names:
                inputs[name].append(batch_inputs[name].numpy())
            for name in targets:
                labels[name].append(batch_targets[name].numpy())
            count += int(batch_inputs[names[0]].shape[0])
            if count >= limit:
                break
    except (OSError, ValueError) as error:
        raise ExportError(f"Cannot read crops from the manifest {info['manifest_path']}: {error}") from error
    if count == 0:
        raise ExportError(
            f"The manifest {info['manifest_path']} has no usable rows in split {split!r} "
            f"(rows need the {', '.join(targets)} label); give one with faces in it."
        )
    return {
        "inputs": {n: np.concatenate(v)[:limit].astype(np.float32) for n, v in inputs.items()},
        "labels": {n: np.concatenate(v)[:limit].astype(np.float32) for n, v in labels.items()},
        "source": f"manifest {info['manifest_path']}, split {split!r}, {min(count, limit)} unaugmented crops "
        f"(shuffled, seed {seed})",
    }


# ----------------------------------------------------------------------------------------------- compare
def _predict_keras(model, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    from c3ae.runtime import KerasBackend

    backend = KerasBackend(model)
    return _batched(backend.predict, inputs)


def _batched(predict, inputs: Mapping[str, np.ndarray], batch: int = 64) -> dict[str, np.ndarray]:
    total = len(next(iter(inputs.values())))
    parts: dict[str, list] = {}
    for start in range(0, total, batch):
        out = predict({n: v[start : start + batch] for n, v in inputs.items()})
        for name, value in out.items():
            parts.setdefault(name, []).append(np.asarray(value, dtype=np.float32))
    return {name: np.concatenate(v) for name, v in parts.items()}


def compare(
    expected: Mapping[str, np.ndarray],
    actual: Mapping[str, np.ndarray],
    quant: str,
    tolerance: float | None = None,
    labels: Mapping[str, np.ndarray] | None = None,
) -> dict:
    """Differences per output and the pass/fail checks of ``quant`` (see the module docstring)."""
    tolerance = float(DEFAULT_TOLERANCE[quant] if tolerance is None else tolerance)
    labels = labels or {}
    outputs, checks, warnings = {}, [], []
    missing = sorted(set(expected) - set(actual))
    if missing:
        checks.append({"check": f"outputs {missing} present", "value": None, "limit": None, "passed": False})
    for name in sorted(set(expected) & set(actual)):
        reference = np.asarray(expected[name], dtype=np.float64)
        value = np.asarray(actual[name], dtype=np.float64).reshape(reference.shape)
        if not np.all(np.isfinite(reference)):
            bad = int(np.sum(~np.all(np.isfinite(reference.reshape(len(reference), -1)), axis=1)))
            what = f"the Keras model itself outputs NaN/Inf for {name} on {bad} crops"
            checks.append({"check": what, "value": None, "limit": None, "passed": False})
            outputs[name] = {"keras_non_finite_crops": bad}
            continue
        diff = np.abs(value - reference)
        finite = bool(np.all(np.isfinite(value)))
        entry = {
            "max_abs_diff": float(np.max(diff)) if finite else None,
            "mean_abs_diff": float(np.mean(diff)) if finite else None,
            "max_scaled_diff": float(np.max(diff / np.maximum(1.0, np.abs(reference)))) if finite else None,
        }
        outputs[name] = entry
        if finite and name in SPREAD_OUTPUTS and len(reference) > 1:
            # A converted model that gives every face the same age is the classic silent failure.
            entry["keras_spread"] = float(np.std(reference))
            entry["artifact_spread"] = float(np.std(value))
            if entry["keras_spread"] <= 1e-6:  # faithful to Keras, so not a failure; but say so
                warnings.append(f"the Keras model itself gives every crop the same {name}")
            else:
                ratio = entry["artifact_spread"] / entry["keras_spread"]
                checks.append(_at_least(f"{name} spread across crops, artifact / keras", ratio, MIN_SPREAD))
        if not finite:
            checks.append({"check": f"{name} finite", "value": None, "limit": None, "passed": False})
            outputs[name]["non_finite_values"] = int(np.sum(~np.isfinite(value)))
            continue
        probability = name in PROBABILITY_OUTPUTS
        if quant == "none":
            checks.append(_check(f"{name} max |diff| / max(1, |keras|)", entry["max_scaled_diff"], tolerance))
        elif quant == "fp16":
            limit = tolerance / 10 if probability else tolerance
            checks.append(_check(f"{name} max |diff|", entry["max_abs_diff"], limit))
        elif probability or name != "age":
            checks.append(_check(f"{name} mean |diff|", entry["mean_abs_diff"], tolerance / 10))
        if name == "age":
            age = {"mean_abs_diff_vs_keras": entry["mean_abs_diff"]}
            truth = labels.get("age")
            if truth is not None and len(truth) == len(reference):
                truth = np.asarray(truth, dtype=np.float64).reshape(reference.shape)
                age["keras_mae"] = float(np.mean(np.abs(reference - truth)))
                age["artifact_mae"] = float(np.mean(np.abs(value - truth)))
                age["mae_delta"] = age["artifact_mae"] - age["keras_mae"]
            else:
                age["mae_delta_bound"] = entry["mean_abs_diff"]
            outputs[name].update(age)
            if quant in ("int8", "dynamic"):
                delta = age.get("mae_delta", entry["mean_abs_diff"])
                what = (
                    "age MAE delta (vs labels)" if "mae_delta" in age else "age mean |diff| (MAE delta bound)"
                )
                checks.append(_check(what, delta, tolerance))
        if name == "gender":
            outputs[name]["decision_agreement"] = float(np.mean((value >= 0.5) == (reference >= 0.5)))
            truth = labels.get("gender")
            if truth is not None and len(truth) == len(reference):
                truth = np.asarray(truth).reshape(reference.shape)
                known = truth >= 0
                if np.any(known):
                    outputs[name]["keras_accuracy"] = float(
                        np.mean((reference[known] >= 0.5) == (truth[known] == 1))
                    )
                    outputs[name]["artifact_accuracy"] = float(
                        np.mean((value[known] >= 0.5) == (truth[known] == 1))
                    )
    return {
        "tolerance": tolerance,
        "outputs": outputs,
        "checks": checks,
        **({"warnings": warnings} if warnings else {}),
        "passed": bool(checks) and all(c["passed"] for c in checks),
    }


def _check(name: str, value: float, limit: float) -> dict:
    return {"check": name, "value": value, "limit": limit, "passed": bool(value <= limit)}


def _at_least(name: str, value: float, limit: float) -> dict:
    return {"check": name, "value": value, "minimum": limit, "passed": bool(value >= limit)}


# ------------------------------------------------------------------------------------------------- paths
def _check_output(output: Path, format: str) -> None:
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"The output folder {parent} does not exist; create it or choose another -o path.")
    try:  # os.access says yes to root even on a read-only file system: try it
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".c3ae-write-test-"):
            pass
    except OSError as error:
        raise ExportError(
            f"The output folder {parent} is not writable ({error.strerror}); choose another -o path."
        ) from error
    if output.is_dir() and format != "saved_model" and format != "coreml":
        raise ExportError(
            f"The output path {output} is a folder; give a file name, e.g. {output / 'model'}"
            f"{SUFFIXES[format]}."
        )
    if output.exists() and not output.is_dir() and format in ("saved_model", "coreml"):
        raise ExportError(f"The output path {output} is a file; a {format} export is a folder.")
    marker = {"saved_model": "saved_model.pb", "coreml": "Manifest.json"}.get(format)
    if output.is_dir() and marker and any(output.iterdir()) and not (output / marker).is_file():
        raise ExportError(
            f"The output folder {output} exists and is not a previous {format} export; refusing to replace "
            "it. Choose a new -o path."
        )


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------- artifacts
def _write_artifact(
    model, source, format: str, quant: str, path: Path, calibration: dict | None, opset: int, timeout
) -> dict:
    """Convert and write to ``path``; returns format-specific facts for the report. The converters run in
    a child process (:mod:`c3ae.export.convert`); a SavedModel is TensorFlow's own format, written here."""
    from c3ae.export.convert import convert, write_artifact

    if format == "saved_model":
        return write_artifact(model, format, quant, path)
    inputs = calibration["inputs"] if calibration is not None else None
    return convert(model, format, quant, path, inputs, opset, source=source, timeout=timeout)


_XNNPACK_PROBE = """
import sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter
interpreter = Interpreter(model_path=sys.argv[1], num_threads=1)
interpreter.allocate_tensors()
for detail in interpreter.get_input_details():
    interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
interpreter.invoke()
print("invoked")
"""


def probe_xnnpack(path: str | Path, timeout: float = 300) -> dict:
    """Whether a TFLite file runs on LiteRT's default XNNPACK delegate, as phone runtimes run it.

    Runs in a child process: LiteRT 2.3 can abort the whole process (double free) on graphs XNNPACK
    mishandles. Returns ``{"passed": bool, "error": str (when not)}``.
    """
    import signal
    import subprocess
    import sys

    try:
        done = subprocess.run(
            [sys.executable, "-c", _XNNPACK_PROBE, str(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"passed": False, "error": f"no result within {timeout:.0f} s"}
    if done.returncode == 0 and "invoked" in done.stdout:
        return {"passed": True}
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    error = lines[-1].strip() if lines else ""
    if done.returncode < 0:
        error = f"the process died with {signal.Signals(-done.returncode).name}" + (
            f": {error}" if error else ""
        )
    return {"passed": False, "error": error or f"exit code {done.returncode}"}


def _run_artifact(
    format: str, path: Path, inputs: Mapping[str, np.ndarray], xnnpack: bool | None = None
) -> tuple[dict, str]:
    """The artifact's outputs on ``inputs`` and a description of the runtime used."""
    if format in ("tflite", "onnx"):
        from c3ae.runtime import TFLiteBackend, load_backend

        if format == "tflite":
            from importlib.metadata import version

            backend = TFLiteBackend(path.read_bytes(), threads=1, xnnpack=xnnpack)
            kernels = "XNNPACK delegate" if backend.delegate else "builtin kernels"
            runtime = f"ai_edge_litert {version('ai-edge-litert')} Interpreter, {kernels} (1 thread)"
        else:
            import onnxruntime

            backend = load_backend(path, format, threads=1)
            runtime = f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider (1 thread)"
        return _batched(backend.predict, inputs), runtime
    import tensorflow as tf

    signature = tf.saved_model.load(str(path)).signatures["serving_default"]

    def predict(batch):
        return {k: v.numpy() for k, v in signature(**{n: tf.constant(a) for n, a in batch.items()}).items()}

    return _batched(predict, inputs), f"tensorflow {tf.__version__} saved_model.load, serving_default"


def _check_coreml(path: Path, model) -> dict:
    """Structural checks of a saved .mlpackage: input/output names, input shapes and types, metadata."""
    import coremltools as ct

    from c3ae.export.coreml import describe_coreml

    described = describe_coreml(ct.models.MLModel(str(path), skip_model_load=True))
    checks = []
    for tensor in model.inputs:
        info = described["inputs"].get(tensor.name)
        ok = bool(info) and info.get("shape", [])[1:] == [int(d) for d in tensor.shape[1:]]
        checks.append(
            {
                "check": f"input {tensor.name} {list(tensor.shape[1:])} float32",
                "value": info,
                "limit": None,
                "passed": ok and info.get("dtype") == "float32",
            }
        )
    for name in model.output_names:
        checks.append(
            {
                "check": f"output {name} present",
                "value": name in described["outputs"],
                "limit": None,
                "passed": name in described["outputs"],
            }
        )
    checks.append(
        {
            "check": "preprocessing metadata",
            "value": "c3ae" in described["metadata"],
            "limit": None,
            "passed": "c3ae" in described["metadata"],
        }
    )
    described["metadata"] = sorted(described["metadata"])
    return {
        "runtime": "none: CoreML models run only on Apple platforms; the package was checked structurally "
        "(names, shapes, types, metadata), not numerically",
        "structure": described,
        "checks": checks,
        "passed": all(c["passed"] for c in checks),
    }


def _verify(model, format: str, quant: str, path: Path, verify_data: dict, tolerance: float | None) -> dict:
    """Run the artifact at ``path`` on the verification crops and compare it with Keras (CoreML: checked
    structurally); returns the report's ``verification`` section."""
    if format == "coreml":
        verification = _check_coreml(path, model)
    else:
        xnnpack = probe_xnnpack(path) if format == "tflite" else None
        expected = _predict_keras(model, verify_data["inputs"])
        actual, runtime = _run_artifact(
            format, path, verify_data["inputs"], None if xnnpack is None or xnnpack["passed"] else False
        )
        checked = compare(expected, actual, quant, tolerance, verify_data["labels"])
        verification = {"runtime": runtime, **checked}
        if xnnpack is not None:
            verification["xnnpack"] = xnnpack
            verification["checks"].append(
                {
                    "check": "runs on LiteRT's default XNNPACK delegate (as phones run it)",
                    "value": None if xnnpack["passed"] else xnnpack["error"],
                    "limit": None,
                    "passed": xnnpack["passed"],
                }
            )
            verification["passed"] = verification["passed"] and xnnpack["passed"]
        dead = constant_layers(model, verify_data["inputs"])
        if dead:  # not a failure in itself; it explains odd int8 scales and weak models
            verification["constant_layers"] = dead
    verification["data"] = verify_data["source"]
    verification["crops"] = int(len(next(iter(verify_data["inputs"].values()), [])))
    return verification


# ---------------------------------------------------------------------------------------------- export
def _check_model_exists(model) -> None:
    """Fail fast, before TensorFlow starts, on a model that is neither a file nor a bundled name."""
    if not isinstance(model, (str, Path)) or Path(model).is_file():
        return
    from c3ae.bundled import WEIGHTS_DIR

    if not (WEIGHTS_DIR / f"{model}.keras").is_file():
        names = ", ".join(sorted(p.stem for p in WEIGHTS_DIR.glob("*.keras"))) or "none yet"
        raise ExportError(f"{str(model)!r} is neither a .keras file nor a bundled model (bundled: {names}).")


def _load(model):
    import keras

    if isinstance(model, keras.Model):
        return model, getattr(model, "name", "model")
    from c3ae.bundled import ModelNotFoundError, load_model

    try:
        return load_model(model), str(model)
    except ModelNotFoundError as error:
        raise ExportError(str(error)) from error


def export_model(
    model,
    output: str | Path,
    format: str = "tflite",
    quant: str = "none",
    *,
    calibration: str | Path | None = None,
    tolerance: float | None = None,
    opset: int = 17,
    verify_limit: int = VERIFY_LIMIT,
    calibration_limit: int = CALIBRATION_LIMIT,
    convert_timeout: float | None = None,
) -> ExportReport:
    """Export ``model`` (a ``keras.Model``, a ``.keras`` path or a bundled model's name) to ``output`` and
    verify it against Keras; returns the report (its ``str`` is the summary ``c3ae export`` prints), also
    written to ``<output>.report.json`` (:func:`report_path`).

    Args:
        format: ``"tflite"``, ``"onnx"``, ``"saved_model"`` (a folder) or ``"coreml"`` (``.mlpackage``).
        quant: TFLite ``"none"``, ``"fp16"``, ``"dynamic"``, ``"int8"``; CoreML ``"none"``, ``"fp16"``;
            ONNX and SavedModel ``"none"``.
        calibration: a ``c3ae preprocess`` manifest: int8 calibrates on its train split and every format is
            verified on its test split (unaugmented crops with labels). Without one, both use crops of the
            bundled photos (see :func:`asset_crops`).
        tolerance: overrides the default gate of ``quant`` (module docstring).
        convert_timeout: seconds the converter's child process may take (default
            :data:`c3ae.export.convert.CONVERT_TIMEOUT`, 600).

    Raises:
        ExportError: a bad model, format, quantisation, manifest or output path (nothing is written);
            :class:`NonFiniteWeightsError` for weights holding NaN or Inf; :class:`VerificationError` when the
            artifact differs from Keras beyond the tolerance (it is left as ``<output>.failed``);
            :class:`ConverterError` when the converter raised, crashed or hung (its child was stopped).
    """
    _check_request(model, output, format, quant, tolerance)
    output = Path(output)
    given = model if isinstance(model, (str, Path)) else None  # the child loads the same
    model, source = _load(model)
    check_finite(model)
    verify_data, calibration_data = _crops_for(
        model, format, quant, calibration, verify_limit, calibration_limit
    )
    report = ExportReport(
        status="failed",
        artifact=str(output),
        format=format,
        quantisation=quant,
        model={"source": source, "name": model.name, "parameters": int(model.count_params())},
        inputs={t.name: [None, *map(int, t.shape[1:])] for t in model.inputs},
        outputs=sorted(model.output_names),
    )
    try:
        _convert_verify_publish(
            model, given, output, report, verify_data, calibration_data, tolerance, opset, convert_timeout
        )
    except ConverterError as error:
        report.error = str(error)
        remove_path(output)  # an older export would not match this report
        _write_report(output, report)
        raise
    except (ExportError, KeyboardInterrupt):
        raise
    except Exception as error:
        report.error = f"{type(error).__name__}: {error}"
        remove_path(output)  # an older export would not match this report
        _write_report(output, report)
        raise ExportError(f"Converting to {format} failed: {type(error).__name__}: {error}") from error
    _write_report(output, report)
    if not report.passed:
        raise _verification_error(report, output)
    return report


def _check_request(model, output, format: str, quant: str, tolerance: float | None) -> None:
    """Refuse, before anything is loaded or written, what cannot be exported as asked."""
    if format not in FORMATS:
        raise ExportError(f"Unknown format {format!r}; choose one of: {', '.join(FORMATS)}.")
    if quant not in FORMAT_QUANTS[format]:
        raise ExportError(
            f"Quantisation {quant!r} is not available for {format}; choose one of: "
            f"{', '.join(FORMAT_QUANTS[format])}."
        )
    if tolerance is not None and not (np.isfinite(tolerance) and tolerance >= 0):
        raise ExportError(f"The tolerance must be a number >= 0, got {tolerance}.")
    _check_model_exists(model)
    _check_output(Path(output), format)
    if format == "coreml":
        from c3ae.export.coreml import CoreMLUnavailableError, _coremltools

        try:
            _coremltools()
        except CoreMLUnavailableError as error:
            raise ExportError(str(error)) from error


def _crops_for(model, format: str, quant: str, calibration, verify_limit: int, calibration_limit: int):
    """(verification crops, int8 calibration crops or None): from the manifest, else the bundled photos."""
    if format == "coreml":  # nothing can run it here: no crops needed
        verify_data = {"inputs": {}, "labels": {}, "source": "none (structural check only)"}
    elif calibration is not None:
        verify_data = manifest_crops(model, calibration, "verify", verify_limit)
    else:
        verify_data = asset_crops(model, seed=0)
    calibration_data = None
    if quant == "int8":
        calibration_data = (
            manifest_crops(model, calibration, "calibrate", calibration_limit, seed=1)
            if calibration is not None
            else asset_crops(model, seed=1)
        )
    return verify_data, calibration_data


def _convert_verify_publish(
    model,
    given,
    output: Path,
    report: ExportReport,
    verify_data,
    calibration_data,
    tolerance,
    opset,
    convert_timeout,
) -> None:
    """Convert to a temporary name, verify against Keras, and rename onto ``output`` only if it passes (a
    failing artifact is kept as ``<output>.failed``); fills ``report``."""
    format, quant = report.format, report.quantisation
    failed = output.with_name(output.name + FAILED_SUFFIX)
    started = time.perf_counter()
    with atomic_path(output) as temporary:
        report.update(
            _write_artifact(model, given, format, quant, temporary, calibration_data, opset, convert_timeout)
        )
        converted = time.perf_counter()
        report.size_bytes = _size(temporary)
        if calibration_data is not None:
            report.calibration = {
                "data": calibration_data["source"],
                "crops": int(len(next(iter(calibration_data["inputs"].values())))),
            }
        verification = _verify(model, format, quant, temporary, verify_data, tolerance)
        report.verification = verification
        report.seconds = {
            "convert": round(converted - started, 2),
            "verify": round(time.perf_counter() - converted, 2),
        }
        remove_path(failed)
        if verification["passed"]:
            report.status = "passed"
        else:  # kept for inspection under a name that does not look valid; nothing is published
            report.artifact = str(failed)
            os.replace(temporary, failed)
            remove_path(output)  # an older export would not match this report


def _verification_error(report: ExportReport, output: Path) -> VerificationError:
    """The error naming the first failing check of a report that did not pass."""
    first = next(c for c in report.verification["checks"] if not c["passed"])
    if isinstance(first["value"], float) and "minimum" in first:
        what = f"{first['check']} = {_fmt(first['value'])} < {_fmt(first['minimum'])}"
    elif isinstance(first["value"], float):
        what = f"{first['check']} = {_fmt(first['value'])} > {_fmt(first['limit'])}"
    elif isinstance(first["value"], str):
        what = f"failed check: {first['check']}: {first['value']}"
    else:
        what = f"failed check: {first['check']}"
    return VerificationError(
        f"{report.format} ({report.quantisation}) artifact failed verification on "
        f"{report.verification['crops']} crops ({what}); it was kept as {report.artifact} and the "
        f"numbers are in {report_path(output)}.",
        report,
    )


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _write_report(output: Path, report: ExportReport) -> None:
    from c3ae._version import __version__
    from c3ae.files import atomic_write_text

    report.c3ae_version = report.c3ae_version or __version__
    report.created = report.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_text(report_path(output), report.to_json())
