"""The default model's answers on the photos a user tries first (../shared/media): plausible, and the same
whatever the photo's encoding. Skips without ../shared."""

import cv2
import numpy as np
import pytest
from conftest import SHARED

MEDIA = SHARED / "media"
PHOTOS = ["obama.jpg", "astronaut.png", "biden.jpg", "t1.jpg", "two_people.jpg", "obama-240p.jpg"]


@pytest.fixture(scope="module")
def estimator():
    if not MEDIA.is_dir():
        pytest.skip(f"needs the photos in {MEDIA} (../shared is not beside this checkout)")
    from c3ae import AgeGenderEstimator

    return AgeGenderEstimator()


def _encoded(image: np.ndarray, kind: str) -> np.ndarray:
    """The photo after a round trip through PNG (lossless), JPEG at quality 75 or WebP (default quality)."""
    options = {"png": [], "jpg": [cv2.IMWRITE_JPEG_QUALITY, 75], "webp": []}[kind]
    ok, data = cv2.imencode(f".{kind}", image, options)
    assert ok
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def _match(reference, faces):
    """``faces`` reordered to the reference's (the nearest box centre of each)."""

    def centre(face):
        x, y, w, h = face.box
        return np.array([x + w / 2, y + h / 2])

    return [min(faces, key=lambda f, r=r: np.linalg.norm(centre(f) - centre(r))) for r in reference]


@pytest.mark.parametrize("name", PHOTOS)
def test_the_same_photo_in_any_encoding_gets_the_same_answers(estimator, name):
    """PNG, JPEG at quality 75 and WebP: the same faces, the same genders, ages within 2 years."""
    from c3ae.faces import read_image

    image = read_image(MEDIA / name)
    reference = estimator.predict(_encoded(image, "png"))
    assert reference
    for kind in ("jpg", "webp"):
        faces = estimator.predict(_encoded(image, kind))
        assert len(faces) == len(reference), kind
        for ref, face in zip(reference, _match(reference, faces), strict=True):
            assert face.gender == ref.gender, (kind, ref, face)
            assert abs(face.age - ref.age) <= 2.0, (kind, ref.age, face.age)


def test_obama_in_his_official_portrait(estimator):
    """Barack Obama in his official portrait, taken at 51."""
    (obama,) = estimator.predict(MEDIA / "obama.jpg")
    assert obama.gender == "male" and 46 <= obama.age <= 56, obama


@pytest.mark.xfail(
    strict=True,
    reason="a missed target (docs/distillation.md): the default says 24 and the teacher 29 for Eileen "
    "Collins at about 43; strict, so that a model that gets it right updates the docs",
)
def test_the_astronaut(estimator):
    (collins,) = estimator.predict(MEDIA / "astronaut.png")
    assert collins.gender == "female" and 35 <= collins.age <= 50, collins
