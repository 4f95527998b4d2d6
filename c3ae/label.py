"""``c3ae label``: a teacher's outputs for every face of a preprocessed dataset, as new shard columns.

For each shard ``<split>-NNNNN.feather`` of a manifest, ``teacher-<split>-NNNNN.feather`` beside it holds,
row for row:

| column | type | meaning |
|---|---|---|
| ``teacher_age_dist`` | fixed list of K float32 | the teacher's age distribution over its K classes |
| ``teacher_age`` | float32 | its expected age, years (NaN where the teacher could not read the face) |
| ``teacher_p_male`` | float32 | its probability of male (NaN likewise) |

``manifest.json`` gains a ``teacher`` block: the teacher's name, the package it comes from, the sha256 of
every file that made the outputs, the age classes' values, whether mirror averaging was on, and per shard
the file, its rows and the faces skipped (with reasons). The teacher is deterministic, so labelling is
idempotent; a finished shard whose record matches is skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from c3ae.errors import DataError

logger = logging.getLogger(__name__)

TEACHER_COLUMNS = ("teacher_age_dist", "teacher_age", "teacher_p_male")
MAX_NAMED_SKIPS = 100
BATCH = 256


def teacher_file(shard_file: str) -> str:
    """The companion file of a shard: ``teacher-<shard file name>``."""
    return f"teacher-{Path(shard_file).name}"


@dataclass
class LabelReport:
    """What one ``c3ae label`` run did."""

    manifest: str
    teacher: str
    labelled: int = 0  # rows labelled by this run
    reused: int = 0  # rows of shards already labelled by the same teacher
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> faces the teacher could not read

    def __str__(self) -> str:
        skipped = ", ".join(f"{reason} {n}" for reason, n in self.skipped.items()) or "none"
        return (
            f"{self.manifest}: {self.labelled} faces labelled by {self.teacher}, {self.reused} already "
            f"labelled; skipped: {skipped}"
        )


def _chip_faces(images: list, landmarks: np.ndarray) -> tuple[list[np.ndarray], list[str | None]]:
    """Decode each chip; ``(chips, reasons)`` with a reason where a face cannot be read."""
    chips, reasons = [], []
    for data, points in zip(images, landmarks, strict=True):
        chip = None
        if isinstance(data, bytes) and data:
            chip = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if chip is None:
            reasons.append("undecodable_chip")
        elif not np.all(np.isfinite(points)) or np.ptp(points.reshape(5, 2)[:, 0]) < 4:
            reasons.append("landmarks_too_close")  # an eye-to-eye span under 4 chip pixels
        else:
            reasons.append(None)
        chips.append(chip if chip is not None else np.zeros((2, 2, 3), np.uint8))
    return chips, reasons


def _label_shard(teacher, shard_path: Path, flip: bool, progress) -> tuple[dict, list[dict]]:
    """Columns for one shard, and the rows skipped (``{"path", "reason"}``)."""
    from c3ae.preprocessing.shards import fixed_list_to_numpy, read_shard

    table = read_shard(shard_path, columns=["image", "landmarks", "path"])
    images = table.column("image").to_pylist()
    landmarks = fixed_list_to_numpy(table.column("landmarks"), 10).reshape(-1, 5, 2)
    paths = table.column("path").to_pylist()
    n, classes = len(images), len(teacher.age_values)
    dist = np.full((n, classes), np.nan, np.float32)
    age = np.full(n, np.nan, np.float32)
    p_male = np.full(n, np.nan, np.float32)
    skipped = []
    for start in range(0, n, BATCH):
        stop = min(start + BATCH, n)
        points = landmarks[start:stop]
        chips, reasons = _chip_faces(images[start:stop], points)
        good = [i for i, reason in enumerate(reasons) if reason is None]
        skipped += [{"path": paths[start + i], "reason": r} for i, r in enumerate(reasons) if r is not None]
        if good:
            out = teacher.predict([chips[i] for i in good], points[good], flip=flip)
            rows = np.asarray(good) + start
            dist[rows], age[rows], p_male[rows] = out.age_dist, out.age, out.p_male
        progress.update(stop - start)
    return {"teacher_age_dist": dist, "teacher_age": age, "teacher_p_male": p_male}, skipped


def _write_columns(path: Path, columns: dict) -> None:
    import pyarrow as pa
    import pyarrow.feather as feather

    from c3ae.files import atomic_path

    dist = columns["teacher_age_dist"]
    flat = pa.array(dist.reshape(-1), type=pa.float32())
    table = pa.table(
        {
            "teacher_age_dist": pa.FixedSizeListArray.from_arrays(flat, dist.shape[1]),
            "teacher_age": pa.array(columns["teacher_age"], type=pa.float32()),
            "teacher_p_male": pa.array(columns["teacher_p_male"], type=pa.float32()),
        }
    )
    with atomic_path(path, fsync=True) as temporary:
        feather.write_feather(table, temporary, compression="zstd")


def teacher_record(teacher, flip: bool) -> dict:
    """What identifies a teacher's labels: a rerun with a different record relabels every shard."""
    from c3ae.teachers import GEOMETRY_VERSION, TEACHER_PACKAGE

    return {
        "name": teacher.name,
        "package": TEACHER_PACKAGE,
        "files": teacher.files(),
        "age_values": [float(v) for v in teacher.age_values],
        "flip": bool(flip),
        "geometry": GEOMETRY_VERSION,
        "columns": list(TEACHER_COLUMNS),
    }


def label_manifest(manifest, teacher_folder, flip: bool = True, progress: bool = True) -> LabelReport:
    """Label every shard of ``manifest`` (its path or folder) with the teacher in ``teacher_folder``."""
    from c3ae.data import _manifest_path
    from c3ae.files import atomic_write_bytes
    from c3ae.records import Manifest
    from c3ae.teachers import load_teacher

    path = _manifest_path(manifest)
    info = Manifest.from_json(path)
    teacher = load_teacher(teacher_folder)
    record = teacher_record(teacher, flip)
    previous = dict(info.extra.get("teacher") or {})
    same = {k: v for k, v in previous.items() if k != "shards"} == record
    done = dict(previous.get("shards") or {}) if same else {}
    report = LabelReport(str(path), teacher.name)
    total = sum(int(s.rows or 0) for s in info.shards)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="face", desc="label", disable=not progress, leave=False)
    shards_record = {}
    raw = _read_json(path)
    try:
        for shard in info.shards:
            shard_path = path.parent / shard.file
            target = path.parent / teacher_file(shard.file)
            entry = done.get(shard.file)
            if entry and target.is_file() and entry.get("rows") == shard.rows:
                report.reused += int(shard.rows or 0)
                bar.update(int(shard.rows or 0))
                shards_record[shard.file] = entry
                continue
            columns, skipped = _label_shard(teacher, shard_path, flip, bar)
            if shard.rows is not None and len(columns["teacher_age"]) != shard.rows:
                raise DataError(
                    f"{shard_path} has {len(columns['teacher_age'])} rows, its manifest says "
                    f"{shard.rows}; preprocess it again."
                )
            _write_columns(target, columns)
            for item in skipped:
                report.skipped[item["reason"]] = report.skipped.get(item["reason"], 0) + 1
            report.labelled += len(columns["teacher_age"]) - len(skipped)
            shards_record[shard.file] = {
                "file": target.name,
                "rows": len(columns["teacher_age"]),
                "skipped": skipped[:MAX_NAMED_SKIPS],
                "skipped_count": len(skipped),
            }
            # the manifest records each finished shard, so an interrupted run resumes after it
            raw["teacher"] = {**record, "shards": {**done, **shards_record}}
            atomic_write_bytes(path, _dump_json(raw))
    finally:
        bar.close()
    raw["teacher"] = {**record, "shards": shards_record}
    atomic_write_bytes(path, _dump_json(raw))
    return report


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def _dump_json(payload: dict) -> bytes:
    import json

    return (json.dumps(payload, indent=2) + "\n").encode("utf-8")


def check_teacher_labels(info, split: str, expected: str | None = None) -> dict:
    """The manifest's ``teacher`` block, checked: every shard of ``split`` labelled and its file present,
    and (``expected``) made by the teacher of that name. Raises :class:`DataError` in one sentence."""
    block = (info.extra or {}).get("teacher")
    where = info.extra.get("manifest_path", "the manifest")
    if not block:
        raise DataError(
            f"{where} has no teacher labels; run `c3ae label {Path(str(where)).parent} --teacher DIR` first."
        )
    if expected is not None and block.get("name") != expected:
        raise DataError(
            f"{where} was labelled by the teacher {block.get('name')!r}, the recipe names "
            f"{expected!r}; label it again with that teacher."
        )
    shards = block.get("shards") or {}
    for shard in info.shards:
        if shard.split == split and shard.file not in shards:
            raise DataError(f"{where}: shard {shard.file} has no teacher labels; rerun `c3ae label` on it.")
    return block


def teacher_predictions(manifest, split: str) -> dict:
    """The stored teacher outputs of one split as :func:`c3ae.evaluate.metrics_from_predictions` takes
    them (``age_true``, ``age_pred``, ``gender_true``, ``gender_prob``), rows with an age and a teacher
    answer only."""
    from c3ae.data import read_manifest
    from c3ae.preprocessing.shards import read_shard

    info = read_manifest(manifest)
    check_teacher_labels(info, split)
    folder = Path(info.extra["manifest_path"]).parent
    parts = {"age_true": [], "age_pred": [], "gender_true": [], "gender_prob": []}
    for shard in info.shards:
        if shard.split != split:
            continue
        labels = read_shard(folder / shard.file, columns=["age", "gender"])
        teacher = read_shard(folder / teacher_file(shard.file), columns=["teacher_age", "teacher_p_male"])
        age = np.asarray(labels.column("age").to_numpy(zero_copy_only=False), dtype=np.float64)
        gender = labels.column("gender").fill_null(-1).to_numpy().astype(np.float64)
        t_age = teacher.column("teacher_age").to_numpy().astype(np.float64)
        t_male = teacher.column("teacher_p_male").to_numpy().astype(np.float64)
        keep = np.isfinite(age) & np.isfinite(t_age)
        for key, values in zip(parts, (age, t_age, gender, t_male), strict=True):
            parts[key].append(values[keep])
    return {key: np.concatenate(values) for key, values in parts.items()}
