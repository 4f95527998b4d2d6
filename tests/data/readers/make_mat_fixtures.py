"""Write the IMDB-WIKI .mat fixtures with scipy.io.savemat.

Run with the project venv (scipy is in the train extra):
    python tests/data/readers/make_mat_fixtures.py
MATLAB datenum = Python ordinal + 366. Expected labels are asserted in tests/test_readers.py.
"""

from datetime import date
from pathlib import Path

import numpy as np
from scipy.io import savemat

HERE = Path(__file__).resolve().parent


def datenum(year: int, month: int, day: int, fraction: float = 0.0) -> float:
    return date(year, month, day).toordinal() + 366 + fraction


def cells(values) -> np.ndarray:
    out = np.empty((1, len(values)), dtype=object)
    for i, value in enumerate(values):
        out[0, i] = value
    return out


# path, dob, photo_taken, gender, face_score, second_face_score, name, celeb_id
NAN = np.nan
ROWS = [
    (
        "01/nm0000001_rm1_1980-6-30_2010.jpg",
        datenum(1980, 6, 30, 0.73),
        2010,
        1.0,
        3.5,
        NAN,
        "Fred Astaire",
        1,
    ),
    ("01/nm0000002_rm2_1980-7-1_2010.jpg", datenum(1980, 7, 1), 2010, 0.0, 2.0, NAN, "Lauren Bacall", 2),
    ("02/nm0000003_rm3_1970-1-1_2000.jpg", datenum(1970, 1, 1), 2000, 1.0, 4.0, 2.1, "Second Face", 3),
    ("02/nm0000004_rm4_1970-1-1_2000.jpg", datenum(1970, 1, 1), 2000, 1.0, 0.5, NAN, "Low Score", 4),
    ("03/nm0000005_rm5_1970-1-1_2000.jpg", datenum(1970, 1, 1), 2000, 0.0, -np.inf, NAN, "No Face", 5),
    ("03/nm0000006_rm6_1950-12-31_1990.jpg", datenum(1950, 12, 31), 1990, NAN, 1.5, NAN, "Zoë Ünicode", 6),
    ("04/nm0000007_rm7_1800-1-1_2000.jpg", datenum(1800, 1, 1), 2000, 1.0, 5.0, NAN, "Too Old", 7),
    ("04/nm0000008_rm8_1990-3-3_2000.jpg", datenum(1990, 3, 3), 2000, 0.0, 2.5, NAN, "", 8),
]
BOXES = [(10.5 + i, 20.0, 110.5 + i, 120.0) for i in range(len(ROWS))]


def columns() -> dict:
    paths, dob, taken, gender, score, second, names, celeb = zip(*ROWS, strict=True)
    return {
        "full_path": cells(paths),
        "dob": np.array([dob]),
        "photo_taken": np.array([taken], dtype=np.uint16),
        "gender": np.array([gender]),
        "face_score": np.array([score]),
        "second_face_score": np.array([second]),
        "face_location": cells([np.array([box]) for box in BOXES]),
        "name": cells(names),
        "celeb_id": np.array([celeb], dtype=np.uint16),
    }


if __name__ == "__main__":
    # The real imdb.mat layout: one 1x1 struct variable holding 1xN fields.
    savemat(HERE / "imdb_nested.mat", {"imdb": columns()}, do_compression=True)
    # Flat variables, no celeb_id, face_location as an N x 4 matrix (uncompressed).
    flat = columns()
    del flat["celeb_id"]
    flat["face_location"] = np.array(BOXES)
    savemat(HERE / "wiki_flat.mat", flat, do_compression=False)
