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
import os
from collections.abc import Iterable, Iterator, Sequence, Sized
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
    crop_names,
    crop_stack,
    is_url,
    read_image,
)

DEFAULT_FLIP = True  # mirror test-time augmentation: val MAE 6.36 -> 6.24 (mean of UTKFace and AAF, c3ae-utk)


class ModelOutputError(BrokenFileError):
    """A model whose outputs are not finite numbers (broken weights): no estimate beats a wrong one."""


GENDER_SUFFIX = "-gender"  # a bundled age-only model "x" may come with a gender model "x-gender"


@dataclass
class Face:
    """One face with its estimates; plain Python types throughout (``to_dict`` is JSON-ready).

    - ``box``: (x, y, w, h) in pixels of the input image: the top-left corner, then width and height
      (JSON has it twice: ``"box_xywh"``, which names the format, and ``"box"``, kept for compatibility).
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
        data = {"box": list(self.box), "box_xywh": list(self.box), **asdict(self)}
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
        threads: CPU threads for the TFLite / ONNX runtimes (None: one per core up to 4 for TFLite,
            ONNX Runtime's own default for ONNX).
        batch_size: the most faces per model call.
        pad_retry: when no face is found, search again on the image padded by this fraction (faces cut by
            the border, tight face crops; see ``c3ae.faces.FacePipeline``); 0 = never (video does this).
        flip: average each face's outputs with those of its mirror image (test-time augmentation: the
            mirrored crops ride in the same model call, twice the batch; on by default because it lowers
            the age error, see the README's TTA ablation).
        min_score: faces the detector scores below this (0..1) are ignored, on the first search and on
            the padded retry alike. None (default): the detector's own thresholds, 0.9 and 0.8 on the
            retry. Haar's detections all score 1.0.
        workers: threads that decode and detect ahead in :meth:`predict_many` and
            :func:`predict_files` (None: one per CPU core; 1: one photo at a time, in the caller's thread).

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
        min_score: float | None = None,
        workers: int | None = None,
    ):
        from c3ae.faces import DETECTORS
        from c3ae.runtime import load_backend

        if detector not in DETECTORS:
            raise UsageError(f"Unknown detector {detector!r}; expected one of {', '.join(DETECTORS)}.")
        if int(min_face) < 1:
            raise UsageError(f"min_face must be at least 1 pixel, got {min_face}.")
        if min_score is not None and not 0.0 <= float(min_score) <= 1.0:
            raise UsageError(f"min_score is a detector score between 0 and 1, got {min_score}.")
        self.min_face = int(min_face)
        self.min_score = None if min_score is None else float(min_score)
        self.workers = None if workers is None else max(int(workers), 1)
        self.round_trip = True  # the chip's JPEG round trip, as the training shards store chips
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
        self._layouts = {id(b): b.info.crop_layout for b in self.backends}  # read once, not per call
        self.pipeline = FacePipeline(
            detector, spec=self.spec, min_face=self.min_face, pad_retry=pad_retry, min_score=self.min_score
        )

    # ------------------------------------------------------------------------------------------ public API
    def predict(self, image) -> list[Face]:
        """Every face of one image (a path, or H x W x 3 uint8 BGR), most confident first; [] if none.

        Raises ``c3ae.faces.ImageReadError`` for a file that cannot be decoded.
        """
        return self.predict_many([image])[0]

    def predict_many(self, images: Iterable) -> list[list[Face]]:
        """The faces of each image; the faces of all images are estimated in batched model calls.

        ``images`` is a list of paths or arrays, or an (N, H, W, 3) array of N images; a single image
        is :meth:`predict`'s (a lone H x W [x 3] array here raises ``ValueError``). Paths are decoded and
        searched for faces ahead, on ``workers`` threads (every core by default), in a bounded window of
        :data:`CHUNK_PIXELS` decoded pixels; the answers are those of one photo at a time."""
        if isinstance(images, np.ndarray) and images.ndim < 4:
            raise UsageError(
                f"predict_many takes a list of images or an (N, H, W, 3) array; got one array of shape "
                f"{images.shape}: use predict(image) for a single image."
            )
        images = list(images)
        if len(images) < 2 or self._worker_count() < 2:
            pictures = [self.read(image) for image in images]
            aligned = [self.align(picture, self.detect(picture)) for picture in pictures]
            flat = self.estimate_aligned([face for faces in aligned for face in faces])
            results, start = [], 0
            for faces in aligned:
                results.append(flat[start : start + len(faces)])
                start += len(faces)
            return results
        return [faces for _, _, faces in self.stream(images, chunk=len(images))]

    def stream(
        self, images: Iterable, chunk: int = 8, keep_images: bool = False, on_error=None
    ) -> Iterator[tuple[object, np.ndarray | None, list[Face]]]:
        """``(source, image or None, faces)`` for each of ``images``, in order, as soon as its batch is done.

        ``workers`` threads decode and detect ahead (:class:`_Prepared`); the faces of up to ``chunk``
        photos go through the model together. ``keep_images`` hands each decoded photo back (to annotate
        it), else None. A photo that cannot be read raises its ``ImageReadError``, or with ``on_error``
        that is called with ``(source, error)`` and the photo is left out. Closing the generator (or
        Ctrl-C in the caller) stops the work ahead."""
        workers = self._worker_count()
        if isinstance(images, Sized):
            workers = min(workers, max(len(images), 1))  # one photo: no thread, no second detector
        prepared = _Prepared(self, images, workers, keep_images)
        try:
            batch: list[_Item] = []
            for item in prepared:
                if item.error is not None:
                    if on_error is None:
                        raise item.error
                    on_error(item.source, item.error)
                    continue
                batch.append(item)
                if len(batch) >= max(int(chunk), 1) or prepared.held >= CHUNK_PIXELS:
                    yield from self._finish(batch, prepared)
                    batch = []
            yield from self._finish(batch, prepared)
        finally:
            prepared.close()

    def _finish(self, batch: list[_Item], prepared: _Prepared):
        """The model's answers for a batch of prepared photos, one ``stream`` tuple per photo."""
        flat = self.estimate_aligned([face for item in batch for face in item.faces])
        start = 0
        for item in batch:
            faces = flat[start : start + len(item.faces)]
            start += len(item.faces)
            image = item.image
            prepared.release(item)
            yield item.source, image, faces

    def _worker_count(self) -> int:
        if self.workers is not None:
            return self.workers
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1

    # ---------------------------------------------------------------------------------------- the stages
    @staticmethod
    def read(image) -> np.ndarray:
        """A path, encoded bytes or an array as an (H, W, 3) uint8 BGR array (``c3ae.faces.read_image``)."""
        return read_image(image)

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces of a BGR image at least ``min_face`` pixels wide and high (and scored at least
        ``min_score``), most confident first. Their boxes are (x1, y1, x2, y2), the detector's."""
        return [d for d in self.pipeline.detect(image) if min(d.width, d.height) >= self.min_face]

    def align(self, image: np.ndarray, detections: Sequence[Detection]) -> list[AlignedFace]:
        """Each detection warped onto the canonical chip (``c3ae.faces.align_face``)."""
        return [align_face(image, detection, self.spec, self.round_trip) for detection in detections]

    def estimate_aligned(self, faces: Sequence[AlignedFace]) -> list[Face]:
        """Age and gender of aligned faces, in batched model calls (``batch_size`` faces at most)."""
        if not faces:
            return []
        outputs: dict[str, np.ndarray] = {}
        crops: dict = {}
        for backend in self.backends:
            if set(backend.output_names) <= set(outputs):
                continue
            for name, value in self._run(backend, faces, crops).items():
                outputs.setdefault(name, value)  # the main model wins over a companion
        broken = sorted(n for n in ("age", "gender") if n in outputs and not np.all(np.isfinite(outputs[n])))
        if broken:
            raise ModelOutputError(
                f"The model {self.model_name} gave non-finite {' and '.join(broken)} (NaN or Inf): its "
                "weights are broken; re-export it, or reinstall c3ae for a bundled model."
            )
        return [self._face(i, face, outputs) for i, face in enumerate(faces)]

    # ------------------------------------------------------------------------------------------- helpers
    def _run(self, backend, faces: Sequence[AlignedFace], crops: dict | None = None) -> dict[str, np.ndarray]:
        """One backend's outputs (float64) for the faces, ``batch_size`` at a time, each chunk padded to a
        power of two; with ``flip``, the mean of the outputs for the crops and for their mirror images,
        which ride in the same call (the second half of the batch). ``crops`` caches each layout's
        (N, K, S, S, 3) uint8 crops between backends."""
        layout, size = self._layouts[id(backend)], backend.input_size
        crops = {} if crops is None else crops
        if (layout, size) not in crops:
            names = crop_names(layout)
            stack = np.empty((len(faces), len(names), size, size, 3), np.uint8)
            for face, out in zip(faces, stack, strict=True):
                crop_stack(face.chip, face.boxes, face.single_box, layout, size, self.spec.context, out)
            crops[layout, size] = stack
        stack, names = crops[layout, size], crop_names(layout)
        copies = 2 if self.flip else 1
        parts: dict[str, list] = {}
        for start in range(0, len(faces), self.batch_size):
            chunk = stack[start : start + self.batch_size]
            count = len(chunk)
            rows = _bucket(copies * count, copies * self.batch_size)
            # (K, rows, S, S, 3): each input's batch is one contiguous block
            feed = np.zeros((len(names), rows, size, size, 3), np.float32)
            feed[:, :count] = chunk.transpose(1, 0, 2, 3, 4)
            if self.flip:
                feed[:, count : 2 * count] = feed[:, :count, :, ::-1]
            outputs = backend.predict({name: feed[k] for k, name in enumerate(names)})
            for name, value in outputs.items():
                value = np.asarray(value, np.float64)
                if self.flip:
                    value = (value[:count] + value[count : 2 * count]) / 2
                parts.setdefault(name, []).append(value[:count])
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


@dataclass
class _Item:
    """One photo of :meth:`AgeGenderEstimator.stream`, prepared by a worker thread."""

    source: object
    image: np.ndarray | None
    faces: list  # AlignedFace
    error: Exception | None
    pixels: int  # counted against CHUNK_PIXELS until released


class _Prepared:
    """The photos of ``sources``, decoded, searched and aligned on ``workers`` threads ahead of the caller,
    handed out in order. At most ``2 * workers + 1`` photos are in flight, and no new one starts while
    those in flight and those handed out with their pixels (``keep_images``) hold :data:`CHUNK_PIXELS`
    decoded pixels (sizes read from the file's header): the next one always starts, so a photo larger
    than the bound still goes through, alone."""

    def __init__(self, estimator: AgeGenderEstimator, sources: Iterable, workers: int, keep_images: bool):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.estimator, self.keep_images = estimator, keep_images
        self.sources = iter(sources)
        self.window = 2 * workers + 1 if workers > 1 else 1
        self.queue: deque = deque()
        self.held = 0  # pixels in flight, or handed out and not yet released
        # One worker: each photo in the caller's thread, when it is asked for, with the estimator's detector.
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="c3ae-predict") if workers > 1 else None
        self.done = False

    def _prepare(self, source) -> tuple[np.ndarray | None, list, Exception | None]:
        from c3ae.faces import ImageReadError

        estimator = self.estimator
        try:
            image = estimator.read(source)
        except ImageReadError as error:
            return None, [], error
        # The workers share the estimator's detector: each of its networks runs one call at a time (on its
        # own LiteRT threads), while the others resample, suppress, align and decode. A detector per worker
        # was measured too: no faster on 2 cores, and 170 MB more per worker for 600-px photos (P-Net keeps
        # an interpreter per pyramid level).
        detections = estimator.detect(image)
        return (image if self.keep_images else None), estimator.align(image, detections), None

    def _fill(self) -> None:
        while (
            not self.done and len(self.queue) < self.window and (not self.queue or self.held < CHUNK_PIXELS)
        ):
            source = next(self.sources, _Prepared)
            if source is _Prepared:
                self.done = True
                break
            pixels = _header_pixels(source)
            self.held += pixels
            job = self.pool.submit(self._prepare, source) if self.pool else _Later(self._prepare, source)
            self.queue.append((source, pixels, job))

    def __iter__(self) -> _Prepared:
        return self

    def __next__(self) -> _Item:
        self._fill()
        if not self.queue:
            raise StopIteration
        source, pixels, future = self.queue.popleft()
        try:
            image, faces, error = future.result()
        except BaseException:
            self.held -= pixels
            raise
        item = _Item(source, image, faces, error, pixels)
        if image is None:
            self.release(item)
        self._fill()
        return item

    def release(self, item: _Item) -> None:
        """``item``'s photo is done with: its pixels no longer count."""
        self.held -= item.pixels
        item.pixels, item.image = 0, None

    def close(self) -> None:
        """No new photo starts; those being read finish in the background."""
        self.done = True
        for _, _, future in self.queue:
            future.cancel()
        self.queue.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


class _Later:
    """A job run in the caller's thread when its result is asked for (a future without a pool)."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def result(self):
        return self.function(*self.args)

    def cancel(self) -> bool:
        return True


def _header_pixels(source) -> int:
    """Pixels of a photo, from its header (a file or encoded bytes) or its shape (an array), at least 1.

    A size the header does not tell counts as the whole bound (:data:`CHUNK_PIXELS`): such a photo is read
    alone, since it may be of any size."""
    if isinstance(source, np.ndarray):
        return max(int(np.prod(source.shape[:2])), 1)
    if not isinstance(source, (str, Path, bytes)):
        return CHUNK_PIXELS
    try:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return max(int(image.width) * int(image.height), 1)
    except Exception:  # unreadable here: the worker reads it (or says why) alone
        return CHUNK_PIXELS


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
    :func:`collect_images`), in order, up to ``chunk`` images per batched model call; the estimator's
    ``workers`` threads decode and detect ahead (:meth:`AgeGenderEstimator.stream`), holding at most about
    :data:`CHUNK_PIXELS` decoded pixels (36-megapixel photos, about 110 MB each decoded, are held one at a
    time, not eight); with ``output_dir`` also write an
    annotated copy (box and "34 F" label) there, under the file's name (folders mirrored), never over an
    input. Unreadable images are skipped: ``on_skip(path, reason, message)`` is called and nothing is
    yielded for them."""
    output_dir = Path(output_dir) if output_dir is not None else None
    inputs = {file.resolve() for file, _ in files}
    used: set[Path] = set()
    names = {id(file): name for file, name in files}

    def skipped(file, error) -> None:
        if on_skip is not None:
            on_skip(file, error.reason, str(error))

    sources = [file for file, _ in files]
    stream = estimator.stream(sources, chunk, keep_images=output_dir is not None, on_error=skipped)
    try:
        for file, image, faces in stream:
            if output_dir is not None:
                target = _annotated_name(output_dir / names[id(file)], used)
                if target.resolve() in inputs:
                    if on_skip is not None:
                        on_skip(file, "would_overwrite_input", f"{target} is an input; not overwritten")
                else:
                    _write_image(target, image, faces)
            image = None  # released before the next photo is handed out
            yield {"path": str(file), "faces": faces}
    finally:
        stream.close()


def _annotated_name(target: Path, used: set[Path]) -> Path:
    """The name of an annotated copy: ``target`` (``.png`` for a suffix OpenCV cannot write), else
    ``<stem>-2``, ``-3``, ...: never a name this run used (``used``, updated) nor an existing file that no
    c3ae run wrote (a user's ``party.png`` beside ``party.gif``; :func:`c3ae.files.replaceable_output`)."""
    from c3ae.files import replaceable_output

    if target.suffix.lower() not in WRITABLE_SUFFIXES:
        target = target.with_suffix(".png")
    candidate, n = target, 2
    while candidate.resolve() in used or not replaceable_output(candidate):
        candidate = target.with_name(f"{target.stem}-{n}{target.suffix}")
        n += 1
    used.add(candidate.resolve())
    return candidate


def _write_image(target: Path, image: np.ndarray, faces: Sequence[Face]) -> None:
    """The annotated copy, written to a temporary name and renamed, and recorded in its folder's
    :data:`c3ae.files.OUTPUTS_MARKER`. Draws on ``image`` itself (the caller is done with it): no second
    full-size copy of a large photo."""
    import cv2

    from c3ae.annotate import draw_faces
    from c3ae.files import atomic_write_bytes, record_output

    ok, encoded = cv2.imencode(target.suffix.lower(), draw_faces(image, faces, copy=False))
    if not ok:
        raise OSError(f"OpenCV could not encode {target}.")
    target.parent.mkdir(parents=True, exist_ok=True)
    record_output(target)  # a later run may replace it: it is ours
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
