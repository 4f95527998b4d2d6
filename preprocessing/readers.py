"""Dataset readers: list a face data set's images with their labels, without decoding any image.

Each reader turns one public layout into :class:`Sample` rows (absolute path, age in years, gender
1 = male / 0 = female / -1 = unknown, identity, ...) and :class:`Reject` rows (path, short reason) for the
images it cannot label. Decoding, detection and cropping happen later, in the face pipeline.

    samples, rejects = scan_dataset("utkface", "../shared/data/utkface")

Registry keys (``READERS``): utkface, asia, afad, imdb_wiki, megaage, megaage_asian, appa_real, fgnet, csv,
folders, ffhq. Files whose extension is not an image extension (jpg, jpeg, png, bmp, webp) are ignored, as are
hidden files and folders (names starting with ``.``). Results are sorted by path.

Reject reasons:

- ``unparsable_name``: the file or folder name does not follow the dataset's naming.
- ``bad_gender``: a gender code outside the dataset's codes (UTK digit 2, AFAD folder 113, CSV "x").
- ``bad_age``: an age that is not a finite number (or, IMDB-WIKI, a birth date / photo year that is not).
- ``age_out_of_range``: an age outside [0, 120] years.
- ``missing_file``: a metadata row whose image is not on disk (or whose path cell is empty).
- ``bad_box``: CSV box1..box4 or deg cells that are not numbers.
- ``no_face``, ``low_face_score``, ``second_face``: IMDB-WIKI rows without a usable single face.
- ``no_class``: ``folders`` images lying outside any class folder.

A metadata file that cannot be used at all (missing, missing a column or field, mismatched list files)
raises ``FileNotFoundError`` or ``ValueError`` naming it: that is a whole-dataset error, not a row's.
"""

from __future__ import annotations

import csv
import inspect
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from c3ae.conventions import FEMALE, MALE, UNKNOWN_GENDER
from c3ae.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
MIN_AGE = 0.0
MAX_AGE = 120.0

REJECT_REASONS = (
    "unparsable_name",
    "bad_gender",
    "bad_age",
    "age_out_of_range",
    "missing_file",
    "bad_box",
    "no_face",
    "low_face_score",
    "second_face",
    "no_class",
)

_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class Sample:
    """One labelled image. Ages in years; gender 1 = male, 0 = female, -1 = unknown."""

    path: str  # absolute path of the image file
    age: float | None  # years; None when the dataset has no age (folder-per-class sets)
    gender: int  # 1 male, 0 female, -1 unknown
    identity: str | None  # person id where the dataset has one (identity-disjoint splits)
    source: str  # dataset name, e.g. "utkface"
    label: str | None = None  # class name for folder-per-class datasets
    box: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2 in pixels
    extra: dict = field(default_factory=dict, hash=False)  # e.g. {"apparent_age": 23.4, "race": 2}


@dataclass
class Reject:
    """An image (or metadata row, ``file:line``) left out, with a short machine-friendly reason."""

    path: str
    reason: str


class _RowError(Exception):
    """One file or row cannot be used; ``reason`` is one of ``REJECT_REASONS``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------------------ small helpers
def is_image_name(name: str) -> bool:
    """True for names ending in jpg, jpeg, png, bmp or webp (any case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _image_files(folder: Path, recursive: bool = True) -> list[Path]:
    """Image files under ``folder``, hidden files and folders skipped, sorted by path."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        found.extend(Path(dirpath, f) for f in filenames if not f.startswith(".") and is_image_name(f))
    return sorted(found, key=str)


def _absolute(path: str | Path) -> Path:
    """Absolute, normalised path; symlinks are kept as given."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def _check_root(root: str | Path) -> Path:
    root = _absolute(root)
    if not root.exists():
        raise FileNotFoundError(f"Dataset root not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"Dataset root is not a folder: {root}")
    return root


def _locate(path: str | Path, root: Path) -> Path:
    """An option's file path: absolute as given; relative ones under ``root`` first, then the cwd."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return _absolute(path)
    return _absolute(root / path) if (root / path).exists() else _absolute(path)


def _number(text: Any) -> float | None:
    """A finite float, or None for empty, unparsable or non-finite values."""
    try:
        value = float(str(text).strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _check_age(age: float | None) -> float:
    """The age in years as a float, or a ``_RowError`` (bad_age / age_out_of_range)."""
    if age is None or not math.isfinite(age):
        raise _RowError("bad_age")
    if not MIN_AGE <= age <= MAX_AGE:
        raise _RowError("age_out_of_range")
    return float(age)


def _require_file(path: Path) -> str:
    if not path.is_file():
        raise _RowError("missing_file")
    return str(path)


def _not_text(path: Path, reason: str) -> DataError:
    return DataError(
        f"{path} is not a UTF-8 text file ({reason}); give the dataset's label file, saved as UTF-8."
    )


def _read_lines(path: Path) -> list[str]:
    """Stripped lines, trailing empty lines dropped; DataError for a file that is not UTF-8 text."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _not_text(path, "it is binary or in another encoding") from None
    if "\x00" in text:
        raise _not_text(path, "it holds NUL bytes")
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _read_csv(path: Path) -> tuple[dict[str, str], list[tuple[int, dict[str, str]]]]:
    """``({lower-case column: column as written}, [(line number, row), ...])`` of a CSV file; DataError
    (one sentence) for a file that is not UTF-8 CSV text (a binary file, NUL bytes, a runaway field)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = {name.strip().lower(): name for name in (reader.fieldnames or []) if name is not None}
            rows = []
            for row in reader:
                if any((value or "").strip() for key, value in row.items() if key is not None):
                    rows.append((reader.line_num, row))
    except UnicodeDecodeError:
        raise _not_text(path, "it is binary or in another encoding") from None
    except csv.Error as error:
        raise _not_text(path, f"line {reader.line_num}: {error}") from None
    return columns, rows


def _cell(row: dict[str, str], columns: dict[str, str], name: str) -> str:
    column = columns.get(name)
    value = row.get(column) if column is not None else None
    return (value or "").strip() if isinstance(value, str) else ""


# ---------------------------------------------------------------------------------------------- readers
class DatasetReader:
    """Base class: ``scan(root)`` lists ``(samples, rejects)``, both sorted by path; no image is decoded."""

    name: ClassVar[str] = ""
    # True when every image is already a crop of one face (the face pipeline may then fall back to the whole
    # image when no detector finds the face, rather than dropping babies and profiles the detector misses).
    face_crops: ClassVar[bool] = False

    def __init__(self) -> None:
        pass

    def scan(self, root: Path) -> tuple[list[Sample], list[Reject]]:
        """Samples and rejects under ``root`` (a folder), sorted by path."""
        root = _check_root(root)
        samples, rejects = self._scan(root)
        samples.sort(key=lambda s: s.path)
        rejects.sort(key=lambda r: (r.path, r.reason))
        return samples, rejects

    def _scan(self, root: Path) -> tuple[list[Sample], list[Reject]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _FileNameReader(DatasetReader):
    """Datasets whose labels are in each image's file name; every image under root is scanned."""

    def _label(self, path: Path, root: Path) -> Sample:
        raise NotImplementedError

    def _scan(self, root: Path) -> tuple[list[Sample], list[Reject]]:
        samples, rejects = [], []
        for path in _image_files(root):
            try:
                samples.append(self._label(path, root))
            except _RowError as error:
                rejects.append(Reject(str(path), error.reason))
        return samples, rejects


def parse_utkface_name(filename: str) -> tuple[float, int, int | None]:
    """``(age in years, gender 1 = male / 0 = female, race 0-4 or None)`` from a UTKFace file name.

    ``age_gender_race_date.jpg[.chip.jpg]`` with UTK's gender 0 = male. Also reads the real malformed
    names: race missing (``39_1_20170116174525125.jpg.chip.jpg``), a space before ``.jpg``, a missing dot
    (``55_0_0_20170116232725357jpg.chip.jpg``). Raises ``_RowError`` when age or gender cannot be read.
    """
    stem = filename.split(".", 1)[0]  # also drops a malformed "...357jpg.chip.jpg" tail
    parts = [part.strip() for part in stem.split("_")]
    if len(parts) < 2 or not _DIGITS.fullmatch(parts[0]) or not _DIGITS.fullmatch(parts[1]):
        raise _RowError("unparsable_name")
    utk_gender = int(parts[1])
    if utk_gender not in (0, 1):
        raise _RowError("bad_gender")
    age = _check_age(float(parts[0]))
    race = None
    if len(parts) >= 4 and _DIGITS.fullmatch(parts[2]):
        race = int(parts[2])
    elif len(parts) == 3 and len(parts[2]) == 1 and _DIGITS.fullmatch(parts[2]):
        race = int(parts[2])  # date missing; a long third field is the date (race missing)
    if race is not None and not 0 <= race <= 4:
        race = None
    return age, MALE if utk_gender == 0 else FEMALE, race


class UTKFaceReader(_FileNameReader):
    """UTKFace: ``age_gender_race_date.jpg[.chip.jpg]``, gender 0 = male in the names; no identities."""

    name = "utkface"
    face_crops = True

    def _label(self, path: Path, root: Path) -> Sample:
        age, gender, race = parse_utkface_name(path.name)
        extra = {} if race is None else {"race": race}
        return Sample(str(path), age, gender, None, self.name, extra=extra)


class AsiaReader(_FileNameReader):
    """All-Age-Faces: ``NNNNNANN.jpg`` (id, ``A``, age); ids up to 7380 are female, later ones male."""

    name = "asia"
    face_crops = True
    LAST_FEMALE_ID = 7380
    PATTERN = re.compile(r"([0-9]+)A([0-9]+)", re.IGNORECASE)

    def _label(self, path: Path, root: Path) -> Sample:
        match = self.PATTERN.fullmatch(Path(path.name).stem.strip())
        if match is None:
            raise _RowError("unparsable_name")
        person, age = match.group(1), _check_age(float(match.group(2)))
        gender = FEMALE if int(person) <= self.LAST_FEMALE_ID else MALE
        return Sample(str(path), age, gender, person, self.name)


class AFADReader(_FileNameReader):
    """AFAD: ``<root>/<age>/<111|112>/<name>.jpg``, 111 = male, 112 = female; no identities."""

    name = "afad"
    face_crops = True
    GENDER_CODES = {"111": MALE, "112": FEMALE}

    def _label(self, path: Path, root: Path) -> Sample:
        parts = path.relative_to(root).parts
        if len(parts) < 3 or not _DIGITS.fullmatch(parts[-3]) or not _DIGITS.fullmatch(parts[-2]):
            raise _RowError("unparsable_name")
        if parts[-2] not in self.GENDER_CODES:
            raise _RowError("bad_gender")
        return Sample(str(path), _check_age(float(parts[-3])), self.GENDER_CODES[parts[-2]], None, self.name)


class FGNetReader(_FileNameReader):
    """FG-NET: ``<subject>A<age>[a|b].JPG``; identity = subject, gender unknown."""

    name = "fgnet"
    PATTERN = re.compile(r"([0-9]+)A([0-9]+)([a-z]?)", re.IGNORECASE)

    def _label(self, path: Path, root: Path) -> Sample:
        match = self.PATTERN.fullmatch(Path(path.name).stem.strip())
        if match is None:
            raise _RowError("unparsable_name")
        age = _check_age(float(match.group(2)))
        return Sample(str(path), age, UNKNOWN_GENDER, match.group(1), self.name)


class MegaAgeReader(DatasetReader):
    """MegaAge: ``list/{train,test}_name.txt`` paired line by line with ``list/{train,test}_age.txt``.

    Images lie in ``train/`` and ``test/``; gender unknown; ``extra["official_split"]`` is the list's split.
    """

    name = "megaage"
    face_crops = True
    SPLITS = ("train", "test")

    def _scan(self, root: Path) -> tuple[list[Sample], list[Reject]]:
        list_dir = root / "list" if (root / "list").is_dir() else root
        samples, rejects, found = [], [], False
        for split in self.SPLITS:
            names_file, ages_file = list_dir / f"{split}_name.txt", list_dir / f"{split}_age.txt"
            if not names_file.is_file() and not ages_file.is_file():
                continue
            for needed, other in ((names_file, ages_file), (ages_file, names_file)):
                if not needed.is_file():
                    raise FileNotFoundError(f"{needed} not found; it pairs line by line with {other}.")
            found = True
            names, ages = _read_lines(names_file), _read_lines(ages_file)
            if len(names) != len(ages):
                raise DataError(
                    f"{names_file} has {len(names)} lines but {ages_file} has {len(ages)}; "
                    "the two list files must pair line by line."
                )
            for line, (image_name, age_text) in enumerate(zip(names, ages, strict=True), start=1):
                path = root / split / image_name
                try:
                    if not image_name:
                        path = Path(f"{names_file}:{line}")
                        raise _RowError("unparsable_name")
                    age = _check_age(_number(age_text))
                    samples.append(
                        Sample(
                            _require_file(path),
                            age,
                            UNKNOWN_GENDER,
                            None,
                            self.name,
                            extra={"official_split": split},
                        )
                    )
                except _RowError as error:
                    rejects.append(Reject(str(path), error.reason))
        if not found:
            raise FileNotFoundError(
                f"No {self.name} list files under {root}: expected list/train_name.txt + list/train_age.txt "
                "and/or list/test_name.txt + list/test_age.txt."
            )
        return samples, rejects


class MegaAgeAsianReader(MegaAgeReader):
    """MegaAge-Asian: the same layout as MegaAge (images already aligned)."""

    name = "megaage_asian"


class AppaRealReader(DatasetReader):
    """APPA-REAL: ``gt_avg_{train,valid,test}.csv`` with images in ``train/``, ``valid/``, ``test/``.

    ``target="real"`` (default) puts real_age in ``age``, ``"apparent"`` puts apparent_age_avg there; both
    ages, apparent_age_std and the official split go in ``extra``. The face-cropped ``<file>_face.jpg``
    next to an image is used when it exists and ``prefer_face_crop`` is true.
    """

    name = "appa_real"
    SPLITS = ("train", "valid", "test")

    def __init__(self, target: str = "real", prefer_face_crop: bool = True):
        if target not in ("real", "apparent"):
            raise DataError(f"appa_real target must be 'real' or 'apparent', got {target!r}")
        self.target = target
        self.prefer_face_crop = prefer_face_crop

    def _image(self, folder: Path, file_name: str) -> str:
        image = folder / file_name
        if self.prefer_face_crop:
            for face in (
                image.with_name(image.name + "_face.jpg"),
                image.with_name(image.stem + "_face.jpg"),
            ):
                if face.is_file():
                    return str(face)
        return _require_file(image)

    def _scan(self, root: Path) -> tuple[list[Sample], list[Reject]]:
        label_files = [(split, root / f"gt_avg_{split}.csv") for split in self.SPLITS]
        label_files = [(split, path) for split, path in label_files if path.is_file()]
        if not label_files:
            raise FileNotFoundError(
                f"No APPA-REAL label file (gt_avg_train.csv, gt_avg_valid.csv, gt_avg_test.csv) in {root}"
            )
        age_column = "real_age" if self.target == "real" else "apparent_age_avg"
        samples, rejects = [], []
        for split, label_file in label_files:
            columns, rows = _read_csv(label_file)
            missing = [c for c in ("file_name", age_column) if c not in columns]
            if missing:
                raise DataError(
                    f"{label_file}: missing column(s) {', '.join(missing)}; found {list(columns)}"
                )
            for line, row in rows:
                file_name = _cell(row, columns, "file_name")
                path = str(root / split / file_name) if file_name else f"{label_file}:{line}"
                try:
                    if not file_name:
                        raise _RowError("missing_file")
                    age = _check_age(_number(_cell(row, columns, age_column)))
                    extra: dict[str, Any] = {"official_split": split}
                    for key, column in (
                        ("apparent_age", "apparent_age_avg"),
                        ("apparent_age_std", "apparent_age_std"),
                        ("real_age", "real_age"),
                        ("num_ratings", "num_ratings"),
                    ):
                        value = _number(_cell(row, columns, column))
                        if value is not None:
                            extra[key] = int(value) if key == "num_ratings" else value
                    image = self._image(root / split, file_name)
                    samples.append(Sample(image, age, UNKNOWN_GENDER, None, self.name, extra=extra))
                except _RowError as error:
                    rejects.append(Reject(path, error.reason))
        return samples, rejects

    def __repr__(self) -> str:
        return f"AppaRealReader(target={self.target!r}, prefer_face_crop={self.prefer_face_crop})"


_GENDER_WORDS = {
    "1": MALE,
    "m": MALE,
    "male": MALE,
    "0": FEMALE,
    "f": FEMALE,
    "female": FEMALE,
    "": UNKNOWN_GENDER,
    "-1": UNKNOWN_GENDER,
    "nan": UNKNOWN_GENDER,
    "unknown": UNKNOWN_GENDER,
}


def parse_gender(text: str) -> int:
    """1 / 0 / -1 from ``1 0 -1`` (also ``1.0``), ``m f male female`` (any case); empty = -1."""
    word = text.strip().lower()
    if word in _GENDER_WORDS:
        return _GENDER_WORDS[word]
    value = _number(word)
    if value in (1.0, 0.0, -1.0):
        return int(value)
    raise _RowError("bad_gender")


class CsvReader(DatasetReader):
    """A generic CSV (default ``<root>/labels.csv``), including the yu4u age-estimation format.

    Columns: ``photo`` or ``path`` (required; relative paths resolve against the CSV's folder); ``age``
    in years (optional; when the column exists an empty or unparsable cell is rejected as bad_age);
    ``gender`` (optional: 1/0/-1 or m/f/male/female, empty = -1); ``identity``; ``box1..box4``
    (x1, y1, x2, y2 in pixels) and ``deg`` (kept in ``extra["deg"]``). ``source`` names the dataset.
    """

    name = "csv"

    def __init__(self, csv_path: str | Path | None = None, source: str = "csv"):
        self.csv_path = csv_path
        self.source = source

    def _scan(self, root: Path) -> tuple[list[Sample], list[Reject]]:
        csv_path = _locate(self.csv_path, root) if self.csv_path is not None else root / "labels.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(f"Label CSV not found: {csv_path}")
        columns, rows = _read_csv(csv_path)
        path_column = "photo" if "photo" in columns else "path" if "path" in columns else None
        if path_column is None:
            raise DataError(f"{csv_path}: needs a 'photo' or 'path' column; found {list(columns)}")
        box_columns = [f"box{i}" for i in range(1, 5)]
        has_box = [c in columns for c in box_columns]
        if any(has_box) and not all(has_box):
            missing = [c for c, present in zip(box_columns, has_box, strict=True) if not present]
            raise DataError(f"{csv_path}: box columns need all of box1..box4; missing {', '.join(missing)}")
        if "age" not in columns and "gender" not in columns:
            raise DataError(
                f"{csv_path}: needs an 'age' column (years) or, for a gender-only dataset, a 'gender' "
                f"column; found {list(columns)}"
            )
        base = csv_path.parent
        samples, rejects = [], []
        for line, row in rows:
            cell = _cell(row, columns, path_column)
            path = str(_absolute(base / Path(cell).expanduser())) if cell else f"{csv_path}:{line}"
            try:
                if not cell:
                    raise _RowError("missing_file")
                age = _check_age(_number(_cell(row, columns, "age"))) if "age" in columns else None
                gender = parse_gender(_cell(row, columns, "gender"))
                extra: dict[str, Any] = {}
                box = None
                if all(has_box):
                    cells = [_cell(row, columns, c) for c in box_columns]
                    if any(cells):
                        values = [_number(c) for c in cells]
                        if any(v is None for v in values):
                            raise _RowError("bad_box")
                        box = tuple(values)
                if _cell(row, columns, "deg"):
                    extra["deg"] = _number(_cell(row, columns, "deg"))
                    if extra["deg"] is None:
                        raise _RowError("bad_box")
                identity = _cell(row, columns, "identity") or None
                samples.append(
                    Sample(
                        _require_file(Path(path)), age, gender, identity, self.source, box=box, extra=extra
                    )
                )
            except _RowError as error:
                rejects.append(Reject(path, error.reason))
        return samples, rejects

    def __repr__(self) -> str:
        return f"CsvReader(csv_path={self.csv_path!r}, source={self.source!r})"


class FFHQReader(DatasetReader):
    """FFHQ with the ffhq-features labels: ``<root>/labels.csv`` (``file,age,gender,yaw,pitch,roll,...``).

    The ages and genders are a face service's *estimates*, not ground truth. A row with empty age and
    gender (no face was found when the labels were made) stays in as an unlabelled face (age None, gender
    -1), for training on a teacher's outputs alone; a row with only one of them empty keeps the other.
    Head pose (degrees) goes to ``extra``. No identities: FFHQ holds one photo per Flickr image.
    """

    name = "ffhq"
    LABELS = "labels.csv"

    def _scan(self, root: Path) -> tuple[list[Sample], list[Reject]]:
        csv_path = root / self.LABELS
        if not csv_path.is_file():
            raise FileNotFoundError(f"FFHQ labels not found: {csv_path} (file,age,gender,yaw,pitch,roll,...)")
        columns, rows = _read_csv(csv_path)
        missing = [c for c in ("file", "age", "gender") if c not in columns]
        if missing:
            raise DataError(f"{csv_path}: needs the columns file, age and gender; lacks {', '.join(missing)}")
        samples, rejects = [], []
        for line, row in rows:
            cell = _cell(row, columns, "file")
            path = str(_absolute(root / cell)) if cell else f"{csv_path}:{line}"
            try:
                if not cell:
                    raise _RowError("missing_file")
                age_text = _cell(row, columns, "age")
                age = _check_age(_number(age_text)) if age_text else None
                gender = parse_gender(_cell(row, columns, "gender"))
                pose = {k: _number(_cell(row, columns, k)) for k in ("yaw", "pitch", "roll") if k in columns}
                extra = {k: v for k, v in pose.items() if v is not None}
                samples.append(Sample(_require_file(Path(path)), age, gender, None, self.name, extra=extra))
            except _RowError as error:
                rejects.append(Reject(path, error.reason))
        return samples, rejects


_CLASS_GENDERS = {"male": MALE, "m": MALE, "female": FEMALE, "f": FEMALE}


class FoldersReader(DatasetReader):
    """Folder per class, ``root/<class>/**/*.jpg``, for the age-group and gender classifiers.

    ``label`` is the folder name and ``extra["class_index"]`` its index in ``classes`` (given, e.g.
    ``["0-12", "13-19"]`` or ``"f,m"``, to restrict and order the classes; else all folders, sorted).
    Gender is 1 / 0 for classes named male / female / m / f (any case), else -1; age is None. Images
    directly in root are rejected as no_class.
    """

    name = "folders"

    def __init__(self, classes: Sequence[str] | str | None = None):
        if isinstance(classes, str):
            classes = [c.strip() for c in classes.split(",") if c.strip()]
        self.classes = list(classes) if classes is not None else None

    def _scan(self, root: Path) -> tuple[list[Sample], list[Reject]]:
        present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        classes = self.classes if self.classes is not None else present
        missing = [c for c in classes if c not in present]
        if missing:
            raise FileNotFoundError(f"Class folder(s) {missing} not found in {root}; found {present}")
        samples = []
        for index, label in enumerate(classes):
            gender = _CLASS_GENDERS.get(label.lower(), UNKNOWN_GENDER)
            for path in _image_files(root / label):
                extra = {"class_index": index}
                samples.append(Sample(str(path), None, gender, None, self.name, label=label, extra=extra))
        rejects = [Reject(str(path), "no_class") for path in _image_files(root, recursive=False)]
        return samples, rejects

    def __repr__(self) -> str:
        return f"FoldersReader(classes={self.classes!r})"


# ------------------------------------------------------------------------------------------ IMDB-WIKI
def imdb_age(dob: float, photo_taken: float) -> float | None:
    """Age in years at the photo: photo year - birth year, minus one when born in July or later.

    ``dob`` is a MATLAB datenum (birth date = ``datetime.fromordinal(max(int(dob) - 366, 1))``). None when
    either value is not a finite number or the date is out of range.
    """
    if not (math.isfinite(dob) and math.isfinite(photo_taken)):
        return None
    try:
        birth = datetime.fromordinal(max(int(dob) - 366, 1))
    except (ValueError, OverflowError):
        return None
    return float(int(photo_taken) - birth.year - (1 if birth.month >= 7 else 0))


class ImdbWikiReader(DatasetReader):
    """IMDB-WIKI: rows of ``imdb.mat`` / ``wiki.mat`` (found in root or one folder below, or ``mat_path``).

    Fields: full_path, dob, gender (1 = male, NaN = unknown), photo_taken, face_score, second_face_score,
    optional face_location (box x1, y1, x2, y2), name, celeb_id (identity: celeb_id, else name). Rows with
    a second face, face_score < ``min_face_score`` or no face are rejected. ``full_path`` is relative to
    the .mat's folder when the .mat is found automatically, and to root when ``mat_path`` is given. Both
    the real nested struct (``{'imdb': struct}``) and flat variables are read.
    """

    name = "imdb_wiki"
    REQUIRED = ("full_path", "dob", "gender", "photo_taken", "face_score", "second_face_score")
    MAT_NAMES = ("imdb.mat", "wiki.mat")

    def __init__(self, mat_path: str | Path | None = None, min_face_score: float = 1.0):
        self.mat_path = mat_path
        self.min_face_score = float(min_face_score)

    def _find_mat(self, root: Path) -> tuple[Path, Path]:
        """``(the .mat, the folder full_path is relative to)``."""
        if self.mat_path is not None:
            mat = _locate(self.mat_path, root)
            if not mat.is_file():
                raise FileNotFoundError(f"IMDB-WIKI metadata file not found: {mat}")
            return mat, root
        candidates = [root / n for n in self.MAT_NAMES]
        candidates += [d / n for d in sorted(root.iterdir()) if d.is_dir() for n in self.MAT_NAMES]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"No imdb.mat or wiki.mat in {root} or its subfolders; pass mat_path.")
        if len(found) > 1:
            names = ", ".join(str(f) for f in found)
            raise DataError(f"Several IMDB-WIKI metadata files under {root} ({names}); pass mat_path.")
        return found[0], found[0].parent

    def _scan(self, root: Path) -> tuple[list[Sample], list[Reject]]:
        mat, base = self._find_mat(root)
        table = mat_table(load_mat(mat))
        missing = [f for f in self.REQUIRED if f not in table]
        if missing:
            raise DataError(f"{mat}: missing IMDB-WIKI field(s) {', '.join(missing)}; found {sorted(table)}")
        paths = [_text(v) for v in _cells(table["full_path"])]
        n = len(paths)
        columns = {f: [_scalar(v) for v in _cells(table[f])] for f in self.REQUIRED[1:]}
        if "celeb_id" in table:
            columns["celeb_id"] = [_scalar(v) for v in _cells(table["celeb_id"])]
        names = [_text(v) for v in _cells(table["name"])] if "name" in table else None
        boxes = _boxes(table["face_location"], n) if "face_location" in table else None
        lengths = {f: len(v) for f, v in columns.items()}
        lengths.update({k: len(v) for k, v in (("name", names), ("face_location", boxes)) if v is not None})
        wrong = {f: length for f, length in lengths.items() if length != n}
        if wrong:
            raise DataError(f"{mat}: fields have {wrong} entries but full_path has {n}")
        samples, rejects = [], []
        for i, rel in enumerate(paths):
            path = str(_absolute(base / rel.strip())) if rel.strip() else f"{mat}:{i + 1}"
            try:
                if not rel.strip():
                    raise _RowError("missing_file")
                score = columns["face_score"][i]
                if not math.isfinite(score):
                    raise _RowError("no_face")
                if score < self.min_face_score:
                    raise _RowError("low_face_score")
                if not math.isnan(columns["second_face_score"][i]):
                    raise _RowError("second_face")
                age = _check_age(imdb_age(columns["dob"][i], columns["photo_taken"][i]))
                code = columns["gender"][i]
                gender = MALE if code == 1 else FEMALE if code == 0 else UNKNOWN_GENDER
                name = names[i].strip() if names is not None else ""
                celeb = columns["celeb_id"][i] if "celeb_id" in columns else math.nan
                identity = str(int(celeb)) if math.isfinite(celeb) else (name or None)
                extra: dict[str, Any] = {"face_score": score}
                if name:
                    extra["name"] = name
                box = boxes[i] if boxes is not None else None
                samples.append(
                    Sample(_require_file(Path(path)), age, gender, identity, self.name, box=box, extra=extra)
                )
            except _RowError as error:
                rejects.append(Reject(path, error.reason))
        return samples, rejects

    def __repr__(self) -> str:
        return f"ImdbWikiReader(mat_path={self.mat_path!r}, min_face_score={self.min_face_score})"


def _cells(value: Any) -> list:
    """The entries of a MATLAB row/column vector (numeric array, cell array, string list) as a list."""
    if isinstance(value, np.ndarray):
        return list(value.ravel(order="F"))
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _scalar(value: Any) -> float:
    """A number from a MATLAB entry (scalar, 1x1 array or 1x1 cell); NaN when empty or not a number."""
    while isinstance(value, np.ndarray):
        if value.size == 0:
            return math.nan
        value = value.ravel()[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _text(value: Any) -> str:
    """A string from a MATLAB entry (str, char array, or a 1x1 cell holding one)."""
    while isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
        value = value.ravel()[0]
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return "" if value.size == 0 else "".join(str(v) for v in value.ravel())
    if isinstance(value, list):
        return "".join(str(v) for v in value)
    return str(value)


def _box(value: Any) -> tuple[float, float, float, float] | None:
    try:
        values = np.asarray(value, dtype=float).ravel()
    except (TypeError, ValueError):
        return None
    if values.size != 4 or not np.all(np.isfinite(values)):
        return None
    return tuple(float(v) for v in values)


def _boxes(value: Any, n: int) -> list[tuple[float, float, float, float] | None]:
    """Per-row boxes from a cell array of 1x4 vectors, or an (N, 4) / (4, N) numeric matrix."""
    if isinstance(value, np.ndarray) and value.dtype != object and value.ndim == 2:
        if value.shape == (n, 4):
            return [_box(row) for row in value]
        if value.shape == (4, n):
            return [_box(col) for col in value.T]
    return [_box(v) for v in _cells(value)]


def mat_table(variables: dict[str, Any]) -> dict[str, Any]:
    """The fields of a loaded IMDB-WIKI .mat: the ``imdb``/``wiki`` struct's, or the flat variables."""
    for key in ("imdb", "wiki"):
        if isinstance(variables.get(key), dict):
            return variables[key]
    structs = [v for v in variables.values() if isinstance(v, dict) and "full_path" in v]
    return structs[0] if len(structs) == 1 else variables


# ------------------------------------------------------------------------------------------- .mat files
def load_mat(path: str | Path) -> dict[str, Any]:
    """Variables of a MATLAB 5/7 .mat file (``scipy.io.loadmat``, in the ``train`` extra), as plain values.

    A struct becomes a dict (an array of structs: an object array of dicts), a cell array an object
    ndarray, a char array a str, a numeric array an ndarray (MATLAB's shape). v7.3 (HDF5) files, other
    files and truncated ones raise ValueError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f".mat file not found: {path}")
    from c3ae.extras import import_optional

    loadmat = import_optional("scipy.io").loadmat
    header = path.read_bytes()[:128]
    if b"MATLAB 7.3" in header:
        raise DataError(f"{path} is a MATLAB v7.3 (HDF5) file; re-save it with save(..., '-v7').")
    if not header.startswith(b"MATLAB"):
        raise DataError(f"{path} is not a MATLAB 5/7 .mat file (no 'MATLAB 5.0 MAT-file' header).")
    try:
        raw = loadmat(str(path))
    except (ValueError, OSError, NotImplementedError, TypeError) as error:
        raise DataError(f"{path}: malformed .mat file ({error})") from error
    return {k: _from_scipy(v) for k, v in raw.items() if not k.startswith("__")}


def _from_scipy(value: Any) -> Any:
    """scipy.io.loadmat's default output converted to :func:`load_mat`'s plain values."""
    if not isinstance(value, np.ndarray):
        return value
    if value.dtype.names:
        records = np.empty(value.size, dtype=object)
        for i, item in enumerate(value.ravel(order="F")):
            records[i] = {name: _from_scipy(item[name]) for name in value.dtype.names}
        return records[0] if value.size == 1 else records.reshape(value.shape, order="F")
    if value.dtype.kind == "U":
        if value.size == 0:
            return ""
        return str(value.ravel()[0]) if value.size == 1 else [str(v) for v in value.ravel()]
    if value.dtype == object:
        items = np.empty(value.size, dtype=object)
        for i, item in enumerate(value.ravel(order="F")):
            items[i] = _from_scipy(item)
        return items.reshape(value.shape, order="F")
    return value


# ------------------------------------------------------------------------------------------- registry
READERS: dict[str, type[DatasetReader]] = {
    reader.name: reader
    for reader in (
        UTKFaceReader,
        AsiaReader,
        AFADReader,
        ImdbWikiReader,
        MegaAgeReader,
        MegaAgeAsianReader,
        AppaRealReader,
        FGNetReader,
        CsvReader,
        FoldersReader,
        FFHQReader,
    )
}


def get_reader(name: str, **options: Any) -> DatasetReader:
    """The reader registered as ``name`` (case and ``-``/``_`` insensitive), built with ``options``."""
    key = name.strip().lower().replace("-", "_")
    if key not in READERS:
        raise DataError(f"Unknown dataset {name!r}; known datasets: {', '.join(sorted(READERS))}")
    reader_class = READERS[key]
    accepted = [p for p in inspect.signature(reader_class.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DataError(
            f"Dataset {key!r} has no option(s) {', '.join(unknown)}; "
            f"its options: {', '.join(accepted) or 'none'}"
        )
    return reader_class(**options)


def scan_dataset(name: str, root: str | Path, **options: Any) -> tuple[list[Sample], list[Reject]]:
    """``(samples, rejects)`` of dataset ``name`` under ``root``, sorted by path; images are not decoded."""
    root = Path(root)
    if not _absolute(root).exists():
        raise FileNotFoundError(f"Dataset root not found: {_absolute(root)}")
    return get_reader(name, **options).scan(root)
