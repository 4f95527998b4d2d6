"""One model, one answer: a shipped model by its name and a copy of its file by path give the same faces.

Every artifact carries the face pipeline its model was trained with (chip, context window, flip; see
``c3ae.export.metadata``), so nothing the estimator does depends on where the file lies. Before, the
shipped ``c3ae-utk.tflite`` copied elsewhere lost its context window (1.3) and changed genders.
"""

import json
import shutil
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, utk_faces

from c3ae.bundled import WEIGHTS_DIR, available_models, card_preprocessing, model_card
from c3ae.estimator import AgeGenderEstimator
from c3ae.faces import ChipSpec, read_image

BUNDLED = available_models()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list:
    """The two bundled photos and three UTKFace-style face crops, decoded once (BGR arrays)."""
    crops = sorted(utk_faces(tmp_path_factory.mktemp("faces")).glob("*.jpg"))[:3]
    paths = [REPO / "assets" / "obama.jpg", REPO / "assets" / "astronaut.jpg", *crops]
    return [read_image(path) for path in paths]


def _answers(estimator: AgeGenderEstimator, photos: list) -> list:
    return [[face.to_dict() for face in faces] for faces in estimator.predict_many(photos)]


def _copy(name: str, suffix: str, folder: Path) -> Path:
    """The shipped file copied under a name that says nothing (no card, no companion found by name)."""
    target = folder / f"copy-of-{name}{suffix}"
    shutil.copyfile(WEIGHTS_DIR / f"{name}{suffix}", target)
    return target


def _by_path(name: str, suffix: str, folder: Path, backend: str) -> AgeGenderEstimator:
    """The estimator of the copied file; an age-only model's bundled gender partner (paired by name) is
    given as a copied file too."""
    companion = f"{name}-gender"
    gender = _copy(companion, suffix, folder) if companion in BUNDLED else None
    return AgeGenderEstimator(str(_copy(name, suffix, folder)), backend=backend, gender_model=gender)


@pytest.mark.parametrize("suffix", [".tflite", ".onnx"])
@pytest.mark.parametrize("name", BUNDLED)
def test_a_shipped_model_by_name_and_by_a_copied_path_gives_one_answer(name, suffix, photos, tmp_path):
    backend = suffix[1:]
    by_name = AgeGenderEstimator(name, backend=backend)
    by_path = _by_path(name, suffix, tmp_path, backend)
    assert by_path.spec == by_name.spec == ChipSpec(**model_card(name).chip)
    assert _answers(by_path, photos) == _answers(by_name, photos)


def test_a_shipped_keras_model_by_name_and_by_a_copied_path_gives_one_answer(photos, tmp_path):
    """Every shipped .keras file loads with its card's chip by path; c3ae-utk (context 1.3, the model of
    the report) answers alike (Keras inference is slow: one model's answers stand for the rest)."""
    pytest.importorskip("keras")
    from c3ae.bundled import load_model
    from c3ae.estimator import _chip_spec
    from c3ae.runtime import KerasBackend

    for name in BUNDLED:
        path = _copy(name, ".keras", tmp_path)
        assert _chip_spec(str(path), KerasBackend(load_model(path))) == ChipSpec(**model_card(name).chip)
    by_name = AgeGenderEstimator("c3ae-utk", backend="keras")
    by_path = _by_path("c3ae-utk", ".keras", tmp_path, "keras")
    assert by_path.spec == by_name.spec and by_path.spec.context == 1.3
    assert _answers(by_path, photos[:2]) == _answers(by_name, photos[:2])


@pytest.mark.parametrize("name", BUNDLED)
def test_every_shipped_artifact_carries_its_card_s_face_pipeline(name):
    from c3ae.runtime import load_backend

    expected = card_preprocessing(model_card(name))
    assert "context" in expected["chip"] and expected["flip"] is True
    for suffix in ("tflite", "onnx"):
        described = load_backend(WEIGHTS_DIR / f"{name}.{suffix}", suffix).metadata["preprocessing"]
        assert described["chip"] == expected["chip"], suffix
        assert {k: described[k] for k in ("detector", "min_face", "pad_retry", "flip")} == {
            k: expected[k] for k in ("detector", "min_face", "pad_retry", "flip")
        }
    with zipfile.ZipFile(WEIGHTS_DIR / f"{name}.keras") as archive:
        config = json.loads(archive.read("config.json"))["config"]
    assert config["preprocessing"]["chip"] == expected["chip"]


def test_the_exporter_writes_the_trained_pipeline_and_a_keras_file_keeps_it(tmp_path):
    pytest.importorskip("keras")
    from c3ae.bundled import load_model
    from c3ae.export.metadata import describe_model

    model = load_model("c3ae-utk")
    assert describe_model(model)["preprocessing"]["chip"]["context"] == 1.3
    model.save(tmp_path / "saved.keras")  # what export hands its converter, and what publish ships
    again = load_model(tmp_path / "saved.keras")
    assert again.preprocessing["chip"]["context"] == 1.3
    assert describe_model(again)["preprocessing"]["chip"] == describe_model(model)["preprocessing"]["chip"]


def test_a_run_folder_s_keras_file_takes_its_context_from_the_run_s_config(tmp_path):
    pytest.importorskip("keras")
    from c3ae.bundled import load_model
    from c3ae.models import build_ssrnet

    build_ssrnet(p_activation="softmax", clamp_output=True).save(tmp_path / "best.keras")
    (tmp_path / "config.yaml").write_text("data:\n  context: 1.2\n")
    assert load_model(tmp_path / "best.keras").preprocessing == {"chip": {"context": 1.2}}
    from c3ae.estimator import _chip_spec
    from c3ae.runtime import KerasBackend

    path = str(tmp_path / "best.keras")
    assert _chip_spec(path, KerasBackend(load_model(path))).context == 1.2
