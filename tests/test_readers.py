"""Dataset readers on tiny synthetic layouts (empty image files: scan never decodes), plus real UTKFace.

The IMDB-WIKI fixtures in tests/data/readers were written by scipy.io.savemat (make_mat_fixtures.py there);
a MATLAB-style file (type-compressed numbers, UTF-8 chars, small data elements, zlib) is written here.
"""

import math
import shutil
import struct
import zlib
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from c3ae.conventions import FEMALE, MALE, UNKNOWN_GENDER
from c3ae.preprocessing.readers import (
    READERS,
    REJECT_REASONS,
    AsiaReader,
    Reject,
    Sample,
    get_reader,
    imdb_age,
    load_mat,
    parse_gender,
    parse_utkface_name,
    scan_dataset,
)

DATA = Path(__file__).resolve().parent / "data" / "readers"
UTKFACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "utkface"


def touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def by_name(samples: list[Sample]) -> dict[str, Sample]:
    return {Path(s.path).name: s for s in samples}


def reasons(rejects: list[Reject]) -> dict[str, str]:
    return {Path(r.path).name: r.reason for r in rejects}


def check_sorted(samples: list[Sample], rejects: list[Reject]) -> None:
    assert [s.path for s in samples] == sorted(s.path for s in samples)
    assert [r.path for r in rejects] == sorted(r.path for r in rejects)
    assert all(Path(s.path).is_absolute() for s in samples)
    assert all(r.reason in REJECT_REASONS for r in rejects)


# -------------------------------------------------------------------------------------------- UTKFace
@pytest.mark.parametrize(
    "name, expected",
    [
        ("25_0_2_20170116174525125.jpg.chip.jpg", (25.0, MALE, 2)),  # UTK 0 = male
        ("25_1_3_20170116174525125.jpg.chip.jpg", (25.0, FEMALE, 3)),  # UTK 1 = female
        ("39_1_20170116174525125.jpg.chip.jpg", (39.0, FEMALE, None)),  # race missing
        ("24_0_1_20170116220224657 .jpg.chip.jpg", (24.0, MALE, 1)),  # space before .jpg
        ("55_0_0_20170116232725357jpg.chip.jpg", (55.0, MALE, 0)),  # dot missing
        ("7_1_4_20170109.jpg", (7.0, FEMALE, 4)),  # not a chip
        ("30_0_4.jpg", (30.0, MALE, 4)),  # date missing
        ("30_0_9_2017.jpg", (30.0, MALE, None)),  # race outside 0-4
    ],
)
def test_utkface_names(name, expected):
    assert parse_utkface_name(name) == expected


def test_utkface_scan(tmp_path):
    touch(
        tmp_path,
        "b/25_0_2_20170116174525125.jpg.chip.jpg",
        "39_1_20170116174525125.jpg.chip.jpg",
        "24_0_1_20170116220224657 .jpg.chip.jpg",
        "55_0_0_20170116232725357jpg.chip.jpg",
        "a/80_1_0_2017.PNG",
        "abc_1_0_2017.jpg.chip.jpg",  # age not a number
        "30.jpg",  # no gender
        "30_2_0_2017.jpg.chip.jpg",  # gender code 2
        "121_0_0_2017.jpg.chip.jpg",  # too old
        "notes.txt",  # not an image: ignored
        ".DS_Store.jpg",  # hidden: ignored
        ".cache/5_0_0_2017.jpg",  # hidden folder: ignored
    )
    samples, rejects = scan_dataset("utkface", tmp_path)
    check_sorted(samples, rejects)
    found = by_name(samples)
    assert set(found) == {
        "25_0_2_20170116174525125.jpg.chip.jpg",
        "39_1_20170116174525125.jpg.chip.jpg",
        "24_0_1_20170116220224657 .jpg.chip.jpg",
        "55_0_0_20170116232725357jpg.chip.jpg",
        "80_1_0_2017.PNG",
    }
    first = found["25_0_2_20170116174525125.jpg.chip.jpg"]
    expected_path = str(tmp_path / "b" / "25_0_2_20170116174525125.jpg.chip.jpg")
    assert first == Sample(expected_path, 25.0, MALE, None, "utkface", extra={"race": 2})
    assert isinstance(first.age, float)
    assert found["39_1_20170116174525125.jpg.chip.jpg"].gender == FEMALE
    assert found["39_1_20170116174525125.jpg.chip.jpg"].extra == {}
    assert found["24_0_1_20170116220224657 .jpg.chip.jpg"].age == 24.0
    assert found["55_0_0_20170116232725357jpg.chip.jpg"].gender == MALE
    assert found["80_1_0_2017.PNG"].extra == {"race": 0}
    assert reasons(rejects) == {
        "abc_1_0_2017.jpg.chip.jpg": "unparsable_name",
        "30.jpg": "unparsable_name",
        "30_2_0_2017.jpg.chip.jpg": "bad_gender",
        "121_0_0_2017.jpg.chip.jpg": "age_out_of_range",
    }


def test_real_utkface():
    if not UTKFACE.is_dir():
        pytest.skip("needs ../shared/data/utkface")
    files = [p for p in UTKFACE.iterdir() if p.is_file()]
    samples, rejects = scan_dataset("utkface", UTKFACE)
    assert len(files) == 23_707
    assert len(samples) >= 23_700
    assert len(samples) + len(rejects) == len(files)
    assert all(r.reason in REJECT_REASONS for r in rejects)
    assert all(0 <= s.age <= 120 and s.gender in (MALE, FEMALE) for s in samples)
    ages = [s.age for s in samples]
    assert (min(ages), max(ages)) == (1.0, 116.0)
    found = by_name(samples)
    assert found["39_1_20170116174525125.jpg.chip.jpg"].gender == FEMALE
    assert found["55_0_0_20170116232725357jpg.chip.jpg"].age == 55.0
    assert "24_0_1_20170116220224657 .jpg.chip.jpg" in found
    # The decade counts of ../shared/data/README.md.
    decades = np.bincount(np.minimum(np.array(ages, dtype=int) // 10, 9), minlength=10)
    assert decades.tolist() == [3061, 1531, 7344, 4537, 2245, 2299, 1318, 699, 504, 169]


# ------------------------------------------------------------------------------------ filename datasets
def test_asia(tmp_path):
    touch(
        tmp_path, "00001A02.jpg", "07380A20.jpg", "07381A20.jpg", "13321A75.JPG", "00002A200.jpg", "face.jpg"
    )
    samples, rejects = scan_dataset("asia", tmp_path)
    check_sorted(samples, rejects)
    found = by_name(samples)
    assert found["00001A02.jpg"] == Sample(str(tmp_path / "00001A02.jpg"), 2.0, FEMALE, "00001", "asia")
    assert found["07380A20.jpg"].gender == FEMALE  # the last female id
    assert found["07381A20.jpg"].gender == MALE
    assert found["13321A75.JPG"].gender == MALE and found["13321A75.JPG"].age == 75.0
    assert AsiaReader.LAST_FEMALE_ID == 7380
    assert reasons(rejects) == {"00002A200.jpg": "age_out_of_range", "face.jpg": "unparsable_name"}


def test_ffhq(tmp_path):
    touch(tmp_path, "00000.jpg", "00003.jpg", "00009.jpg", "00011.jpg")
    (tmp_path / "labels.csv").write_text(
        "file,age,gender,yaw,pitch,roll,glasses,faces_found\n"
        "00000.jpg,0.0,female,15.3,5.4,1.5,NoGlasses,1\n"
        "00003.jpg,,,,,,,0\n"  # no face found when the labels were made: an unlabelled face
        "00009.jpg,26.0,male,25.8,11.6,1.5,ReadingGlasses,1\n"
        "00010.jpg,30.0,male,0,0,0,NoGlasses,1\n"  # not on disk
        "00011.jpg,231.0,male,0,0,0,NoGlasses,1\n"
    )
    samples, rejects = scan_dataset("ffhq", tmp_path)
    check_sorted(samples, rejects)
    found = by_name(samples)
    assert found["00000.jpg"] == Sample(
        str(tmp_path / "00000.jpg"), 0.0, FEMALE, None, "ffhq", extra={"yaw": 15.3, "pitch": 5.4, "roll": 1.5}
    )
    assert found["00003.jpg"].age is None and found["00003.jpg"].gender == -1
    assert found["00009.jpg"].gender == MALE and found["00009.jpg"].age == 26.0
    assert reasons(rejects) == {"00010.jpg": "missing_file", "00011.jpg": "age_out_of_range"}
    (tmp_path / "labels.csv").write_text("file,gender\n00000.jpg,male\n")
    with pytest.raises(ValueError, match="needs the columns file, age and gender; lacks age"):
        scan_dataset("ffhq", tmp_path)


def test_afad(tmp_path):
    touch(tmp_path, "15/111/a.jpg", "15/112/b.jpg", "72/111/c.jpeg", "20/113/d.jpg", "misc/e.jpg", "f.jpg")
    touch(tmp_path, "x/111/g.jpg", "15/111/readme.txt")
    samples, rejects = scan_dataset("afad", tmp_path)
    check_sorted(samples, rejects)
    found = by_name(samples)
    assert found["a.jpg"] == Sample(str(tmp_path / "15/111/a.jpg"), 15.0, MALE, None, "afad")
    assert found["b.jpg"].gender == FEMALE
    assert found["c.jpeg"].age == 72.0
    assert reasons(rejects) == {
        "d.jpg": "bad_gender",
        "e.jpg": "unparsable_name",
        "f.jpg": "unparsable_name",
        "g.jpg": "unparsable_name",
    }


def test_fgnet(tmp_path):
    touch(tmp_path, "images/001A02.JPG", "images/002A16a.JPG", "images/002A16b.JPG", "images/082A00.jpg")
    touch(tmp_path, "images/readme.jpg", "images/Data.txt")
    samples, rejects = scan_dataset("fgnet", tmp_path)
    check_sorted(samples, rejects)
    found = by_name(samples)
    assert found["001A02.JPG"] == Sample(
        str(tmp_path / "images/001A02.JPG"), 2.0, UNKNOWN_GENDER, "001", "fgnet"
    )
    assert found["002A16a.JPG"].identity == found["002A16b.JPG"].identity == "002"
    assert found["002A16a.JPG"].age == 16.0
    assert found["082A00.jpg"].age == 0.0
    assert reasons(rejects) == {"readme.jpg": "unparsable_name"}


# ------------------------------------------------------------------------------------------ list files
def megaage_layout(root: Path, train_ages: str = "23\n5\nold\n130\n9\n") -> None:
    (root / "list").mkdir(parents=True)
    (root / "list/train_name.txt").write_text("1.jpg\n2.jpg\n3.jpg\n4.jpg\n5.jpg\n\n")
    (root / "list/train_age.txt").write_text(train_ages)
    (root / "list/test_name.txt").write_text("1.jpg\n")
    (root / "list/test_age.txt").write_text("61\n")
    touch(
        root, "train/1.jpg", "train/2.jpg", "train/3.jpg", "train/4.jpg", "test/1.jpg", "train/unlisted.jpg"
    )


@pytest.mark.parametrize("name", ["megaage", "megaage_asian"])
def test_megaage(tmp_path, name):
    megaage_layout(tmp_path)
    samples, rejects = scan_dataset(name, tmp_path)
    check_sorted(samples, rejects)
    assert [(Path(s.path).relative_to(tmp_path).as_posix(), s.age, s.extra) for s in samples] == [
        ("test/1.jpg", 61.0, {"official_split": "test"}),
        ("train/1.jpg", 23.0, {"official_split": "train"}),
        ("train/2.jpg", 5.0, {"official_split": "train"}),
    ]
    assert all(s.gender == UNKNOWN_GENDER and s.source == name and s.identity is None for s in samples)
    assert [(Path(r.path).relative_to(tmp_path).as_posix(), r.reason) for r in rejects] == [
        ("train/3.jpg", "bad_age"),
        ("train/4.jpg", "age_out_of_range"),
        ("train/5.jpg", "missing_file"),
    ]


def test_megaage_bad_lists(tmp_path):
    megaage_layout(tmp_path / "short", train_ages="23\n5\n")
    with pytest.raises(ValueError, match=r"train_name\.txt has 5 lines but .*train_age\.txt has 2"):
        scan_dataset("megaage", tmp_path / "short")
    megaage_layout(tmp_path / "half")
    (tmp_path / "half/list/test_age.txt").unlink()
    with pytest.raises(FileNotFoundError, match="test_age.txt not found"):
        scan_dataset("megaage_asian", tmp_path / "half")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="list/train_name.txt"):
        scan_dataset("megaage", tmp_path / "empty")


APPA_HEADER = "file_name,num_ratings,apparent_age_avg,apparent_age_std,real_age\n"


def appa_layout(root: Path) -> None:
    (root / "gt_avg_train.csv").write_text(
        APPA_HEADER + "000000.jpg,36,5.0,1.146423008,4\n000001.jpg,63,20.33,3.47,18\n000002.jpg,40,x,1.0,x\n"
    )
    (root / "gt_avg_valid.csv").write_text(
        APPA_HEADER + "004113.jpg,38,25.0,3.0,27\n004114.jpg,38,25.0,3.0,27\n"
    )
    touch(root, "train/000000.jpg", "train/000000.jpg_face.jpg", "train/000001.jpg", "train/000002.jpg")
    touch(root, "valid/004113.jpg")  # 004114.jpg is missing


def test_appa_real(tmp_path):
    appa_layout(tmp_path)
    samples, rejects = scan_dataset("appa_real", tmp_path)
    check_sorted(samples, rejects)
    found = by_name(samples)
    assert set(found) == {"000000.jpg_face.jpg", "000001.jpg", "004113.jpg"}  # the face crop when present
    first = found["000000.jpg_face.jpg"]
    assert first.age == 4.0 and first.gender == UNKNOWN_GENDER and first.source == "appa_real"
    assert first.extra == {
        "official_split": "train",
        "apparent_age": 5.0,
        "apparent_age_std": 1.146423008,
        "real_age": 4.0,
        "num_ratings": 36,
    }
    assert found["004113.jpg"].extra["official_split"] == "valid"
    assert reasons(rejects) == {"000002.jpg": "bad_age", "004114.jpg": "missing_file"}

    apparent, _ = scan_dataset("appa_real", tmp_path, target="apparent", prefer_face_crop=False)
    assert {Path(s.path).name: s.age for s in apparent} == {
        "000000.jpg": 5.0,
        "000001.jpg": 20.33,
        "004113.jpg": 25.0,
    }


def test_appa_real_errors(tmp_path):
    with pytest.raises(ValueError, match="target must be 'real' or 'apparent'"):
        get_reader("appa_real", target="both")
    with pytest.raises(FileNotFoundError, match="gt_avg_train.csv"):
        scan_dataset("appa_real", tmp_path)
    (tmp_path / "gt_avg_train.csv").write_text("file_name,apparent_age_avg\n0.jpg,3\n")
    with pytest.raises(ValueError, match="missing column.*real_age"):
        scan_dataset("appa_real", tmp_path)
    assert scan_dataset("appa_real", tmp_path, target="apparent")[1] == [
        Reject(str(tmp_path / "train/0.jpg"), "missing_file")
    ]


# --------------------------------------------------------------------------------------------- IMDB-WIKI
def datenum(year: int, month: int, day: int) -> float:
    return date(year, month, day).toordinal() + 366.0


def test_imdb_age_rule():
    assert imdb_age(datenum(1980, 6, 30), 2010) == 30.0  # June birthday: photo year - birth year
    assert imdb_age(datenum(1980, 7, 1), 2010) == 29.0  # July or later: one less
    assert imdb_age(datenum(1980, 12, 31) + 0.9, 2010) == 29.0
    assert imdb_age(math.nan, 2010) is None and imdb_age(datenum(1980, 1, 1), math.nan) is None
    assert imdb_age(0.0, 2010) == 2009.0  # dob before year 1 clamps to 0001-01-01


def imdb_images(root: Path, skip_last: bool) -> list[str]:
    stems = [
        "01/nm0000001_rm1_1980-6-30_2010",
        "01/nm0000002_rm2_1980-7-1_2010",
        "02/nm0000003_rm3_1970-1-1_2000",
        "02/nm0000004_rm4_1970-1-1_2000",
        "03/nm0000005_rm5_1970-1-1_2000",
        "03/nm0000006_rm6_1950-12-31_1990",
        "04/nm0000007_rm7_1800-1-1_2000",
        "04/nm0000008_rm8_1990-3-3_2000",
    ]
    names = [s + ".jpg" for s in stems]
    touch(root, *(names[:-1] if skip_last else names))
    return names


def test_imdb_nested_struct(tmp_path):
    # The real layout: {'imdb': 1x1 struct of 1xN fields}, compressed, found one folder below root.
    names = imdb_images(tmp_path / "imdb_crop", skip_last=True)
    shutil.copy(DATA / "imdb_nested.mat", tmp_path / "imdb_crop" / "imdb.mat")
    samples, rejects = scan_dataset("imdb_wiki", tmp_path)
    check_sorted(samples, rejects)
    got = [
        (Path(s.path).relative_to(tmp_path / "imdb_crop").as_posix(), s.age, s.gender, s.identity)
        for s in samples
    ]
    assert got == [
        (names[0], 30.0, MALE, "1"),  # born 30 June 1980, photo 2010
        (names[1], 29.0, FEMALE, "2"),  # born 1 July 1980, photo 2010
        (names[5], 39.0, UNKNOWN_GENDER, "6"),  # gender NaN
    ]
    assert samples[0].box == (10.5, 20.0, 110.5, 120.0)
    assert samples[0].extra == {"face_score": 3.5, "name": "Fred Astaire"}
    assert samples[2].extra["name"] == "Zoë Ünicode"
    assert all(s.source == "imdb_wiki" for s in samples)
    assert [(Path(r.path).name, r.reason) for r in rejects] == [
        ("nm0000003_rm3_1970-1-1_2000.jpg", "second_face"),
        ("nm0000004_rm4_1970-1-1_2000.jpg", "low_face_score"),
        ("nm0000005_rm5_1970-1-1_2000.jpg", "no_face"),
        ("nm0000007_rm7_1800-1-1_2000.jpg", "age_out_of_range"),
        ("nm0000008_rm8_1990-3-3_2000.jpg", "missing_file"),
    ]
    lenient, _ = scan_dataset("imdb_wiki", tmp_path, min_face_score=0.0)
    assert "nm0000004_rm4_1970-1-1_2000.jpg" in by_name(lenient)


def test_imdb_flat_with_mat_path(tmp_path):
    # Flat variables, no celeb_id (identity = name), face_location an N x 4 matrix; paths relative to root.
    imdb_images(tmp_path, skip_last=False)
    samples, rejects = scan_dataset("imdb_wiki", tmp_path, mat_path=DATA / "wiki_flat.mat")
    found = by_name(samples)
    assert len(samples) == 4 and len(rejects) == 4
    assert found["nm0000001_rm1_1980-6-30_2010.jpg"].identity == "Fred Astaire"
    assert found["nm0000002_rm2_1980-7-1_2010.jpg"].box == (11.5, 20.0, 111.5, 120.0)
    assert found["nm0000008_rm8_1990-3-3_2000.jpg"].identity is None  # empty name
    assert found["nm0000008_rm8_1990-3-3_2000.jpg"].age == 10.0


def mat_element(mtype: int, payload: bytes, e: str) -> bytes:
    if len(payload) <= 4:  # small data element, as MATLAB writes short ones
        return struct.pack(e + "I", (len(payload) << 16) | mtype) + payload.ljust(4, b"\0")
    return struct.pack(e + "II", mtype, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def mat_matrix(value, e: str, name: str = "") -> bytes:
    """A miMATRIX element the way MATLAB writes one: doubles narrowed to integer types when exact."""
    if isinstance(value, dict):
        width = 32
        data = mat_element(5, struct.pack(e + "i", width), e)
        data += mat_element(1, b"".join(k.encode().ljust(width, b"\0") for k in value), e)
        data += b"".join(mat_matrix(v, e) for v in value.values())
        mx_class, dims = 2, (1, 1)
    elif isinstance(value, str):
        mx_class, dims, data = 4, (1, len(value)) if value else (0, 0), mat_element(16, value.encode(), e)
    elif isinstance(value, list):
        mx_class, dims, data = 1, (1, len(value)), b"".join(mat_matrix(v, e) for v in value)
    else:  # a NumPy array: a numeric 1xN row
        array = np.asarray(value, dtype=float).reshape(1, -1)
        dims, mx_class = array.shape, 6
        if np.all(np.isfinite(array)) and np.all(array == np.round(array)) and array.min() >= 0:
            narrow = (4, "u2") if array.max() < 2**16 else (5, "i4")
            data = mat_element(narrow[0], array.ravel(order="F").astype(e + narrow[1]).tobytes(), e)
        else:
            data = mat_element(9, array.ravel(order="F").astype(e + "f8").tobytes(), e)
    body = mat_element(6, struct.pack(e + "II", mx_class, 0), e)
    body += mat_element(5, struct.pack(e + "2i", *dims), e) + mat_element(1, name.encode(), e) + data
    return struct.pack(e + "II", 14, len(body)) + body


def write_matlab_style(path: Path, variables: dict, e: str = "<") -> None:
    header = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024".ljust(116)
    header += b"\0" * 8 + struct.pack(e + "H", 0x0100) + (b"IM" if e == "<" else b"MI")
    body = b""
    for name, value in variables.items():
        packed = zlib.compress(mat_matrix(value, e, name))
        body += struct.pack(e + "II", 15, len(packed)) + packed
    path.write_bytes(header + body)


def wiki_struct() -> dict:
    """Fields of a small wiki.mat: lists are cell arrays, NumPy arrays numeric 1xN rows."""
    return {
        "dob": np.array([datenum(1980, 6, 30), datenum(1980, 7, 1), datenum(1960, 2, 2)]),
        "photo_taken": np.array([2010, 2010, 2000]),
        "full_path": ["17/a.jpg", "17/b.jpg", "17/c.jpg"],
        "gender": np.array([1.0, math.nan, 0.0]),
        "name": ["Ann", "", "Bo"],
        "face_location": [np.array([1, 2, 3, 4]), np.array([1.5, 2, 3, 4]), np.array([5, 6, 7, 8])],
        "face_score": np.array([1.5, 2.0, 4.0]),
        "second_face_score": np.array([math.nan, math.nan, math.nan]),
    }


@pytest.mark.parametrize("endian", ["<", ">"])
def test_imdb_matlab_style_file(tmp_path, endian):
    touch(tmp_path, "17/a.jpg", "17/b.jpg", "17/c.jpg")
    write_matlab_style(tmp_path / "wiki.mat", {"wiki": wiki_struct()}, endian)
    samples, rejects = scan_dataset("imdb_wiki", tmp_path)
    assert rejects == []
    assert [(Path(s.path).name, s.age, s.gender, s.identity, s.box) for s in samples] == [
        ("a.jpg", 30.0, MALE, "Ann", (1.0, 2.0, 3.0, 4.0)),
        ("b.jpg", 29.0, UNKNOWN_GENDER, None, (1.5, 2.0, 3.0, 4.0)),
        ("c.jpg", 40.0, FEMALE, "Bo", (5.0, 6.0, 7.0, 8.0)),
    ]


def test_imdb_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="imdb.mat or wiki.mat"):
        scan_dataset("imdb_wiki", tmp_path)
    fields = wiki_struct()
    del fields["dob"], fields["second_face_score"]
    write_matlab_style(tmp_path / "wiki.mat", {"wiki": fields})
    with pytest.raises(ValueError, match="missing IMDB-WIKI field.*dob, second_face_score"):
        scan_dataset("imdb_wiki", tmp_path)
    fields = wiki_struct()
    fields["gender"] = fields["gender"][:2]
    write_matlab_style(tmp_path / "wiki.mat", {"wiki": fields})
    with pytest.raises(ValueError, match=r"'gender': 2.*full_path has 3"):
        scan_dataset("imdb_wiki", tmp_path)
    shutil.copy(DATA / "imdb_nested.mat", tmp_path / "imdb.mat")
    with pytest.raises(ValueError, match="Several IMDB-WIKI metadata files"):
        scan_dataset("imdb_wiki", tmp_path)
    with pytest.raises(FileNotFoundError, match="nothere.mat"):
        scan_dataset("imdb_wiki", tmp_path, mat_path="nothere.mat")
    (tmp_path / "v73.mat").write_bytes(b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(128))
    with pytest.raises(ValueError, match="v7.3"):
        load_mat(tmp_path / "v73.mat")
    (tmp_path / "junk.mat").write_bytes(b"not a mat file" * 20)
    with pytest.raises(ValueError, match="not a MATLAB 5/7 .mat file"):
        load_mat(tmp_path / "junk.mat")
    (tmp_path / "cut.mat").write_bytes((DATA / "wiki_flat.mat").read_bytes()[:600])
    with pytest.raises(ValueError, match="malformed"):
        load_mat(tmp_path / "cut.mat")


# ---------------------------------------------------------------------------------------- generic CSV
def test_csv(tmp_path):
    elsewhere = tmp_path / "elsewhere.jpg"
    touch(tmp_path, "data/img/a.jpg", "data/img/b.jpg", "data/img/c.jpg", "data/img/d.jpg", "data/img/e.jpg")
    touch(tmp_path, "data/img/f.jpg", "data/img/g.jpg", "data/img/h.jpg", "elsewhere.jpg")
    (tmp_path / "data/labels.csv").write_text(
        "photo,age,gender,identity,deg,box1,box2,box3,box4\n"
        "img/a.jpg,23,m,p1,10.5,1,2,30,40\n"
        "img/b.jpg,31.5,Female,p1,,,,,\n"
        "img/c.jpg,40,F,,,,,,\n"
        "img/d.jpg,8,,,,,,,\n"
        "img/e.jpg,8,1.0,,,,,,\n"
        f"{elsewhere},60,MALE,,,,,,\n"
        "img/f.jpg,old,m,,,,,,\n"
        "img/g.jpg,20,x,,,,,,\n"
        "img/h.jpg,20,m,,,1,2,3,\n"
        "img/missing.jpg,20,m,,,,,,\n"
        ",20,m,,,,,,\n"
        ",,,,,,,,\n"
    )
    samples, rejects = scan_dataset("csv", tmp_path / "data")
    check_sorted(samples, rejects)
    found = by_name(samples)
    assert found["a.jpg"] == Sample(
        str(tmp_path / "data/img/a.jpg"),
        23.0,
        MALE,
        "p1",
        "csv",
        box=(1.0, 2.0, 30.0, 40.0),
        extra={"deg": 10.5},
    )
    assert (found["b.jpg"].age, found["b.jpg"].gender, found["b.jpg"].box) == (31.5, FEMALE, None)
    assert found["c.jpg"].gender == FEMALE and found["c.jpg"].identity is None
    assert found["d.jpg"].gender == UNKNOWN_GENDER
    assert found["e.jpg"].gender == MALE
    assert found["elsewhere.jpg"].path == str(elsewhere)  # absolute paths are kept
    assert reasons(rejects) == {
        "f.jpg": "bad_age",
        "g.jpg": "bad_gender",
        "h.jpg": "bad_box",
        "missing.jpg": "missing_file",
        "labels.csv:12": "missing_file",  # empty photo cell; the all-empty line is skipped
    }


def test_csv_options_and_errors(tmp_path):
    touch(tmp_path, "x.jpg")
    (tmp_path / "meta.csv").write_text("path,gender\nx.jpg,f\n")  # no age column: age None
    samples, rejects = scan_dataset("csv", tmp_path, csv_path="meta.csv", source="mine")
    assert samples == [Sample(str(tmp_path / "x.jpg"), None, FEMALE, None, "mine")] and rejects == []
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        scan_dataset("csv", tmp_path)
    (tmp_path / "labels.csv").write_text("file,age\nx.jpg,3\n")
    with pytest.raises(ValueError, match="'photo' or 'path' column"):
        scan_dataset("csv", tmp_path)
    (tmp_path / "labels.csv").write_text("photo,box1,box2\nx.jpg,1,2\n")
    with pytest.raises(ValueError, match="missing box3, box4"):
        scan_dataset("csv", tmp_path)


@pytest.mark.parametrize(
    "text, gender",
    [("1", MALE), ("0", FEMALE), ("-1", UNKNOWN_GENDER), ("", UNKNOWN_GENDER), ("M", MALE), ("f", FEMALE)]
    + [("Male", MALE), ("FEMALE", FEMALE), (" m ", MALE), ("0.0", FEMALE), ("nan", UNKNOWN_GENDER)],
)
def test_parse_gender(text, gender):
    assert parse_gender(text) == gender


# ------------------------------------------------------------------------------------------- folders
def test_folders(tmp_path):
    touch(tmp_path, "male/a.jpg", "Female/b.png", "f/c.jpg", "M/sub/d.jpg", "13-19/e.jpg", "0-12/g.jpg")
    touch(tmp_path, "loose.jpg", "male/notes.txt", ".trash/h.jpg")
    samples, rejects = scan_dataset("folders", tmp_path)
    check_sorted(samples, rejects)
    found = by_name(samples)
    assert found["a.jpg"] == Sample(
        str(tmp_path / "male/a.jpg"), None, MALE, None, "folders", label="male", extra={"class_index": 5}
    )
    assert {n: (s.label, s.gender) for n, s in found.items()} == {
        "a.jpg": ("male", MALE),
        "b.png": ("Female", FEMALE),
        "c.jpg": ("f", FEMALE),
        "d.jpg": ("M", MALE),
        "e.jpg": ("13-19", UNKNOWN_GENDER),
        "g.jpg": ("0-12", UNKNOWN_GENDER),
    }
    assert rejects == [Reject(str(tmp_path / "loose.jpg"), "no_class")]

    chosen, _ = scan_dataset("folders", tmp_path, classes=["13-19", "0-12"])
    assert [(s.label, s.extra["class_index"]) for s in chosen] == [("0-12", 1), ("13-19", 0)]
    assert {s.label for s in scan_dataset("folders", tmp_path, classes="f,M")[0]} == {"f", "M"}
    with pytest.raises(FileNotFoundError, match=r"\['60\+'\] not found"):
        scan_dataset("folders", tmp_path, classes=["0-12", "60+"])


# -------------------------------------------------------------------------------------- registry, roots
def test_registry():
    assert set(READERS) == {
        "utkface",
        "asia",
        "afad",
        "imdb_wiki",
        "megaage",
        "megaage_asian",
        "appa_real",
        "fgnet",
        "csv",
        "folders",
        "ffhq",
    }
    assert all(cls.name == key for key, cls in READERS.items())
    assert get_reader("APPA-REAL", target="apparent").target == "apparent"
    with pytest.raises(ValueError, match=r"Unknown dataset 'morph'; known datasets: afad, appa_real, asia"):
        get_reader("morph")
    with pytest.raises(ValueError, match="'utkface' has no option.*csv_path; its options: none"):
        get_reader("utkface", csv_path="x.csv")


def test_missing_root(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"Dataset root not found: {missing}"):
        scan_dataset("utkface", missing)
    with pytest.raises(FileNotFoundError, match="Dataset root not found"):
        get_reader("asia").scan(missing)
    touch(tmp_path, "file.jpg")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        scan_dataset("utkface", tmp_path / "file.jpg")


def test_deterministic_order(tmp_path):
    names = [f"{age}_{age % 2}_0_2017.jpg.chip.jpg" for age in (50, 3, 27, 99, 12)] + ["z.jpg", "a.jpg"]
    for sub in ("b", "a"):
        touch(tmp_path, *(f"{sub}/{n}" for n in reversed(names)))
    first = scan_dataset("utkface", tmp_path)
    assert first == scan_dataset("utkface", tmp_path)
    samples, rejects = first
    assert [s.path for s in samples] == sorted(str(tmp_path / sub / n) for sub in "ab" for n in names[:5])
    assert [r.path for r in rejects] == sorted(str(tmp_path / sub / n) for sub in "ab" for n in names[5:])
    assert len({s for s in samples}) == 10  # frozen samples hash despite the extra dict
