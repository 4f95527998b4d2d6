"""AgeGenderEstimator and Face on real faces (assets/), batching, and bad inputs.

Uses the bundled c3ae-utk model when the package ships it, otherwise an untrained C3AE (SE + gender) saved
to a temporary folder: the face pipeline, the batching and the output schema are the same either way.
"""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from c3ae.estimator import AgeGenderEstimator, Face, age_spread
from c3ae.faces import FacePipeline, ImageReadError, read_image

OBAMA = REPO / "assets" / "obama.jpg"
ASTRONAUT = REPO / "assets" / "astronaut.jpg"
FACE_KEYS = {"box", "box_xywh", "landmarks", "detector_score", "age", "age_std", "gender", "gender_prob"}


@pytest.fixture(scope="module")
def estimator(model):
    return AgeGenderEstimator(model)


@pytest.fixture(scope="module")
def obama_faces(estimator):
    return estimator.predict(OBAMA)


def check_face(face: Face, image_shape) -> None:
    data = face.to_dict()
    assert set(data) == FACE_KEYS
    assert json.loads(json.dumps(data)) == data  # plain Python types only
    x, y, w, h = face.box
    assert all(type(v) is float for v in face.box) and w >= 20 and h >= 20
    assert 0 <= x + w / 2 <= image_shape[1] and 0 <= y + h / 2 <= image_shape[0]
    assert set(face.landmarks) == {"left_eye", "right_eye", "nose", "mouth_left", "mouth_right"}
    assert type(face.detector_score) is float and 0.8 <= face.detector_score <= 1.0
    assert type(face.age) is float and 0.0 <= face.age <= 110.0
    assert type(face.age_std) is float and 0.0 <= face.age_std <= 55.0
    assert face.gender in ("male", "female")
    assert type(face.gender_prob) is float and 0.5 <= face.gender_prob <= 1.0


# ------------------------------------------------------------------------------------------------ real faces
def test_one_face_per_portrait_with_the_documented_schema(obama_faces):
    image = read_image(OBAMA)
    assert len(obama_faces) == 1
    check_face(obama_faces[0], image.shape)
    x, y, w, h = obama_faces[0].box
    assert 0.25 * image.shape[1] < x + w / 2 < 0.75 * image.shape[1]
    assert obama_faces[0].label == f"{round(obama_faces[0].age)} {obama_faces[0].gender[0].upper()}"


def test_bundled_model_gives_plausible_ages(obama_faces, estimator):
    assert abs(obama_faces[0].age - 51) <= 12  # born Aug 1961, photographed Dec 2012: 51
    assert obama_faces[0].gender == "male"
    # Eileen Collins (born 1956); the portrait's year is not recorded, so only her gender is checked.
    assert estimator.predict(ASTRONAUT)[0].gender == "female"


def test_path_and_bgr_array_give_the_same_faces(estimator, obama_faces):
    from_array = estimator.predict(cv2.imread(str(OBAMA)))
    assert [f.to_dict() for f in from_array] == [f.to_dict() for f in obama_faces]


def test_grayscale_and_rgba_images_are_converted(estimator, tmp_path):
    gray = cv2.cvtColor(read_image(OBAMA), cv2.COLOR_BGR2GRAY)
    faces = estimator.predict(gray)  # H x W array
    assert len(faces) == 1
    rgba = tmp_path / "rgba.png"
    Image.open(OBAMA).convert("RGBA").save(rgba)
    faces = estimator.predict(rgba)
    assert len(faces) == 1
    check_face(faces[0], gray.shape)


def test_all_faces_of_all_images_in_one_batched_call(estimator, obama_faces):
    backend = estimator.backends[0]
    calls = []
    original = backend.predict

    def counting(inputs):
        calls.append(len(next(iter(inputs.values()))))
        return original(inputs)

    backend.predict = counting
    try:
        results = estimator.predict_many([OBAMA, ASTRONAUT, np.full((120, 160, 3), 90, np.uint8)])
    finally:
        del backend.predict
    assert calls == ([4] if estimator.flip else [2])  # two faces (and their mirror images), one model call
    assert [len(r) for r in results] == [1, 1, 0]
    one, many = obama_faces[0], results[0][0]
    assert one.box == many.box and abs(one.age - many.age) < 0.05
    assert abs(one.gender_prob - many.gender_prob) < 1e-3


def test_flip_averages_each_face_with_its_mirror_image(model):
    flipped = AgeGenderEstimator(model, flip=True)
    assert AgeGenderEstimator(model).flip  # on by default (the README's TTA ablation)
    backend = flipped.backends[0]
    feeds, outputs = [], []
    original = backend.predict

    def recording(inputs):
        feeds.append({name: np.array(crops) for name, crops in inputs.items()})
        outputs.append(original(inputs))
        return outputs[-1]

    backend.predict = recording
    try:
        (face,) = flipped.predict(OBAMA)
    finally:
        del backend.predict
    assert len(feeds) == 1  # the face and its mirror image in one call
    for crops in feeds[0].values():
        assert len(crops) == 2
        np.testing.assert_array_equal(crops[1], crops[0][:, ::-1])
    expected = (float(outputs[0]["age"][0, 0]) + float(outputs[0]["age"][1, 0])) / 2
    assert abs(face.age - expected) < 0.006
    (plain,) = AgeGenderEstimator(model, flip=False).predict(OBAMA)
    assert plain.box == face.box


def test_inference_crops_come_from_the_training_face_pipeline(estimator):
    image = read_image(OBAMA)
    ours = estimator.align(image, estimator.detect(image))
    training = FacePipeline("mtcnn").process(image)
    assert len(ours) == len(training) == 1
    np.testing.assert_array_equal(ours[0].chip, training[0].chip)
    np.testing.assert_allclose(ours[0].boxes, training[0].boxes)


def test_haar_detector_has_no_landmarks(model):
    faces = AgeGenderEstimator(model, detector="haar").predict(OBAMA)
    assert len(faces) >= 1 and faces[0].landmarks is None and faces[0].detector_score == 1.0


# ------------------------------------------------------------------------------------------------ bad input
def test_no_face_is_an_empty_list(estimator):
    assert estimator.predict(np.full((200, 300, 3), 128, np.uint8)) == []


def test_faces_below_min_face_are_ignored(model, obama_faces):
    width = obama_faces[0].box[2]
    assert AgeGenderEstimator(model, min_face=int(width) + 10).predict(OBAMA) == []
    # Larger min_face values search a shrunk copy (mtcnn 1.0 finds nothing when asked for a
    # min_face_size above 20), and must still find a face just above the limit.
    kept = AgeGenderEstimator(model, min_face=int(width * 0.8)).predict(OBAMA)
    assert len(kept) == 1 and abs(kept[0].box[2] - width) < 0.1 * width


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_unreadable_images_raise_a_clear_error(estimator, tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content is None:  # truncated JPEG
        content = OBAMA.read_bytes()[:2000]
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match="bad.jpg"):
        estimator.predict(path)


def test_unknown_model_and_detector():
    with pytest.raises(ValueError, match="neither"):
        AgeGenderEstimator("no-such-model")
    with pytest.raises(ValueError, match="Unknown detector"):
        AgeGenderEstimator("no-such-model", detector="yolo")


# ------------------------------------------------------------------------------------------------ models
@pytest.mark.slow
def test_single_input_age_model_with_a_separate_gender_model(tmp_path, model):
    """SSR-Net: one ``image`` input, no age_bins; gender from a second model."""
    from c3ae.models import build_ssrnet

    age_path, gender_path = tmp_path / "ssr.keras", tmp_path / "ssr-gender.keras"
    build_ssrnet(p_activation="softmax", clamp_output=True).save(age_path)  # finite when untrained
    build_ssrnet(V=1, p_activation="softmax", clamp_output=True).save(gender_path)
    age_only = AgeGenderEstimator(str(age_path)).predict(OBAMA)
    assert len(age_only) == 1 and age_only[0].age is not None
    assert age_only[0].age_std is None and age_only[0].gender is None and age_only[0].gender_prob is None
    both = AgeGenderEstimator(str(age_path), gender_model=str(gender_path)).predict(OBAMA)[0]
    assert both.age == age_only[0].age and both.gender in ("male", "female")


def test_age_std_is_the_spread_of_the_bin_distribution():
    two_point = np.zeros((1, 12))
    two_point[0, 3], two_point[0, 4] = 0.6, 0.4  # age 34
    np.testing.assert_allclose(age_spread(two_point), [10 * np.sqrt(0.24)])
    np.testing.assert_allclose(age_spread(np.eye(12)[[5]]), [0.0])
    uniform = np.full((1, 12), 1 / 12)
    np.testing.assert_allclose(age_spread(uniform), [np.arange(12).std() * 10])


def test_import_c3ae_stays_light():
    code = (
        "import sys; from c3ae import AgeGenderEstimator, Face; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules; print(AgeGenderEstimator)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_a_pil_image_is_a_photo_and_a_url_is_refused_in_one_sentence(tmp_path):
    """Issue 20: a PIL image gave a raw TypeError; a URL was mangled into 'https:/... does not exist'."""
    import subprocess
    import sys

    from PIL import Image

    from c3ae import AgeGenderEstimator
    from c3ae.faces import ImageReadError, read_image

    photo = REPO / "assets" / "obama.jpg"
    with Image.open(photo) as image:
        np.testing.assert_array_equal(read_image(image), read_image(photo))
        estimator = AgeGenderEstimator()
        assert estimator.predict(image)[0].to_dict() == estimator.predict(photo)[0].to_dict()
    with pytest.raises(ImageReadError, match="is a url: c3ae reads local files and downloads nothing"):
        read_image("https://example.com/a.jpg")
    done = subprocess.run(
        [sys.executable, "-m", "c3ae.cli", "predict", "https://example.com/a.jpg"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "https://example.com/a.jpg is a URL; c3ae reads local files and downloads nothing" in done.stderr
