"""Age and gender of every face in a photo, in one call.

>>> from c3ae import AgeGenderEstimator                                 # doctest: +SKIP
>>> estimator = AgeGenderEstimator("c3ae-utk", backend="tflite")        # doctest: +SKIP
>>> [face.to_dict() for face in estimator.predict("assets/obama.jpg")]  # doctest: +SKIP
[{'box': [..], 'landmarks': {..}, 'detector_score': 0.99, 'age': 51.3, 'age_std': 6.1, 'gender': 'male',
  'gender_prob': 0.97}]

Images are a path or an H x W x 3 uint8 array in **BGR** channel order (OpenCV's: what ``cv2.imread`` and
``c3ae.faces.read_image`` return); grayscale (H x W) and BGRA arrays are converted. Faces go through the
one face pipeline of ``c3ae.faces`` (detect -> align -> crops), the same code that made the training crops.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from c3ae.bundled import DEFAULT_MODEL
from c3ae.conventions import AGE_BIN_WIDTH
from c3ae.errors import BrokenFileError, UsageError
from c3ae.faces import (
    DEFAULT_CHIP,
    LANDMARK_NAMES,
    AlignedFace,
    ChipSpec,
    Detection,
    FacePipeline,
    align_face,
    is_url,
    model_crops,
    read_image,
)

DEFAULT_FLIP = True  # mirror test-time augmentation: val MAE 6.36 -> 6.24 (mean of UTKFace and AAF, c3ae-utk)


class ModelOutputError(BrokenFileError):
    """A model whose outputs are not finite numbers (broken weights): no estimate beats a wrong one."""


GENDER_SUFFIX = "-gender"  # a bundled age-only model "x" may come with a gender model "x-gender"


@dataclass
class Face:
    """One face with its estimates; plain Python types throughout (``to_dict`` is JSON-ready).

    - ``box``: (x, y, w, h) in pixels of the input image.
    - ``landmarks``: ``{"left_eye": (x, y), "right_eye", "nose", "mouth_left", "mouth_right"}``, or None
      (the Haar detector has none).
    - ``detector_score``: the detector's confidence (Haar: 1.0).
    - ``age``: years. ``age_std``: the spread (standard deviation, years) of the model's predicted age
      distribution, the 12 bins at 0, 10, ..., 110 years (C3AE); None for models without one. C3AE's
      two-point encoding puts mass on two neighbouring bins, so even a confident estimate has a spread of up
      to 5 years; larger values mean a flatter, less certain distribution.
    - ``gender``: ``"male"`` or ``"female"``; ``gender_prob``: the probability of the stated gender (>= 0.5).

    Fields the model does not predict are None.
    """

    box: tuple[float, float, float, float]
    landmarks: dict[str, tuple[float, float]] | None
    detector_score: float
    age: float | None = None
    age_std: float | None = None
    gender: str | None = None
    gender_prob: float | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["box"] = list(self.box)
        if self.landmarks is not None:
            data["landmarks"] = {name: list(point) for name, point in self.landmarks.items()}
        return data

    @property
    def label(self) -> str:
        """The short label drawn on images: ``"34 F"``."""
        from c3ae.annotate import face_label

        return face_label(self.age, self.gender)


def age_spread(age_bins: np.ndarray) -> np.ndarray:
    """Standard deviation in years of each row of (N, K) age-bin probabilities, bins at 0, 10, 20, ..."""
    probs = np.clip(np.asarray(age_bins, dtype=np.float64), 0.0, None)
    probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
    centres = np.arange(probs.shape[1]) * AGE_BIN_WIDTH
    mean = probs @ centres
    return np.sqrt(np.maximum(probs @ centres**2 - mean**2, 0.0))


def _round(value: float, digits: int) -> float | None:
    """A plain float rounded to ``digits``; None for NaN or infinity (a broken model output)."""
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def _bucket(count: int, limit: int) -> int:
    """The batch size a chunk of ``count`` faces is padded to: the next power of two (at most ``limit``),
    so that backends see few distinct shapes (no retracing, no tensor reallocation per face count)."""
    return min(1 << max(count - 1, 0).bit_length(), max(limit, count))


class AgeGenderEstimator:
    """Detect every face of a photo, align it, and estimate age and gender in one batched model call.

    Args:
        model: a bundled model's name (``"c3ae-utk"``, see ``c3ae.bundled.available_models()``), a
            ``.keras``, ``.tflite`` or ``.onnx`` file, or a ``keras.Model``. A bundled age-only model ``X``
            is paired with the bundled gender model ``X-gender`` when there is one (SSR-Net).
        backend: ``"keras"``, ``"tflite"``, ``"onnx"`` or ``"auto"`` (the file's own format; a bundled
            name's shipped TFLite file when there is one; Keras otherwise). See ``c3ae.runtime.load_backend``.
        detector: ``"mtcnn"`` (5 landmarks, the training pipeline's) or ``"haar"`` (faster, frontal only).
        min_face: faces narrower or shorter than this many pixels are ignored. With MTCNN, values above 20
            also make detection faster: it searches a copy shrunk by 20 / min_face.
        gender_model: a separate gender model (same forms as ``model``); None = the bundled ``X-gender``
            pairing above; False = none.
        threads: CPU threads for the TFLite / ONNX runtimes.
        batch_size: the most faces per model call.
        pad_retry: when no face is found, search again on the image padded by this fraction (faces cut by
            the border, tight face crops; see ``c3ae.faces.FacePipeline``); 0 = never (video does this).
        flip: average each face's outputs with those of its mirror image (test-time augmentation: two
            model calls per batch; on by default because it lowers the age error, see the README's TTA
            ablation).

    Images: a path or an H x W x 3 uint8 array in **BGR** channel order (OpenCV's); grayscale and BGRA
    arrays are converted. Loading the model happens here; the detector is built on the first image.
    """

    def __init__(
        self,
        model=DEFAULT_MODEL,
        backend: str = "auto",
        detector: str = "mtcnn",
        min_face: int = 20,
        *,
        gender_model=None,
        threads: int | None = None,
        batch_size: int = 64,
        pad_retry: float = 0.25,
        flip: bool = DEFAULT_FLIP,
    ):
        from c3ae.faces import DETECTORS
        from c3ae.runtime import load_backend

        if detector not in DETECTORS:
            raise UsageError(f"Unknown detector {detector!r}; expected one of {', '.join(DETECTORS)}.")
        if int(min_face) < 1:
            raise UsageError(f"min_face must be at least 1 pixel, got {min_face}.")
        self.min_face = int(min_face)
        self.batch_size = max(int(batch_size), 1)
        self.flip = bool(flip)
        self.backends = [load_backend(model, backend, threads=threads)]
        if gender_model is None and "gender" not in self.backends[0].output_names:
            gender_model = _paired_gender_model(model)
        if gender_model:
            companion = load_backend(gender_model, backend, threads=threads)
            if "gender" not in companion.output_names:
                raise UsageError(f"The gender model {gender_model!r} has no 'gender' output.")
            self.backends.append(companion)
        outputs = {name for b in self.backends for name in b.output_names}
        if not outputs & {"age", "gender"}:
            raise UsageError(
                f"{model!r} predicts {sorted(outputs)}; the estimator needs an 'age' or a 'gender' output."
            )
        self.model_name = str(model) if isinstance(model, (str, Path)) else getattr(model, "name", "model")
        self.spec = _chip_spec(model, self.backends[0])
        self.pipeline = FacePipeline(detector, spec=self.spec, min_face=self.min_face, pad_retry=pad_retry)

    # ------------------------------------------------------------------------------------------ public API
    def predict(self, image) -> list[Face]:
        """Every face of one image (a path, or H x W x 3 uint8 BGR), most confident first; [] if none.

        Raises ``c3ae.faces.ImageReadError`` for a file that cannot be decoded.
        """
        return self.predict_many([image])[0]

    def predict_many(self, images: Iterable) -> list[list[Face]]:
        """The faces of each image; the faces of all images are estimated in batched model calls.

        ``images`` is a list of paths or arrays, or an (N, H, W, 3) array of N images; a single image
        is :meth:`predict`'s (a lone H x W [x 3] array here raises ``ValueError``)."""
        if isinstance(images, np.ndarray) and images.ndim < 4:
            raise UsageError(
                f"predict_many takes a list of images or an (N, H, W, 3) array; got one array of shape "
                f"{images.shape}: use predict(image) for a single image."
            )
        pictures = [self.read(image) for image in images]
        aligned = [self.align(picture, self.detect(picture)) for picture in pictures]
        flat = self.estimate_aligned([face for faces in aligned for face in faces])
        results, start = [], 0
        for faces in aligned:
            results.append(flat[start : start + len(faces)])
            start += len(faces)
        return results

    # ---------------------------------------------------------------------------------------- the stages
    @staticmethod
    def read(image) -> np.ndarray:
        """A path, encoded bytes or an array as an (H, W, 3) uint8 BGR array (``c3ae.faces.read_image``)."""
        return read_image(image)

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces of a BGR image at least ``min_face`` pixels wide and high, most confident first."""
        return [d for d in self.pipeline.detect(image) if min(d.width, d.height) >= self.min_face]

    def align(self, image: np.ndarray, detections: Sequence[Detection]) -> list[AlignedFace]:
        """Each detection warped onto the canonical chip (``c3ae.faces.align_face``)."""
        return [align_face(image, detection, self.spec) for detection in detections]

    def estimate_aligned(self, faces: Sequence[AlignedFace]) -> list[Face]:
        """Age and gender of aligned faces, in batched model calls (``batch_size`` faces at most)."""
        if not faces:
            return []
        outputs: dict[str, np.ndarray] = {}
        for backend in self.backends:
            if set(backend.output_names) <= set(outputs):
                continue
            for name, value in self._run(backend, faces).items():
                outputs.setdefault(name, value)  # the main model wins over a companion
        broken = sorted(n for n in ("age", "gender") if n in outputs and not np.all(np.isfinite(outputs[n])))
        if broken:
            raise ModelOutputError(
                f"The model {self.model_name} gave non-finite {' and '.join(broken)} (NaN or Inf): its "
                "weights are broken; re-export it, or reinstall c3ae for a bundled model."
            )
        return [self._face(i, face, outputs) for i, face in enumerate(faces)]

    # ------------------------------------------------------------------------------------------- helpers
    def _run(self, backend, faces: Sequence[AlignedFace]) -> dict[str, np.ndarray]:
        """One backend's outputs (float64) for the faces, ``batch_size`` at a time, each chunk padded to a
        power of two; with ``flip``, the mean of the outputs for the crops and for their mirror images."""
        layout, size = backend.info.crop_layout, backend.input_size
        parts: dict[str, list] = {}
        for start in range(0, len(faces), self.batch_size):
            chunk = faces[start : start + self.batch_size]
            context = self.spec.context
            crops = [model_crops(f.chip, f.boxes, f.single_box, layout, size, context) for f in chunk]
            feed = {}
            for name in backend.input_names:
                feed[name] = np.zeros((_bucket(len(crops), self.batch_size), size, size, 3), np.float32)
                feed[name][: len(crops)] = np.stack([c[name] for c in crops])
            results = {n: np.asarray(v, np.float64) for n, v in backend.predict(feed).items()}
            if self.flip:
                mirrored = backend.predict({n: crops[:, :, ::-1] for n, crops in feed.items()})
                results = {n: (v + np.asarray(mirrored[n], np.float64)) / 2 for n, v in results.items()}
            for name, value in results.items():
                parts.setdefault(name, []).append(value[: len(crops)])
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}

    @staticmethod
    def _face(index: int, aligned: AlignedFace, outputs: dict) -> Face:
        detection = aligned.detection
        x1, y1, x2, y2 = detection.box
        landmarks = None
        if detection.landmarks is not None:
            landmarks = {
                name: (_round(x, 1), _round(y, 1))
                for name, (x, y) in zip(LANDMARK_NAMES, detection.landmarks, strict=True)
            }
        face = Face(
            box=(_round(x1, 1), _round(y1, 1), _round(x2 - x1, 1), _round(y2 - y1, 1)),
            landmarks=landmarks,
            detector_score=_round(detection.score, 4),
        )
        if outputs.get("age") is not None:
            face.age = _round(outputs["age"][index].reshape(-1)[0], 2)
        if outputs.get("age_bins") is not None:
            face.age_std = _round(age_spread(outputs["age_bins"][index : index + 1])[0], 2)
        male = float(outputs["gender"][index].reshape(-1)[0]) if outputs.get("gender") is not None else None
        if male is not None and math.isfinite(male):
            male = min(max(male, 0.0), 1.0)
            face.gender = "male" if male >= 0.5 else "female"
            face.gender_prob = _round(male if male >= 0.5 else 1.0 - male, 4)
        return face

    def __repr__(self) -> str:
        return (
            f"AgeGenderEstimator(model={self.model_name!r}, backend={self.backends[0].name!r}, "
            f"detector={self.pipeline.detector_name!r}, min_face={self.min_face}, flip={self.flip})"
        )


def _paired_gender_model(model) -> str | None:
    if not isinstance(model, str) or Path(model).is_file():
        return None
    from c3ae.bundled import available_models

    name = f"{model}{GENDER_SUFFIX}"
    return name if name in available_models() else None


def _chip_spec(model, backend) -> ChipSpec:
    """The chip geometry the model was trained with, context window included: a bundled name's model card's,
    else the model's own description (``preprocessing.chip`` in a ``.tflite`` / ``.onnx`` file's c3ae
    metadata, a ``.keras`` model's ``preprocessing``), else the default. ``c3ae export`` writes the card's
    into every artifact, so a bundled model by name and a copy of its file by path agree. Values outside
    ``c3ae.export.metadata.CHIP_RANGES`` are refused in one sentence naming the key."""
    from c3ae.export.metadata import check_chip

    chip, origin = None, getattr(backend, "origin", "") or str(model)
    if isinstance(model, str) and not Path(model).is_file():
        from c3ae.bundled import ModelNotFoundError, model_card

        try:
            chip, origin = model_card(model).chip, f"the model card of {model}"
        except ModelNotFoundError:
            chip = None
    if chip is None:
        chip = ((getattr(backend, "metadata", None) or {}).get("preprocessing") or {}).get("chip")
    fields = {k: v for k, v in check_chip(chip, origin).items() if k in ChipSpec.__dataclass_fields__}
    return ChipSpec(**fields) if fields else DEFAULT_CHIP


# ------------------------------------------------------------------------------------------------- batches
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
CHUNK_PIXELS = 32_000_000  # predict_files adds no photo to a batch once it holds this many decoded pixels
WRITABLE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
CSV_COLUMNS = (
    "path",
    "face",
    "x",
    "y",
    "w",
    "h",
    "age",
    "age_std",
    "gender",
    "gender_prob",
    "detector_score",
)


def collect_images(paths: Iterable[str | Path], exclude: str | Path | None = None) -> list[tuple[Path, Path]]:
    """(file, name for its annotated copy) for every image given: files as they are (whatever their
    suffix), folders recursively (files with an image suffix, sorted), skipping anything under ``exclude``
    (the output folder). Raises FileNotFoundError for a path that does not exist."""
    exclude = Path(exclude).resolve() if exclude is not None else None
    found: list[tuple[Path, Path]] = []
    for given in paths:
        if isinstance(given, str) and is_url(given):
            raise UsageError(
                f"{given} is a URL; c3ae reads local files and downloads nothing: save the photo first."
            )
        path = Path(given)
        if path.is_file():
            found.append((path, Path(path.name)))
        elif path.is_dir():
            root = Path(path.resolve().name or "images")
            for file in sorted(path.rglob("*")):
                if not (file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES):
                    continue
                if exclude is not None and file.resolve().is_relative_to(exclude):
                    continue
                found.append((file, root / file.relative_to(path)))
        else:
            raise FileNotFoundError(f"{path} does not exist.")
    return found


def predict_files(
    estimator: AgeGenderEstimator,
    files: Sequence[tuple[Path, Path]],
    output_dir: str | Path | None = None,
    chunk: int = 8,
    on_skip=None,
):
    """Yield ``{"path": str, "faces": [Face, ...]}`` for each readable image of ``files`` (from
    :func:`collect_images`), up to ``chunk`` images per batched model call (fewer once they hold
    :data:`CHUNK_PIXELS` pixels: 36-megapixel photos, about 110 MB each decoded, are held one at a time, not
    eight); with ``output_dir`` also write an
    annotated copy (box and "34 F" label) there, under the file's name (folders mirrored), never over an
    input. Unreadable images are skipped: ``on_skip(path, reason, message)`` is called and nothing is
    yielded for them."""
    from c3ae.faces import ImageReadError

    output_dir = Path(output_dir) if output_dir is not None else None
    inputs = {file.resolve() for file, _ in files}
    used: set[Path] = set()
    pending = list(files)
    while pending:
        batch, pixels = [], 0
        while pending and len(batch) < max(int(chunk), 1) and pixels < CHUNK_PIXELS:
            file, name = pending.pop(0)
            try:
                image = read_image(file)
            except ImageReadError as error:
                if on_skip is not None:
                    on_skip(file, error.reason, str(error))
                continue
            batch.append((file, name, image))
            pixels += image.shape[0] * image.shape[1]
        if not batch:
            continue
        results = estimator.predict_many([image for _, _, image in batch])
        for (file, name, image), faces in zip(batch, results, strict=True):
            if output_dir is not None:
                target = _annotated_name(output_dir / name, used)
                if target.resolve() in inputs:
                    if on_skip is not None:
                        on_skip(file, "would_overwrite_input", f"{target} is an input; not overwritten")
                else:
                    _write_image(target, image, faces)
            yield {"path": str(file), "faces": faces}
        batch = image = None  # released before the next batch is decoded, not after


def _annotated_name(target: Path, used: set[Path]) -> Path:
    if target.suffix.lower() not in WRITABLE_SUFFIXES:
        target = target.with_suffix(".png")
    candidate, n = target, 2
    while candidate.resolve() in used:
        candidate = target.with_name(f"{target.stem}-{n}{target.suffix}")
        n += 1
    used.add(candidate.resolve())
    return candidate


def _write_image(target: Path, image: np.ndarray, faces: Sequence[Face]) -> None:
    """The annotated copy, written to a temporary name and renamed. Draws on ``image`` itself (the caller
    is done with it): no second full-size copy of a large photo."""
    import cv2

    from c3ae.annotate import draw_faces
    from c3ae.files import atomic_write_bytes

    ok, encoded = cv2.imencode(target.suffix.lower(), draw_faces(image, faces, copy=False))
    if not ok:
        raise OSError(f"OpenCV could not encode {target}.")
    atomic_write_bytes(target, encoded.data)


def csv_rows(results: Iterable[dict]) -> list[dict]:
    """One row per face (``CSV_COLUMNS``); an image without faces gets one row with empty face fields."""
    rows = []
    for result in results:
        if not result["faces"]:
            rows.append({"path": result["path"]})
        for index, face in enumerate(result["faces"]):
            x, y, w, h = face.box
            rows.append(
                {
                    "path": result["path"],
                    "face": index,
                    "x": x,
                    "y": y,
                    "w": w,
                    "h": h,
                    "age": face.age,
                    "age_std": face.age_std,
                    "gender": face.gender,
                    "gender_prob": face.gender_prob,
                    "detector_score": face.detector_score,
                }
            )
    return rows
