"""``c3ae preprocess``: dataset photos -> detect -> align -> boxes -> Feather shards + manifest.json.

- Deterministic split (train/val/test, 80/10/10 by default, seeded) by identity where the dataset has one,
  otherwise by image; decided from the file list before any photo is decoded, so a rerun plans the same
  shards.
- Shards hold at most 5,000 rows of one split; each is written to a temporary name and renamed, then a small
  summary (``.<shard>.json``) records its counts and rejects. A rerun skips every shard whose summary exists,
  so a killed run resumes and Ctrl-C never leaves a half-written shard.
- Bad items (unreadable files, no face, labels out of range) are skipped, counted by reason in the manifest
  and listed in ``rejects.csv``; the run fails only when nothing usable was produced.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from c3ae._version import __version__
from c3ae.errors import C3AEError, UsageError
from c3ae.faces import DEFAULT_CHIP, ChipSpec, FacePipeline, ImageReadError, read_image
from c3ae.files import (
    atomic_path,
    atomic_write_text,
    check_ours,
    json_holding,
    remove_stale_temporaries,
    text_starting,
)
from c3ae.preprocessing.readers import Reject, Sample, get_reader, scan_dataset
from c3ae.preprocessing.shards import COLUMNS, MAX_ROWS_PER_SHARD, write_shard
from c3ae.records import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, Manifest, Shard

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LEGACY_SPLIT_KEY = "absolute path"  # what shards of versions that keyed photos by their absolute path hold
REJECTS_HEADER = ("path", "reason", "detail")
# The files of an ``out`` folder that a rerun replaces, each with the test that it is one c3ae wrote.
OWN_FILES = {
    MANIFEST_NAME: json_holding(format=MANIFEST_FORMAT),
    "rejects.csv": text_starting(",".join(REJECTS_HEADER) + "\r\n", ",".join(REJECTS_HEADER) + "\n"),
}


class PreprocessError(C3AEError, RuntimeError):
    """Nothing usable could be produced, or the output folder cannot be used."""


@dataclass
class ShardPlan:
    split: str
    index: int
    samples: list[Sample]

    @property
    def file(self) -> str:
        return f"{self.split}-{self.index:05d}.feather"


@dataclass
class ShardSummary:
    file: str
    split: str
    samples: int
    rows: int = 0
    multi_face: int = 0
    fallback: int = 0  # faces taken from the dataset's box or the whole image: the detector found none
    pipeline: dict = field(default_factory=dict)  # the face pipeline that made the shard
    split_key: str = LEGACY_SPLIT_KEY  # how photos without an identity were keyed (:func:`split_key`)
    rejects: list[tuple[str, str, str]] = field(default_factory=list)  # (path, reason, detail)
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        return {**self.__dict__, "rejects": [list(r) for r in self.rejects]}


# ------------------------------------------------------------------------------------------------ planning
def split_key(key_root: str | None) -> str:
    """How :func:`assign_splits` keys photos without an identity, as recorded in the manifest."""
    return "path relative to the root" if key_root is None else f"path under {key_root}"


def _group_key(sample: Sample, root: Path | None, key_root: str | None) -> str:
    if sample.identity not in (None, ""):
        return f"id:{sample.identity}"
    path = Path(sample.path)
    if root is not None and path.is_relative_to(root):
        relative = path.relative_to(root).as_posix()
        return f"path:{relative}" if key_root is None else f"path:{key_root.rstrip('/')}/{relative}"
    return f"path:{sample.path}"


def _stable_hash(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def assign_splits(
    samples: Sequence[Sample],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    root: str | Path | None = None,
    key_root: str | None = None,
) -> list[str]:
    """A split name per sample. Groups (identities, else single images) are ordered by a seeded hash and
    cut at the cumulative fractions, so every identity lands in exactly one split.

    ``root``: the dataset's folder. A photo without an identity is keyed by its path relative to it, so the
    split is the same wherever the dataset lies. ``key_root``: key such photos as if the dataset lay at
    this absolute path instead; versions up to 0.1.0-dev keyed by the absolute path, and the bundled models
    were split with the datasets at ``/work/shared/data/<folder>`` (how their cards' test sets are rebuilt).
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise UsageError(f"Split fractions must be three non-negative numbers summing to 1, got {fractions}.")
    groups: dict[str, list[int]] = {}
    base = Path(os.path.abspath(root)) if root is not None else None
    for i, sample in enumerate(samples):
        groups.setdefault(_group_key(sample, base, key_root), []).append(i)
    ordered = sorted(groups, key=lambda key: _stable_hash(seed, key))
    total = len(samples)
    bounds = (fractions[0] * total, (fractions[0] + fractions[1]) * total)
    splits = [""] * total
    assigned = 0
    for key in ordered:
        members = groups[key]
        split = "train" if assigned < bounds[0] else "val" if assigned < bounds[1] else "test"
        for i in members:
            splits[i] = split
        assigned += len(members)
    return splits


def plan_shards(samples: Sequence[Sample], splits: Sequence[str], rows_per_shard: int = MAX_ROWS_PER_SHARD):
    """Shards of at most ``rows_per_shard`` samples per split, in path order."""
    plans = []
    for split in SPLITS:
        members = sorted(
            (s for s, sp in zip(samples, splits, strict=True) if sp == split), key=lambda s: s.path
        )
        for index, start in enumerate(range(0, len(members), rows_per_shard)):
            plans.append(ShardPlan(split, index, members[start : start + rows_per_shard]))
    return plans


# ------------------------------------------------------------------------------------------------ one photo
_WORKER_PIPELINE: FacePipeline | None = None


def _init_worker(detector: str, spec: ChipSpec, min_face: int, pad_retry: float, single_thread: bool) -> None:
    global _WORKER_PIPELINE
    if single_thread:
        os.environ["TF_NUM_INTRAOP_THREADS"] = "1"
        os.environ["TF_NUM_INTEROP_THREADS"] = "1"
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import cv2

        cv2.setNumThreads(1)
    _WORKER_PIPELINE = FacePipeline(detector, spec, min_face, pad_retry)


def process_sample(
    sample: Sample, pipeline: FacePipeline | None = None, fallback_full_image: bool = False
) -> tuple[dict | None, tuple | None]:
    """(row, None) for a kept face, (None, (path, reason, detail)) for a reject. Never raises on bad data.

    When the detector finds no face, the sample's own box (datasets that give one) or, with
    ``fallback_full_image`` (datasets of face crops), the whole image is used; such rows have
    ``faces_found`` 0 and ``detector_score`` 0.
    """
    pipeline = pipeline or _WORKER_PIPELINE
    try:
        image = read_image(sample.path)
    except ImageReadError as error:
        return None, (sample.path, error.reason, str(error))
    try:
        faces = pipeline.process(image, fallback_box=sample.box, fallback_full_image=fallback_full_image)
    except Exception as error:  # a detector failure on one odd photo must not stop a 500K-image run
        return None, (sample.path, "detector_error", f"{type(error).__name__}: {error}")
    if not faces:
        return None, (sample.path, "no_face", "")
    face = faces[0]
    row = {
        "image": face.chip_jpeg,
        "age": sample.age,
        "gender": sample.gender,
        "boxes": face.boxes,
        "single_box": face.single_box,
        "landmarks": face.landmarks,
        "detector_score": face.detection.score,
        "faces_found": len(faces) if face.detection.score > 0 else 0,
        "source": sample.source,
        "path": sample.path,
        "identity": sample.identity,
        "label": sample.label,
    }
    return row, None


def _process_in_worker(sample: Sample, fallback_full_image: bool):
    return process_sample(sample, None, fallback_full_image)


# ------------------------------------------------------------------------------------------------ the run
def _write_json_atomically(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def _summary_path(out: Path, plan: ShardPlan) -> Path:
    return out / f".{plan.file}.json"


def _load_summary(out: Path, plan: ShardPlan, expected_pipeline: dict, key: str) -> ShardSummary | None:
    path = _summary_path(out, plan)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if (
        data.get("samples") != len(plan.samples)
        or data.get("pipeline") != expected_pipeline
        or data.get("split_key", LEGACY_SPLIT_KEY) != key  # the same shard name may hold other photos
        or (data.get("rows") and not (out / plan.file).is_file())
    ):
        return None  # the plan or the face pipeline changed, or the shard vanished: redo it
    data["rejects"] = [tuple(r) for r in data.get("rejects", [])]
    return ShardSummary(**data)


def _finish_shard(out: Path, plan: ShardPlan, rows: list[dict], summary: ShardSummary) -> None:
    summary.rows = len(rows)
    if rows:
        write_shard(out / plan.file, rows)
    _write_json_atomically(_summary_path(out, plan), summary.to_dict())


def preprocess(
    dataset: str,
    root: str | Path,
    out: str | Path,
    *,
    workers: int = 1,
    limit: int | None = None,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    detector: str = "mtcnn",
    spec: ChipSpec = DEFAULT_CHIP,
    min_face: int = 20,
    rows_per_shard: int = MAX_ROWS_PER_SHARD,
    progress: bool = True,
    reader_options: dict | None = None,
    fallback: str = "auto",
    splits: Sequence[str] = SPLITS,
    split_key_root: str | None = None,
) -> Manifest:
    """Run the whole preprocessing; returns the manifest (also written to ``out/manifest.json``; its
    ``str`` is the summary ``c3ae preprocess`` prints).

    ``fallback``: what to do when the detector finds no face. ``"auto"``: use the sample's own box where
    the dataset gives one, and the whole image for datasets of face crops (UTKFace, AFAD, All-Age-Faces,
    MegaAge); ``"none"``: reject the photo as ``no_face``.

    ``splits``: the splits to process (all three by default). The split of every photo is assigned over
    the whole dataset first, so ``splits=("test",)`` gives exactly the test faces of a full run, in minutes
    (how CI reproduces the model cards); a later run with all splits in the same ``out`` adds the rest.
    ``split_key_root``: see :func:`assign_splits` (``key_root``).
    """
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown or not splits:
        raise PreprocessError(
            f"splits must be a non-empty selection of {', '.join(SPLITS)}, got {list(splits)!r}.",
            parameter="splits",
        )
    if fallback not in ("auto", "none"):
        raise PreprocessError(f"fallback must be 'auto' or 'none', got {fallback!r}.", parameter="fallback")
    started = time.monotonic()
    root, out = Path(root), Path(out)
    if out.exists() and not out.is_dir():
        raise PreprocessError(
            f"out {out} is a file; give a folder (it is created if missing).", parameter="out"
        )
    check_ours(out, "out", OWN_FILES)  # never a manifest.json or rejects.csv of the user's
    out.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(out):  # a killed run's half-written shard or summary
        log.info("removed %s, left by an interrupted run", stale.name)

    samples, scan_rejects = scan_dataset(dataset, root, **(reader_options or {}))
    if limit is not None:
        samples = _limited(samples, limit, seed)
    if not samples:
        raise PreprocessError(
            f"No usable {dataset} samples under {root} ({len(scan_rejects)} files rejected while scanning)."
        )
    assigned = assign_splits(samples, fractions, seed, root=root, key_root=split_key_root)
    plans = [p for p in plan_shards(samples, assigned, rows_per_shard) if p.split in splits]
    pipeline = FacePipeline(detector, spec, min_face)
    fallback_full_image = fallback == "auto" and get_reader(dataset).face_crops
    if fallback == "none":
        samples = [replace(s, box=None) for s in samples]
    pipeline_record = {**pipeline.to_dict(), "fallback": fallback, "fallback_full_image": fallback_full_image}
    key = split_key(split_key_root)

    summaries: dict[str, ShardSummary] = {}
    pending = []
    for plan in plans:
        summary = _load_summary(out, plan, pipeline_record, key)
        if summary is None:
            pending.append(plan)
        else:
            summaries[plan.file] = summary
    if summaries:
        log.info("resuming: %d of %d shards already done", len(summaries), len(plans))

    processed_seconds = 0.0
    processed_samples = sum(len(p.samples) for p in pending)
    if pending:
        run_started = time.monotonic()
        _process_shards(
            out, pending, pipeline, pipeline_record, workers, fallback_full_image, progress, summaries, key
        )
        processed_seconds = time.monotonic() - run_started

    timing = {
        "wall_time_s": round(time.monotonic() - started, 1),
        "processed_samples": processed_samples,
        "processing_s": round(processed_seconds, 1),
        "faces_per_s": round(processed_samples / processed_seconds, 2) if processed_seconds else None,
        "workers": workers,
    }
    manifest = _manifest(
        dataset,
        root,
        plans,
        summaries,
        scan_rejects,
        pipeline_record,
        seed,
        fractions,
        len(samples),
        limit,
        timing,
        splits,
        key,
    )
    _write_rejects_csv(out, scan_rejects, summaries.values())
    atomic_write_text(out / MANIFEST_NAME, manifest.to_json())
    if manifest.counts["kept"] == 0:
        raise PreprocessError(
            f"No face was kept from {len(samples)} {dataset} samples; "
            f"see {out / 'rejects.csv'} for the reasons."
        )
    return manifest


def _process_shards(
    out: Path,
    pending,
    pipeline,
    pipeline_record: dict,
    workers: int,
    fallback_full_image: bool,
    progress,
    summaries,
    key: str,
) -> None:
    """Detect, align and write each pending shard (``summaries`` gets each one's summary as it finishes, so
    an interrupted run keeps the shards it wrote)."""
    results = _results(pending, pipeline, workers, fallback_full_image)
    bar = _progress_bar(sum(len(p.samples) for p in pending), progress)
    kept_total = rejected_total = 0
    try:
        for plan in pending:
            shard_started = time.monotonic()
            summary = ShardSummary(plan.file, plan.split, len(plan.samples), pipeline=pipeline_record)
            summary.split_key = key
            rows = []
            for _ in plan.samples:
                row, reject = next(results)
                if row is not None:
                    rows.append(row)
                    summary.multi_face += row["faces_found"] > 1
                    summary.fallback += row["faces_found"] == 0
                    kept_total += 1
                else:
                    summary.rejects.append(reject)
                    rejected_total += 1
                bar.update(1)
                bar.set_postfix(kept=kept_total, rejected=rejected_total, refresh=False)
            summary.elapsed_s = round(time.monotonic() - shard_started, 3)
            _finish_shard(out, plan, rows, summary)
            summaries[plan.file] = summary
    finally:
        bar.close()
        results.close()


def _limited(samples: list[Sample], limit: int, seed: int) -> list[Sample]:
    import random

    if limit < 1:
        raise PreprocessError(f"limit must be at least 1, got {limit}.", parameter="limit")
    chosen = random.Random(seed).sample(samples, min(limit, len(samples)))
    return sorted(chosen, key=lambda s: s.path)


def _results(plans: Sequence[ShardPlan], pipeline: FacePipeline, workers: int, fallback_full_image: bool):
    """A generator of (row, reject) in plan order, from this process or a pool of ``workers`` processes."""
    samples = [s for plan in plans for s in plan.samples]
    if workers <= 1:
        return (process_sample(s, pipeline, fallback_full_image) for s in samples)
    return _pool_results(samples, pipeline, workers, fallback_full_image)


def _pool_results(samples: Sequence[Sample], pipeline: FacePipeline, workers: int, fallback_full_image: bool):
    import multiprocessing

    # spawn, not fork: the workers load TensorFlow (MTCNN) and must not inherit a half-initialised runtime.
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(
        workers,
        initializer=_init_worker,
        initargs=(pipeline.detector_name, pipeline.spec, pipeline.min_face, pipeline.pad_retry, True),
    )
    try:
        work = functools.partial(_process_in_worker, fallback_full_image=fallback_full_image)
        yield from pool.imap(work, samples, chunksize=8)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


class _NoBar:
    def update(self, *_):
        pass

    def set_postfix(self, *_, **__):
        pass

    def close(self):
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="preprocess", smoothing=0.05, dynamic_ncols=True)


def _manifest(
    dataset,
    root,
    plans,
    summaries,
    scan_rejects,
    pipeline,
    seed,
    fractions,
    total,
    limit,
    timing,
    splits,
    key,
) -> Manifest:
    """The manifest of the finished shards: what was kept and rejected, per split, and how."""
    rejects = Counter(r.reason for r in scan_rejects)
    by_split: Counter = Counter()
    shards = []
    multi_face = fallback = 0
    for plan in plans:
        summary = summaries[plan.file]
        rejects.update(reason for _, reason, _ in summary.rejects)
        by_split[plan.split] += summary.rows
        multi_face += summary.multi_face
        fallback += summary.fallback
        if summary.rows:
            shards.append(Shard(file=plan.file, split=plan.split, rows=summary.rows))
    kept = sum(by_split.values())
    return Manifest(
        format=MANIFEST_FORMAT,
        version=MANIFEST_VERSION,
        c3ae_version=__version__,
        dataset=dataset,
        root=str(Path(root).resolve()),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        face_pipeline=pipeline,
        split={
            "seed": seed,
            "fractions": dict(zip(SPLITS, fractions, strict=True)),
            "by": "identity where known, else image",
            "limit": limit,
            "processed": [split for split in SPLITS if split in splits],
            "key": key,
        },
        counts={
            "files_scanned": total + len(scan_rejects),
            "samples": total,
            "kept": kept,
            "rejected": sum(rejects.values()),
            "kept_fraction": round(kept / max(total + len(scan_rejects), 1), 4),
            "multi_face_photos": multi_face,
            "fallback_faces": fallback,
            "by_split": {split: by_split.get(split, 0) for split in SPLITS},
        },
        rejects=dict(sorted(rejects.items(), key=lambda kv: -kv[1])),
        columns=list(COLUMNS),
        shards=shards,
        timing=timing,
    )


def _write_rejects_csv(out: Path, scan_rejects: Iterable[Reject], summaries: Iterable[ShardSummary]) -> None:
    with atomic_path(out / "rejects.csv") as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(REJECTS_HEADER)
        for reject in scan_rejects:
            writer.writerow([reject.path, reject.reason, getattr(reject, "detail", "")])
        for summary in summaries:
            writer.writerows(summary.rejects)
