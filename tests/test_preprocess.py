"""c3ae preprocess: shards, manifest, rejects, split, resume, interruption, train/inference crop identity."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO, utk_faces

import c3ae.preprocessing.pipeline as pipeline_module
from c3ae.faces import FacePipeline, crop, model_crops, read_image
from c3ae.preprocessing.pipeline import PreprocessError, assign_splits, preprocess
from c3ae.preprocessing.readers import Sample
from c3ae.preprocessing.shards import fixed_list_to_numpy, read_shard

FACES = [REPO / "assets" / "obama.jpg", REPO / "assets" / "astronaut.jpg"]


def small_face(path, side=240) -> np.ndarray:
    image = read_image(path)
    scale = side / max(image.shape[:2])
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def utk_layout(tmp_path_factory):
    """A tiny UTKFace-style folder: 6 real faces (flips and crops of the two assets), one corrupt file,
    one photo without a face, one malformed name."""
    root = utk_faces(tmp_path_factory.mktemp("utk"))
    (root / "30_1_0_20170110000000001.jpg.chip.jpg").write_bytes(
        b"\xff\xd8\xff\xe0 a JPEG header and nothing else"
    )
    cv2.imwrite(str(root / "40_0_0_20170110000000002.jpg.chip.jpg"), np.full((200, 200, 3), 127, np.uint8))
    cv2.imwrite(str(root / "abc_def.jpg.chip.jpg"), small_face(FACES[0]))
    return root


@pytest.fixture(scope="module")
def prepared(utk_layout, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep")
    manifest = preprocess("utkface", utk_layout, out, rows_per_shard=2, progress=False)
    return out, manifest


def test_manifest_counts_and_reasons(prepared):
    out, manifest = prepared
    assert json.loads((out / "manifest.json").read_text()) == manifest
    counts = manifest["counts"]
    # The faceless grey photo is kept through the whole-image fallback: UTKFace is a set of face crops.
    assert counts["files_scanned"] == 9 and counts["samples"] == 8 and counts["kept"] == 7
    assert counts["fallback_faces"] == 1
    assert manifest["rejects"] == {"unparsable_name": 1, "truncated_image": 1}
    assert sum(counts["by_split"].values()) == 7
    assert manifest["face_pipeline"]["chip"]["size"] == 160
    rejects = (out / "rejects.csv").read_text()
    assert "abc_def.jpg.chip.jpg,unparsable_name" in rejects and "truncated_image" in rejects


def test_without_fallback_faceless_photos_are_rejected(utk_layout, tmp_path):
    manifest = preprocess("utkface", utk_layout, tmp_path, progress=False, fallback="none")
    assert manifest["counts"]["kept"] == 6 and manifest["rejects"]["no_face"] == 1
    assert manifest["counts"]["fallback_faces"] == 0


def test_one_split_alone_gives_the_same_faces_as_a_full_run_and_resumes_to_it(utk_layout, tmp_path):
    """``splits=("test",)`` processes exactly the test faces of a full run (how CI rebuilds the cards' test
    sets); a later full run in the same folder adds the rest."""
    options = {"rows_per_shard": 2, "progress": False, "fractions": (0.4, 0.2, 0.4)}
    full = preprocess("utkface", utk_layout, tmp_path / "full", **options)
    alone = preprocess("utkface", utk_layout, tmp_path / "alone", splits=("test",), **options)
    assert full["counts"]["by_split"]["test"] > 0
    assert alone["counts"]["by_split"] == {"train": 0, "val": 0, "test": full["counts"]["by_split"]["test"]}
    assert alone["split"]["processed"] == ["test"] and {s["split"] for s in alone["shards"]} == {"test"}
    for shard in alone["shards"]:
        assert read_shard(tmp_path / "alone" / shard["file"]).equals(
            read_shard(tmp_path / "full" / shard["file"])
        )
    resumed = preprocess("utkface", utk_layout, tmp_path / "alone", **options)
    assert resumed["counts"] == full["counts"] and resumed["timing"]["processed_samples"] < 8
    with pytest.raises(PreprocessError, match="splits must be"):
        preprocess("utkface", utk_layout, tmp_path, progress=False, splits=("tset",))


def test_changed_pipeline_invalidates_finished_shards(prepared, utk_layout, tmp_path):
    out = tmp_path / "prep"
    shutil.copytree(prepared[0], out)
    manifest = preprocess("utkface", utk_layout, out, rows_per_shard=2, progress=False, fallback="none")
    assert manifest["counts"]["kept"] == 6  # redone with the new setting, not reused


def test_shards_hold_at_most_the_limit_and_round_trip(prepared):
    out, manifest = prepared
    total = 0
    for shard in manifest["shards"]:
        table = read_shard(out / shard["file"])
        assert table.num_rows == shard["rows"] <= 2
        assert set(table.column("source").to_pylist()) == {"utkface"}
        assert set(table.column("split").to_pylist() if "split" in table.column_names else []) <= {
            shard["split"]
        }
        boxes = fixed_list_to_numpy(table.column("boxes"), 12)
        assert np.isfinite(boxes).all()
        ages = table.column("age").to_numpy()
        assert np.isin(ages, [48, 49, 50, 51, 52, 53, 40]).all()
        chip = cv2.imdecode(np.frombuffer(table.column("image")[0].as_py(), np.uint8), cv2.IMREAD_COLOR)
        assert chip.shape == (160, 160, 3)
        total += table.num_rows
    assert total == manifest["counts"]["kept"]
    assert not list(out.glob(".*partial*"))


def test_the_split_is_the_same_wherever_the_dataset_lies(utk_layout, tmp_path):
    """Photos without an identity are keyed by their path relative to the root: the same dataset in two
    folders (here a copy and a symbolic link) gets the same split; ``key_root`` keys them as if the dataset
    lay at that absolute path (how splits of earlier versions, which keyed the absolute path, are rebuilt)."""
    from c3ae.preprocessing.readers import get_reader

    copy = tmp_path / "elsewhere" / "utk"
    shutil.copytree(utk_layout, copy)
    link = tmp_path / "link"
    link.symlink_to(utk_layout)
    fractions = (0.4, 0.2, 0.4)
    splits = []
    for root in (utk_layout, copy, link):
        samples, _ = get_reader("utkface").scan(root)
        samples.sort(key=lambda sample: Path(sample.path).name)
        splits.append(assign_splits(samples, fractions, seed=3, root=root))
        absolute = assign_splits(samples, fractions, seed=3)  # keyed by where the files are
        assert assign_splits(samples, fractions, seed=3, root=root, key_root=str(root)) == absolute
    assert splits[0] == splits[1] == splits[2] and len(set(splits[0])) > 1
    manifest = preprocess("utkface", copy, tmp_path / "prep", progress=False, fractions=fractions, seed=3)
    assert manifest["split"]["key"] == "path relative to the root"


def test_split_is_deterministic_and_by_identity():
    samples = [Sample(f"/x/{i}.jpg", 30.0, 1, f"person{i // 4}", "t") for i in range(400)]
    first = assign_splits(samples, seed=1)
    assert first == assign_splits(samples, seed=1)
    assert first != assign_splits(samples, seed=2)
    for person in range(100):
        assert len({first[i] for i in range(person * 4, person * 4 + 4)}) == 1  # no identity leaks
    counts = {split: first.count(split) for split in ("train", "val", "test")}
    assert counts == {"train": 320, "val": 40, "test": 40}


def test_rerun_resumes_and_redoes_only_missing_shards(prepared, utk_layout, tmp_path, monkeypatch):
    out = tmp_path / "prep"
    shutil.copytree(prepared[0], out)
    victim = prepared[1]["shards"][0]["file"]
    (out / victim).unlink()
    (out / f".{victim}.json").unlink()
    calls = []
    original = pipeline_module.process_sample
    monkeypatch.setattr(
        pipeline_module, "process_sample", lambda s, p=None, f=False: calls.append(s) or original(s, p, f)
    )
    manifest = preprocess("utkface", utk_layout, out, rows_per_shard=2, progress=False)
    assert 1 <= len(calls) <= 2  # only the missing shard's samples
    assert manifest["counts"] == prepared[1]["counts"] and (out / victim).is_file()


def test_interrupted_run_leaves_no_half_shard_and_resumes(utk_layout, tmp_path, monkeypatch):
    out = tmp_path / "prep"
    original = pipeline_module.process_sample
    calls = []

    def interrupt_on_third(sample, pipeline=None, fallback_full_image=False):
        calls.append(sample)
        if len(calls) == 3:  # the first shard (2 samples) is done, the second is half-way
            raise KeyboardInterrupt
        return original(sample, pipeline, fallback_full_image)

    monkeypatch.setattr(pipeline_module, "process_sample", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        preprocess("utkface", utk_layout, out, rows_per_shard=2, progress=False)
    summaries = [json.loads(p.read_text()) for p in out.glob(".*.feather.json")]
    assert len(summaries) == 1 and summaries[0]["samples"] == 2  # the first shard only, complete
    assert sorted(p.name for p in out.glob("*.feather")) == (
        [summaries[0]["file"]] if summaries[0]["rows"] else []
    )
    assert not (out / "manifest.json").exists() and not list(out.glob(".*partial*"))
    monkeypatch.setattr(pipeline_module, "process_sample", original)
    manifest = preprocess("utkface", utk_layout, out, rows_per_shard=2, progress=False)
    assert manifest["counts"]["kept"] == 7


def test_nothing_usable_fails(tmp_path):
    root = tmp_path / "utk"
    root.mkdir()
    cv2.imwrite(str(root / "40_0_0_20170110000000002.jpg.chip.jpg"), np.full((100, 100, 3), 127, np.uint8))
    with pytest.raises(PreprocessError, match="No face was kept"):
        preprocess("utkface", root, tmp_path / "out", progress=False, detector="haar", fallback="none")


def test_training_and_inference_crops_are_identical(prepared, utk_layout):
    """The crops a model trains on (shard -> in-graph JPEG decode -> crop) are the inference crops."""
    import tensorflow as tf

    out, manifest = prepared
    inference = FacePipeline("mtcnn")
    for shard in manifest["shards"]:
        table = read_shard(out / shard["file"])
        for row in range(table.num_rows):
            jpeg = table.column("image")[row].as_py()
            boxes = fixed_list_to_numpy(table.column("boxes"), 12)[row].reshape(3, 4)
            single = fixed_list_to_numpy(table.column("single_box"), 4)[row]
            chip = tf.io.decode_jpeg(jpeg, channels=3, dct_method="INTEGER_ACCURATE").numpy()[..., ::-1]
            training = {
                name: crop(chip, box) for name, box in zip(("outer", "middle", "inner"), boxes, strict=True)
            }
            training["image"] = crop(chip, single)

            photo = read_image(table.column("path")[row].as_py())
            face = inference.process(photo, fallback_full_image=True)[0]
            live = {
                **model_crops(face.chip, face.boxes, face.single_box),
                **model_crops(face.chip, face.boxes, face.single_box, "single"),
            }
            np.testing.assert_array_equal(face.boxes, boxes)
            for name in training:
                np.testing.assert_array_equal(training[name], live[name], err_msg=name)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "c3ae.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "nope", "--root", ".", "--out", "x"], "Unknown dataset 'nope'; choose one of"),
        (
            ["--dataset", "utkface", "--root", "/no/such/dir", "--out", "x"],
            "--root /no/such/dir is not a folder",
        ),
        (["--dataset", "utkface", "--root", ".", "--out", "x", "--split", "0.5,0.5"], "three fractions"),
        (["--dataset", "utkface", "--root", ".", "--out", "x", "--splits", "tset"], "--splits 'tset'"),
    ],
)
def test_cli_user_errors(args, message):
    result = run_cli("preprocess", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
