"""MTCNN on LiteRT (c3ae.detector): the same faces as the mtcnn package, no TensorFlow, safe failures."""

import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import REPO, SHARED

from c3ae.detector import (
    DETECTOR_DIR,
    MTCNN,
    NETWORK_FILES,
    DetectorFileError,
    iou_matrix,
    nms,
    pnet_in_tiles,
    pyramid_scales,
    tile_spans,
)

ASSETS = sorted((REPO / "assets").glob("*.jpg"))
MEDIA = sorted((SHARED / "media").glob("*.jpg"))


@pytest.fixture(scope="module")
def detector() -> MTCNN:
    return MTCNN(max_side=None)


@pytest.fixture(scope="module")
def reference():
    """The mtcnn package (TensorFlow): the reference our detector reproduces."""
    pytest.importorskip("mtcnn", reason="the mtcnn package is the reference (pip install 'c3ae[train]')")
    from mtcnn import MTCNN as PackageMTCNN

    package = PackageMTCNN()

    def detect(image_bgr: np.ndarray) -> np.ndarray:
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        rows = package.detect_faces(rgb, fit_to_image=False, box_format="xyxy", output_type="numpy")
        return np.asarray(rows, dtype=np.float64).reshape(-1, 16)[:, 1:]

    return detect


def _compare(ours: np.ndarray, theirs: np.ndarray, min_score: float) -> None:
    """Same faces above ``min_score``; box IoU >= 0.98 and landmarks within 1 px for each."""
    ours, theirs = ours[ours[:, 4] >= min_score], theirs[theirs[:, 4] >= min_score]
    assert len(ours) == len(theirs)
    if not len(ours):
        return
    overlap = iou_matrix(theirs[:, :4], ours[:, :4])
    match = overlap.argmax(axis=1)
    assert sorted(match.tolist()) == list(range(len(ours)))
    assert overlap[np.arange(len(theirs)), match].min() >= 0.98
    np.testing.assert_allclose(ours[match, 5:], theirs[:, 5:], atol=1.0)
    np.testing.assert_allclose(ours[match, 4], theirs[:, 4], atol=0.02)


@pytest.mark.parametrize("path", ASSETS, ids=lambda p: p.name)
def test_same_faces_as_the_mtcnn_package_on_the_assets(detector, reference, path):
    image = cv2.imread(str(path))
    ours = detector.detect(image)
    assert len(ours) >= 1
    _compare(ours, reference(image), min_score=0.9)


@pytest.mark.slow
def test_same_faces_as_the_mtcnn_package_on_real_photos(detector, reference):
    if not MEDIA:
        pytest.skip(f"needs the photos in {SHARED / 'media'} (../shared is not beside this checkout)")
    for path in MEDIA:
        image = cv2.imread(str(path))
        _compare(detector.detect(image), reference(image), min_score=0.9)


def test_our_keras_networks_are_the_packages(reference):
    """Input normalisation and the RGB->BGR swap folded into conv1 change nothing but rounding."""
    from mtcnn.stages import StageONet, StagePNet, StageRNet

    from c3ae.models.mtcnn import build_mtcnn_network

    rng = np.random.default_rng(0)
    for name, stage, shape in (
        ("pnet", StagePNet, (1, 41, 57, 3)),
        ("rnet", StageRNet, (3, 24, 24, 3)),
        ("onet", StageONet, (3, 48, 48, 3)),
    ):
        ours = build_mtcnn_network(name)
        pixels = rng.uniform(0, 255, shape).astype(np.float32)
        theirs = stage().model((pixels[..., ::-1] - 127.5) / 128)
        outputs = ours.predict_on_batch(pixels)
        names = ["offsets", "landmarks", "probabilities"] if name == "onet" else ["offsets", "probabilities"]
        for output, expected in zip(names, theirs, strict=True):
            np.testing.assert_allclose(outputs[output], expected.numpy(), atol=1e-5)


@pytest.mark.slow
def test_the_conversion_command_reproduces_the_shipped_files(tmp_path):
    pytest.importorskip("mtcnn", reason="the conversion reads the mtcnn package's weights")
    from c3ae.export.detector import main

    assert main(["-o", str(tmp_path)]) == 0
    assert "MIT License" in (tmp_path / "LICENSE").read_text()
    image = cv2.imread(str(ASSETS[0]))
    shipped, rebuilt = (
        MTCNN(max_side=None).detect(image),
        MTCNN(max_side=None, model_dir=tmp_path).detect(image),
    )
    np.testing.assert_allclose(rebuilt, shipped, atol=1e-4)


# --------------------------------------------------------------------------------------------- the stages
def test_tiled_pnet_equals_one_call_on_the_whole_level(detector):
    rng = np.random.default_rng(1)
    for height, width in ((701, 533), (600, 800), (259, 1100), (30, 400)):
        level = rng.uniform(0, 255, (height, width, 3)).astype(np.float32)
        offsets, face = pnet_in_tiles(detector.pnet, level)
        whole = detector.pnet(level[None])
        np.testing.assert_allclose(offsets, whole["offsets"][0], atol=1e-5)
        np.testing.assert_allclose(face, whole["probabilities"][0, :, :, 1], atol=1e-5)


def test_tiles_start_on_even_pixels_and_cover_the_side():
    for extent in (300, 513, 1000, 1001):
        spans = tile_spans(extent)
        assert all(start % 2 == 0 for start, _ in spans)
        assert spans[-1][0] + spans[-1][1] == extent
        assert all(b[0] <= a[0] + a[1] - 10 for a, b in zip(spans, spans[1:], strict=False))


def test_pyramid_stops_at_the_12_pixel_window():
    scales = pyramid_scales(640, 360, 20)
    assert scales[0] == pytest.approx(0.6) and np.all(np.diff(scales) < 0)
    assert np.floor(360 * scales[-1]) >= 12
    assert len(pyramid_scales(640, 360, 200)) >= 1  # the package's pyramid fails above min_face 20
    assert len(pyramid_scales(11, 500)) == 0


def test_nms_drops_boxes_overlapping_any_earlier_one():
    boxes = np.array(
        [[0, 0, 10, 10, 0.9], [1, 0, 11, 10, 0.8], [2, 0, 12, 10, 0.7], [50, 50, 60, 60, 0.6]], float
    )
    kept = nms(boxes, 0.5)
    # The package's rule: box 3 overlaps box 2 (suppressed or not) by more than 0.5, so it goes too.
    assert kept[:, 4].tolist() == [0.9, 0.6]


def test_large_photos_are_searched_downscaled_and_mapped_back(detector):
    image = cv2.imread(str(REPO / "assets" / "obama.jpg"))
    big = cv2.resize(image, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
    (small_face,) = detector.detect(image)[:1]
    (big_face,) = MTCNN(max_side=max(image.shape[:2])).detect(big)[:1]
    assert iou_matrix(big_face[None, :4] / 3, small_face[None, :4])[0, 0] > 0.9
    np.testing.assert_allclose(big_face[5:] / 3, small_face[5:], atol=3.0)


def test_video_frames_of_one_size_reuse_their_interpreters():
    detector = MTCNN()
    frame = cv2.resize(cv2.imread(str(REPO / "assets" / "obama.jpg")), (640, 360))
    detector.detect(frame)
    shapes = set(detector.pnet._cache)
    detector.detect(frame[:, ::-1].copy())
    assert set(detector.pnet._cache) == shapes


# ------------------------------------------------------------------------------------------- bad install
@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_broken_detector_file_names_the_file_and_the_reinstall(tmp_path, damage):
    folder = tmp_path / "mtcnn"
    shutil.copytree(DETECTOR_DIR, folder)
    target = folder / NETWORK_FILES["rnet"]
    if damage == "missing":
        target.unlink()
    else:
        target.write_bytes(b"not a flatbuffer" * 10)
    with pytest.raises(DetectorFileError, match=r"rnet\.tflite.*pip install --force-reinstall c3ae"):
        MTCNN(model_dir=folder)


def test_the_cli_reports_a_broken_detector_in_one_line(tmp_path):
    folder = tmp_path / "mtcnn"
    shutil.copytree(DETECTOR_DIR, folder)
    (folder / NETWORK_FILES["onet"]).write_bytes(b"")
    code = (
        "import sys, c3ae.detector as d; d.DETECTOR_DIR = __import__('pathlib').Path(sys.argv[1]); "
        "from c3ae.cli import main; sys.exit(main(['predict', sys.argv[2]]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(folder), str(ASSETS[0])], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "onet.tflite" in result.stderr and "pip install --force-reinstall c3ae" in result.stderr


def test_bench_mtcnn_speed_times_each_stage(tmp_path):
    import json

    from c3ae.cli import main

    out = tmp_path / "speed.json"
    assert main(["bench", "mtcnn", str(ASSETS[0]), "--speed", "--runs", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["size"] == [640, 360] and result["median_ms"] > 0
    assert {"pyramid", "pnet", "rnet", "onet"} <= set(result["stages_median_ms"])
