"""Detection bounded for any photo: crowds of hundreds of faces, extreme aspect ratios, tiny min_face and the
padded retry, in chunks below OpenCV's limits and in memory linear in the pixels (issue 21, point 2)."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import REPO

import c3ae.detector as detector_module
from c3ae.detector import BATCH_LIMIT, MTCNN, REMAP_LIMIT, crop_and_resize, nms

PHOTO = REPO / "assets" / "obama.jpg"


def face_tile(side: int) -> np.ndarray:
    """The face of the bundled photo, ``side`` pixels square (forehead to chin)."""
    return cv2.resize(cv2.imread(str(PHOTO))[0:390, 100:550], (side, side), interpolation=cv2.INTER_AREA)


def crowd(count: int, side: int, gap: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A grid of ``count`` copies of the face on grey, about 16:9, and each copy's box (x1, y1, x2, y2)."""
    columns = int(np.ceil(np.sqrt(count * 16 / 9)))
    rows = -(-count // columns)
    step = side + gap
    image = np.full((rows * step + gap, columns * step + gap, 3), 128, np.uint8)
    tile, boxes = face_tile(side), []
    for index in range(count):
        y, x = (gap + step * k for k in divmod(index, columns))
        image[y : y + side, x : x + side] = tile
        boxes.append((x, y, x + side, y + side))
    return image, np.array(boxes, float)


def assert_each_face_found(found: np.ndarray, boxes: np.ndarray) -> None:
    """One confident detection on every face of the grid, and no more than one per face."""
    found = found[found[:, 4] >= 0.9]
    centres_x, centres_y = (found[:, 0] + found[:, 2]) / 2, (found[:, 1] + found[:, 3]) / 2
    inside = (
        (boxes[:, None, 0] <= centres_x)
        & (centres_x <= boxes[:, None, 2])
        & (boxes[:, None, 1] <= centres_y)
        & (centres_y <= boxes[:, None, 3])
    )
    assert inside.any(axis=1).all(), f"{(~inside.any(axis=1)).sum()} of {len(boxes)} faces missed"
    assert (inside.sum(axis=1) == 1).all()


@pytest.fixture(scope="module")
def detector() -> MTCNN:
    return MTCNN()


# ------------------------------------------------------------------------------------- chunks and limits
def test_thousands_of_patches_are_sampled_in_chunks_below_remaps_limit():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (360, 640, 3)).astype(np.float32)
    corners = rng.uniform(-20, 600, (3000, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(5, 80, (3000, 1))], axis=1)
    assert 3000 * 48 > REMAP_LIMIT  # one remap call for all of them is what OpenCV refuses
    patches = crop_and_resize(image, boxes, 48)
    assert patches.shape == (3000, 48, 48, 3)
    for index in (0, 1, BATCH_LIMIT - 1, BATCH_LIMIT, 2999):
        np.testing.assert_array_equal(patches[index], crop_and_resize(image, boxes[index : index + 1], 48)[0])


def test_photos_wider_than_remaps_limit_are_sampled_from_the_pixels_they_need(monkeypatch):
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, (120, 500, 3)).astype(np.float32)
    corners = rng.uniform(-30, 480, (50, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(3, 150, (50, 1))], axis=1)
    whole = crop_and_resize(image, boxes, 24)
    monkeypatch.setattr(detector_module, "REMAP_LIMIT", 100)  # as if the photo were 32767 pixels wide
    np.testing.assert_allclose(crop_and_resize(image, boxes, 24), whole, atol=1e-3)
    monkeypatch.undo()
    strip = rng.uniform(0, 255, (20, REMAP_LIMIT + 5000, 3)).astype(np.float32)
    patches = crop_and_resize(strip, np.array([[37000.0, 2, 37016, 18], [10, -5, 30, 15]]), 24)
    assert patches.shape == (2, 24, 24, 3) and np.isfinite(patches).all()


def test_nms_of_thousands_of_boxes_equals_the_pairwise_rule():
    rng = np.random.default_rng(2)
    corners = rng.uniform(0, 1000, (3000, 2))
    boxes = np.concatenate(
        [corners, corners + rng.uniform(10, 40, (3000, 1)), rng.uniform(0, 1, (3000, 1))], axis=1
    )
    boxes = boxes[np.argsort(boxes[:, 4])[::-1]]
    overlap = detector_module.iou_matrix(boxes, boxes)
    expected = boxes[~np.triu(overlap > 0.5, 1).any(axis=0)]
    np.testing.assert_array_equal(nms(boxes, 0.5, sort=False), expected)
    groups = rng.integers(0, 3, 3000)
    same = groups[:, None] == groups[None, :]
    expected = boxes[~(np.triu(overlap > 0.5, 1) & same).any(axis=0)]
    np.testing.assert_array_equal(nms(boxes, 0.5, sort=False, groups=groups), expected)


def test_a_min_face_below_the_12_pixel_window_searches_from_12(detector):
    image = cv2.resize(cv2.imread(str(PHOTO)), (240, 300), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(MTCNN(min_face=1).detect(image), MTCNN(min_face=12).detect(image))


# --------------------------------------------------------------------------------------------- crowds
def test_a_crowd_of_200_faces_is_found(detector):
    image, boxes = crowd(200, 40)
    assert_each_face_found(detector.detect(image), boxes)


@pytest.mark.parametrize("count", [500, 1000])
def test_crowds_of_500_and_1000_faces_pass_r_net_and_o_net(detector, count):
    """R-Net and O-Net on every face of the crowd (their crops and calls in chunks); P-Net's proposals
    for so many faces are the 200-face test's."""
    image, boxes = crowd(count, 40)
    image = image.astype(np.float32)
    # P-Net's square proposal around each face: the face spans x 0.32-0.68, y 0.14-0.71 of the tile.
    side = boxes[:, 2:3] - boxes[:, 0:1]
    centre = boxes[:, :2] + side * np.array([0.5, 0.42])
    jitter = np.random.default_rng(count).uniform(-1, 1, (count, 2))
    corner = centre + jitter - 0.3 * side
    proposals = np.concatenate([corner, corner + 0.6 * side, np.ones((count, 1))], axis=1)
    clock = detector_module._Clock(None)
    found = detector._onet(image, detector._rnet(image, proposals, clock), clock)
    assert_each_face_found(found, boxes)


# ------------------------------------------------------------------------------- under a memory limit
MEMORY_LIMIT_GB = 4  # the process needs about 1.2 GB of address space; the old padded retry needed 22 GB

LIMITED = """
import json, resource, sys
import numpy as np

limit = int(float(sys.argv[1]) * 2**30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.path.insert(0, sys.argv[2])
from test_crowds import crowd, face_tile
from c3ae.detector import MTCNN
from c3ae.faces import FacePipeline

results = {}
image, boxes = crowd(200, 40)
results["crowd"] = int((MTCNN().detect(image)[:, 4] >= 0.9).sum())
# 1000 faces (tiny once the photo is searched at 1280 pixels): thousands of R-Net proposals, which one
# remap call refused.
image, boxes = crowd(1000, 40)
results["crowd_1000"] = MTCNN().detect(image).shape[1]
# A strip wider than remap's limit, searched at full size: 180 faces in a row.
strip = np.full((48, 36000, 3), 128, np.uint8)
for x in range(0, 36000 - 44, 200):
    strip[2:46, x : x + 44] = face_tile(44)
results["strip"] = int((MTCNN(max_side=None).detect(strip)[:, 4] >= 0.9).sum())
pipeline = FacePipeline()
for height, width in ((10, 100000), (100000, 10), (1, 1), (12, 12), (30, 20000)):
    results[f"{height}x{width}"] = len(pipeline.detect(np.full((height, width, 3), 200, np.uint8)))
print(json.dumps(results))
"""


def test_crowds_strips_and_thin_photos_under_a_memory_limit():
    result = subprocess.run(
        [sys.executable, "-c", LIMITED, str(MEMORY_LIMIT_GB), str(REPO / "tests")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert results["crowd"] >= 200 and results["strip"] == 180 and results["crowd_1000"] == 15
    assert all(results[shape] == 0 for shape in ("10x100000", "100000x10", "1x1", "12x12", "30x20000"))
