"""The tf.data input pipeline (c3ae.data) on a tiny hand-made manifest: no detector involved."""

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from c3ae.conventions import AGE_BANDS
from c3ae.data import (
    Augmentation,
    age_to_group,
    augment_crops,
    label_to_group,
    make_dataset,
    mirror_boxes,
    read_manifest,
    split_size,
)
from c3ae.faces import (
    TEMPLATE_IN_BOX,
    ChipSpec,
    Detection,
    align_face,
    crop,
    mask_context,
    model_crops,
    read_image,
)
from c3ae.losses import two_point_encode
from c3ae.models.levi_hassner import ADIENCE_AGE_GROUPS
from c3ae.preprocessing.shards import write_shard

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SPEC = ChipSpec()
TRAIN_AGES = [1.0, 5.0, 23.5, 35.0, 47.0, float("nan"), 62.0, 80.0, 14.0, 30.0]
TRAIN_GENDERS = [1, 0, -1, 1, 0, 1, -1, 0, 1, 0]
VAL_AGES = [3.0, 18.0, 27.0, 41.0, 55.0, 70.0]
VAL_GENDERS = [0, 1, -1, 0, 1, 1]
VAL_LABELS = [None, "15-20", None, "(38, 43)", None, None]


def _face_image() -> tuple[np.ndarray, np.ndarray]:
    """A BGR photo (the repository's public-domain portrait, at a quarter of the original 910x1137) and a
    plausible MTCNN-style face box in it."""
    image = cv2.resize(read_image(ASSETS / "obama.jpg"), (228, 284), interpolation=cv2.INTER_AREA)
    return image, np.array([342.0, 65.0, 642.0, 455.0]) * 0.25


def _detection(box: np.ndarray, scale: float, shift: tuple[float, float], angle: float) -> Detection:
    x1, y1, x2, y2 = box
    centre = np.array([(x1 + x2) / 2 + shift[0], (y1 + y2) / 2 + shift[1]])
    half = np.array([x2 - x1, y2 - y1]) * scale / 2
    new_box = np.concatenate([centre - half, centre + half])
    points = new_box[:2] + TEMPLATE_IN_BOX * (2 * half)
    theta = math.radians(angle)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    points = (points - centre) @ rotation.T + centre
    return Detection(tuple(float(v) for v in new_box), 0.99, tuple((float(x), float(y)) for x, y in points))


def _row(face, age, gender, identity, label=None) -> dict:
    return {
        "image": face.chip_jpeg,
        "age": age,
        "gender": gender,
        "boxes": face.boxes,
        "single_box": face.single_box,
        "landmarks": face.landmarks,
        "detector_score": 0.99,
        "faces_found": 1,
        "source": "test",
        "path": f"{identity}.jpg",
        "identity": identity,
        "label": label,
    }


def _write_manifest(folder: Path, shards: list[dict]) -> Path:
    manifest = {
        "format": "c3ae-manifest",
        "version": 1,
        "dataset": "test",
        "face_pipeline": {"detector": "mtcnn", "min_face": 20, "chip": SPEC.to_dict()},
        "shards": shards,
        "counts": {},
        "rejects": {},
    }
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return build_tiny_manifest(tmp_path_factory.mktemp("shards"))


def build_tiny_manifest(folder: Path) -> dict:
    """train-00000 (6 rows, one without an age), train-00001 (4 rows), val-00000 (6 rows, 2 labelled)."""
    image, box = _face_image()
    variants = [(1.0, (0, 0), 0), (0.9, (3, -2), 8), (1.1, (-4, 3), -10), (1.0, (2, 4), 4)]
    faces = [align_face(image, _detection(box, *v), SPEC) for v in variants]
    train = [
        _row(faces[i % len(faces)], age, gender, f"t{i}")
        for i, (age, gender) in enumerate(zip(TRAIN_AGES, TRAIN_GENDERS, strict=True))
    ]
    val = [
        _row(faces[(i + 1) % len(faces)], age, gender, f"v{i}", label)
        for i, (age, gender, label) in enumerate(zip(VAL_AGES, VAL_GENDERS, VAL_LABELS, strict=True))
    ]
    parts = {"train-00000.feather": train[:6], "train-00001.feather": train[6:], "val-00000.feather": val}
    shards = []
    for name, rows in parts.items():
        write_shard(folder / name, rows)
        shards.append({"file": name, "split": name.split("-")[0], "rows": len(rows)})
    return {"manifest": _write_manifest(folder, shards), "folder": folder, "train": train, "val": val}


def _collect(dataset) -> tuple[dict, dict]:
    inputs, targets = {}, {}
    for batch_inputs, batch_targets in dataset:
        for store, batch in ((inputs, batch_inputs), (targets, batch_targets)):
            for name, value in batch.items():
                store.setdefault(name, []).append(value.numpy())
    return (
        {k: np.concatenate(v) for k, v in inputs.items()},
        {k: np.concatenate(v) for k, v in targets.items()},
    )


# ------------------------------------------------------------------------------------------------ manifest
def test_read_manifest_resolves_shards(data):
    info = read_manifest(data["folder"])
    assert [Path(s["path"]) for s in info["shards"]] == [
        data["folder"] / name for name in ("train-00000.feather", "train-00001.feather", "val-00000.feather")
    ]
    assert split_size(data["manifest"], "train") == 10
    assert split_size(data["manifest"], "val") == 6


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        make_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        make_dataset(tmp_path / "nope.json")


def test_split_and_model_errors(data):
    with pytest.raises(ValueError, match="has no rows in split 'test'"):
        make_dataset(data["manifest"], split="test")
    with pytest.raises(ValueError, match="Unknown split 'holdout'"):
        make_dataset(data["manifest"], split="holdout")
    with pytest.raises(ValueError, match="Unknown model family 'resnet'"):
        make_dataset(data["manifest"], model="resnet")
    with pytest.raises(ValueError, match="no outputs"):
        make_dataset(data["manifest"], outputs=["age_group"])


# ------------------------------------------------------------------------------------------------- specs
@pytest.mark.parametrize(
    ("model", "inputs", "size", "targets"),
    [
        ("c3ae", ("outer", "middle", "inner"), 64, {"age": 1, "age_bins": 12, "gender": 1}),
        ("ssrnet", ("image",), 64, {"age": 1, "gender": 1}),
        ("dldl", ("image",), 64, {"age": 1, "age_bins": 1, "gender": 1}),
        ("levi_hassner", ("image",), 227, {"age_group": len(ADIENCE_AGE_GROUPS), "gender": 1}),
    ],
)
def test_element_spec(data, model, inputs, size, targets):
    dataset = make_dataset(data["manifest"], split="val", model=model, batch_size=4)
    input_spec, target_spec = dataset.element_spec
    assert tuple(input_spec) == inputs
    assert set(target_spec) == set(targets)
    for spec in input_spec.values():
        assert spec.shape.as_list() == [None, size, size, 3] and spec.dtype.name == "float32"
    for name, width in targets.items():
        assert (
            target_spec[name].shape.as_list() == [None, width] and target_spec[name].dtype.name == "float32"
        )
    batch_inputs, batch_targets = next(iter(dataset))
    assert batch_inputs[inputs[0]].shape == (4, size, size, 3)
    assert all(batch_targets[name].shape == (4, width) for name, width in targets.items())


def test_crops_match_face_pipeline_without_augmentation(data):
    inputs, targets = _collect(make_dataset(data["manifest"], split="val", batch_size=4))
    rows = data["val"]
    assert len(targets["age"]) == len(rows)
    for index, row in enumerate(rows):  # unshuffled: manifest order
        chip = cv2.imdecode(np.frombuffer(row["image"], np.uint8), cv2.IMREAD_COLOR)
        for name, box in zip(("outer", "middle", "inner"), row["boxes"], strict=True):
            np.testing.assert_array_equal(inputs[name][index], crop(chip, box, 64).astype(np.float32))
    np.testing.assert_array_equal(targets["age"][:, 0], np.float32(VAL_AGES))
    np.testing.assert_array_equal(targets["gender"][:, 0], np.float32(VAL_GENDERS))
    np.testing.assert_allclose(targets["age_bins"], two_point_encode(np.float32(VAL_AGES)), atol=1e-6)

    single, _ = _collect(make_dataset(data["manifest"], split="val", model="ssrnet", batch_size=8))
    for index, row in enumerate(rows):
        chip = cv2.imdecode(np.frombuffer(row["image"], np.uint8), cv2.IMREAD_COLOR)
        np.testing.assert_array_equal(single["image"][index], crop(chip, row["single_box"], 64))


@pytest.mark.parametrize("model", ["c3ae", "ssrnet"])
def test_context_window_crops_match_inference_crops(data, model):
    """With a context window, training crops are still exactly the crops inference makes (model_crops)."""
    inputs, _ = _collect(make_dataset(data["manifest"], split="val", model=model, batch_size=4, context=1.2))
    plain, _ = _collect(make_dataset(data["manifest"], split="val", model=model, batch_size=4))
    for index, row in enumerate(data["val"]):
        chip = cv2.imdecode(np.frombuffer(row["image"], np.uint8), cv2.IMREAD_COLOR)
        boxes = np.asarray(row["boxes"], np.float32)
        layout = "triple" if model == "c3ae" else "single"
        live = model_crops(chip, boxes, np.asarray(row["single_box"]), layout, 64, context=1.2)
        for name, value in live.items():
            np.testing.assert_array_equal(inputs[name][index], value.astype(np.float32), err_msg=name)
    name = "outer" if model == "c3ae" else "image"
    assert not np.array_equal(inputs[name], plain[name])  # the window did cut something


def test_mask_context_keeps_a_square_window_around_the_inner_box():
    chip = np.full((20, 20, 3), 200, np.uint8)
    masked = mask_context(chip, (8, 8, 12, 12), 2.0)  # 8 px window centred on (10, 10): pixels 6..13
    assert masked[6:14, 6:14].min() == 200 and masked.sum() == 8 * 8 * 3 * 200
    assert mask_context(chip, (8, 8, 12, 12), 0.0) is chip
    assert mask_context(chip, (-50, -50, -40, -40), 1.0).sum() == 0  # window off the chip: all black


def test_nan_ages_dropped_only_for_age_targets(data):
    _, targets = _collect(make_dataset(data["manifest"], batch_size=4, seed=0, augment=False))
    assert len(targets["age"]) == 9 and np.isfinite(targets["age"]).all()
    expected = sorted(a for a in TRAIN_AGES if not math.isnan(a))
    assert sorted(targets["age"][:, 0].tolist()) == expected
    np.testing.assert_allclose(targets["age_bins"], two_point_encode(targets["age"]), atol=1e-6)
    _, gender_only = _collect(make_dataset(data["manifest"], batch_size=4, seed=0, outputs=["gender"]))
    assert set(gender_only) == {"gender"}
    assert len(gender_only["gender"]) == 10  # the row without an age is kept
    assert sorted(gender_only["gender"][:, 0].tolist()) == sorted(float(g) for g in TRAIN_GENDERS)


@pytest.mark.parametrize("balance", [0.0, 1.0])
def test_label_weights_give_unknown_labels_a_weight_of_zero(data, balance):
    """label_weights=True: per-output sample weights, the balance weight times 0 for unknown genders."""
    from c3ae.data import balance_table

    kwargs = {"batch_size": 4, "seed": 0, "augment": False, "balance": balance}
    weighted = list(make_dataset(data["manifest"], label_weights=True, **kwargs))
    assert all(set(weights) == set(targets) for _, targets, weights in weighted)
    gender = np.concatenate([targets["gender"].numpy().ravel() for _, targets, _ in weighted])
    age = np.concatenate([targets["age"].numpy().ravel() for _, targets, _ in weighted])
    table = balance_table(data["manifest"], "train", balance)
    bands = np.searchsorted([low for _, low, _ in AGE_BANDS], age, side="right") - 1
    expected = table[bands, np.where(gender < 0, 2, gender).astype(int)]
    for name in ("age", "age_bins", "gender"):
        values = np.concatenate([weights[name].numpy() for *_, weights in weighted])
        np.testing.assert_allclose(values, expected * (gender >= 0 if name == "gender" else 1), rtol=1e-6)
    assert (gender == -1).any()
    plain = list(make_dataset(data["manifest"], **kwargs))  # the same batches, weights aside
    np.testing.assert_array_equal(np.concatenate([t["gender"].numpy().ravel() for _, t, *_ in plain]), gender)


def test_outputs_restricts_targets_and_dldl_bins_are_ages(data):
    dataset = make_dataset(data["manifest"], split="val", model="dldl", outputs=["age_bins", "age"])
    _, targets = _collect(dataset)
    assert set(targets) == {"age", "age_bins"}
    np.testing.assert_array_equal(targets["age_bins"], targets["age"])


# ----------------------------------------------------------------------------------------- augmentation
def _epoch(iterator_source) -> dict:
    inputs, targets = _collect(iterator_source)
    return {**inputs, **{f"t_{k}": v for k, v in targets.items()}}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_augmentation_is_deterministic_per_seed_and_varies_per_epoch(data):
    first = make_dataset(data["manifest"], batch_size=4, seed=3)
    second = make_dataset(data["manifest"], batch_size=4, seed=3)
    other = make_dataset(data["manifest"], batch_size=4, seed=4)
    epoch_1, epoch_1_again = _epoch(first), _epoch(second)
    assert _same(epoch_1, epoch_1_again)
    assert not _same(epoch_1, _epoch(other))
    epoch_2 = _epoch(first)
    assert not np.array_equal(epoch_1["outer"], epoch_2["outer"])
    assert _same(epoch_2, _epoch(second))  # fresh runs with a seed reproduce each other, epoch by epoch
    for crops in (epoch_1["outer"], epoch_1["inner"]):
        assert crops.dtype == np.float32 and crops.min() >= 0 and crops.max() <= 255
        np.testing.assert_array_equal(crops, np.round(crops))


def test_mirror_boxes():
    boxes = np.array([[10.0, 20.0, 50.0, 70.0], [0.0, 5.0, 160.0, 6.0]])
    mirrored = mirror_boxes(boxes, 160)
    np.testing.assert_array_equal(mirrored, [[110.0, 20.0, 150.0, 70.0], [0.0, 5.0, 160.0, 6.0]])
    np.testing.assert_array_equal(mirror_boxes(mirrored, 160), boxes)


def test_flip_mirrors_chip_and_boxes(data):
    row = data["train"][1]
    chip = cv2.imdecode(np.frombuffer(row["image"], np.uint8), cv2.IMREAD_COLOR)
    flip_only = Augmentation(
        flip=1.0, max_rotation=0.0, shift=0.0, scale=0.0, contrast=(1, 1), brightness=(0, 0), erase=0.0
    )
    flipped = augment_crops(chip, row["boxes"], 64, np.random.default_rng(0), params=flip_only)
    for index, box in enumerate(row["boxes"]):
        expected = crop(np.ascontiguousarray(chip[:, ::-1]), mirror_boxes(box, chip.shape[1]), 64)
        np.testing.assert_array_equal(flipped[index], expected)
        # and it is the mirror image of the unflipped crop (up to cv2's fixed-point interpolation weights)
        plain = crop(chip, box, 64)
        assert np.abs(flipped[index][:, ::-1].astype(int) - plain).max() <= 2
    no_change = Augmentation(**{**flip_only.__dict__, "flip": 0.0})
    same = augment_crops(chip, row["boxes"], 64, np.random.default_rng(0), params=no_change)
    np.testing.assert_array_equal(same, np.stack([crop(chip, b, 64) for b in row["boxes"]]))


# --------------------------------------------------------------------------------------- corrupt shards
def test_corrupt_shard_is_skipped_then_raises(data, tmp_path, caplog):
    info = json.loads(data["manifest"].read_text())
    for shard in info["shards"]:
        shard["file"] = str(data["folder"] / shard["file"])
    (tmp_path / "broken.feather").write_bytes(b"not a feather file at all")
    info["shards"][0]["file"] = "broken.feather"
    (tmp_path / "manifest.json").write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING, logger="c3ae.data"):
        dataset = make_dataset(tmp_path, batch_size=8, seed=1, outputs=["gender"])
    assert "Skipping 1 of 2 shards" in caplog.text and "broken.feather" in caplog.text
    _, targets = _collect(dataset)
    assert len(targets["gender"]) == 4  # train-00001 only

    info["shards"][1]["file"] = "missing.feather"
    (tmp_path / "manifest.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="no readable shard in split 'train'"):
        make_dataset(tmp_path)


# ------------------------------------------------------------------------------------------ age groups
def test_age_to_adience_group():
    groups = {age: ADIENCE_AGE_GROUPS[age_to_group(age)] for age in (0, 2, 2.5, 3.5, 5, 7.5, 14.5, 22, 24)}
    assert groups == {
        0: "0-2",
        2: "0-2",
        2.5: "0-2",
        3.5: "4-6",
        5: "4-6",
        7.5: "8-13",
        14.5: "15-20",
        22: "15-20",
        24: "25-32",
    }
    assert [ADIENCE_AGE_GROUPS[age_to_group(a)] for a in (35, 36, 45, 58, 60, 95)] == [
        "25-32",
        "38-43",
        "38-43",
        "60+",
        "60+",
        "60+",
    ]
    assert age_to_group(float("nan")) == -1
    assert (
        label_to_group("25-32") == 4 and label_to_group("(38, 43)") == 5 and label_to_group("(60, 100)") == 7
    )
    assert label_to_group("(27, 32)") == 4 and label_to_group("(8, 23)") == 3 and label_to_group("45") == 5
    assert label_to_group("cat") == -1 and label_to_group(None) == -1 and label_to_group("") == -1


def test_levi_hassner_groups_prefer_labels(data):
    _, targets = _collect(make_dataset(data["manifest"], split="val", model="levi_hassner", batch_size=3))
    groups = [ADIENCE_AGE_GROUPS[i] for i in targets["age_group"].argmax(axis=1)]
    # ages 3, 18, 27, 41, 55, 70 with labels "15-20" on the 2nd and "(38, 43)" on the 4th row
    assert groups == ["0-2", "15-20", "25-32", "38-43", "48-53", "60+"]
    assert (targets["age_group"].sum(axis=1) == 1).all()


# ---------------------------------------------------------------------------------------------- bench
def test_bench_data_smoke(data):
    from c3ae.bench import bench_data, format_bench_table

    result = bench_data(data["manifest"], batch_size=4, batches=3, warmup=1)
    assert result["images_per_s_median"] > 0 and result["images_per_s_overall"] > 0
    table = format_bench_table([result])
    assert table.startswith("|") and "images_per_s_median" in table


def test_corrupt_image_rows_are_skipped_and_named(data, tmp_path, caplog):
    """A truncated or garbled JPEG in a shard row: the row is dropped with its shard and index named,
    instead of TensorFlow's decoder stopping the run ("jpeg::Uncompress failed")."""
    import pyarrow as pa
    import pyarrow.feather as feather

    info = json.loads(data["manifest"].read_text())
    for shard in info["shards"]:
        shard["file"] = str(data["folder"] / shard["file"])
    first = next(s for s in info["shards"] if s["split"] == "train")
    table = feather.read_table(first["file"])
    images = table.column("image").to_pylist()
    images[1] = images[1][: len(images[1]) // 2]  # truncated
    images[2] = b"\xff\xd8 not really a JPEG"  # garbled
    # damaged in the middle of the scan, its start and end markers intact
    images[4] = images[4][:300] + b"\x00" * 400 + images[4][700:]
    table = table.set_column(table.column_names.index("image"), "image", pa.array(images, pa.binary()))
    feather.write_feather(table, tmp_path / "damaged.feather")
    first["file"] = str(tmp_path / "damaged.feather")
    (tmp_path / "manifest.json").write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING, logger="c3ae.data"):
        _, targets = _collect(make_dataset(tmp_path, batch_size=8, seed=1, outputs=["gender"]))
        _, intact = _collect(make_dataset(data["manifest"], batch_size=8, seed=1, outputs=["gender"]))
    assert len(targets["gender"]) == len(intact["gender"]) - 3
    assert "Skipping 3 row(s) of shard" in caplog.text and "damaged.feather" in caplog.text
    assert "(rows 1, 2, 4)" in caplog.text
