"""Throughput benchmarks: the input pipeline (with augmentation) and the training step, in images per second.

``c3ae bench data --data MANIFEST`` calls :func:`bench_data` and :func:`bench_train_step` and prints
:func:`format_bench_table`. Both return plain dicts of numbers and strings.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _onednn() -> bool:
    """Whether TensorFlow's oneDNN CPU kernels are on (its default on x86 Linux); off, CPU training is
    about 2.5 times slower."""
    return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").strip().lower() not in ("0", "false", "no", "off")


def _rates(sizes: Sequence[int], seconds: Sequence[float]) -> dict:
    per_batch = [n / max(t, 1e-9) for n, t in zip(sizes, seconds, strict=True)]
    total = max(sum(seconds), 1e-9)
    return {
        "images_per_s_median": float(statistics.median(per_batch)),
        "images_per_s_overall": float(sum(sizes) / total),
        "seconds": float(total),
        "images": int(sum(sizes)),
    }


def bench_data(
    manifest: str | Path,
    model: str = "c3ae",
    batch_size: int = 64,
    batches: int = 30,
    warmup: int = 5,
    augment: bool = True,
    split: str = "train",
    progress: bool = True,
) -> dict:
    """Images per second of :func:`c3ae.data.make_dataset` (shuffled, augmented by default) on this machine.

    The split is repeated, so a small one still gives ``batches`` timed batches after ``warmup`` untimed
    ones. Returns the median over batches of the per-batch rate and the overall rate.
    """
    from tqdm.auto import tqdm

    from c3ae.data import make_dataset

    if batches < 1 or warmup < 0:
        raise ValueError(f"Need batches >= 1 and warmup >= 0, got {batches} and {warmup}.")
    dataset = make_dataset(
        manifest, split=split, model=model, batch_size=batch_size, augment=augment, seed=0
    ).repeat()
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    sizes, seconds = [], []
    for _ in tqdm(range(batches), desc=f"data {model}", unit="batch", disable=not progress, leave=False):
        start = time.perf_counter()
        inputs, _ = next(iterator)
        seconds.append(time.perf_counter() - start)
        sizes.append(int(next(iter(inputs.values())).shape[0]))
    return {
        "bench": "data",
        "model": str(model),
        "augment": bool(augment),
        "batch_size": int(batch_size),
        "batches": int(batches),
        "cpus": _cpu_count(),
        "onednn": _onednn(),
        **_rates(sizes, seconds),
    }


def _random_batch(model, batch_size: int, rng) -> tuple[object, dict]:
    import numpy as np

    from c3ae.losses import two_point_encode

    def pixels(tensor):
        return rng.uniform(0, 255, (batch_size, *tensor.shape[1:])).astype(np.float32)

    if isinstance(model.input, dict):
        inputs = {name: pixels(tensor) for name, tensor in model.input.items()}
    else:
        inputs = pixels(model.inputs[0])
    ages = rng.uniform(1, 90, batch_size).astype(np.float32)
    targets = {}
    for name, output in zip(model.output_names, model.outputs, strict=True):
        width = int(output.shape[-1])
        if name == "age" or (name == "age_bins" and width == 1):
            targets[name] = ages.reshape(-1, 1)
        elif name == "age_bins" and width == 12:
            targets[name] = np.asarray(two_point_encode(ages), dtype=np.float32)
        elif name == "gender":
            targets[name] = rng.integers(0, 2, (batch_size, 1)).astype(np.float32)
        else:  # a distribution over classes (age_group, other bin layouts)
            targets[name] = np.eye(width, dtype=np.float32)[rng.integers(0, width, batch_size)]
    return inputs, targets


def _simple_losses(model) -> dict:
    import keras

    losses = {}
    for name in model.output_names:
        if name == "age":
            losses[name] = keras.losses.MeanAbsoluteError()
        elif name == "gender":
            losses[name] = keras.losses.BinaryCrossentropy()
        elif name == "age_bins":
            losses[name] = keras.losses.KLDivergence()
        else:
            losses[name] = keras.losses.CategoricalCrossentropy()
    return losses


def bench_train_step(
    model_name: str = "c3ae-se-gender",
    batch_size: int = 64,
    steps: int = 20,
    warmup: int = 3,
    progress: bool = True,
    seed: int = 0,
) -> dict:
    """Images per second of one ``train_on_batch`` of a registered model variant on random data.

    Compiled with Adam and simple losses (MAE on ``age``, KL divergence on ``age_bins``, binary
    cross-entropy on ``gender``, categorical cross-entropy on class outputs). The first ``warmup`` steps
    (graph tracing) are not timed. Returns the median per-step rate and the overall rate.
    """
    import keras
    import numpy as np
    from tqdm.auto import tqdm

    from c3ae.models import build_variant

    if steps < 1 or warmup < 0:
        raise ValueError(f"Need steps >= 1 and warmup >= 0, got {steps} and {warmup}.")
    model = build_variant(model_name)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=_simple_losses(model))
    inputs, targets = _random_batch(model, int(batch_size), np.random.default_rng(seed))
    for _ in range(warmup):
        model.train_on_batch(inputs, targets)
    seconds = []
    for _ in tqdm(range(steps), desc=f"train {model_name}", unit="step", disable=not progress, leave=False):
        start = time.perf_counter()
        model.train_on_batch(inputs, targets)
        seconds.append(time.perf_counter() - start)
    return {
        "bench": "train_step",
        "model": str(model_name),
        "batch_size": int(batch_size),
        "steps": int(steps),
        "parameters": int(model.count_params()),
        "cpus": _cpu_count(),
        "onednn": _onednn(),
        **_rates([int(batch_size)] * len(seconds), seconds),
    }


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    return "" if value is None else str(value).replace("|", "\\|")


def format_bench_table(rows: Sequence[Mapping]) -> str:
    """A markdown table of benchmark results: one row per dict, columns in first-seen key order."""
    rows = list(rows)
    if not rows:
        return ""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if c in ("bench", "model") else "---:" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ inference
def _file_size(model) -> int | None:
    path = Path(str(model))
    return path.stat().st_size if isinstance(model, (str, Path)) and path.is_file() else None


def _is_artifact(model) -> bool:
    """A .tflite or .onnx file: timed as it is, with the runtime alone (no TensorFlow)."""
    path = Path(str(model))
    return isinstance(model, (str, Path)) and path.suffix.lower() in (".tflite", ".onnx") and path.is_file()


def _keras_model_for_bench(model):
    """(keras model or None, label): a bundled name, a .keras file, a registered variant (untrained)."""
    path = Path(str(model))
    if _is_artifact(model):
        return None, path.name
    import keras

    if isinstance(model, keras.Model):
        return model, model.name
    from c3ae.bundled import ModelNotFoundError, load_model
    from c3ae.models import VARIANTS, build_variant

    try:
        return load_model(model), path.name if path.is_file() else str(model)
    except ModelNotFoundError:
        if str(model) in VARIANTS:
            return build_variant(str(model)), f"{model} (untrained)"
        raise


def _time_backend(backend, batch: int, runs: int, warmup: int, rng) -> dict:
    import numpy as np

    size = backend.input_size
    inputs = {n: rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32) for n in backend.input_names}
    for _ in range(warmup):
        backend.predict(inputs)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        backend.predict(inputs)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {"ms_per_face": 1000 * median / batch, "ms_per_batch": 1000 * median}


def bench_models(
    models: Sequence,
    backends: Sequence[str] = ("keras", "tflite", "onnx"),
    quants: Sequence[str] = ("none", "fp16", "dynamic", "int8"),
    batch_sizes: Sequence[int] = (1, 8),
    threads: Sequence[int] = (1, 2),
    runs: int = 200,
    warmup: int = 10,
    calibration: str | Path | None = None,
    progress: bool = True,
    seed: int = 0,
) -> list[dict]:
    """File size and per-face latency of each model per backend and quantisation (medians of ``runs`` calls).

    ``models``: bundled names, ``.keras`` files, registered variant names (untrained weights; latency and size
    do not depend on the weights) or ``.tflite`` / ``.onnx`` files (timed as they are). TFLite runs every
    quantisation in ``quants``; int8 is calibrated on ``calibration`` (a manifest) or the bundled photos.
    ONNX and Keras run fp32 only. Keras's thread count is TensorFlow's (fixed once TensorFlow starts), so
    its rows say ``threads: "tf"``. Inputs are float32 crops (latency does not depend on their content).
    A face is one set of crops (three for C3AE). Returns one dict per (model, backend, quant, threads, batch).
    """
    import numpy as np
    from tqdm.auto import tqdm

    from c3ae.runtime import BACKENDS, KerasBackend, load_backend

    if runs < 1 or warmup < 0:
        raise ValueError(f"Need runs >= 1 and warmup >= 0, got {runs} and {warmup}.")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"Unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}.")
    if not all(_is_artifact(model) for model in models):  # conversions ahead: they need TensorFlow
        from c3ae.export.tflite import QUANT_TYPES

        unknown = [q for q in quants if q not in QUANT_TYPES]
        if unknown:
            raise ValueError(f"Unknown quantisation {unknown[0]!r}; choose from {', '.join(QUANT_TYPES)}.")
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    for model in models:
        keras_model, label = _keras_model_for_bench(model)
        artifacts = []  # (backend, quant, bytes or None, size)
        if keras_model is None:
            kind = Path(str(model)).suffix.lower().lstrip(".")
            artifacts.append((kind, None, Path(str(model)).read_bytes()))
        else:
            artifacts += _convert_for_bench(keras_model, backends, quants, calibration)
        for backend_name, quant, data in artifacts:
            if backend_name == "keras":
                size = _file_size(model) or _keras_size(keras_model)
                backend = KerasBackend(keras_model)
                configs = [("tf", b) for b in batch_sizes]
            else:
                size = len(data)
                configs = [(t, b) for t in threads for b in batch_sizes]
            for thread_count, batch in tqdm(
                configs, desc=f"{label} {backend_name} {quant}", disable=not progress, leave=False
            ):
                if backend_name != "keras":
                    backend = _backend_from_bytes(load_backend, backend_name, data, thread_count)
                timing = _time_backend(backend, int(batch), int(runs), int(warmup), rng)
                rows.append(
                    {
                        "bench": "inference",
                        "model": label,
                        "backend": backend_name,
                        "quant": quant or backend.metadata.get("quantisation", "unknown"),
                        "size_kb": round(size / 1024, 1),
                        "threads": thread_count,
                        "batch": int(batch),
                        "ms_per_face": round(timing["ms_per_face"], 4),
                        "ms_per_batch": round(timing["ms_per_batch"], 4),
                        "runs": int(runs),
                    }
                )
    return rows


def _keras_size(model) -> int:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="c3ae-bench-") as folder:
        path = Path(folder) / "model.keras"
        model.save(path)
        return path.stat().st_size


def _backend_from_bytes(load_backend, kind: str, data: bytes, threads: int):
    import tempfile

    with tempfile.TemporaryDirectory(prefix="c3ae-bench-") as folder:
        path = Path(folder) / f"model.{kind}"
        path.write_bytes(data)
        return load_backend(path, kind, threads=int(threads))


def _convert_for_bench(model, backends, quants, calibration) -> list[tuple[str, str, bytes | None]]:
    artifacts: list[tuple[str, str, bytes | None]] = []
    for backend in backends:
        if backend == "keras":
            artifacts.append(("keras", "none", None))
        elif backend == "onnx":
            from c3ae.export.onnx import to_onnx

            artifacts.append(("onnx", "none", to_onnx(model)))
        elif backend == "tflite":
            from c3ae.export.tflite import to_tflite

            for quant in quants:
                representative = None
                if quant == "int8":
                    from c3ae.export.verify import asset_crops, manifest_crops

                    data = (
                        manifest_crops(model, calibration, "calibrate")
                        if calibration
                        else asset_crops(model, seed=1)
                    )
                    representative = [data["inputs"]]
                artifacts.append(("tflite", quant, to_tflite(model, quant, representative)))
    return artifacts
