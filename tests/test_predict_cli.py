"""``c3ae predict``: files and folders, the JSON and CSV outputs, annotated copies, and bad inputs."""

import csv
import hashlib
import json
import shutil

import cv2
import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from c3ae.cli import main

OBAMA = REPO / "assets" / "obama.jpg"
ASTRONAUT = REPO / "assets" / "astronaut.jpg"
FACE_KEYS = {"box", "box_xywh", "landmarks", "detector_score", "age", "age_std", "gender", "gender_prob"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder tree: two portraits (one as RGBA PNG), a photo without a face, a grayscale photo, a corrupt
    file, an empty file, a truncated JPEG, and a text file that is not looked at."""
    root = tmp_path_factory.mktemp("photos") / "album"
    (root / "sub").mkdir(parents=True)
    shutil.copy(OBAMA, root / "obama.jpg")
    Image.open(ASTRONAUT).convert("RGBA").save(root / "sub" / "astronaut.png")
    cv2.imwrite(str(root / "wall.jpg"), np.full((120, 160, 3), 140, np.uint8))
    cv2.imwrite(str(root / "sub" / "gray.png"), cv2.imread(str(OBAMA), cv2.IMREAD_GRAYSCALE))
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not really a JPEG")
    (root / "empty.png").write_bytes(b"")
    (root / "sub" / "cut.jpg").write_bytes(OBAMA.read_bytes()[:3000])
    (root / "notes.txt").write_text("not an image")
    return root


def digests(folder) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_json_to_stdout_has_one_object_per_image(model, capsys):
    assert main(["predict", str(OBAMA), str(ASTRONAUT), "--json", "-", "--model", model]) == 0
    captured = capsys.readouterr()
    records = json.loads(captured.out)  # stdout holds the JSON and nothing else
    assert [r["path"] for r in records] == [str(OBAMA), str(ASTRONAUT)]
    for record in records:
        assert set(record) == {"path", "faces"} and len(record["faces"]) == 1
        face = record["faces"][0]
        assert set(face) == FACE_KEYS
        assert len(face["box"]) == 4 and set(face["landmarks"]) >= {"left_eye", "nose"}
        assert face["gender"] in ("male", "female") and 0.5 <= face["gender_prob"] <= 1.0
        assert isinstance(face["age"], float) and isinstance(face["age_std"], float)
    assert "2 image(s), 2 face(s)" in captured.err


def test_folders_recursively_with_bad_files_skipped(model, photos, tmp_path, capsys):
    before = digests(photos)
    out = tmp_path / "annotated"
    code = main(
        [
            "predict",
            str(photos),
            "--output-dir",
            str(out),
            "--json",
            str(tmp_path / "faces.json"),
            "--csv",
            str(tmp_path / "faces.csv"),
            "--model",
            model,
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert digests(photos) == before  # inputs untouched
    records = {r["path"]: r["faces"] for r in json.loads((tmp_path / "faces.json").read_text())}
    names = {name.replace(str(photos) + "/", ""): faces for name, faces in records.items()}
    assert set(names) == {"obama.jpg", "wall.jpg", "sub/astronaut.png", "sub/gray.png"}
    assert len(names["obama.jpg"]) == 1 and len(names["sub/astronaut.png"]) == 1
    assert len(names["sub/gray.png"]) == 1 and names["wall.jpg"] == []
    # Unreadable files: one message each, and a summary with the reasons.
    for bad in ("corrupt.jpg", "empty.png", "cut.jpg"):
        assert f"{bad}:" in captured.err
    assert "skipped 3" in captured.err and "empty file 1" in captured.err
    assert "Traceback" not in captured.err
    # Annotated copies mirror the folder; a box was drawn on the portrait.
    copies = sorted(p.relative_to(out).as_posix() for p in out.rglob("[!.]*") if p.is_file())
    assert copies == ["album/obama.jpg", "album/sub/astronaut.png", "album/sub/gray.png", "album/wall.jpg"]
    assert not np.array_equal(cv2.imread(str(out / "album" / "obama.jpg")), cv2.imread(str(OBAMA)))
    rows = list(csv.DictReader((tmp_path / "faces.csv").open()))
    assert len(rows) == 4  # three faces, and one row for the image without a face
    assert {r["gender"] for r in rows if r["face"] == "0"} <= {"male", "female"}
    assert [r["face"] for r in rows if r["path"].endswith("wall.jpg")] == [""]


def test_never_overwrites_an_input(model, photos, capsys):
    before = digests(photos)
    # The annotated copy of album/obama.jpg would land on album/obama.jpg itself: it gets a name of its own.
    assert main(["predict", str(photos / "obama.jpg"), "--output-dir", str(photos), "--model", model]) == 0
    after = digests(photos)
    assert {p: d for p, d in after.items() if p in before} == before
    assert sorted(p.name for p in set(after) - set(before)) == [".c3ae-outputs", "obama-2.jpg"]


def test_no_face_is_exit_0_and_an_empty_list(model, photos, capsys):
    assert main(["predict", str(photos / "wall.jpg"), "--json", "-", "--model", model]) == 0
    assert json.loads(capsys.readouterr().out) == [{"path": str(photos / "wall.jpg"), "faces": []}]


def test_only_unreadable_files_is_exit_1(model, photos, capsys):
    assert main(["predict", str(photos / "corrupt.jpg"), "--model", model]) == 1
    err = capsys.readouterr().err
    assert "corrupt.jpg: not an image" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "no/such/photo.jpg"], "no/such/photo.jpg does not exist"),
        (["predict", str(OBAMA), "--model", "no-such-model"], "neither a .keras file nor a bundled model"),
        (["predict", str(OBAMA), "--json", "/no/such/folder/out.json"], "does not exist"),
        (["predict", str(OBAMA), "--json", "-", "--csv", "-"], "cannot both write to stdout"),
        (["predict", str(OBAMA), "--detector", "yolo"], "invalid choice"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(args, message, capsys):
    if "yolo" in args:  # argparse's own check
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
    else:
        assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_empty_folder_is_a_user_mistake(tmp_path, capsys):
    (tmp_path / "readme.txt").write_text("no photos here")
    assert main(["predict", str(tmp_path)]) == 2
    assert "No images found" in capsys.readouterr().err


def huge_jpeg_header(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims width x height pixels: refused from the header alone."""
    import struct

    ok, encoded = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))
    data = bytearray(encoded.tobytes())
    at = 2
    while data[at + 1] not in (0xC0, 0xC2):  # walk the markers to the frame header
        at += 2 + struct.unpack(">H", data[at + 2 : at + 4])[0]
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("size", [(20000, 20000), (11000, 10000)], ids=["400MP", "110MP"])
def test_a_photo_of_hundreds_of_megapixels_is_refused_and_the_batch_goes_on(tmp_path, capsys, size):
    """400 MP trips PIL's own bomb check at open, 110 MP our limit: both before any pixel is decoded."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(OBAMA, folder / "obama.jpg")
    (folder / "huge.jpg").write_bytes(huge_jpeg_header(*size))
    assert main(["predict", str(folder), "--json", str(tmp_path / "faces.json")]) == 0
    err = capsys.readouterr().err
    assert "huge.jpg: too large" in err and "over the limit of 100 megapixels" in err
    assert "skipped 1: too large 1" in err
    (record,) = json.loads((tmp_path / "faces.json").read_text())
    assert record["path"].endswith("obama.jpg") and len(record["faces"]) == 1
