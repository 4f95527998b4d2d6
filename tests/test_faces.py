"""The face pipeline: image decoding, detection, alignment, box geometry and crops."""

import io
import json

import cv2
import numpy as np
import pytest
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from c3ae.faces import (
    CROP_NAMES,
    ChipSpec,
    Detection,
    FacePipeline,
    ImageReadError,
    align_face,
    crop,
    make_detector,
    model_crops,
    read_image,
    single_box,
    triple_boxes,
)

OBAMA = REPO / "assets" / "obama.jpg"


@pytest.fixture(scope="module")
def obama() -> np.ndarray:
    return read_image(OBAMA)


@pytest.fixture(scope="module")
def mtcnn_faces(obama):
    return FacePipeline("mtcnn").process(obama)


# ------------------------------------------------------------------------------------------------ geometry
def test_triple_boxes_follow_the_reference_formula():
    # box 100 wide, 130 high -> m = 30; nose at (150, 170); y1 = 100 -> middle half-size 70; inner half 50.
    boxes = triple_boxes((100, 100, 200, 230), (150, 170))
    np.testing.assert_allclose(boxes[0], [70, 70, 230, 260])
    np.testing.assert_allclose(boxes[1], [80, 100, 220, 240])
    np.testing.assert_allclose(boxes[2], [100, 120, 200, 220])
    assert boxes.dtype == np.float32 and boxes.shape == (3, 4)


def test_single_box_margin():
    np.testing.assert_allclose(single_box((100, 100, 200, 300), 0.4), [60, 20, 240, 380])


COORDINATE = st.one_of(st.floats(-1e4, 1e4), st.sampled_from([float("nan"), float("inf"), -float("inf")]))


@settings(max_examples=200, deadline=None)
@given(
    box=st.tuples(*[COORDINATE] * 4),
    nose=st.tuples(*[COORDINATE] * 2),
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    size=st.sampled_from([64, 32]),
)
def test_boxes_stay_finite_and_crops_have_the_model_size(box, nose, height, width, size):
    image = np.full((height, width, 3), 200, np.uint8)
    boxes = triple_boxes(box, nose)
    single = single_box(box)
    assert np.isfinite(boxes).all() and np.isfinite(single).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    for b in [*boxes, single]:
        patch = crop(image, b, size)
        assert patch.shape == (size, size, 3) and patch.dtype == np.uint8


def test_crop_pads_outside_the_image_with_zeros():
    image = np.full((100, 100, 3), 255, np.uint8)
    patch = crop(image, (50, 50, 150, 150), 64)  # bottom-right three quarters lie outside
    assert patch[:28, :28].min() == 255
    assert patch[36:, :].max() == 0 and patch[:, 36:].max() == 0


def test_crop_of_the_whole_image_is_a_resize():
    image = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    patch = crop(image, (0, 0, 128, 128), 64)
    reference = cv2.resize(image, (64, 64), interpolation=cv2.INTER_LINEAR)
    assert np.abs(patch.astype(int) - reference).max() <= 1  # same pixel-centre convention as cv2.resize


def test_chip_spec_rejects_impossible_geometry():
    with pytest.raises(ValueError, match="Impossible chip geometry"):
        ChipSpec(size=8)


# ------------------------------------------------------------------------------------------------ alignment
def synthetic_detection(scale: float = 1.0, dx: float = 0.0, dy: float = 0.0) -> Detection:
    box = np.array([100, 80, 200, 210]) * scale + [dx, dy, dx, dy]
    width, height = box[2] - box[0], box[3] - box[1]
    template = [(0.27, 0.366), (0.73, 0.366), (0.5, 0.577), (0.28, 0.73), (0.72, 0.73)]
    points = tuple((box[0] + u * width, box[1] + v * height) for u, v in template)
    return Detection(tuple(float(v) for v in box), 0.99, tuple((float(x), float(y)) for x, y in points))


def test_alignment_maps_the_template_face_to_the_chip_centre():
    image = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    spec = ChipSpec()
    face = align_face(image, synthetic_detection(scale=1.3, dx=20), spec)
    assert face.chip.shape == (spec.size, spec.size, 3)
    np.testing.assert_allclose(face.landmarks, spec.template(), atol=1e-3)
    width = face.box[2] - face.box[0]
    assert width == pytest.approx(spec.size * spec.face_width, rel=1e-4)
    np.testing.assert_allclose((face.box[:2] + face.box[2:]) / 2, [spec.size / 2] * 2, atol=1e-3)


def test_alignment_removes_rotation():
    image = np.zeros((400, 400, 3), np.uint8)
    detection = synthetic_detection()
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array([150, 150])
    rotated = tuple(tuple((rotation @ (np.array(p) - centre) + centre).tolist()) for p in detection.landmarks)
    face = align_face(image, Detection(detection.box, 0.9, rotated))
    eyes = face.landmarks[:2]
    assert abs(eyes[0, 1] - eyes[1, 1]) < 1e-3  # eyes level again


def test_chip_went_through_the_stored_jpeg_round_trip(obama):
    face = align_face(obama, synthetic_detection(scale=1.5, dx=150, dy=60))
    decoded = cv2.imdecode(np.frombuffer(face.chip_jpeg, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(face.chip, decoded)


def test_haar_style_detection_without_landmarks_still_aligns():
    image = np.full((300, 300, 3), 128, np.uint8)
    face = align_face(image, Detection((100, 80, 200, 210), 1.0, None))
    assert face.landmarks.shape == (5, 2) and np.isfinite(face.boxes).all()


def test_model_crops_names_and_shapes(obama):
    face = align_face(obama, synthetic_detection(scale=1.5, dx=150, dy=60))
    c3ae_crops = model_crops(face.chip, face.boxes, face.single_box, "triple")
    assert list(c3ae_crops) == list(CROP_NAMES)
    assert all(c.shape == (64, 64, 3) for c in c3ae_crops.values())
    assert model_crops(face.chip, face.boxes, face.single_box, "single", 227)["image"].shape == (227, 227, 3)


# ------------------------------------------------------------------------------------------------ detectors
def test_mtcnn_finds_the_face_with_plain_python_numbers(mtcnn_faces, obama):
    assert len(mtcnn_faces) == 1
    detection = mtcnn_faces[0].detection
    json.dumps(detection.to_dict())  # numpy scalars would fail here
    assert isinstance(detection.score, float) and detection.score > 0.95
    assert all(isinstance(v, float) for point in detection.landmarks for v in point)
    x1, y1, x2, y2 = detection.box
    height, width = obama.shape[:2]
    assert 0.25 * width < (x1 + x2) / 2 < 0.75 * width and 0.1 * height < (y1 + y2) / 2 < 0.6 * height


def test_mtcnn_with_a_large_min_face_finds_the_same_face(mtcnn_faces, obama):
    """mtcnn 1.0 itself finds nothing above min_face_size 20; our pyramid stops at P-Net's 12-pixel window."""
    from c3ae.faces import MTCNNDetector

    (large,) = MTCNNDetector(min_face=80).detect(obama)
    reference = mtcnn_faces[0].detection
    assert min(large.box[2] - large.box[0], large.box[3] - large.box[1]) >= 80
    # A pyramid starting 4 times smaller proposes other candidate boxes; R- and O-Net refine them to the
    # same face, to within MTCNN's own spread between scales.
    from c3ae.detector import iou_matrix

    assert iou_matrix(np.array([large.box]), np.array([reference.box]))[0, 0] > 0.85
    width = reference.box[2] - reference.box[0]
    np.testing.assert_allclose(large.landmarks, reference.landmarks, atol=0.08 * width)
    big = max(obama.shape[:2]) + 1
    assert MTCNNDetector(min_face=big).detect(obama) == []


def test_mtcnn_alignment_puts_the_eyes_on_the_template(mtcnn_faces):
    face = mtcnn_faces[0]
    np.testing.assert_allclose(face.landmarks[:2], ChipSpec().template()[:2], atol=4.0)


def test_haar_detector_finds_the_frontal_face(obama):
    detections = make_detector("haar").detect(obama)
    assert len(detections) >= 1 and detections[0].landmarks is None


def test_no_face_gives_an_empty_list():
    assert FacePipeline("haar").process(np.full((200, 200, 3), 90, np.uint8)) == []


def test_unknown_detector():
    with pytest.raises(ValueError, match="Unknown detector 'yolo'"):
        make_detector("yolo")


# ------------------------------------------------------------------------------------------------ decoding
def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_read_image_modes(tmp_path):
    rgb = Image.new("RGB", (20, 10), (10, 20, 30))
    bgr = read_image(encode(rgb, "PNG"))
    assert bgr.shape == (10, 20, 3) and tuple(bgr[0, 0]) == (30, 20, 10)
    assert read_image(encode(rgb.convert("L"), "PNG")).shape == (10, 20, 3)
    assert read_image(encode(rgb.convert("RGBA"), "PNG")).shape == (10, 20, 3)
    assert read_image(encode(rgb.convert("CMYK"), "JPEG")).shape == (10, 20, 3)
    sixteen = Image.fromarray(np.full((10, 20), 65535, np.uint16))
    assert read_image(encode(sixteen, "PNG")).max() == 255
    assert read_image(np.zeros((5, 6), np.uint8)).shape == (5, 6, 3)
    assert read_image(np.zeros((5, 6, 4), np.uint8)).shape == (5, 6, 3)


def test_read_image_applies_exif_orientation():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    assert read_image(encode(image, "JPEG", exif=exif)).shape == (40, 20, 3)


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty_file"), (b"not an image at all", "not_an_image"), (None, "truncated_image")],
)
def test_read_image_bad_files(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content is None:
        content = OBAMA.read_bytes()[:5000]
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as error:
        read_image(path)
    assert error.value.reason == reason


def test_read_image_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="missing file"):
        read_image(tmp_path / "nope.jpg")
