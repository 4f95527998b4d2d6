"""The training input pipeline: Feather shards of aligned chips -> batches of named crops and targets.

:func:`make_dataset` streams one split of a ``c3ae preprocess`` output (``manifest.json`` and its shards)
as a ``tf.data.Dataset`` of ``(inputs, targets)`` dicts named like a model's inputs and outputs:

- shards are read one at a time per interleave slot (pyarrow, through ``from_generator``), so memory stays
  bounded whatever the split's size; unreadable shards are skipped with a warning;
- chips are decoded in the graph (``tf.io.decode_jpeg(..., dct_method="INTEGER_ACCURATE")``, the same bytes
  OpenCV gives) and turned to BGR;
- crops are cut with :func:`c3ae.faces.crop`, the very function inference uses, so without augmentation the
  crops are pixel-identical to the inference crops; they go out as float32 BGR in [0, 255];
- training augmentation (flip, rotation, box jitter, brightness/contrast, random erasing) runs in numpy/cv2
  from a per-element seed, so a seeded pipeline is reproducible while every epoch sees new augmentations.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from c3ae.conventions import AGE_BANDS, FEMALE, MALE
from c3ae.errors import DataError, UsageError
from c3ae.faces import crop, mask_context, warp
from c3ae.models.spec import CROP_LAYOUTS
from c3ae.records import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, Manifest

logger = logging.getLogger(__name__)

MANIFEST_VERSIONS = (MANIFEST_VERSION,)  # the manifest versions this c3ae reads
STANDARD_SPLITS = ("train", "val", "test")

SHUFFLE_BUFFER = 2048
SHARDS_IN_FLIGHT = 4  # interleave cycle when shuffling: at most this many shards are held in memory
ROWS_PER_CHUNK = 256  # rows per generator yield (unbatched right after)
_ROW_COLUMNS = ("image", "age", "gender", "boxes", "single_box", "label")


# ------------------------------------------------------------------------------------------------- manifest
def _manifest_path(manifest: str | Path) -> Path:
    path = Path(manifest)
    if path.is_dir():
        path = path / MANIFEST_NAME
    return path


def read_manifest(manifest: str | Path | Mapping) -> Manifest:
    """Read and check ``manifest.json`` (or the folder holding it) as a :class:`~c3ae.records.Manifest`.

    ``root`` is the manifest's folder (absolute), ``manifest_path`` (in ``extra``) its file, and each shard
    gains an absolute ``path``; the record reads like the dict it was read from. A manifest this function
    returned passes through. Raises FileNotFoundError for a missing manifest and
    :class:`~c3ae.errors.DataError` for one that is not a c3ae manifest.
    """
    if isinstance(manifest, Mapping):
        if "manifest_path" in manifest and all("path" in s for s in manifest.get("shards", [])):
            return manifest if isinstance(manifest, Manifest) else Manifest.from_json(manifest)
        raise DataError("A manifest dict must come from read_manifest().")
    path = _manifest_path(manifest).absolute()
    if not path.is_file():
        raise FileNotFoundError(
            f"No manifest at {path}; run 'c3ae preprocess' first, or pass the folder holding manifest.json."
        )
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not a readable JSON manifest ({error}).") from error
    if not isinstance(info, dict) or info.get("format") != MANIFEST_FORMAT:
        raise DataError(f'{path} is not a c3ae manifest (expected "format": "{MANIFEST_FORMAT}").')
    if info.get("version") not in MANIFEST_VERSIONS:
        raise DataError(
            f"{path} has manifest version {info.get('version')!r}; this c3ae reads versions "
            f"{', '.join(map(str, MANIFEST_VERSIONS))}."
        )
    shards = info.get("shards")
    if not isinstance(shards, list):
        raise DataError(f'{path} lists no shards ("shards" must be a list).')
    root = path.parent
    resolved = []
    for index, shard in enumerate(shards):
        if not isinstance(shard, dict) or not isinstance(shard.get("file"), str) or "split" not in shard:
            raise DataError(f'{path}: shard entry {index} needs "file" and "split", got {shard!r}.')
        rows = shard.get("rows")
        if rows is not None and (not isinstance(rows, int) or rows < 0):
            raise DataError(f"{path}: shard {shard['file']} has an invalid row count {rows!r}.")
        resolved.append({**shard, "path": str((root / shard["file"]).absolute())})
    return Manifest.from_json({**info, "shards": resolved, "manifest_path": str(path), "root": str(root)})


def manifest_splits(manifest: str | Path | Mapping) -> list[str]:
    """The splits a manifest has shards for, in first-seen order."""
    info = read_manifest(manifest)
    return list(dict.fromkeys(str(s["split"]) for s in info["shards"]))


def _split_shards(info: dict, split: str) -> list[dict]:
    splits = list(dict.fromkeys(str(s["split"]) for s in info["shards"]))
    if split not in splits and split not in STANDARD_SPLITS:
        known = ", ".join(repr(s) for s in splits) or "none"
        raise DataError(f"Unknown split {split!r}; manifest {info['manifest_path']} has the splits {known}.")
    shards = [s for s in info["shards"] if s["split"] == split]
    if not shards or all(s.get("rows") == 0 for s in shards):
        raise DataError(f"manifest {info['manifest_path']} has no rows in split {split!r}")
    return shards


def split_size(manifest: str | Path | Mapping, split: str) -> int:
    """Rows of ``split`` as the manifest records them (rows dropped for a missing age are still counted)."""
    info = read_manifest(manifest)
    shards = [s for s in info["shards"] if s["split"] == split]
    total = 0
    for shard in shards:
        rows = shard.get("rows")
        if rows is None:
            rows = _shard_row_count(shard["path"])
        total += int(rows or 0)
    return total


def _shard_row_count(path: str) -> int | None:
    try:
        import pyarrow as pa

        with pa.memory_map(path) as source:
            reader = pa.ipc.open_file(source)
            return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except Exception:  # noqa: BLE001 - an unreadable shard simply has no known size
        return None


def _check_shard(path: str) -> str | None:
    """Why a shard cannot be read (cheap: the Feather footer and schema only), or None when it looks fine."""
    import pyarrow as pa

    if not Path(path).is_file():
        return "missing file"
    try:
        with pa.memory_map(path) as source:
            schema = pa.ipc.open_file(source).schema
    except (OSError, pa.ArrowException) as error:
        return f"unreadable or corrupt Feather file ({error})"
    missing = [c for c in _ROW_COLUMNS if c not in schema.names]
    if missing:
        return f"lacks the columns {missing}"
    return None


def _readable_shards(info: dict, split: str) -> list[str]:
    shards = _split_shards(info, split)
    readable, skipped = [], []
    for shard in shards:
        if shard.get("rows") == 0:
            continue
        problem = _check_shard(shard["path"])
        if problem is None:
            readable.append(shard["path"])
        else:
            skipped.append(f"{shard['path']}: {problem}")
    if skipped:
        logger.warning(
            "Skipping %d of %d shards of split %r in %s: %s",
            len(skipped),
            len(shards),
            split,
            info["manifest_path"],
            "; ".join(skipped),
        )
    if not readable:
        raise DataError(
            f"manifest {info['manifest_path']} has no readable shard in split {split!r} "
            f"({len(skipped)} unreadable): {'; '.join(skipped)}"
        )
    return readable


# ------------------------------------------------------------------------------------------ age groups
def _group_ranges() -> list[tuple[float, float]]:
    from c3ae.models.levi_hassner import ADIENCE_AGE_GROUPS

    ranges = []
    for name in ADIENCE_AGE_GROUPS:
        numbers = [float(n) for n in re.findall(r"\d+(?:\.\d+)?", name)]
        low = numbers[0]
        high = numbers[1] if len(numbers) > 1 else math.inf
        ranges.append((low, high))
    return ranges


def age_to_group(age: float) -> int:
    """Index in ``ADIENCE_AGE_GROUPS`` of the group whose range holds ``age``, or the nearest for ages in the
    gaps (2.5 -> "0-2", 3.5 -> "4-6", 35 -> the lower of two equidistant groups, "25-32"); -1 for NaN."""
    age = float(age)
    if math.isnan(age):
        return -1
    distances = [max(low - age, age - high, 0.0) for low, high in _group_ranges()]
    return int(np.argmin(distances))


def label_to_group(label: str | None) -> int:
    """Index in ``ADIENCE_AGE_GROUPS`` of a class label naming a group ("25-32", "(25, 32)", "60+",
    "(60, 100)"); another numeric range maps to the group holding its middle ("(27, 32)" -> "25-32"), a
    number to its group; -1 for labels that are no age (None, "cat")."""
    from c3ae.models.levi_hassner import ADIENCE_AGE_GROUPS

    if not label:
        return -1
    text = str(label).strip()
    if text in ADIENCE_AGE_GROUPS:
        return ADIENCE_AGE_GROUPS.index(text)
    numbers = [float(n) for n in re.findall(r"\d+(?:\.\d+)?", text)]
    if not numbers or not re.fullmatch(r"[\s()\[\]\d.,+\-]+", text):
        return -1
    for index, (low, high) in enumerate(_group_ranges()):
        if numbers[0] == low and (len(numbers) == 1 or numbers[1] == high or math.isinf(high)):
            return index
    # Another range (Adience's stray "(8, 23)", "(27, 32)", "(38, 48)"): the group holding its middle.
    return age_to_group(sum(numbers[:2]) / len(numbers[:2]))


# --------------------------------------------------------------------------------------------- shard rows
def _row_signature(tf, teacher_classes: int = 0):
    """The generator's chunk of rows; with ``teacher_classes`` also the teacher's columns (distillation)."""
    signature = {
        "image": tf.TensorSpec((None,), tf.string),
        "age": tf.TensorSpec((None,), tf.float32),
        "gender": tf.TensorSpec((None,), tf.float32),
        "boxes": tf.TensorSpec((None, 3, 4), tf.float32),
        "single_box": tf.TensorSpec((None, 4), tf.float32),
        "age_group": tf.TensorSpec((None,), tf.int32),
        "weight": tf.TensorSpec((None,), tf.float32),
    }
    if teacher_classes:
        signature.update({name: tf.TensorSpec((None,), tf.float32) for name in DISTILL_ROW_KEYS[1:]})
        signature["teacher_age_dist"] = tf.TensorSpec((None, teacher_classes), tf.float32)
    return signature


# Per row, with distillation: the teacher's distribution, expected age and P(male), and the teacher's
# share of each head's target (0: ground truth only, 1: the teacher only; 0 where it has no answer).
DISTILL_ROW_KEYS = (
    "teacher_age_dist",
    "teacher_age",
    "teacher_p_male",
    "teacher_share_age",
    "teacher_share_gender",
)


def _whole_jpeg(data) -> bool:
    """Starts with JPEG's start-of-image marker and ends with its end-of-image marker."""
    return isinstance(data, bytes) and data[:2] == b"\xff\xd8" and data.rstrip(b"\0")[-2:] == b"\xff\xd9"


@functools.cache
def _decode_check():
    """A graph that decodes a batch of JPEGs as the pipeline does; it fails if any one cannot be decoded."""
    import tensorflow as tf

    def decodes(data):
        return tf.size(tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")) > 0

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def check(images):
        return tf.map_fn(decodes, images, fn_output_signature=tf.bool)

    return check


def _undecodable(images: Sequence[bytes], chunk: int = 512) -> list[int]:
    """Indices of the JPEGs TensorFlow's decoder refuses (damaged in the middle of the scan: such a row would
    stop a whole run with an error naming no shard or row). One graph call per chunk when all decode; the
    chunk is bisected around a failure."""
    import tensorflow as tf

    check = _decode_check()

    def refused(low: int, high: int) -> list[int]:
        try:
            check(tf.constant(list(images[low:high]), dtype=tf.string))
            return []
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError):
            if high - low == 1:
                return [low]
            middle = (low + high) // 2
            return refused(low, middle) + refused(middle, high)

    starts = range(0, len(images), chunk)
    return [i for start in starts for i in refused(start, min(start + chunk, len(images)))]


def _teacher_rows(path: str, n: int, shares: Mapping, age: np.ndarray, gender: np.ndarray) -> dict:
    """The distillation columns of one shard (its ``teacher-`` companion file, ``c3ae.label``): the
    teacher's outputs and its share of each head's target per row. The share is the source's
    ``shares[head]`` where the row has a label, 1 where it has none (the teacher alone), 0 where the
    teacher could not read the face."""
    from c3ae.label import teacher_file
    from c3ae.preprocessing.shards import fixed_list_to_numpy, read_shard

    if not shares.get("labelled", True):  # a source without teacher labels in a distilled mix
        zeros = np.zeros(n, np.float32)
        return {
            "teacher_age_dist": np.zeros((n, int(shares["classes"])), np.float32),
            "teacher_age": zeros,
            "teacher_p_male": zeros,
            "teacher_share_age": zeros,
            "teacher_share_gender": zeros,
        }
    table = read_shard(Path(path).parent / teacher_file(path), columns=list(DISTILL_ROW_KEYS[:3]))
    if table.num_rows != n:
        raise DataError(
            f"{path}: its teacher file has {table.num_rows} rows, the shard {n}; run c3ae label again."
        )
    dist = table.column("teacher_age_dist")
    t_age = table.column("teacher_age").to_numpy().astype(np.float32)
    t_male = table.column("teacher_p_male").to_numpy().astype(np.float32)
    answered = np.isfinite(t_age) & np.isfinite(t_male)
    share_age = np.where(np.isfinite(age), float(shares.get("age", 0.0)), 1.0)
    share_gender = np.where((gender == MALE) | (gender == FEMALE), float(shares.get("gender", 0.0)), 1.0)
    return {
        "teacher_age_dist": np.nan_to_num(fixed_list_to_numpy(dist, dist.type.list_size)),
        "teacher_age": np.nan_to_num(t_age),
        "teacher_p_male": np.nan_to_num(t_male),
        "teacher_share_age": np.where(answered, share_age, 0.0).astype(np.float32),
        "teacher_share_gender": np.where(answered, share_gender, 0.0).astype(np.float32),
    }


def _shard_rows(path, seed, *, permute: bool, need_age: bool, need_group: bool, weights=None, teacher=None):
    """Yield one shard's rows in chunks of dict-of-arrays (``from_generator``'s generator); ``weights`` is
    a :func:`balance_table` giving each row's sample weight (default 1); ``teacher`` the source's teacher
    shares per head (``{"age": 0.5, "gender": 0.8}``) to add the distillation columns."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from c3ae.preprocessing.shards import ShardError, fixed_list_to_numpy, read_shard

    path = path.decode() if isinstance(path, bytes) else str(path)
    try:
        table = read_shard(path, columns=_ROW_COLUMNS)
        images = table.column("image").to_numpy(zero_copy_only=False)
        age = np.asarray(table.column("age").to_numpy(zero_copy_only=False), dtype=np.float32)
        gender = pc.fill_null(table.column("gender"), -1).to_numpy().astype(np.float32)
        boxes = fixed_list_to_numpy(table.column("boxes"), 12).reshape(-1, 3, 4)
        single = fixed_list_to_numpy(table.column("single_box"), 4)
        labels = table.column("label").to_pylist() if need_group else None
        distill = None if teacher is None else _teacher_rows(path, len(age), teacher, age, gender)
    except (ShardError, OSError, pa.ArrowException, ValueError) as error:
        logger.warning("Skipping 1 shard that cannot be read: %s (%s)", path, error)
        return
    del table
    if need_group:
        from_label = np.array([label_to_group(v) for v in labels], dtype=np.int32)
        from_age = np.array([age_to_group(a) for a in age], dtype=np.int32)
        group = np.where(from_label >= 0, from_label, from_age).astype(np.int32)
    else:
        group = np.full(len(age), -1, dtype=np.int32)
    keep = np.array([isinstance(b, bytes) and len(b) > 0 for b in images], dtype=bool)
    whole = np.array([_whole_jpeg(b) for b in images], dtype=bool)
    candidates = np.flatnonzero(keep & whole)
    whole[candidates[_undecodable(images[candidates])]] = False
    broken = np.flatnonzero(keep & ~whole)
    if len(broken):  # TensorFlow's decoder would stop the whole run with an error naming neither
        shown = ", ".join(str(int(i)) for i in broken[:10]) + (", ..." if len(broken) > 10 else "")
        logger.warning(
            "Skipping %d row(s) of shard %s whose image is not a whole, decodable JPEG (rows %s).",
            len(broken),
            path,
            shown,
        )
    keep &= whole
    if need_group:
        keep &= group >= 0
    elif need_age:  # a face without an age trains on the teacher's, where distilling
        keep &= np.isfinite(age) | (distill is not None and distill["teacher_share_age"] > 0)
    weight = np.ones(len(age), dtype=np.float32)
    if weights is not None:
        weight = np.asarray(weights, dtype=np.float32).reshape(-1)[_cells(age, gender)]
    order = np.flatnonzero(keep)
    if permute:
        order = np.random.default_rng(int(np.int64(seed).view(np.uint64))).permutation(order)
    for start in range(0, len(order), ROWS_PER_CHUNK):
        rows = order[start : start + ROWS_PER_CHUNK]
        yield {
            "image": images[rows],
            "age": age[rows],
            "gender": gender[rows],
            "boxes": boxes[rows],
            "single_box": single[rows],
            "age_group": group[rows],
            "weight": weight[rows],
            **({} if distill is None else {key: values[rows] for key, values in distill.items()}),
        }


# ------------------------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class Augmentation:
    """Training augmentation parameters (the defaults are the ones :func:`make_dataset` uses).

    The probabilities of the "real photo" changes (``context_mask``, ``grayscale``, ``colour``, ``gamma``,
    ``blur``, ``downscale``, ``jpeg``) default to 0: a recipe turns them on with ``data.augmentation``.
    """

    flip: float = 0.5  # probability of mirroring the chip (and its boxes)
    max_rotation: float = 15.0  # degrees, uniform in [-max, max], about the face centre, on the chip
    shift: float = 0.05  # box shift, up to this fraction of the box size, per axis (detector noise)
    scale: float = 0.05  # box scale, uniform in [1 - scale, 1 + scale]
    contrast: tuple[float, float] = (0.7, 1.3)  # alpha of alpha * x + beta
    brightness: tuple[float, float] = (-25.0, 25.0)  # beta
    erase: float = 0.2  # probability, per crop, of random erasing (occlusion)
    erase_area: tuple[float, float] = (0.06, 0.10)  # fraction of the crop area
    erase_aspect: tuple[float, float] = (0.5, 2.0)  # height / width of the erased rectangle
    # probability of zeroing the chip outside a random window of inner-box widths (UTKFace-like black
    # surroundings), so that one model works with and without context
    context_mask: float = 0.0
    context_window: tuple[float, float] = (0.55, 1.3)
    grayscale: float = 0.0  # probability of a grey photo
    colour: float = 0.0  # probability of a white-balance change: per-channel gains in [1 - 0.15, 1 + 0.15]
    gamma: float = 0.0  # probability of a gamma change, gamma in ``gamma_range``
    gamma_range: tuple[float, float] = (0.6, 1.6)
    blur: float = 0.0  # probability of a Gaussian blur, sigma in ``blur_sigma`` chip pixels
    blur_sigma: tuple[float, float] = (0.5, 2.0)
    downscale: float = 0.0  # probability of a low-resolution photo: down by ``downscale_factor``, back up
    downscale_factor: tuple[float, float] = (0.25, 0.6)
    jpeg: float = 0.0  # probability of JPEG recompression at a quality in ``jpeg_quality``
    jpeg_quality: tuple[int, int] = (20, 85)

    @classmethod
    def from_dict(cls, values: dict | None) -> Augmentation:
        """Defaults overridden by ``values`` (a config's ``data.augmentation``); lists become tuples.
        Unknown names raise ValueError naming them."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DataError(f"Unknown augmentation {unknown[0]!r}; known: {', '.join(sorted(known))}.")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


DEFAULT_AUGMENTATION = Augmentation()


def mirror_boxes(boxes, width: float) -> np.ndarray:
    """Boxes (..., 4) as (x1, y1, x2, y2) in an image of ``width`` mirrored left-right: x1' = W - x2,
    x2' = W - x1 (y unchanged)."""
    boxes = np.array(boxes, dtype=np.float64, copy=True)
    x1 = boxes[..., 0].copy()
    boxes[..., 0] = width - boxes[..., 2]
    boxes[..., 2] = width - x1
    return boxes


def jitter_box(box, rng: np.random.Generator, shift: float = 0.05, scale: float = 0.05) -> np.ndarray:
    """Shift a box by up to ``shift`` of its size per axis and scale it by [1 - scale, 1 + scale]."""
    x1, y1, x2, y2 = (float(v) for v in box)
    width, height = x2 - x1, y2 - y1
    cx = (x1 + x2) / 2 + rng.uniform(-shift, shift) * width
    cy = (y1 + y2) / 2 + rng.uniform(-shift, shift) * height
    factor = rng.uniform(1.0 - scale, 1.0 + scale)
    half_w, half_h = width * factor / 2, height * factor / 2
    return np.array([cx - half_w, cy - half_h, cx + half_w, cy + half_h])


def _erase(image: np.ndarray, rng: np.random.Generator, area: tuple, aspect: tuple) -> None:
    side_h, side_w = image.shape[:2]
    target = rng.uniform(*area) * side_h * side_w
    ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    height = int(min(side_h, max(1, round(math.sqrt(target * ratio)))))
    width = int(min(side_w, max(1, round(math.sqrt(target / ratio)))))
    top = int(rng.integers(0, side_h - height + 1))
    left = int(rng.integers(0, side_w - width + 1))
    image[top : top + height, left : left + width] = rng.integers(
        0, 256, (height, width, image.shape[2]), dtype=np.uint8
    )


def photo_changes(chip: np.ndarray, rng: np.random.Generator, params: Augmentation) -> np.ndarray:
    """What cameras and the web do to a BGR uint8 chip, each change drawn with its probability in ``params``:
    grey, white balance, gamma, Gaussian blur, a low-resolution round trip and JPEG recompression."""
    if rng.random() < params.grayscale:
        chip = cv2.cvtColor(cv2.cvtColor(chip, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    if rng.random() < params.colour:
        gains = rng.uniform(0.85, 1.15, size=3).astype(np.float32)
        chip = np.clip(np.rint(chip.astype(np.float32) * gains), 0, 255).astype(np.uint8)
    if rng.random() < params.gamma:
        gamma = rng.uniform(*params.gamma_range)
        table = np.clip(np.rint(255.0 * (np.arange(256) / 255.0) ** gamma), 0, 255).astype(np.uint8)
        chip = cv2.LUT(chip, table)
    if rng.random() < params.blur:
        chip = cv2.GaussianBlur(chip, (0, 0), rng.uniform(*params.blur_sigma))
    if rng.random() < params.downscale:
        height, width = chip.shape[:2]
        factor = rng.uniform(*params.downscale_factor)
        small = cv2.resize(
            chip,
            (max(1, round(width * factor)), max(1, round(height * factor))),
            interpolation=cv2.INTER_AREA,
        )
        chip = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    if rng.random() < params.jpeg:
        quality = int(rng.integers(params.jpeg_quality[0], params.jpeg_quality[1] + 1))
        ok, data = cv2.imencode(".jpg", chip, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok:
            chip = cv2.imdecode(data, cv2.IMREAD_COLOR)
    return np.ascontiguousarray(chip)


def augment_crops(
    chip: np.ndarray,
    boxes,
    size: int,
    rng: np.random.Generator,
    centre=None,
    params: Augmentation = DEFAULT_AUGMENTATION,
) -> np.ndarray:
    """Augmented crops of a BGR uint8 chip: (K, size, size, 3) uint8 for boxes (K, 4).

    Chip-level changes are drawn once, so C3AE's three crops stay consistent: a left-right mirror (boxes
    mirrored with it) and a rotation about ``centre`` (the face centre; default the chip centre), zero
    border. Then, per box, a jitter (shift, scale) and :func:`c3ae.faces.crop` itself, so augmented crops
    follow the face pipeline's conventions. Before the crops, the chip gets :func:`photo_changes` (grey,
    white balance, gamma, blur, low resolution, JPEG), each with its probability in ``params``. Then one
    brightness/contrast change for the sample, and random erasing with noise per crop.
    """
    chip = np.asarray(chip)
    side_h, side_w = chip.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    cx, cy = (side_w / 2, side_h / 2) if centre is None else (float(centre[0]), float(centre[1]))
    if rng.random() < params.flip:
        chip = np.ascontiguousarray(chip[:, ::-1])
        boxes = mirror_boxes(boxes, side_w)
        cx = side_w - cx
    angle = rng.uniform(-params.max_rotation, params.max_rotation)
    if angle != 0.0:
        # Box coordinates are pixel edges (see c3ae.faces.crop); cv2 works in pixel centres.
        rotation = cv2.getRotationMatrix2D((cx - 0.5, cy - 0.5), angle, 1.0)
        chip = warp(chip, rotation, (side_w, side_h))
    chip = photo_changes(chip, rng, params)
    alpha = rng.uniform(*params.contrast)
    beta = rng.uniform(*params.brightness)
    crops = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
    for index, box in enumerate(boxes):
        patch = crop(chip, jitter_box(box, rng, params.shift, params.scale), size)
        if alpha != 1.0 or beta != 0.0:
            patch = np.clip(np.rint(patch.astype(np.float32) * alpha + beta), 0, 255).astype(np.uint8)
        if rng.random() < params.erase:
            _erase(patch, rng, params.erase_area, params.erase_aspect)
        crops[index] = patch
    return crops


def _crop_rows(
    chip,
    boxes,
    single,
    seed,
    *,
    size: int,
    augment: bool,
    use_single: bool,
    context: float = 0.0,
    params: Augmentation = DEFAULT_AUGMENTATION,
):
    """numpy_function body: (K, size, size, 3) uint8 crops of one decoded BGR chip."""
    inner = boxes.reshape(-1, 4)[2]
    chip = mask_context(np.ascontiguousarray(chip), inner, context)
    boxes = single.reshape(1, 4) if use_single else boxes.reshape(-1, 4)
    if not augment:
        return np.stack([crop(chip, box, size) for box in boxes])
    rng = np.random.default_rng(int(np.int64(seed).view(np.uint64)))
    if rng.random() < params.context_mask:
        chip = mask_context(chip, inner, rng.uniform(*params.context_window))
    centre = ((single[0] + single[2]) / 2, (single[1] + single[3]) / 2)
    return augment_crops(chip, boxes, size, rng, centre=centre, params=params)


# ------------------------------------------------------------------------------------------------ dataset
def _resolve_model(model) -> tuple:
    """(family spec, crop layout (``"triple"`` or ``"single"``), input side, output names or None) for a
    family name, a registered variant name, a :class:`~c3ae.models.spec.ModelInfo` or a model built by
    ``c3ae.models``."""
    from c3ae.models.spec import FAMILIES, ModelInfo, family_spec

    if not isinstance(model, (str, ModelInfo)):
        from c3ae.models.base import model_info

        model = model_info(model)
    if isinstance(model, ModelInfo):
        return family_spec(model.family), model.crop_layout, model.input_size, model.outputs
    if model.replace("-", "_") in FAMILIES:
        spec = family_spec(model)
        return spec, spec.crop_layout(), spec.input_size, None
    from c3ae.models.catalog import VARIANTS

    if model in VARIANTS:
        variant = VARIANTS[model]
        spec = family_spec(variant.family)
        return spec, spec.crop_layout(variant.kwargs), variant.input_size, variant.outputs
    raise DataError(
        f"Unknown model family {model!r}; expected one of {', '.join(FAMILIES)} (or a variant name: "
        f"{', '.join(VARIANTS)})."
    )


@dataclass(frozen=True)
class Source:
    """One preprocessed dataset in a training mix: its manifest, its share of the training samples
    (``weight``, relative to the other sources') and the name its metrics are reported under (default: the
    manifest's ``dataset``)."""

    manifest: str | Path | Mapping
    weight: float = 1.0
    name: str = ""


# The face-pipeline settings that decide what a crop looks like: sources mixed in one model must agree.
CROP_SETTINGS = ("detector", "chip", "template_in_box", "box_aspect")


def read_sources(sources: Sequence[Source | Mapping | str | Path]) -> list[tuple[str, Manifest, float]]:
    """(name, manifest, weight) per source, checked before any data is read: every manifest readable, every
    weight a positive number, names unique, and the same crop settings (``CROP_SETTINGS``) in all."""
    if isinstance(sources, (str, Path, Mapping)) or not sources:
        raise DataError("sources must be a non-empty list of manifests (or {manifest:, weight:} entries).")
    resolved, names = [], set()
    for index, entry in enumerate(sources):
        if isinstance(entry, Mapping) and "manifest" in entry and "format" not in entry:
            entry = Source(**entry)
        source = entry if isinstance(entry, Source) else Source(entry)
        weight = source.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise DataError(f"source {index}: the mixing weight must be a positive number, got {weight!r}.")
        info = read_manifest(source.manifest)
        name = source.name or str(info.get("dataset") or f"source{index}")
        if name in names:
            raise DataError(f"Two sources are named {name!r}; give each a distinct name.")
        names.add(name)
        resolved.append((name, info, float(weight)))
    first_name, first, _ = resolved[0]
    for name, info, _ in resolved[1:]:
        for key in CROP_SETTINGS:
            mine, theirs = (m.get("face_pipeline", {}).get(key) for m in (info, first))
            if mine != theirs:
                raise DataError(
                    f"Source {name!r} ({info['manifest_path']}) was preprocessed with face_pipeline.{key} = "
                    f"{mine!r}, source {first_name!r} with {theirs!r}; preprocess both the same way."
                )
    return resolved


def balance_table(manifest: str | Path | Mapping, split: str, strength: float) -> np.ndarray:
    """Sample weights per (age band, gender) cell of a split, (len(AGE_BANDS) + 1, 3): rows are the bands
    and a last row for unknown ages, columns female, male, unknown. A cell's weight is its share of the
    split's rows, relative to an even spread over the non-empty cells, to the power ``-strength`` (0: all
    ones, 1: every cell weighs the same in total), clipped to [0.1, 10] and normalised to a mean of 1 per
    row."""
    table = np.ones((len(AGE_BANDS) + 1, 3))
    if not strength:
        return table
    from c3ae.preprocessing.shards import read_shard

    info = read_manifest(manifest)
    ages, genders = [], []
    for shard in info["shards"]:
        if shard["split"] == split and _check_shard(shard["path"]) is None:
            columns = read_shard(shard["path"], ["age", "gender"])
            ages.append(np.asarray(columns.column("age").to_numpy(zero_copy_only=False), dtype=np.float64))
            genders.append(columns.column("gender").fill_null(-1).to_numpy().astype(np.int64))
    if not ages:
        return table
    cells = _cells(np.concatenate(ages), np.concatenate(genders))
    counts = np.bincount(cells, minlength=table.size).reshape(table.shape).astype(np.float64)
    share = counts / counts.sum() * np.count_nonzero(counts)
    with np.errstate(divide="ignore"):
        table = np.where(counts > 0, np.clip(share ** (-float(strength)), 0.1, 10.0), 1.0)
    return table / (table * counts).sum() * counts.sum()


def _cells(age: np.ndarray, gender: np.ndarray) -> np.ndarray:
    """Flat (band, gender) cell index per row: band by ``AGE_BANDS`` (a last one for unknown ages), gender
    column 0 female, 1 male, 2 unknown."""
    lows = np.array([low for _, low, _ in AGE_BANDS])
    band = np.where(np.isfinite(age), np.searchsorted(lows, np.nan_to_num(age), side="right") - 1, len(lows))
    band = np.clip(band, 0, len(lows))
    column = np.where(gender == 1, 1, np.where(gender == 0, 0, 2))
    return band * 3 + column


def _row_stream(
    info: dict, split: str, generator, shuffle: bool, seeds: list, cache, teacher_classes: int = 0
):
    """The rows of one manifest's split as a dataset of dicts (shuffled and cached as asked)."""
    import tensorflow as tf

    shard_paths = _readable_shards(info, split)
    deterministic = True if seeds[0] is not None or not shuffle else None
    signature = _row_signature(tf, teacher_classes)

    def shard_dataset(path, row_seed):
        return tf.data.Dataset.from_generator(
            generator, output_signature=signature, args=(path, row_seed)
        ).unbatch()

    paths = tf.data.Dataset.from_tensor_slices(shard_paths)
    if shuffle and len(shard_paths) > 1:
        paths = paths.shuffle(len(shard_paths), seed=seeds[0], reshuffle_each_iteration=True)
    row_seeds = tf.data.Dataset.random(seed=seeds[1], rerandomize_each_iteration=True)
    cycle = min(len(shard_paths), SHARDS_IN_FLIGHT) if shuffle else 1
    rows = tf.data.Dataset.zip(paths, row_seeds).interleave(
        shard_dataset,
        cycle_length=cycle,
        block_length=1,
        **({"num_parallel_calls": tf.data.AUTOTUNE, "deterministic": deterministic} if cycle > 1 else {}),
    )
    if cache:
        rows = rows.cache(cache if isinstance(cache, str) else "")
    return rows


def _mixed_rows(streams: list, weights: list[float], shuffle: bool, seed: int | None):
    """One stream of rows from several sources: sampled by weight, each source repeated, when shuffling
    (an endless stream: give ``steps_per_epoch``); one after the other otherwise."""
    import tensorflow as tf

    if len(streams) == 1:
        return streams[0]
    if not shuffle:
        rows = streams[0]
        for stream in streams[1:]:
            rows = rows.concatenate(stream)
        return rows
    total = float(sum(weights))
    return tf.data.Dataset.sample_from_datasets(
        [stream.repeat() for stream in streams], weights=[w / total for w in weights], seed=seed
    )


def make_dataset(
    manifest: str | Path | Mapping | Sequence[Source | Mapping | str | Path],
    split: str = "train",
    model="c3ae",
    batch_size: int = 64,
    augment: bool | None = None,
    seed: int | None = None,
    shuffle: bool | None = None,
    outputs: Sequence[str] | None = None,
    input_size: int | None = None,
    drop_remainder: bool = False,
    cache: bool | str = False,
    context: float = 0.0,
    balance: float = 0.0,
    augmentation: Augmentation | None = None,
    label_weights: bool = False,
    distill: Sequence[Mapping | None] | Mapping | None = None,
):
    """A ``tf.data.Dataset`` of ``(inputs, targets)`` batches for one split of a preprocessed dataset, or of
    ``(inputs, targets, sample_weight)`` batches when ``balance`` > 0 or ``label_weights``.

    Args:
        manifest: path of ``manifest.json`` or of its folder (or a dict from :func:`read_manifest`); or a
            list of :class:`Source` (or ``{"manifest": ..., "weight": ...}`` dicts, or paths: weight 1) to
            mix. Shuffled, the sources' rows are drawn with probabilities proportional to their weights,
            each source repeating, so the stream is endless (set ``steps_per_epoch``); unshuffled, they come
            one source after the other.
        split: ``"train"``, ``"val"``, ``"test"`` or any split the manifest names.
        model: family (``"c3ae"``, ``"ssrnet"``, ``"dldl"``, ``"levi_hassner"``), a variant name, or a model
            built by ``c3ae.models`` (its crops, input size and outputs are then used). C3AE's inputs are
            ``outer``/``middle``/``inner`` (the triple boxes), the others' ``image`` (single box).
        batch_size: rows per batch.
        augment: training augmentation; default on for ``"train"``, off otherwise.
        seed: makes shuffling and augmentation reproducible: two datasets built with the same seed yield the
            same batches, epoch after epoch, while each epoch differs from the previous one.
        shuffle: shuffle shards, rows within shards and a 2048-row buffer; default on for ``"train"``.
            Unshuffled, rows come in manifest order.
        outputs: restrict the targets to these names (pass ``model.output_names``).
        input_size: crop side; default 64 (227 for levi_hassner).
        drop_remainder: drop the last, smaller batch.
        cache: cache the shard rows (JPEG bytes and labels, before augmentation) in memory (True) or in the
            file named by a string, after the first epoch.
        context: zero each chip outside a window of this many inner-box widths before cropping
            (``c3ae.faces.mask_context``; 0 keeps everything), as inference does for the same model.
        balance: weigh rows by :func:`balance_table` of this strength, per source (0: no weights).
        augmentation: the augmentation parameters (default :data:`DEFAULT_AUGMENTATION`).
        label_weights: sample weights per output, a dict like the targets (:func:`label_weight`: the balance
            weight, 1 without, and 0 where the label is unknown, a gender of -1), as training feeds them to
            the stock Keras losses (``c3ae.task.mean_over_labelled``). Else a balance weight is one tensor.
        distill: the teacher's share of each head's target, per source (a list) or for all (a dict), e.g.
            ``{"age": 0.3, "gender": 0.8}``; None for a source trains on its labels alone. The manifests
            must hold teacher labels (``c3ae label``). Targets become ``(1 - share) * label + share *
            teacher``: the age distribution mapped onto the family's bins, the expected age, P(male). A
            face without a label takes the teacher's answer alone, a face the teacher could not read its
            label alone.

    Targets (float32): ``age`` (N, 1) years; ``gender`` (N, 1) 1/0/-1 (unknown stays -1: its label weight
    is 0); ``age_bins`` (N, 12) two-point encoded for C3AE, the age (N, 1) for DLDL; ``age_group`` (N, 8)
    one-hot over Adience's groups (from the row's label when it names a group, else from the age). Rows
    without an age are dropped when an age-based target is requested.
    """
    import tensorflow as tf

    mixing = not isinstance(manifest, (str, Path, Mapping))
    sources = read_sources(manifest) if mixing else [("", read_manifest(manifest), 1.0)]
    spec, layout, model_size, model_outputs = _resolve_model(model)
    if outputs is None and model_outputs:
        outputs = [o for o in model_outputs if o in spec.targets]
    try:
        targets = spec.select_targets(outputs)
    except UsageError as error:
        raise DataError(str(error)) from error
    size = int(input_size or model_size)
    if size < 1:
        raise DataError(f"input_size must be a positive number of pixels, got {input_size!r}.")
    if int(batch_size) < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size!r}.")
    augment = split == "train" if augment is None else bool(augment)
    shuffle = split == "train" if shuffle is None else bool(shuffle)
    deterministic = True if seed is not None or not shuffle else None
    shares, teacher_values = _distill_shares(sources, split, distill)
    streams = _source_streams(
        sources, split, targets, shuffle, seed, cache, balance, shares, len(teacher_values or ())
    )
    if mixing:
        _log_mix(sources, split, shuffle)
    base = [None] * 4 if seed is None else [int(seed) * 4 + i for i in range(4)]
    rows = _mixed_rows(streams, [w for *_, w in sources], shuffle, base[0])
    if shuffle:
        rows = rows.shuffle(SHUFFLE_BUFFER, seed=base[2], reshuffle_each_iteration=True)
    element_seeds = tf.data.Dataset.random(seed=base[3], rerandomize_each_iteration=True)
    rows = tf.data.Dataset.zip(rows, element_seeds)
    cropper = partial(
        _crop_rows,
        size=size,
        augment=augment,
        use_single=layout == "single",
        context=float(context),
        params=augmentation or DEFAULT_AUGMENTATION,
    )
    dataset = rows.map(
        partial(_to_crops, cropper=cropper, input_names=CROP_LAYOUTS[layout], size=size),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    dataset = dataset.batch(int(batch_size), drop_remainder=drop_remainder)
    weights = "per_output" if label_weights else ("rows" if balance else None)
    to_targets = partial(
        _to_targets,
        encode=spec.encode_targets,
        targets=targets,
        weights=weights,
        teacher_values=teacher_values,
    )
    dataset = dataset.map(to_targets, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _to_targets(inputs, labels, *, encode, targets, weights, teacher_values=None):
    """A batch of (crops, labels) -> (crops, targets[, sample weights]): ``weights`` None for none, "rows"
    for the rows' balance weights, "per_output" for :func:`label_weight` per target; ``teacher_values``
    (the teacher's age classes, years) mixes the teacher's outputs into the targets."""
    made = {name: encode(name, labels) for name in targets}
    if teacher_values is not None:
        made = _with_teacher(made, labels, encode, teacher_values)
    if weights == "per_output":
        return inputs, made, {name: label_weight(name, made[name], labels["weight"]) for name in made}
    return (inputs, made, labels["weight"]) if weights == "rows" else (inputs, made)


def _with_teacher(made: dict, labels: dict, encode, teacher_values) -> dict:
    """Targets mixed with the teacher's: ``(1 - share) * label + share * teacher`` per row and head. The
    teacher's age distribution goes onto the family's own encoding (its bins, or years) through each
    class's encoded value; a missing label (NaN age, gender -1) is replaced, not mixed, where share is 1."""
    import tensorflow as tf

    values = tf.constant(np.asarray(teacher_values, np.float32))
    mixed = dict(made)
    for name, target in made.items():
        if name == "gender":
            teacher, share = tf.reshape(labels["teacher_p_male"], (-1, 1)), labels["teacher_share_gender"]
        elif name in ("age", "age_bins"):
            per_class = tf.reshape(encode(name, {"age": values}), (len(teacher_values), -1))
            teacher = tf.matmul(labels["teacher_age_dist"], per_class)
            share = labels["teacher_share_age"]
        else:
            continue
        share = tf.reshape(share, (-1, 1))
        own = tf.where(tf.math.is_finite(target), target, tf.zeros_like(target))
        mixed[name] = tf.where(share > 0, (1.0 - share) * own + share * teacher, target)
    return mixed


def label_weight(name: str, target, weight):
    """A batch's sample weights (N,) for output ``name``: ``weight`` (the balance weights), times 0 where
    the target holds no label: a ``gender`` outside [0, 1] (1 male, 0 female, or a teacher's soft P(male)),
    i.e. -1 for unknown. The other targets always hold one (:func:`make_dataset` drops rows without an age
    or group, or without the teacher's age when distilling)."""
    import tensorflow as tf

    if name != "gender":
        return weight
    gender = tf.reshape(tf.cast(target, weight.dtype), (-1,))
    known = tf.logical_and(tf.greater_equal(gender, float(FEMALE)), tf.less_equal(gender, float(MALE)))
    return weight * tf.cast(known, weight.dtype)


def _distill_shares(sources, split: str, distill) -> tuple[list | None, list | None]:
    """(per-source teacher shares for :func:`_shard_rows`, the teacher's age classes), or (None, None)
    without distillation. Every distilled source must be labelled, all by one teacher."""
    if distill is None or (not isinstance(distill, Mapping) and not any(distill)):
        return None, None
    from c3ae.label import check_teacher_labels

    per_source = [distill] * len(sources) if isinstance(distill, Mapping) else list(distill)
    if len(per_source) != len(sources):
        raise DataError(f"distill gives {len(per_source)} entries for {len(sources)} sources.")
    blocks = {}
    for (name, info, _), shares in zip(sources, per_source, strict=True):
        if shares:
            bad = {k: v for k, v in shares.items() if k not in ("age", "gender") or not 0 <= float(v) <= 1}
            if bad:
                raise DataError(f"source {name!r}: teacher shares are age and gender in [0, 1], got {bad}.")
            blocks[name] = check_teacher_labels(info, split)
    values = {tuple(block["age_values"]) for block in blocks.values()}
    teachers = {block.get("name") for block in blocks.values()}
    if len(values) > 1 or len(teachers) > 1:
        raise DataError(
            f"The sources were labelled by different teachers ({sorted(map(str, teachers))}); "
            "label them all with one."
        )
    classes = len(next(iter(values)))
    shares = [dict(s) if s else {"labelled": False, "classes": classes} for s in per_source]
    return shares, list(next(iter(values)))


def _source_streams(sources, split, targets, shuffle, seed, cache, balance, shares=None, classes=0) -> list:
    """One row stream per source, each with its own seeds (source 0 keeps the single-manifest seeds, so a
    source alone gives the same batches as a plain manifest), its balance weights and its teacher shares."""
    streams = []
    for index, (_, info, _) in enumerate(sources):
        seeds = [None] * 4 if seed is None else [int(seed) * 4 + i + 7919 * index for i in range(4)]
        generator = partial(
            _shard_rows,
            permute=shuffle,
            need_age=any(t in ("age", "age_bins") for t in targets),
            need_group="age_group" in targets,
            weights=balance_table(info, split, balance),
            teacher=None if shares is None else shares[index],
        )
        streams.append(_row_stream(info, split, generator, shuffle, seeds, cache, classes))
    return streams


def _to_crops(row, element_seed, *, cropper, input_names, size):
    """One row -> (named float32 BGR crops, labels)."""
    import tensorflow as tf

    chip = tf.io.decode_jpeg(row["image"], channels=3, dct_method="INTEGER_ACCURATE")
    chip = tf.reverse(chip, axis=[-1])  # RGB -> BGR
    crops = tf.numpy_function(
        cropper, [chip, row["boxes"], row["single_box"], element_seed], tf.uint8, stateful=False
    )
    crops = tf.cast(tf.ensure_shape(crops, (len(input_names), size, size, 3)), tf.float32)
    inputs = {name: crops[index] for index, name in enumerate(input_names)}
    labels = {
        key: row[key] for key in ("age", "gender", "age_group", "weight", *DISTILL_ROW_KEYS) if key in row
    }
    return inputs, labels


def _log_mix(sources: list[tuple[str, dict, float]], split: str, shuffle: bool) -> None:
    total = sum(w for *_, w in sources)
    parts = [
        f"{name} {split_size(info, split)} rows"
        + (f", weight {weight:g} ({100 * weight / total:.0f}% of samples)" if shuffle else "")
        for name, info, weight in sources
    ]
    logger.info("Split %r from %d sources: %s", split, len(sources), "; ".join(parts))
