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

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from c3ae.faces import CROP_NAMES, crop, mask_context, warp

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "c3ae-manifest"
MANIFEST_VERSIONS = (1,)
STANDARD_SPLITS = ("train", "val", "test")

FAMILIES = ("c3ae", "ssrnet", "dldl", "levi_hassner")
DEFAULT_INPUT_SIZE = {"c3ae": 64, "ssrnet": 64, "dldl": 64, "levi_hassner": 227}
FAMILY_OUTPUTS = {
    "c3ae": ("age", "age_bins", "gender"),
    "ssrnet": ("age", "gender"),
    "dldl": ("age", "age_bins", "gender"),
    "levi_hassner": ("age_group", "gender"),
}
AGE_TARGETS = ("age", "age_bins", "age_group")

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


def read_manifest(manifest: str | Path | dict) -> dict:
    """Read and validate ``manifest.json`` (or the folder holding it).

    Returns the manifest as a dict with ``manifest_path`` and ``root`` (absolute) added, and each shard
    entry given an absolute ``path``. Raises FileNotFoundError for a missing manifest and ValueError for one
    that is not a c3ae manifest.
    """
    if isinstance(manifest, dict):
        if "manifest_path" in manifest and all("path" in s for s in manifest.get("shards", [])):
            return manifest
        raise ValueError("A manifest dict must come from read_manifest().")
    path = _manifest_path(manifest).absolute()
    if not path.is_file():
        raise FileNotFoundError(
            f"No manifest at {path}; run 'c3ae preprocess' first, or pass the folder holding manifest.json."
        )
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable JSON manifest ({error}).") from error
    if not isinstance(info, dict) or info.get("format") != MANIFEST_FORMAT:
        raise ValueError(f'{path} is not a c3ae manifest (expected "format": "{MANIFEST_FORMAT}").')
    if info.get("version") not in MANIFEST_VERSIONS:
        raise ValueError(
            f"{path} has manifest version {info.get('version')!r}; this c3ae reads versions "
            f"{', '.join(map(str, MANIFEST_VERSIONS))}."
        )
    shards = info.get("shards")
    if not isinstance(shards, list):
        raise ValueError(f'{path} lists no shards ("shards" must be a list).')
    root = path.parent
    resolved = []
    for index, shard in enumerate(shards):
        if not isinstance(shard, dict) or not isinstance(shard.get("file"), str) or "split" not in shard:
            raise ValueError(f'{path}: shard entry {index} needs "file" and "split", got {shard!r}.')
        rows = shard.get("rows")
        if rows is not None and (not isinstance(rows, int) or rows < 0):
            raise ValueError(f"{path}: shard {shard['file']} has an invalid row count {rows!r}.")
        resolved.append({**shard, "path": str((root / shard["file"]).absolute())})
    return {**info, "shards": resolved, "manifest_path": str(path), "root": str(root)}


def manifest_splits(manifest: str | Path | dict) -> list[str]:
    """The splits a manifest has shards for, in first-seen order."""
    info = read_manifest(manifest)
    return list(dict.fromkeys(str(s["split"]) for s in info["shards"]))


def _split_shards(info: dict, split: str) -> list[dict]:
    splits = list(dict.fromkeys(str(s["split"]) for s in info["shards"]))
    if split not in splits and split not in STANDARD_SPLITS:
        known = ", ".join(repr(s) for s in splits) or "none"
        raise ValueError(f"Unknown split {split!r}; manifest {info['manifest_path']} has the splits {known}.")
    shards = [s for s in info["shards"] if s["split"] == split]
    if not shards or all(s.get("rows") == 0 for s in shards):
        raise ValueError(f"manifest {info['manifest_path']} has no rows in split {split!r}")
    return shards


def split_size(manifest: str | Path | dict, split: str) -> int:
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
        raise ValueError(
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
def _row_signature(tf):
    return {
        "image": tf.TensorSpec((None,), tf.string),
        "age": tf.TensorSpec((None,), tf.float32),
        "gender": tf.TensorSpec((None,), tf.float32),
        "boxes": tf.TensorSpec((None, 3, 4), tf.float32),
        "single_box": tf.TensorSpec((None, 4), tf.float32),
        "age_group": tf.TensorSpec((None,), tf.int32),
    }


def _whole_jpeg(data) -> bool:
    """Starts with JPEG's start-of-image marker and ends with its end-of-image marker."""
    return isinstance(data, bytes) and data[:2] == b"\xff\xd8" and data.rstrip(b"\0")[-2:] == b"\xff\xd9"


def _shard_rows(path, seed, *, permute: bool, need_age: bool, need_group: bool):
    """Yield one shard's rows in chunks of dict-of-arrays (``from_generator``'s generator)."""
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
    broken = np.flatnonzero(keep & ~whole)
    if len(broken):  # TensorFlow's decoder would stop the whole run with an error naming neither
        shown = ", ".join(str(int(i)) for i in broken[:10]) + (", ..." if len(broken) > 10 else "")
        logger.warning(
            "Skipping %d row(s) of shard %s whose image is not a whole JPEG (rows %s).",
            len(broken),
            path,
            shown,
        )
    keep &= whole
    if need_group:
        keep &= group >= 0
    elif need_age:
        keep &= np.isfinite(age)
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
        }


# ------------------------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class Augmentation:
    """Training augmentation parameters (the defaults are the ones :func:`make_dataset` uses)."""

    flip: float = 0.5  # probability of mirroring the chip (and its boxes)
    max_rotation: float = 15.0  # degrees, uniform in [-max, max], about the face centre, on the chip
    shift: float = 0.05  # box shift, up to this fraction of the box size, per axis
    scale: float = 0.05  # box scale, uniform in [1 - scale, 1 + scale]
    contrast: tuple[float, float] = (0.7, 1.3)  # alpha of alpha * x + beta
    brightness: tuple[float, float] = (-25.0, 25.0)  # beta
    erase: float = 0.2  # probability, per crop, of random erasing
    erase_area: tuple[float, float] = (0.06, 0.10)  # fraction of the crop area
    erase_aspect: tuple[float, float] = (0.5, 2.0)  # height / width of the erased rectangle


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
    follow the face pipeline's conventions. Then one brightness/contrast change for the sample, and random
    erasing with noise per crop.
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
    chip, boxes, single, seed, *, size: int, augment: bool, use_single: bool, context: float = 0.0
):
    """numpy_function body: (K, size, size, 3) uint8 crops of one decoded BGR chip."""
    chip = mask_context(np.ascontiguousarray(chip), boxes.reshape(-1, 4)[2], context)
    boxes = single.reshape(1, 4) if use_single else boxes.reshape(-1, 4)
    if not augment:
        return np.stack([crop(chip, box, size) for box in boxes])
    rng = np.random.default_rng(int(np.int64(seed).view(np.uint64)))
    centre = ((single[0] + single[2]) / 2, (single[1] + single[3]) / 2)
    return augment_crops(chip, boxes, size, rng, centre=centre)


# ------------------------------------------------------------------------------------------------ dataset
def _resolve_model(model: str) -> tuple[str, tuple[str, ...]]:
    """(family, input names) for a family name or a registered variant name."""
    name = str(model).replace("-", "_") if str(model).replace("-", "_") in FAMILIES else str(model)
    if name in FAMILIES:
        return name, CROP_NAMES if name == "c3ae" else ("image",)
    from c3ae.models import VARIANTS

    if name in VARIANTS:
        variant = VARIANTS[name]
        triple = variant.family == "c3ae" and variant.kwargs.get("triple_box", True)
        return variant.family, CROP_NAMES if triple else ("image",)
    raise ValueError(
        f"Unknown model family {model!r}; expected one of {', '.join(FAMILIES)} (or a variant name: "
        f"{', '.join(VARIANTS)})."
    )


def _select_targets(family: str, outputs: Sequence[str] | None) -> tuple[str, ...]:
    available = FAMILY_OUTPUTS[family]
    if outputs is None:
        return available
    if isinstance(outputs, str):
        outputs = [outputs]
    unknown = [o for o in outputs if o not in available]
    if unknown:
        raise ValueError(
            f"Model family {family!r} has no outputs {unknown}; its targets are {', '.join(available)}."
        )
    if not outputs:
        raise ValueError("outputs= names no target.")
    return tuple(dict.fromkeys(outputs))


def _make_targets(rows: dict, family: str, targets: Sequence[str]) -> dict:
    import tensorflow as tf

    from c3ae.losses import two_point_encode

    age = tf.reshape(rows["age"], (-1, 1))
    made = {}
    for name in targets:
        if name == "age":
            made[name] = age
        elif name == "gender":
            made[name] = tf.reshape(rows["gender"], (-1, 1))
        elif name == "age_bins":
            made[name] = age if family == "dldl" else tf.cast(two_point_encode(rows["age"]), tf.float32)
        elif name == "age_group":
            from c3ae.models.levi_hassner import ADIENCE_AGE_GROUPS

            made[name] = tf.one_hot(rows["age_group"], len(ADIENCE_AGE_GROUPS), dtype=tf.float32)
    return made


def make_dataset(
    manifest: str | Path | dict,
    split: str = "train",
    model: str = "c3ae",
    batch_size: int = 64,
    augment: bool | None = None,
    seed: int | None = None,
    shuffle: bool | None = None,
    outputs: Sequence[str] | None = None,
    input_size: int | None = None,
    drop_remainder: bool = False,
    cache: bool | str = False,
    context: float = 0.0,
):
    """A ``tf.data.Dataset`` of ``(inputs, targets)`` batches for one split of a preprocessed dataset.

    Args:
        manifest: path of ``manifest.json`` or of its folder (or a dict from :func:`read_manifest`).
        split: ``"train"``, ``"val"``, ``"test"`` or any split the manifest names.
        model: family (``"c3ae"``, ``"ssrnet"``, ``"dldl"``, ``"levi_hassner"``) or a variant name. C3AE's
            inputs are ``outer``/``middle``/``inner`` (the triple boxes), the others' ``image`` (single box).
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

    Targets (float32): ``age`` (N, 1) years; ``gender`` (N, 1) 1/0/-1 (unknown stays -1 for the masked
    loss); ``age_bins`` (N, 12) two-point encoded for C3AE, the age (N, 1) for DLDL; ``age_group`` (N, 8)
    one-hot over Adience's groups (from the row's label when it names a group, else from the age). Rows
    without an age are dropped when an age-based target is requested.
    """
    import tensorflow as tf

    info = read_manifest(manifest)
    family, input_names = _resolve_model(model)
    targets = _select_targets(family, outputs)
    shard_paths = _readable_shards(info, split)
    size = int(input_size or DEFAULT_INPUT_SIZE[family])
    if size < 1:
        raise ValueError(f"input_size must be a positive number of pixels, got {input_size!r}.")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}.")
    augment = split == "train" if augment is None else bool(augment)
    shuffle = split == "train" if shuffle is None else bool(shuffle)
    deterministic = True if seed is not None or not shuffle else None
    seeds = [None] * 4 if seed is None else [int(seed) * 4 + i for i in range(4)]

    generator = partial(
        _shard_rows,
        permute=shuffle,
        need_age=any(t in ("age", "age_bins") for t in targets),
        need_group="age_group" in targets,
    )
    signature = _row_signature(tf)

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
    if shuffle:
        rows = rows.shuffle(SHUFFLE_BUFFER, seed=seeds[2], reshuffle_each_iteration=True)
    element_seeds = tf.data.Dataset.random(seed=seeds[3], rerandomize_each_iteration=True)
    rows = tf.data.Dataset.zip(rows, element_seeds)

    cropper = partial(
        _crop_rows, size=size, augment=augment, use_single=input_names == ("image",), context=float(context)
    )
    count = len(input_names)

    def to_crops(row, element_seed):
        chip = tf.io.decode_jpeg(row["image"], channels=3, dct_method="INTEGER_ACCURATE")
        chip = tf.reverse(chip, axis=[-1])  # RGB -> BGR
        crops = tf.numpy_function(
            cropper, [chip, row["boxes"], row["single_box"], element_seed], tf.uint8, stateful=False
        )
        crops = tf.cast(tf.ensure_shape(crops, (count, size, size, 3)), tf.float32)
        inputs = {name: crops[index] for index, name in enumerate(input_names)}
        labels = {key: row[key] for key in ("age", "gender", "age_group")}
        return inputs, labels

    dataset = rows.map(to_crops, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    dataset = dataset.batch(int(batch_size), drop_remainder=drop_remainder)
    dataset = dataset.map(
        lambda inputs, labels: (inputs, _make_targets(labels, family, targets)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    return dataset.prefetch(tf.data.AUTOTUNE)
