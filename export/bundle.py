"""A deployable folder for a phone or edge app: every network as ``.tflite`` and one ``bundle.json`` spec.

    c3ae export c3ae-utk --bundle DIR

writes

- ``detector/pnet.tflite``, ``rnet.tflite``, ``onet.tflite`` and the detector's ``LICENSE``;
- the age/gender model(s), e.g. ``c3ae-utk.tflite`` (SSR-Net comes as an age and a gender model);
- ``bundle.json``: the input convention, every detector parameter and step, the alignment template, chip and
  crop geometry, and what each output means;
- ``reference.py``: a small implementation that reads only this folder (NumPy, OpenCV, LiteRT) and
  reproduces ``c3ae.AgeGenderEstimator``; it is the executable form of the spec, for a port to follow;
- ``README.md``: what is where.

Bundling a shipped model needs only the runtime install; a ``.keras`` file is converted (``c3ae[train]``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from c3ae.errors import C3AEError

BUNDLE_FORMAT = "c3ae-bundle"
BUNDLE_VERSION = 2  # 2: crop layouts named "triple" / "single", each model's family and options
REFERENCE = Path(__file__).with_name("reference.py")
README_TITLE = "# c3ae bundle"


class BundleError(C3AEError, ValueError):
    """A bundle that cannot be written as asked (model, folder)."""


def bundle_spec(estimator, model_files: list[str]) -> dict:
    """The ``bundle.json`` of an :class:`~c3ae.AgeGenderEstimator`'s pipeline with ``model_files``."""
    from c3ae._version import __version__
    from c3ae.conventions import AGE_BIN_WIDTH, CHANNEL_ORDER, PIXEL_RANGE
    from c3ae.export.metadata import CROP_GEOMETRY, OUTPUT_DESCRIPTIONS

    pipeline, spec = estimator.pipeline, estimator.spec
    models = []
    for file, backend in zip(model_files, estimator.backends, strict=True):
        models.append(
            {
                "file": file,
                "crops": backend.info.crop_layout,
                "model_info": backend.info.to_dict(),
                "inputs": {
                    name: [None, backend.input_size, backend.input_size, 3] for name in backend.input_names
                },
                "outputs": {name: OUTPUT_DESCRIPTIONS.get(name, "float32") for name in backend.output_names},
            }
        )
    return {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "c3ae_version": __version__,
        "model": estimator.model_name,
        "input_convention": {
            "photo": "uint8 H x W x 3, BGR (OpenCV's order)",
            "networks": f"float32 NHWC, {CHANNEL_ORDER}, raw pixel values in "
            f"[{PIXEL_RANGE[0]:g}, {PIXEL_RANGE[1]:g}] (every network, detector included, normalises inside "
            "its graph)",
            "signature": "serving_default; inputs and outputs by name",
        },
        "detector": _detector_spec(pipeline),
        "alignment": _alignment_spec(spec),
        "crops": {
            "triple": {name: CROP_GEOMETRY[name] for name in ("outer", "middle", "inner")},
            "single": CROP_GEOMETRY["image"],
            "context": "context > 0: zero the chip outside a square of context x the inner box's width, "
            "centred on the inner box, before cropping",
            "flip": "when the spec's flip is true, each model also runs on the crops mirrored left to right, "
            "and every output is the mean of the two runs (test-time augmentation)",
            "sampling": "each box resized to the model's input side, bilinear, sample u at x1 + (u + 0.5) * "
            "(x2 - x1) / side - 0.5, zero (black) outside the chip",
        },
        "models": models,
        "flip": bool(estimator.flip),
        "outputs": {
            "age": "years",
            "age_std": f"standard deviation of age_bins, bins at 0, {AGE_BIN_WIDTH:g}, ... years",
            "gender": "probability of male: >= 0.5 is male; 1 = male, 0 = female",
        },
    }


def _detector_spec(pipeline) -> dict:
    """The detector's part of ``bundle.json``: its files, parameters and every step, to reimplement it."""
    from c3ae import detector as mtcnn

    detector = pipeline.detector
    return {
        "kind": "mtcnn",
        "files": {name: f"detector/{file}" for name, file in mtcnn.NETWORK_FILES.items()},
        "license": "detector/LICENSE",
        "min_face": pipeline.min_face,
        "min_score": detector.min_score,
        "max_side": detector.max_side,
        "pyramid": {
            "first_scale": f"{mtcnn.CELL} / min_face",
            "factor": mtcnn.SCALE_FACTOR,
            "cell": mtcnn.CELL,
        },
        "thresholds": {
            "pnet": mtcnn.THRESHOLDS[0],
            "rnet": mtcnn.THRESHOLDS[1],
            "onet": mtcnn.THRESHOLDS[2],
        },
        "nms": {
            "pnet_level": [mtcnn.NMS_PNET_LEVEL, "union"],
            "pnet_all": [mtcnn.NMS_PNET_ALL, "union"],
            "rnet": [mtcnn.NMS_RNET, "union"],
            "onet": [mtcnn.NMS_ONET, "min"],
        },
        "outside_pixel": mtcnn.OUTSIDE_PIXEL,
        "pad_retry": pipeline.pad_retry,
        "retry_min_score": pipeline.retry_min_score,
        "networks": {
            "pnet": "image (1, H, W, 3) -> offsets (1, h, w, 4), probabilities (1, h, w, 2); cell (y, x) "
            "covers level pixels 2x+1 .. 2x+12",
            "rnet": "image (N, 24, 24, 3) -> offsets (N, 4), probabilities (N, 2)",
            "onet": "image (N, 48, 48, 3) -> offsets (N, 4), landmarks (N, 10) as x1..x5, y1..y5 "
            "fractions of the box, probabilities (N, 2)",
        },
        "steps": [
            "Search a copy of the photo scaled (area) by f = min(1, 20 / min_face), and further down "
            "to max_side if its longer side is still larger; divide boxes and landmarks by f "
            "afterwards. On the copy, min_face becomes max(min_face f, min(min_face, 20)).",
            "Pyramid: scales 12 / min_face * 0.709^k for k < round(log(min_side / 12) / log(1 / 0.709) "
            "- 1), keeping levels whose shorter side is >= 12; each level is the photo area-resampled to "
            "(int(W s), int(H s)) in float32.",
            "P-Net on each level; cells with face probability > pnet threshold give boxes "
            "(2x+1 + 11 dx1, 2y+1 + 11 dy1, 2x+12 + 11 dx2, 2y+12 + 11 dy2) / s, sorted by score "
            "(descending), NMS pnet_level; all levels together: sort, NMS pnet_all; square each box.",
            "NMS(t, method): walking the boxes in order, drop every box whose overlap (intersection over "
            "union, or over the smaller area) with ANY earlier box exceeds t, dropped or not; areas "
            "(x2 - x1)(y2 - y1), no +1.",
            "Square: side = max(w, h) around the same centre.",
            "R-Net on 24 x 24 patches, O-Net on 48 x 48: bilinear samples at x1 (W-1)/W + i (x2 - x1) "
            "(W-1)/W / (n-1) (same for y); a sample row or column outside [0, W-1] is outside_pixel.",
            "Refine: box += offsets * (w + 1, h + 1, w + 1, h + 1); score = probabilities[:, 1]; keep "
            "score > threshold; sort, NMS; after R-Net, square again.",
            "O-Net landmarks, from the box before refining: x = (w + 1) lx + x1 - 1, "
            "y = (h + 1) ly + y1 - 1.",
            "Keep faces with score >= min_score and min(w, h) >= min_face, most confident first. If "
            "none, pad the photo with black by pad_retry of its longer side, detect again accepting "
            "scores from retry_min_score, and shift the results back.",
        ],
    }


def _alignment_spec(spec) -> dict:
    """The alignment's part of ``bundle.json``: the template, the chip and the steps of the warp."""
    from c3ae.faces import BOX_ASPECT, LANDMARK_NAMES, TEMPLATE_IN_BOX

    return {
        "landmarks": list(LANDMARK_NAMES),
        "template_in_box": TEMPLATE_IN_BOX.tolist(),
        "box_aspect": BOX_ASPECT,
        "chip": {**spec.to_dict(), "context": spec.context},
        "steps": [
            "Template: a box face_width * size wide and box_aspect times as tall, centred in the chip; "
            "the 5 landmarks at template_in_box (fractions of that box).",
            "Similarity transform (rotation, uniform scale, shift) from the 5 detected landmarks to the "
            "template, least-median fit (OpenCV estimateAffinePartial2D, LMEDS).",
            "Warp the photo onto a size x size chip, bilinear, black outside; JPEG-encode it at "
            "jpeg_quality and decode it again (the training chips were stored so).",
            "Map the detection's box centre through the transform; its width and height scale by the "
            "transform's scale: that is the face box in the chip. Landmarks map through the transform.",
        ],
    }


def _model_bytes(estimator) -> list[tuple[str, bytes]]:
    """(file name, flatbuffer) of each TFLite model the estimator runs."""
    files = []
    for index, backend in enumerate(estimator.backends):
        name = Path(str(getattr(backend, "origin", "") or f"model-{index}")).stem or f"model-{index}"
        files.append((f"{name}.tflite", backend.flatbuffer))
    return files


def bundle_files(out_dir: str | Path, model_files: Sequence[str] = ()) -> dict:
    """The files a bundle in ``out_dir`` consists of (``model_files`` beside the fixed ones), each with the
    test that an existing one was written by c3ae: ``bundle.json``, ``README.md`` and ``reference.py`` by
    their content, the networks by the folder's ``bundle.json`` being ours (it is written first)."""
    from c3ae.detector import NETWORK_FILES
    from c3ae.files import json_holding, text_starting

    is_spec = json_holding(format=BUNDLE_FORMAT)
    ours = is_spec(Path(out_dir) / "bundle.json")
    networks = [*model_files, *(f"detector/{file}" for file in [*NETWORK_FILES.values(), "LICENSE"])]
    return {
        "bundle.json": is_spec,
        "README.md": text_starting(README_TITLE),
        "reference.py": text_starting(REFERENCE.read_text().splitlines()[0]),
        **{file: lambda _, ours=ours: ours for file in networks},
    }


def write_bundle(model: str | Path, out_dir: str | Path, option: str = "out_dir") -> dict:
    """Write the bundle of ``model`` (a bundled name, a ``.tflite`` or a ``.keras`` file) into ``out_dir``
    (created; an existing bundle there is replaced file by file). Returns the spec written. A file of the
    user's where the bundle has one (a ``README.md``, say) is refused (``OutputError`` naming ``option``)."""
    from c3ae.detector import DETECTOR_DIR, NETWORK_FILES
    from c3ae.estimator import AgeGenderEstimator
    from c3ae.files import atomic_write_bytes, atomic_write_text, check_ours

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BundleError(f"{out_dir} exists and is not a folder; give a folder for the bundle.")
    check_ours(out_dir, option, bundle_files(out_dir))
    estimator = AgeGenderEstimator(model, backend="tflite")
    models = _model_bytes(estimator)
    check_ours(out_dir, option, bundle_files(out_dir, [file for file, _ in models]))
    spec = bundle_spec(estimator, [file for file, _ in models])
    atomic_write_text(out_dir / "bundle.json", json.dumps(spec, indent=2) + "\n")  # first: marks it ours
    for file, data in models:
        atomic_write_bytes(out_dir / file, data)
    for file in [*NETWORK_FILES.values(), "LICENSE"]:
        atomic_write_bytes(out_dir / "detector" / file, (DETECTOR_DIR / file).read_bytes())
    atomic_write_bytes(out_dir / "reference.py", REFERENCE.read_bytes())
    atomic_write_text(out_dir / "README.md", _readme(spec))
    return spec


def _readme(spec: dict) -> str:
    models = "\n".join(f"- `{m['file']}`: outputs {', '.join(m['outputs'])}" for m in spec["models"])
    return (
        f"{README_TITLE}: {spec['model']}\n\n"
        "Everything a phone or edge app needs to find faces and estimate their age and gender.\n\n"
        "- `detector/`: MTCNN's P-, R- and O-Net as TFLite (and their licence).\n"
        f"{models}\n"
        "- `bundle.json`: the input convention, every detector parameter and step, the alignment template, "
        "chip and crop geometry, and the meaning of each output.\n"
        "- `reference.py`: a small implementation reading only this folder (NumPy, OpenCV, LiteRT): "
        "`python reference.py photo.jpg` prints the faces as JSON. A port reproduces it.\n"
    )
