"""Reference implementation of a c3ae bundle: reads only its own folder, needs only NumPy, OpenCV, LiteRT.

    python reference.py photo.jpg            # the faces of the photo as JSON

It is the executable form of ``bundle.json``: every number it uses comes from there, and it is written as
plain loops so that a port (Kotlin, Swift, C++) can follow it line by line. ``c3ae.AgeGenderEstimator``
gives the same faces, ages and genders (a test in the c3ae repository checks this).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import cv2
import numpy as np
from ai_edge_litert.interpreter import Interpreter

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------ bundle.json
class BundleError(ValueError):
    """A bundle.json that cannot be this bundle's: a value outside its range, a file outside the folder."""


# (key path, low, high, integer?): every number the reference reads, with the range it may take. A
# tampered bundle.json must not divide by zero (a pyramid factor of 1), run for minutes (0.9999) or
# allocate without bound (a chip of 10**9 pixels). The chip's ranges are c3ae.export.metadata.CHIP_RANGES.
RANGES = [
    ("detector.min_face", 4, 10000, False),
    ("detector.min_score", 0, 1, False),
    ("detector.retry_min_score", 0, 1, False),
    ("detector.pad_retry", 0, 1, False),
    ("detector.outside_pixel", 0, 255, False),
    ("detector.pyramid.factor", 0.1, 0.9, False),
    ("detector.pyramid.cell", 12, 12, True),
    ("detector.thresholds.pnet", 0, 1, False),
    ("detector.thresholds.rnet", 0, 1, False),
    ("detector.thresholds.onet", 0, 1, False),
    ("alignment.box_aspect", 0.5, 2, False),
    ("alignment.chip.size", 16, 1024, True),
    ("alignment.chip.face_width", 0.05, 1, False),
    ("alignment.chip.jpeg_quality", 1, 100, True),
    ("alignment.chip.single_margin", 0, 2, False),
    ("alignment.chip.context", 0, 10, False),
]
MAX_SIDE = (32, 10000)  # detector.max_side: 0 (no limit) or this many pixels
INPUTS = ("outer", "middle", "inner", "image")


def _at(spec: dict, key: str):
    value = spec
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise BundleError(
                f"bundle.json has no {key}; export the bundle again with 'c3ae export --bundle'."
            )
        value = value[part]
    return value


def _number(key: str, value, low: float, high: float, integer: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value <= high or (integer and float(value) != int(value)):
        what = "an integer" if integer else "a number"
        allowed = f"{low:g}" if low == high else f"from {low:g} to {high:g}"
        raise BundleError(f"bundle.json: {key} is {value!r:.40}; it must be {what} {allowed}.")
    return value


def _inside(folder: Path, key: str, name) -> Path:
    """``folder / name`` if ``name`` is a relative path to a file inside the bundle folder."""
    root = folder.resolve()
    path = (root / str(name)).resolve() if isinstance(name, str) and name else None
    if path is None or Path(name).is_absolute() or ".." in Path(name).parts or not path.is_relative_to(root):
        raise BundleError(f"bundle.json: {key} is {name!r:.60}; it must name a file inside the bundle.")
    if not path.is_file():
        raise BundleError(f"bundle.json: {key} names {name}, which is not in the bundle folder.")
    return path


def check_spec(spec, folder: Path = HERE) -> dict:
    """``spec`` (bundle.json) if every value the reference reads is within its range and every file it
    names lies inside ``folder``; else :class:`BundleError`, one sentence naming the key and its range."""
    if not isinstance(spec, dict) or spec.get("format") != "c3ae-bundle":
        raise BundleError("bundle.json is not a c3ae bundle description (format 'c3ae-bundle').")
    for key, low, high, integer in RANGES:
        _number(key, _at(spec, key), low, high, integer)
    max_side = _at(spec, "detector.max_side")
    if max_side:
        _number("detector.max_side", max_side, *MAX_SIDE, integer=True)
    for stage in ("pnet_level", "pnet_all", "rnet", "onet"):
        pair = _at(spec, f"detector.nms.{stage}")
        if not isinstance(pair, list) or len(pair) != 2 or pair[1] not in ("union", "min"):
            raise BundleError(f"bundle.json: detector.nms.{stage} must be [threshold, 'union' or 'min'].")
        _number(f"detector.nms.{stage}[0]", pair[0], 0, 1)
    files = _at(spec, "detector.files")
    if not isinstance(files, dict) or set(files) != {"pnet", "rnet", "onet"}:
        raise BundleError("bundle.json: detector.files must name the pnet, rnet and onet files.")
    for name, file in files.items():
        _inside(folder, f"detector.files.{name}", file)
    template = _at(spec, "alignment.template_in_box")
    if not isinstance(template, list) or len(template) != 5:
        raise BundleError("bundle.json: alignment.template_in_box must hold 5 points.")
    for index, point in enumerate(template):
        if not isinstance(point, list) or len(point) != 2:
            raise BundleError(f"bundle.json: alignment.template_in_box[{index}] must be a point [x, y].")
        for value in point:
            _number(f"alignment.template_in_box[{index}]", value, 0, 1)
    models = spec.get("models")
    if not isinstance(models, list) or not 1 <= len(models) <= 4:
        raise BundleError("bundle.json: models must list from 1 to 4 models.")
    for index, model in enumerate(models):
        key = f"models[{index}]"
        if not isinstance(model, dict):
            raise BundleError(f"bundle.json: {key} is not a model description.")
        _inside(folder, f"{key}.file", model.get("file"))
        inputs = model.get("inputs")
        if not isinstance(inputs, dict) or not inputs or not set(inputs) <= set(INPUTS):
            raise BundleError(f"bundle.json: {key}.inputs must name crops among {', '.join(INPUTS)}.")
        for name, shape in inputs.items():
            if not isinstance(shape, list) or len(shape) != 4:
                raise BundleError(f"bundle.json: {key}.inputs.{name} must be a shape [N, S, S, 3].")
            _number(f"{key}.inputs.{name}[1]", shape[1], 8, 512, integer=True)
    if not isinstance(spec.get("flip", False), bool):
        raise BundleError("bundle.json: flip must be true or false.")
    return spec


def read_spec(folder: Path = HERE) -> dict:
    """The checked bundle.json of ``folder`` (:func:`check_spec`)."""
    try:
        spec = json.loads((folder / "bundle.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise BundleError(f"bundle.json cannot be read as JSON ({type(error).__name__}).") from None
    return check_spec(spec, folder)


class Network:
    """A TFLite file run through its serving_default signature, inputs and outputs by name."""

    def __init__(self, path: Path):
        self.data = path.read_bytes()

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        interpreter = Interpreter(model_content=self.data)
        runner = interpreter.get_signature_runner("serving_default")
        return runner(**{name: np.ascontiguousarray(value, np.float32) for name, value in inputs.items()})


# ----------------------------------------------------------------------------------------------- detector
def overlap(a, b, method: str) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    denominator = area_a + area_b - inter if method == "union" else min(area_a, area_b)
    return inter / denominator if denominator > 0 else 0.0


def suppress(rows: list, threshold: float, method: str, sort: bool = True) -> list:
    """Drop every row overlapping ANY earlier row (dropped or not) by more than ``threshold``."""
    if sort:
        order = np.argsort(np.array([row[4] for row in rows]))[::-1]
        rows = [rows[i] for i in order]
    return [
        row
        for j, row in enumerate(rows)
        if not any(overlap(rows[i], row, method) > threshold for i in range(j))
    ]


def square(row: list) -> list:
    w, h = row[2] - row[0], row[3] - row[1]
    side = max(w, h)
    x1, y1 = row[0] + w * 0.5 - side * 0.5, row[1] + h * 0.5 - side * 0.5
    return [x1, y1, x1 + side, y1 + side, *row[4:]]


def patch(image: np.ndarray, row: list, size: int, outside: float) -> np.ndarray:
    height, width = image.shape[:2]
    steps = np.arange(size, dtype=np.float32)
    x1, y1, x2, y2 = (np.float32(v) for v in row[:4])
    x1, x2 = x1 / np.float32(width), x2 / np.float32(width)
    y1, y2 = y1 / np.float32(height), y2 / np.float32(height)
    xs = x1 * np.float32(width - 1) + steps * ((x2 - x1) * np.float32(width - 1) / np.float32(size - 1))
    ys = y1 * np.float32(height - 1) + steps * ((y2 - y1) * np.float32(height - 1) / np.float32(size - 1))
    map_x, map_y = np.meshgrid(xs, ys)
    out = cv2.remap(
        image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(outside,) * 3
    )
    out[(ys < 0) | (ys > height - 1), :] = outside
    out[:, (xs < 0) | (xs > width - 1)] = outside
    return out


def refine(rows: list, image: np.ndarray, network: Network, size: int, threshold: float, d: dict) -> list:
    kept = []
    for row in rows:
        out = network(image=patch(image, row, size, d["outside_pixel"])[None])
        w, h = row[2] - row[0] + 1, row[3] - row[1] + 1
        offsets = out["offsets"][0].astype(np.float64)
        box = [
            row[0] + offsets[0] * w,
            row[1] + offsets[1] * h,
            row[2] + offsets[2] * w,
            row[3] + offsets[3] * h,
        ]
        points = []
        if "landmarks" in out:
            marks = out["landmarks"][0].astype(np.float64)
            points = [w * marks[k] + row[0] - 1 for k in range(5)] + [
                h * marks[5 + k] + row[1] - 1 for k in range(5)
            ]
        score = float(out["probabilities"][0, 1])
        if score > threshold:
            kept.append([*box, score, *points])
    return kept


def detect_once(photo: np.ndarray, d: dict, nets: dict, min_score: float) -> list:
    """MTCNN as bundle.json's detector steps say: rows (x1, y1, x2, y2, score, lx1..lx5, ly1..ly5)."""
    height, width = photo.shape[:2]
    min_face = float(d["min_face"])
    factor = min(1.0, 20.0 / min_face)
    if d["max_side"] and max(height, width) * factor > d["max_side"]:
        factor = d["max_side"] / max(height, width)
    if factor < 1.0:
        size = (max(round(width * factor), 1), max(round(height * factor), 1))
        photo = cv2.resize(photo, size, interpolation=cv2.INTER_AREA)
        factor = size[0] / width
        min_face = max(min_face * factor, min(min_face, 20.0))
    image = photo.astype(np.float32)
    height, width = image.shape[:2]
    cell, factor_k = d["pyramid"]["cell"], d["pyramid"]["factor"]
    count = (
        round(-((math.log(min(height, width) / cell) / math.log(factor_k)) + 1))
        if min(height, width) >= cell
        else 0
    )
    proposals = []
    for k in range(max(count, 0)):
        scale = (cell / min_face) * factor_k**k
        if math.floor(min(height, width) * scale) < cell:
            continue
        level = cv2.resize(image, (int(width * scale), int(height * scale)), interpolation=cv2.INTER_AREA)
        out = nets["pnet"](image=level[None])
        face, offsets = out["probabilities"][0, :, :, 1], out["offsets"][0].astype(np.float64)
        rows = []
        for y, x in zip(*np.where(face > d["thresholds"]["pnet"]), strict=True):
            dx1, dy1, dx2, dy2 = offsets[y, x]
            box = [2 * x + 1 + 11 * dx1, 2 * y + 1 + 11 * dy1, 2 * x + 12 + 11 * dx2, 2 * y + 12 + 11 * dy2]
            rows.append([v / scale for v in box] + [float(face[y, x])])
        if rows:
            order = np.argsort(np.array([row[4] for row in rows]))[::-1]
            proposals += suppress([rows[i] for i in order], *d["nms"]["pnet_level"], sort=False)
    if not proposals:
        return []
    boxes = [square(row) for row in suppress(proposals, *d["nms"]["pnet_all"])]
    boxes = [
        square(row)
        for row in suppress(
            refine(boxes, image, nets["rnet"], 24, d["thresholds"]["rnet"], d), *d["nms"]["rnet"]
        )
    ]
    faces = suppress(refine(boxes, image, nets["onet"], 48, d["thresholds"]["onet"], d), *d["nms"]["onet"])
    faces = [[v / factor if i != 4 else v for i, v in enumerate(row)] for row in faces]
    faces = [f for f in faces if f[4] >= min_score and min(f[2] - f[0], f[3] - f[1]) >= d["min_face"]]
    return sorted(faces, key=lambda f: -f[4])


def detect(photo: np.ndarray, d: dict, nets: dict) -> list:
    faces = detect_once(photo, d, nets, d["min_score"])
    if faces or d["pad_retry"] <= 0:
        return faces
    pad = int(round(d["pad_retry"] * max(photo.shape[:2])))
    padded = cv2.copyMakeBorder(photo, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    faces = detect_once(padded, d, nets, d["retry_min_score"])
    return [[v - pad if i != 4 else v for i, v in enumerate(f)] for f in faces]


# ---------------------------------------------------------------------------------------------- alignment
def align(photo: np.ndarray, face: list, a: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(chip, face box in the chip, nose in the chip)."""
    chip = a["chip"]
    box_width = chip["size"] * chip["face_width"]
    box_height = box_width * a["box_aspect"]
    left, top = (chip["size"] - box_width) / 2, (chip["size"] - box_height) / 2
    template = np.array([[left + fx * box_width, top + fy * box_height] for fx, fy in a["template_in_box"]])
    landmarks = np.array(list(zip(face[5:10], face[10:15], strict=True)), dtype=np.float64)
    matrix, _ = cv2.estimateAffinePartial2D(landmarks, template, method=cv2.LMEDS)
    warped = cv2.warpAffine(photo, matrix, (chip["size"],) * 2, flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    ok, encoded = cv2.imencode(".jpg", warped, [cv2.IMWRITE_JPEG_QUALITY, chip["jpeg_quality"]])
    warped = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    scale = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
    centre = matrix[:, :2] @ np.array([(face[0] + face[2]) / 2, (face[1] + face[3]) / 2]) + matrix[:, 2]
    half = np.array([face[2] - face[0], face[3] - face[1]]) * scale / 2
    nose = matrix[:, :2] @ landmarks[2] + matrix[:, 2]
    return warped, np.concatenate([centre - half, centre + half]), nose


def cut(chip: np.ndarray, box, side: int) -> np.ndarray:
    x1, y1, x2, y2 = (float(v) for v in box)
    sx, sy = side / (x2 - x1), side / (y2 - y1)
    matrix = np.array([[sx, 0.0, (0.5 - x1) * sx - 0.5], [0.0, sy, (0.5 - y1) * sy - 0.5]])
    return cv2.warpAffine(chip, matrix, (side, side), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))


def crop_boxes(box: np.ndarray, nose: np.ndarray, margin: float) -> dict:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    m, nx, ny = abs(w - h), nose[0], nose[1]
    return {
        "outer": (x1 - m, y1 - m, x2 + m, y2 + m),
        "middle": (nx - (ny - y1), ny - (ny - y1), nx + (ny - y1), ny + (ny - y1)),
        "inner": (nx - w / 2, ny - w / 2, nx + w / 2, ny + w / 2),
        "image": (x1 - w * margin, y1 - h * margin, x2 + w * margin, y2 + h * margin),
    }


def keep_context(chip: np.ndarray, inner, context: float) -> np.ndarray:
    if not context:
        return chip
    half = context * (inner[2] - inner[0]) / 2
    cx, cy = (inner[0] + inner[2]) / 2, (inner[1] + inner[3]) / 2
    left, right = max(math.ceil(cx - half - 0.5), 0), min(math.floor(cx + half - 0.5) + 1, chip.shape[1])
    top, bottom = max(math.ceil(cy - half - 0.5), 0), min(math.floor(cy + half - 0.5) + 1, chip.shape[0])
    masked = np.zeros_like(chip)
    if right > left and bottom > top:
        masked[top:bottom, left:right] = chip[top:bottom, left:right]
    return masked


# ------------------------------------------------------------------------------------------------ estimate
def estimate(photo: np.ndarray, folder: Path = HERE) -> list[dict]:
    """Every face of a uint8 BGR photo: box (x, y, w, h), landmarks, score, age, age_std, gender."""
    spec = read_spec(folder)
    d, a = spec["detector"], spec["alignment"]
    nets = {name: Network(folder / file) for name, file in d["files"].items()}
    models = [(Network(folder / m["file"]), m) for m in spec["models"]]
    results = []
    for face in detect(photo, d, nets):
        chip, box, nose = align(photo, face, a)
        boxes = crop_boxes(box, nose, a["chip"]["single_margin"])
        chip = keep_context(chip, boxes["inner"], a["chip"]["context"])
        outputs: dict = {}
        for network, model in models:
            side = model["inputs"][next(iter(model["inputs"]))][1]
            crops = {name: cut(chip, boxes[name], side).astype(np.float32)[None] for name in model["inputs"]}
            found = {name: value.astype(np.float64) for name, value in network(**crops).items()}
            if spec.get("flip"):  # test-time augmentation: the mean with the mirrored crops' outputs
                mirrored = network(**{name: c[:, :, ::-1] for name, c in crops.items()})
                found = {name: (value + mirrored[name]) / 2 for name, value in found.items()}
            for name, value in found.items():
                outputs.setdefault(name, value[0])
        record = {
            "box": [
                round(face[0], 1),
                round(face[1], 1),
                round(face[2] - face[0], 1),
                round(face[3] - face[1], 1),
            ],
            "landmarks": {
                n: [round(face[5 + i], 1), round(face[10 + i], 1)] for i, n in enumerate(a["landmarks"])
            },
            "detector_score": round(face[4], 4),
            "age": round(float(outputs["age"][0]), 2) if "age" in outputs else None,
            "age_std": None,
            "gender": None,
            "gender_prob": None,
        }
        if "age_bins" in outputs:
            probs = np.clip(outputs["age_bins"], 0, None) / max(
                np.clip(outputs["age_bins"], 0, None).sum(), 1e-12
            )
            centres = np.arange(len(probs)) * 10.0
            mean = probs @ centres
            record["age_std"] = round(float(np.sqrt(max(probs @ centres**2 - mean**2, 0.0))), 2)
        if "gender" in outputs:
            male = min(max(float(outputs["gender"][0]), 0.0), 1.0)
            record["gender"] = "male" if male >= 0.5 else "female"
            record["gender_prob"] = round(male if male >= 0.5 else 1.0 - male, 4)
        results.append(record)
    return results


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python reference.py PHOTO")
    image = cv2.imread(sys.argv[1], cv2.IMREAD_COLOR)
    if image is None:
        sys.exit(f"{sys.argv[1]} is not a readable image")
    try:
        print(json.dumps(estimate(image), indent=1))
    except BundleError as error:
        sys.exit(f"reference.py: {error}")
