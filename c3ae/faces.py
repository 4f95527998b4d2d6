"""The one face pipeline: read -> detect -> align -> boxes -> crops.

Preprocessing (``c3ae preprocess``), the training data pipeline (``c3ae.data``) and inference all go through
these functions, so training crops and inference crops cannot drift apart:

1. :func:`read_image` decodes any photo (EXIF orientation, grayscale, 16-bit, RGBA, CMYK) to BGR uint8.
2. A detector (:class:`MTCNNDetector`, or :class:`HaarDetector` without landmarks) finds faces.
3. :func:`align_face` warps each face with a 5-point similarity transform onto a canonical template in a
   square "chip" (160x160 by default, the face box spanning 40% of its width), passes the chip through the
   JPEG round trip that training shards store (so inference sees the very pixels training saw), and maps the
   face box and landmarks into chip coordinates.
4. :func:`triple_boxes` (C3AE's outer/middle/inner, as the reference ``gen_boundbox``) and :func:`single_box`
   (face box grown by a margin) are computed on the chip.
5. :func:`crop` cuts a box out of the chip and resizes it to the model's input size, zero-padding where the
   box leaves the chip.

All boxes are (x1, y1, x2, y2) in pixels; all images are BGR uint8; crops fed to models are float32 BGR in
[0, 255] (see ``c3ae.conventions``).
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from c3ae.detector import DEFAULT_MAX_SIDE
from c3ae.errors import C3AEError, UsageError
from c3ae.litert import rebuild_after_fork, stderr_lock
from c3ae.models.spec import CROP_LAYOUTS, TRIPLE

EXIF_ORIENTATION = 0x0112
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
NOSE = LANDMARK_NAMES.index("nose")
CROP_NAMES = TRIPLE  # the order of the boxes in a manifest row, and of the model inputs

# Median MTCNN landmark positions in units of the MTCNN face box (0..1 across x1..x2 and y1..y2), measured on
# UTKFace and made left-right symmetric; MTCNN boxes are about 1.3 times taller than wide.
TEMPLATE_IN_BOX = np.array(
    [[0.27, 0.366], [0.73, 0.366], [0.50, 0.577], [0.28, 0.73], [0.72, 0.73]], dtype=np.float64
)
BOX_ASPECT = 1.3


class ImageReadError(C3AEError, ValueError):
    """A file that cannot be decoded as an image; ``reason`` is a short machine-friendly tag."""

    def __init__(self, path: str | Path, reason: str, detail: str = ""):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason.replace('_', ' ')}{': ' + detail if detail else ''}")


MAX_PIXELS = 100_000_000  # photos above 100 megapixels are refused before they are decoded


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(text: str) -> bool:
    """True for ``scheme://...`` (http, https, s3, ...): not a local path."""
    return bool(_URL.match(text))


def read_image(source: str | Path | bytes | np.ndarray, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Decode a photo to an (H, W, 3) uint8 BGR array.

    Accepts a path, encoded bytes, a PIL image (RGB, as PIL holds it), or an array (H x W, H x W x 1/3/4;
    arrays are taken as BGR[A], as OpenCV returns them). A URL is refused: nothing is downloaded. Applies
    the EXIF orientation; converts grayscale, palette, RGBA, CMYK and 16-bit images. Raises
    :class:`ImageReadError` for missing, empty, corrupt or truncated files, and (reason ``too_large``, read
    from the header, before decoding) for files over ``max_pixels`` pixels.
    """
    if isinstance(source, np.ndarray):
        return _array_to_bgr(source, "array")
    if hasattr(source, "getbands") and hasattr(source, "convert"):  # a PIL image, already decoded
        return _pil_to_bgr(source)
    if isinstance(source, str) and is_url(source):
        raise ImageReadError(
            source, "is_a_url", "c3ae reads local files and downloads nothing; save the photo first"
        )
    import io
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    name = "bytes" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes):
        path = Path(source)
        if path.is_dir():
            raise ImageReadError(path, "is_a_folder", "give an image file")
        if not path.is_file():
            raise ImageReadError(path, "missing_file")
        if path.stat().st_size == 0:
            raise ImageReadError(path, "empty_file")
        try:
            data = path.read_bytes()
        except PermissionError as error:
            raise ImageReadError(path, "permission_denied", "check the file's permissions") from error
        except OSError as error:
            raise ImageReadError(path, "unreadable_file", error.strerror or str(error)) from error
    else:
        data = source
    try:
        with warnings.catch_warnings():  # our own limit applies, below PIL's "decompression bomb" one
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        with image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise _too_large(
                    name, f"{image.width} x {image.height} = {image.width * image.height}", max_pixels
                )
            if _whole_jpeg(image, data):
                # OpenCV decodes straight to BGR (and applies the EXIF orientation): a third of PIL's time
                # and memory for camera photos, the same pixels (both are libjpeg-turbo).
                decoded, warning = _imdecode_jpeg(data)
                if warning is not None:
                    raise ImageReadError(name, "corrupt_image", warning)
                if decoded is not None:
                    return decoded
            image.load()
            if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
                image = ImageOps.exif_transpose(image)
            return _pil_to_bgr(image)
    except ImageReadError:
        raise
    except UnidentifiedImageError as error:
        raise ImageReadError(name, "not_an_image") from error
    except Image.DecompressionBombError as error:  # PIL's own limit, at twice its MAX_IMAGE_PIXELS
        found = re.search(r"\((\d+) pixels\)", str(error))
        raise _too_large(name, found.group(1) if found else "too many", max_pixels or MAX_PIXELS) from error
    except (OSError, SyntaxError, ValueError) as error:
        reason = "truncated_image" if "truncated" in str(error).lower() else "corrupt_image"
        raise ImageReadError(name, reason, str(error)) from error


def _whole_jpeg(image, data: bytes) -> bool:
    """A colour or grey JPEG that ends with its end-of-image marker (OpenCV would decode a truncated one
    without a word; PIL reports it)."""
    return image.format == "JPEG" and image.mode in ("RGB", "L") and data.rstrip(b"\0")[-2:] == b"\xff\xd9"


# libjpeg's warnings for scan data that does not decode as written (jerror.h): it prints the first one to
# stderr and decodes on, filling the rest of the photo with grey or garbage. Stray bytes before a marker
# ("extraneous bytes") and odd metadata are not among them: some cameras write those in good photos.
_CORRUPT_JPEG = re.compile(
    r"Corrupt JPEG data: (premature end of data segment|bad Huffman code|bad arithmetic code|found marker)"
    r"|Premature end of JPEG file"
)
_CAPTURE: dict[int, object] = {}  # process id -> the temporary file libjpeg's stderr goes to


def _imdecode_jpeg(data: bytes) -> tuple[np.ndarray | None, str | None]:
    """``cv2.imdecode`` of a JPEG and libjpeg's corrupt-data warning, if it gave one.

    OpenCV decodes a JPEG damaged in its middle without a word (libjpeg prints its warning to the process's
    stderr), so file descriptor 2 goes to a temporary file during the call (under a lock) and whatever else
    was written there meanwhile is passed on.
    """
    buffer = np.frombuffer(data, np.uint8)
    with stderr_lock():  # shared with c3ae.litert: fd 2 is the process's; a fork waits for it
        try:
            capture = _CAPTURE.get(os.getpid())
            if capture is None:
                capture = _CAPTURE[os.getpid()] = tempfile.TemporaryFile()
            capture.seek(0)
            capture.truncate()
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no usable stderr (a daemon): decode without the check
            return cv2.imdecode(buffer, cv2.IMREAD_COLOR), None
        try:
            os.dup2(capture.fileno(), 2)
            decoded = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read().decode("utf-8", "replace")
    warning = None
    passed_on = []
    for line in text.splitlines(keepends=True):
        if warning is None and _CORRUPT_JPEG.search(line):
            warning = line.strip()
        else:
            passed_on.append(line)
    if passed_on:
        os.write(2, "".join(passed_on).encode())
    return decoded, warning


def _too_large(name: str, pixels: str, limit: int) -> ImageReadError:
    return ImageReadError(
        name, "too_large", f"{pixels} pixels, over the limit of {limit / 1e6:.0f} megapixels"
    )


def _pil_to_bgr(image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8)
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        rgba = np.asarray(image, dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        rgb = rgba[..., :3] * alpha  # composite on black, like the zero padding of crops
        return np.ascontiguousarray(rgb[..., ::-1].round().astype(np.uint8))
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    mode = "BGR" if image.mode == "RGB" else "L"
    # PIL writes the channels in BGR order itself: one copy of the pixels, not three.
    pixels = np.frombuffer(bytearray(image.tobytes("raw", mode)), np.uint8)
    if mode == "L":
        return cv2.cvtColor(pixels.reshape(image.height, image.width), cv2.COLOR_GRAY2BGR)
    return pixels.reshape(image.height, image.width, 3)


def _warn_if_unit_range(array: np.ndarray) -> None:
    """A float image whose values all lie in [0, 1] would turn black as uint8 [0, 255]: say so once."""
    import warnings

    if np.issubdtype(array.dtype, np.floating) and float(np.nanmax(array)) <= 1.0:
        warnings.warn(
            "The image is float with values in [0, 1]; c3ae takes uint8 BGR pixels in [0, 255] (H x W x 3, "
            "what cv2.imread returns): multiply by 255 and convert to uint8 first.",
            UserWarning,
            stacklevel=4,
        )


def _array_to_bgr(array: np.ndarray, name: str) -> np.ndarray:
    if array.size == 0:
        raise ImageReadError(name, "empty_image")
    if array.dtype == np.uint16:
        array = (array.astype(np.float64) * (255.0 / 65535.0)).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        _warn_if_unit_range(array)
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1):
        return cv2.cvtColor(array.reshape(array.shape[:2]), cv2.COLOR_GRAY2BGR)
    if array.ndim == 3 and array.shape[2] == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2BGR)
    if array.ndim == 3 and array.shape[2] == 3:
        return np.ascontiguousarray(array)
    raise ImageReadError(name, "bad_shape", f"expected H x W [x 1|3|4], got {array.shape}")


# ------------------------------------------------------------------------------------------------ detection
@dataclass
class Detection:
    """One detected face in photo coordinates: plain Python numbers, JSON-serialisable."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    score: float  # detector confidence in [0, 1] (Haar: 1.0, it has none)
    landmarks: tuple[tuple[float, float], ...] | None = None  # 5 (x, y) points in LANDMARK_NAMES order

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    def to_dict(self) -> dict:
        return asdict(self)


class MTCNNDetector:
    """MTCNN on LiteRT (:mod:`c3ae.detector`): the ``mtcnn`` package's networks and steps, without
    TensorFlow. Photos whose longer side exceeds ``max_side`` are searched on a downscaled copy; boxes and
    landmarks come back in the photo's pixels."""

    name = "mtcnn"

    def __init__(
        self,
        min_face: int = 20,
        min_score: float = 0.9,
        max_side: int | None = DEFAULT_MAX_SIDE,
        threads: int | None = None,
    ):
        from c3ae.detector import MTCNN

        self.min_face = int(min_face)
        self.min_score = float(min_score)
        self._mtcnn = MTCNN(min_face=self.min_face, max_side=max_side, threads=threads)

    @property
    def max_side(self) -> int | None:
        return self._mtcnn.max_side

    def detect(self, image_bgr: np.ndarray, min_score: float | None = None) -> list[Detection]:
        """Faces in a BGR uint8 image, most confident first; ``min_score`` overrides the threshold."""
        min_score = self.min_score if min_score is None else float(min_score)
        detections = []
        for row in self._mtcnn.detect(image_bgr):
            x1, y1, x2, y2, score = (float(v) for v in row[:5])
            if score < min_score or min(x2 - x1, y2 - y1) < self.min_face:
                continue
            points = tuple((float(x), float(y)) for x, y in zip(row[5:10], row[10:15], strict=True))
            detections.append(Detection((x1, y1, x2, y2), score, points))
        return sorted(detections, key=lambda d: -d.score)


class HaarDetector:
    """OpenCV's frontal-face Haar cascade: faster, frontal faces only, no landmarks (score 1.0)."""

    name = "haar"

    def __init__(self, min_face: int = 20, min_neighbors: int = 5):
        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise RuntimeError(f"OpenCV's Haar cascade could not be loaded from {path}.")
        self.min_face = int(min_face)
        self.min_neighbors = int(min_neighbors)
        self._lock = threading.Lock()  # a cascade keeps scratch buffers: one call at a time
        rebuild_after_fork(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # a forked child gets the lock free, whoever held it in the parent

    def detect(self, image_bgr: np.ndarray, min_score: float | None = None) -> list[Detection]:
        """Faces in a BGR uint8 image, largest first (``min_score`` is accepted and ignored)."""
        gray = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY)
        with self._lock:
            faces = self._cascade.detectMultiScale(
                gray, scaleFactor=1.1, minNeighbors=self.min_neighbors, minSize=(self.min_face, self.min_face)
            )
        detections = [
            Detection(_haar_to_mtcnn_box(float(x), float(y), float(w), float(h)), 1.0, None)
            for x, y, w, h in faces
        ]
        return sorted(detections, key=lambda d: -(d.width * d.height))


def _haar_to_mtcnn_box(x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
    # Haar boxes are square and sit a little higher and tighter than MTCNN's; stretch them to MTCNN's aspect
    # so the same template and triple boxes apply.
    cx, cy = x + w / 2, y + h * 0.55
    height = w * BOX_ASPECT
    return (cx - w / 2, cy - height / 2, cx + w / 2, cy + height / 2)


DETECTORS = {"mtcnn": MTCNNDetector, "haar": HaarDetector}


def box_detection(box, score: float = 0.0) -> Detection:
    """A landmark-free detection from a known face box (a dataset's own box), stretched to MTCNN's aspect
    around its centre so the same template and triple boxes apply."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return Detection(_haar_to_mtcnn_box(x1, y1 + (y2 - y1) * -0.05, x2 - x1, y2 - y1), score, None)


def full_image_detection(image: np.ndarray) -> Detection:
    """The face of an image that is already a tight face crop (UTKFace, AFAD, MegaAge-Asian chips): the box
    MTCNN finds on such crops, 82% of the width and 1.3 times as tall, centred. Score 0: not detected."""
    height, width = image.shape[:2]
    face_width = 0.82 * width
    face_height = BOX_ASPECT * face_width
    cx, cy = width / 2, height / 2
    return Detection(
        (cx - face_width / 2, cy - face_height / 2, cx + face_width / 2, cy + face_height / 2), 0.0, None
    )


def _shift(detection: Detection, offset: float) -> Detection:
    """The same detection moved by ``offset`` pixels along both axes."""
    x1, y1, x2, y2 = detection.box
    points = detection.landmarks
    if points is not None:
        points = tuple((x + offset, y + offset) for x, y in points)
    return Detection((x1 + offset, y1 + offset, x2 + offset, y2 + offset), detection.score, points)


def make_detector(name: str = "mtcnn", **options):
    """A detector by name: ``"mtcnn"`` (5 landmarks) or ``"haar"`` (faster, frontal only, no landmarks)."""
    if name not in DETECTORS:
        raise UsageError(f"Unknown detector {name!r}; expected one of {', '.join(DETECTORS)}.")
    return DETECTORS[name](**options)


# ------------------------------------------------------------------------------------------------ alignment
@dataclass(frozen=True)
class ChipSpec:
    """Geometry of the aligned chip and of the crops cut from it; recorded in every manifest."""

    size: int = 160  # chip side in pixels
    face_width: float = 0.4  # width of the aligned face box as a fraction of the chip side
    jpeg_quality: int = 95  # quality of the stored chips, and of the round trip at inference
    crop_size: int = 64  # C3AE / SSR-Net input side
    single_margin: float = 0.4  # single-crop margin, fraction of the face box's width and height per side
    # Side of the visible window around the face, in widths of the inner box (centred on it); chip pixels
    # outside are zeroed before cropping. 0 keeps everything. Face-crop datasets (UTKFace) show about 1.2
    # inner-box widths and black beyond; a model trained on them should see the same window in the wild.
    context: float = 0.0

    def __post_init__(self):
        if (
            self.size < 16
            or not 0.05 <= self.face_width <= 1.0
            or not 1 <= self.jpeg_quality <= 100
            or self.context < 0
        ):
            raise UsageError(f"Impossible chip geometry: {self}.")

    def template(self) -> np.ndarray:
        """The 5 canonical landmark positions in chip pixels."""
        width = self.size * self.face_width
        height = width * BOX_ASPECT
        x1, y1 = (self.size - width) / 2, (self.size - height) / 2
        return np.column_stack([x1 + TEMPLATE_IN_BOX[:, 0] * width, y1 + TEMPLATE_IN_BOX[:, 1] * height])

    def to_dict(self) -> dict:
        record = asdict(self)
        if not self.context:  # a crop-time setting: manifests written before it existed stay valid
            del record["context"]
        return record


DEFAULT_CHIP = ChipSpec()


@dataclass
class AlignedFace:
    """A face warped onto the canonical chip, with its boxes in chip coordinates (x1, y1, x2, y2)."""

    chip: np.ndarray  # (S, S, 3) uint8 BGR, after the JPEG round trip
    chip_jpeg: bytes  # the stored form of ``chip``
    box: np.ndarray  # (4,) float32, the face box in the chip
    landmarks: np.ndarray  # (5, 2) float32, in the chip (estimated from the template for Haar)
    boxes: np.ndarray  # (3, 4) float32, C3AE's outer, middle, inner
    single_box: np.ndarray  # (4,) float32
    detection: Detection  # in photo coordinates
    transform: np.ndarray = field(repr=False)  # (2, 3) photo -> chip


_TEMPLATES: dict[ChipSpec, np.ndarray] = {}


def _template(spec: ChipSpec) -> np.ndarray:
    """``spec.template()``, computed once per geometry (read-only)."""
    template = _TEMPLATES.get(spec)
    if template is None:
        template = _TEMPLATES[spec] = spec.template()
        template.setflags(write=False)
    return template


def similarity_transform(detection: Detection, spec: ChipSpec) -> np.ndarray:
    """2x3 matrix mapping photo pixels to chip pixels: 5-point similarity fit, or from the box alone."""
    if detection.landmarks is not None:
        source = np.asarray(detection.landmarks, dtype=np.float64)
        matrix, _ = cv2.estimateAffinePartial2D(source, _template(spec), method=cv2.LMEDS)
        if matrix is not None and np.all(np.isfinite(matrix)):
            (a, b, _), (c, d, _) = matrix.tolist()
            if abs(a * d - b * c) > 1e-9:
                return matrix
    x1, y1, x2, y2 = detection.box
    scale = spec.size * spec.face_width / max(x2 - x1, 1e-6)
    centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    shift = np.array([spec.size / 2, spec.size / 2]) - scale * centre
    return np.array([[scale, 0.0, shift[0]], [0.0, scale, shift[1]]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return points @ matrix[:, :2].T + matrix[:, 2]


def warp(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear affine warp to ``size`` (width, height); pixels from outside the image are black, as the
    reference's padding. The one warp behind alignment, crops and augmentation."""
    return cv2.warpAffine(
        image, matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0)
    )


def jpeg_round_trip(image: np.ndarray, quality: int) -> tuple[np.ndarray, bytes]:
    """Encode to JPEG and decode again, exactly as the shards store chips and the data pipeline reads them
    (``tf.io.decode_jpeg(..., dct_method="INTEGER_ACCURATE")`` decodes to the same bytes as OpenCV)."""
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise UsageError("JPEG encoding failed.")
    data = encoded.tobytes()
    return cv2.imdecode(encoded, cv2.IMREAD_COLOR), data


def align_face(
    image: np.ndarray, detection: Detection, spec: ChipSpec = DEFAULT_CHIP, round_trip: bool = True
) -> AlignedFace:
    """Warp one detected face of a BGR photo onto the canonical chip and compute its boxes there.

    ``round_trip`` False skips the JPEG round trip (``chip_jpeg`` is then empty): the chip is the warp's
    own pixels. Training shards store the round-tripped chip, which inference reproduces by default.
    """
    matrix = similarity_transform(detection, spec)
    chip = warp(image, matrix, (spec.size, spec.size))
    chip_jpeg = b""
    if round_trip:
        chip, chip_jpeg = jpeg_round_trip(chip, spec.jpeg_quality)
    (a, b, tx), (c, d, ty) = matrix.tolist()
    scale = math.sqrt(abs(a * d - b * c))
    x1, y1, x2, y2 = (float(v) for v in detection.box)
    mx, my = (x1 + x2) / 2, (y1 + y2) / 2
    cx, cy = a * mx + b * my + tx, c * mx + d * my + ty
    hw, hh = (x2 - x1) * scale / 2, (y2 - y1) * scale / 2
    box = np.array([cx - hw, cy - hh, cx + hw, cy + hh])
    if detection.landmarks is not None:
        landmarks = _apply(matrix, detection.landmarks)
    else:
        width, height = box[2] - box[0], box[3] - box[1]
        landmarks = box[:2] + TEMPLATE_IN_BOX * np.array([width, height])
    return AlignedFace(
        chip=chip,
        chip_jpeg=chip_jpeg,
        box=box.astype(np.float32),
        landmarks=landmarks.astype(np.float32),
        boxes=triple_boxes(box, landmarks[NOSE]),
        single_box=single_box(box, spec.single_margin),
        detection=detection,
        transform=matrix,
    )


# ---------------------------------------------------------------------------------------------- boxes, crops
MIN_BOX_SIDE = 1.0


def _finite(value: float) -> float:
    """NaN as 0, anything else clipped to +-1e6 (infinities included)."""
    return 0.0 if value != value else min(max(value, -1e6), 1e6)


def _valid_corners(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float, float, float]:
    """Finite corners of a box at least MIN_BOX_SIDE wide and high, about the same centre."""
    x1, y1, x2, y2 = _finite(x1), _finite(y1), _finite(x2), _finite(y2)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half_w, half_h = max(abs(x2 - x1), MIN_BOX_SIDE) / 2, max(abs(y2 - y1), MIN_BOX_SIDE) / 2
    return (cx - half_w, cy - half_h, cx + half_w, cy + half_h)


def _valid_box(box: np.ndarray) -> np.ndarray:
    """Finite, at least MIN_BOX_SIDE wide and high, float32."""
    corners = np.asarray(box, dtype=np.float64).reshape(4).tolist()
    return np.array(_valid_corners(*corners), dtype=np.float32)


def triple_boxes(box, nose) -> np.ndarray:
    """C3AE's three context boxes (reference ``gen_boundbox``) as a (3, 4) float32 array.

    For the face box (x1, y1, x2, y2) of width w and height h, m = |w - h| and the nose (nx, ny):
    outer = the box grown by m on every side; middle = a square centred on the nose with half-size ny - y1;
    inner = a square centred on the nose with half-size w / 2.
    """
    x1, y1, x2, y2 = (float(v) for v in _valid_box(box))
    nx, ny = (float(v) for v in np.nan_to_num(np.asarray(nose, dtype=np.float64)))
    width, height = x2 - x1, y2 - y1
    margin = abs(width - height)
    half_middle = max(ny - y1, MIN_BOX_SIDE / 2)
    half_inner = max(width / 2, MIN_BOX_SIDE / 2)
    boxes = [
        (x1 - margin, y1 - margin, x2 + margin, y2 + margin),
        (nx - half_middle, ny - half_middle, nx + half_middle, ny + half_middle),
        (nx - half_inner, ny - half_inner, nx + half_inner, ny + half_inner),
    ]
    return np.array([_valid_corners(*b) for b in boxes], dtype=np.float32)


def single_box(box, margin: float = 0.4) -> np.ndarray:
    """The face box grown by ``margin`` of its width and height on each side, (4,) float32."""
    x1, y1, x2, y2 = (float(v) for v in _valid_box(box))
    dx, dy = (x2 - x1) * margin, (y2 - y1) * margin
    return _valid_box((x1 - dx, y1 - dy, x2 + dx, y2 + dy))


def _crop_matrix(box, size: int) -> np.ndarray:
    """2x3 matrix mapping image pixels into the (size, size) crop of ``box`` (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = _valid_box(box).tolist()
    sx, sy = size / (x2 - x1), size / (y2 - y1)
    # Pixel centres: output pixel u samples x = x1 + (u + 0.5) / sx - 0.5, as cv2.resize does.
    return np.array([[sx, 0.0, (0.5 - x1) * sx - 0.5], [0.0, sy, (0.5 - y1) * sy - 0.5]])


def crop(image: np.ndarray, box, size: int = 64) -> np.ndarray:
    """Cut ``box`` (x1, y1, x2, y2) out of a BGR uint8 image and resize it to (size, size, 3) uint8.

    Bilinear sampling; parts of the box outside the image are zero (black), as the reference's padding.
    """
    return warp(image, _crop_matrix(box, size), (size, size))


def mask_context(chip: np.ndarray, inner_box, context: float) -> np.ndarray:
    """A copy of the chip with the pixels outside a square window zeroed: side ``context`` times the inner
    box's width, centred on the inner box. ``context`` 0 returns the chip unchanged."""
    if not context:
        return chip
    x1, y1, x2, y2 = (float(v) for v in np.asarray(inner_box, dtype=np.float64).reshape(4))
    half = context * (x2 - x1) / 2
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    height, width = chip.shape[:2]
    # Pixel centres inside the window are kept (pixel i covers [i, i + 1)).
    left, right = int(np.ceil(cx - half - 0.5)), int(np.floor(cx + half - 0.5)) + 1
    top, bottom = int(np.ceil(cy - half - 0.5)), int(np.floor(cy + half - 0.5)) + 1
    masked = np.zeros_like(chip)
    left, top, right, bottom = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
    if right > left and bottom > top:
        masked[top:bottom, left:right] = chip[top:bottom, left:right]
    return masked


def crop_names(layout: str) -> tuple[str, ...]:
    """The names of a crop layout's crops, in the order :func:`crop_stack` stacks them."""
    if layout not in CROP_LAYOUTS:
        raise UsageError(f"Unknown crop layout {layout!r}; expected one of {', '.join(CROP_LAYOUTS)}.")
    return CROP_NAMES if layout == "triple" else ("image",)


def crop_stack(
    chip: np.ndarray,
    boxes: np.ndarray,
    single: np.ndarray,
    layout: str = "triple",
    size: int = 64,
    context: float = 0.0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`model_crops` as one (K, size, size, 3) uint8 array, in :func:`crop_names` order; written
    into ``out`` when given (each crop warped straight into it: no copies)."""
    names = crop_names(layout)
    boxes = np.asarray(boxes).reshape(3, 4)
    chip = mask_context(chip, boxes[2], context)
    if out is None:
        out = np.empty((len(names), size, size, 3), np.uint8)
    for index, box in enumerate(boxes if layout == "triple" else (single,)):
        cv2.warpAffine(
            chip,
            _crop_matrix(box, size),
            (size, size),
            dst=out[index],
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=(0, 0, 0),
        )
    return out


def model_crops(
    chip: np.ndarray,
    boxes: np.ndarray,
    single: np.ndarray,
    layout: str = "triple",
    size: int = 64,
    context: float = 0.0,
) -> dict[str, np.ndarray]:
    """The named uint8 BGR crops of a crop layout (``ModelInfo.crop_layout``): ``"triple"`` gives C3AE's
    ``outer``/``middle``/``inner``, ``"single"`` one ``image``; each ``size`` pixels square.

    ``context`` > 0 first zeroes the chip outside the window of that many inner-box widths (``mask_context``).
    """
    stack = crop_stack(chip, boxes, single, layout, size, context)
    return dict(zip(crop_names(layout), stack, strict=True))


# ------------------------------------------------------------------------------------------------ pipeline
class FacePipeline:
    """detect -> align -> boxes, with one set of parameters shared by preprocessing and inference."""

    def __init__(
        self,
        detector: str = "mtcnn",
        spec: ChipSpec = DEFAULT_CHIP,
        min_face: int = 20,
        pad_retry: float = 0.25,
        retry_min_score: float = 0.8,
        max_side: int | None = DEFAULT_MAX_SIDE,
        min_score: float | None = None,
    ):
        self.detector_name = detector
        # The lowest detector score kept, on the first search and the padded retry (None: the detector's
        # own threshold, then retry_min_score).
        self.min_score = None if min_score is None else float(min_score)
        self.spec = spec
        self.min_face = int(min_face)
        self.pad_retry = float(pad_retry)
        self.retry_min_score = float(retry_min_score)
        # MTCNN searches photos whose longer side exceeds this on a downscaled copy (None: never).
        self.max_side = None if max_side is None else int(max_side)
        self._detector = None
        self._lock = threading.Lock()  # held while the detector is built
        rebuild_after_fork(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    @property
    def detector(self):
        if self._detector is None:  # built lazily: the detector's interpreters load on first use
            with self._lock:  # once, however many threads ask first
                if self._detector is None:
                    options = {"max_side": self.max_side} if self.detector_name == "mtcnn" else {}
                    self._detector = make_detector(self.detector_name, min_face=self.min_face, **options)
        return self._detector

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in a BGR photo, most confident first. When none is found and ``pad_retry`` > 0, detect again
        on the photo padded with black by that fraction of its longer side, accepting scores down to
        ``retry_min_score``: faces cropped tightly or cut by the border (UTKFace's chips, say) are found
        that way."""
        detections = self.detector.detect(image, min_score=self.min_score)
        if detections or self.pad_retry <= 0:
            return detections
        # The pad is a fraction of the longer side, but at most 4 times the shorter one: the padded photo is
        # then at most (1 + 8 pad_retry)^2 times the photo's pixels, whatever its shape (a 10 x 100000 strip).
        pad = int(round(self.pad_retry * min(max(image.shape[:2]), 4 * min(image.shape[:2]))))
        padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        retry = self.retry_min_score if self.min_score is None else self.min_score
        return [_shift(d, -pad) for d in self.detector.detect(padded, min_score=retry)]

    def process(
        self,
        image: np.ndarray,
        max_faces: int | None = None,
        fallback_box=None,
        fallback_full_image: bool = False,
    ) -> list[AlignedFace]:
        """All faces of a BGR photo, most confident first, aligned with their boxes.

        When the detector finds nothing: ``fallback_box`` (a dataset's own face box) or, with
        ``fallback_full_image``, the whole image as a tight face crop is aligned instead, with score 0.
        """
        detections = self.detect(image)[: max_faces or None]
        if not detections and fallback_box is not None:
            detections = [box_detection(fallback_box)]
        elif not detections and fallback_full_image:
            detections = [full_image_detection(image)]
        return [align_face(image, d, self.spec) for d in detections]

    def to_dict(self) -> dict:
        return {
            "detector": self.detector_name,
            "detector_runtime": "litert" if self.detector_name == "mtcnn" else "opencv",
            "max_side": self.max_side if self.detector_name == "mtcnn" else None,
            "min_face": self.min_face,
            "pad_retry": self.pad_retry,
            "retry_min_score": self.retry_min_score,
            "chip": self.spec.to_dict(),
            "template_in_box": TEMPLATE_IN_BOX.tolist(),
            "box_aspect": BOX_ASPECT,
        }
