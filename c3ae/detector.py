"""MTCNN face detection on LiteRT, with the stages in NumPy and OpenCV: no TensorFlow.

It reproduces the ``mtcnn`` package (1.0) step for step, with its thresholds and defaults: an image
pyramid (area resampling, factor 0.709, first level 12 / min_face), P-Net proposals on every level, the
package's NMS (a box is dropped when any higher-scoring box overlaps it by more than the threshold), box
regression, squaring, R-Net and O-Net refinement on bilinear patches of the photo, and O-Net's 5 landmarks.
The networks are ``c3ae/weights/mtcnn/*.tflite`` (``python -m c3ae.export.detector`` makes them), which take
BGR raw pixels in [0, 255].

Photos whose longer side exceeds ``max_side`` are searched on a copy downscaled to it; boxes and landmarks
are mapped back to the photo's pixels, so alignment reads the full-resolution pixels.

>>> detector = MTCNN()                                  # doctest: +SKIP
>>> detector.detect(cv2.imread("assets/obama.jpg"))     # doctest: +SKIP
array([[x1, y1, x2, y2, score, lx1..lx5, ly1..ly5], ...])
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np

from c3ae.errors import BrokenFileError, UsageError
from c3ae.litert import abandon, default_threads, quiet_first_delegate, rebuild_after_fork

DETECTOR_DIR = Path(__file__).parent / "weights" / "mtcnn"
NETWORK_FILES = {name: f"{name}.tflite" for name in ("pnet", "rnet", "onet")}
REINSTALL = "pip install --force-reinstall c3ae"

# The mtcnn package's defaults.
MIN_FACE = 20
SCALE_FACTOR = 0.709
CELL = 12  # P-Net's window, in pixels of a pyramid level
STRIDE = 2
THRESHOLDS = (0.6, 0.7, 0.8)  # P-, R-, O-Net face probability
NMS_PNET_LEVEL, NMS_PNET_ALL, NMS_RNET, NMS_ONET = 0.5, 0.7, 0.7, 0.7
OUTSIDE_PIXEL = 127.5  # the package's normalised 0: patches are mid-grey where they leave the photo

DEFAULT_MAX_SIDE = 1280  # photos are searched at most this large (faces from 20 px of it)
# The smallest face searched: P-Net's 12-pixel window on the photo itself. A smaller ``min_face`` would
# search an upscaled photo (min_face 1: 12 times wider and higher, a pyramid of billions of pixels); it is
# searched from this size instead, so detection stays bounded by the photo's pixels.
MIN_SEARCHED_FACE = CELL
# Patches per R-Net/O-Net call and per ``cv2.remap`` call: crowds are processed in chunks of this many
# faces, below OpenCV's limit of SHRT_MAX (32767) rows per remap (256 x 48 = 12288) and with bounded memory.
BATCH_LIMIT = 256
REMAP_LIMIT = 32767  # OpenCV's SHRT_MAX: remap's largest source and destination side
INTERPRETER_CACHE = 32  # P-Net interpreters kept, one per pyramid-level shape (video frames reuse them)


class DetectorFileError(BrokenFileError):
    """A detector file of the installed package that is missing or unreadable (a broken install)."""


def pyramid_scales(width: int, height: int, min_face: float = MIN_FACE) -> np.ndarray:
    """The package's pyramid: 12 / min_face times 0.709^k, without the levels smaller than the 12-pixel
    window (the package fails on those when min_face > 20)."""
    min_dim = min(width, height)
    if min_dim < CELL:
        return np.empty(0)
    count = round(-((np.log(min_dim / CELL) / np.log(SCALE_FACTOR)) + 1))
    scales = (CELL / float(min_face)) * SCALE_FACTOR ** np.arange(max(count, 0))
    return scales[np.floor(min_dim * scales) >= CELL]


_RESAMPLERS = None
_RESAMPLERS_LOCK = threading.Lock()


def _resampler():
    """Threads for the pyramid's resampling: OpenCV's area resize runs on one core, and releases the GIL.
    One pool per process: a forked child makes its own (the parent's threads are not in the child)."""
    global _RESAMPLERS
    with _RESAMPLERS_LOCK:
        if _RESAMPLERS is None:
            from concurrent.futures import ThreadPoolExecutor

            _RESAMPLERS = ThreadPoolExecutor(max_workers=default_threads(), thread_name_prefix="c3ae-pyramid")
        return _RESAMPLERS


def _forget_resamplers() -> None:
    global _RESAMPLERS, _RESAMPLERS_LOCK
    _RESAMPLERS, _RESAMPLERS_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_resamplers)


def pyramid(image: np.ndarray, scales: np.ndarray):
    """Yield (scale, level) for each scale: the float32 image area-resampled to (int(W s), int(H s)), the
    package's (truncated) sizes, each level from the photo itself (resampling from the previous level is
    5 times cheaper but moves P-Net's scores enough to change which proposals survive NMS). All levels are
    resampled in parallel threads, in the background of P-Net's work on the earlier ones."""
    height, width = image.shape[:2]
    sizes = [(int(width * scale), int(height * scale)) for scale in scales]
    levels = [_resampler().submit(cv2.resize, image, size, interpolation=cv2.INTER_AREA) for size in sizes]
    for scale, level in zip(scales, levels, strict=True):
        yield scale, level.result()


def overlap(a: np.ndarray, b: np.ndarray, method: str = "union") -> np.ndarray:
    """Overlap of boxes ``a`` (..., 4) with boxes ``b`` (..., 4), broadcast, boxes (x1, y1, x2, y2), no +1:
    intersection over union, or over the smaller area (``method="min"``)."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    width = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]))
    height = np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]))
    inter = width * height
    if method == "union":
        denominator = area_a + area_b - inter
    else:
        denominator = np.minimum(area_a, area_b)
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / denominator


def iou_matrix(a: np.ndarray, b: np.ndarray, method: str = "union") -> np.ndarray:
    """Overlap of every box of ``a`` (N, 4) with every box of ``b`` (M, 4), boxes (x1, y1, x2, y2), no +1:
    intersection over union, or over the smaller area (``method="min"``)."""
    return overlap(a[:, None, :4], b[None, :, :4], method)


DENSE_NMS = 256  # up to this many boxes, NMS computes every pair's overlap at once


def nms(
    boxes: np.ndarray,
    threshold: float,
    method: str = "union",
    sort: bool = True,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """The package's suppression on rows (x1, y1, x2, y2, score, ...): optionally sorted by score (its
    argsort, descending), then every row that overlaps *any* earlier row by more than ``threshold`` is
    dropped, suppressed or not; with ``groups`` (a label per row), only rows of the same group count
    (P-Net's levels, each suppressed on its own in one call).

    Up to ``DENSE_NMS`` rows, every pair's overlap is computed at once. Beyond, only pairs whose x-ranges
    intersect can overlap: they are found by a sweep along x and their overlaps computed as ``iou_matrix``
    would (the same float operations), in chunks, so time and memory follow the overlapping pairs (a
    crowd's thousands of proposals), not their square."""
    if len(boxes) == 0:
        return boxes
    if sort:
        order = np.argsort(boxes[:, 4])[::-1]
        boxes = boxes[order]
        groups = None if groups is None else groups[order]
    coords = boxes[:, :4]
    count = len(boxes)
    if count <= DENSE_NMS:  # a video frame's few hundred proposals: one matrix, fewer NumPy calls
        later = np.triu(iou_matrix(coords, coords, method) > threshold, 1)
        if groups is not None:
            later &= groups[:, None] == groups[None, :]
        return boxes[~later.any(axis=0)]
    by_x = np.argsort(coords[:, 0], kind="stable")
    # Box by_x[p] can meet the boxes by_x[p + 1 : ends[p]]: those starting before it ends.
    ends = np.searchsorted(coords[by_x, 0], coords[by_x, 2], side="left")
    partners = np.maximum(ends - np.arange(1, count + 1), 0)
    y1, y2 = np.ascontiguousarray(coords[:, 1]), np.ascontiguousarray(coords[:, 3])
    keep = np.ones(count, dtype=bool)
    first, budget = 0, 1 << 20  # pairs per chunk
    totals = np.cumsum(partners)
    while first < count:
        done = totals[first - 1] if first else 0
        last = max(int(np.searchsorted(totals, done + budget, side="right")), first + 1)
        counts = partners[first:last]
        rows = np.repeat(np.arange(first, last), counts)
        if len(rows):
            step = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
            a, b = by_x[rows], by_x[rows + 1 + step]
            # Only pairs that also meet along y can overlap (a cheap test on most of them).
            meet = np.minimum(y2[a], y2[b]) > np.maximum(y1[a], y1[b])
            if groups is not None:
                meet &= groups[a] == groups[b]
            a, b = a[meet], b[meet]
            hit = overlap(coords[a], coords[b], method) > threshold
            keep[np.maximum(a[hit], b[hit])] = False  # the later (lower-scoring) box of each pair
        first = last
    return boxes[keep]


def to_square(boxes: np.ndarray) -> np.ndarray:
    """Boxes grown to squares of their longer side around the same centre (other columns kept)."""
    boxes = boxes.copy()
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(width, height)
    boxes[:, 0] += width * 0.5 - side * 0.5
    boxes[:, 1] += height * 0.5 - side * 0.5
    boxes[:, 2] = boxes[:, 0] + side
    boxes[:, 3] = boxes[:, 1] + side
    return boxes


def refine(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Boxes moved by regression ``offsets`` (N, 4) in units of the box's width and height (+1, as the
    package)."""
    boxes = boxes.copy()
    width = boxes[:, 2] - boxes[:, 0] + 1
    height = boxes[:, 3] - boxes[:, 1] + 1
    boxes[:, :4] += offsets * np.stack([width, height, width, height], axis=-1)
    return boxes


def crop_and_resize(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """(N, size, size, 3) float32 bilinear patches of ``boxes`` (x1, y1, x2, y2 in pixels) from a float32
    image, sampled where ``tf.image.crop_and_resize`` samples boxes normalised by the image's width and
    height (corner samples at x1 (W - 1) / W and x2 (W - 1) / W); samples outside the image are
    ``OUTSIDE_PIXEL``. ``cv2.remap`` (bilinear weights in 1/32-pixel steps) samples ``BATCH_LIMIT`` boxes
    per call, below its limit of SHRT_MAX rows, whatever the number of faces."""
    height, width = image.shape[:2]
    steps = np.arange(size, dtype=np.float32)
    coords = boxes[:, :4].astype(np.float32) / np.array([width, height, width, height], np.float32)

    def positions(low: np.ndarray, high: np.ndarray, extent: int) -> np.ndarray:
        scale = (high - low) * np.float32(extent - 1) / np.float32(size - 1)
        return low[:, None] * np.float32(extent - 1) + steps[None, :] * scale[:, None]

    ys = positions(coords[:, 1], coords[:, 3], height)
    xs = positions(coords[:, 0], coords[:, 2], width)
    patches = np.empty((len(boxes), size, size, 3), np.float32)
    chunk = max(1, min(BATCH_LIMIT, (REMAP_LIMIT - 1) // size))
    for start in range(0, len(boxes), chunk):
        stop = min(start + chunk, len(boxes))
        patches[start:stop] = _remap_patches(image, xs[start:stop], ys[start:stop])
    # tf.image.crop_and_resize fills a whole sample row or column that leaves the image.
    rows, columns = (ys >= 0) & (ys <= height - 1), (xs >= 0) & (xs <= width - 1)
    if not (rows.all() and columns.all()):  # most boxes lie inside the photo
        patches[~(rows[:, :, None] & columns[:, None, :])] = OUTSIDE_PIXEL
    return patches


def _remap_patches(image: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bilinear samples (N, size, size, 3) of ``image`` at columns ``xs`` (N, size) and rows ``ys`` (N,
    size): one ``cv2.remap``. An image with a side of SHRT_MAX pixels or more (remap's limit) is first
    reduced to the rows and columns the samples read (each sample's two neighbours), which keeps every
    bilinear weight."""
    count, size = xs.shape
    if max(image.shape[:2]) >= REMAP_LIMIT:
        image, xs, ys = _needed_pixels(image, xs, ys)
    map_x = np.ascontiguousarray(np.broadcast_to(xs[:, None, :], (count, size, size)).reshape(-1, size))
    map_y = np.ascontiguousarray(np.broadcast_to(ys[:, :, None], (count, size, size)).reshape(-1, size))
    patches = cv2.remap(
        image,
        map_x,
        map_y,
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(OUTSIDE_PIXEL,) * 3,
    )
    return patches.reshape(count, size, size, 3)


def _needed_pixels(image: np.ndarray, xs: np.ndarray, ys: np.ndarray):
    """The image's rows and columns that bilinear samples at ``xs``, ``ys`` read (floor and floor + 1 of
    each, inside the image), and the samples' positions in that smaller image. Samples outside the image
    are masked by the caller; those on its last row or column have a zero weight on the next one."""

    def needed(positions: np.ndarray, extent: int):
        low = np.floor(positions)
        kept = np.unique(np.clip(np.concatenate([low.ravel(), low.ravel() + 1]), 0, extent - 1))
        kept = kept.astype(np.int64)
        index = np.searchsorted(kept, np.clip(low, 0, extent - 1))
        return kept, (index + (positions - low)).astype(np.float32)

    rows, ys = needed(ys, image.shape[0])
    cols, xs = needed(xs, image.shape[1])
    return np.ascontiguousarray(image[rows][:, cols]), xs, ys


class _Network:
    """One LiteRT network; interpreters kept per input shape (least recently used dropped). Calls from
    several threads take turns (one lock per network); a forked child builds its own interpreters."""

    def __init__(self, path: Path, threads: int | None, cache: int = INTERPRETER_CACHE):
        from ai_edge_litert.interpreter import Interpreter

        try:
            self._data = path.read_bytes()
            probe = Interpreter(model_content=self._data)
            details = probe.get_signature_runner("serving_default")
        except (OSError, ValueError, RuntimeError) as error:
            problem = "is missing" if not path.is_file() else "is not a readable TFLite model"
            raise DetectorFileError(
                f"The detector file {path} {problem}; reinstall c3ae: {REINSTALL}"
            ) from error
        self._interpreter_class = Interpreter
        self._input = details.get_input_details()["image"]["index"]
        self._outputs = {name: d["index"] for name, d in details.get_output_details().items()}
        self.output_names = tuple(self._outputs)
        del details, probe
        self._threads = threads
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._limit = cache
        self._lock = threading.Lock()
        rebuild_after_fork(self)

    def _after_fork(self) -> None:
        """In a forked child: a new lock, and the parent's interpreters set aside for fresh ones."""
        self._lock = threading.Lock()
        abandon(*self._cache.values())
        self._cache = OrderedDict()

    def _interpreter(self, shape: tuple):
        interpreter = self._cache.get(shape)
        if interpreter is None:
            interpreter = self._interpreter_class(model_content=self._data, num_threads=self._threads)
            interpreter.resize_tensor_input(self._input, shape, strict=False)
            with quiet_first_delegate():
                interpreter.allocate_tensors()
            self._cache[shape] = interpreter
            if len(self._cache) > self._limit:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(shape)
        return interpreter

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        with self._lock:
            interpreter = self._interpreter(batch.shape)
            interpreter.set_tensor(self._input, batch)
            interpreter.invoke()
            return {name: interpreter.get_tensor(index) for name, index in self._outputs.items()}


# Pyramid levels above 512 x 512 pixels run P-Net on tiles of at most 257 x 257: a few interpreter shapes
# then serve every large photo (XNNPACK's set-up costs about 0.2 ms per thousand pixels of a new shape).
PNET_WHOLE_LEVEL = 512 * 512
PNET_TILE = 256
PNET_OVERLAP = 10  # the 12-pixel window minus the 2-pixel stride: tiles overlap by this much


def pnet_cells(extent: int) -> int:
    """P-Net's output cells along a side of ``extent`` pixels (conv 3, 'same' pool 2, conv 3, conv 3)."""
    return -(-(extent - 2) // 2) - 4


def tile_spans(extent: int) -> list[tuple[int, int]]:
    """(start, length) of the tiles along one side: even starts (the cell grid's stride is 2), 256-pixel
    tiles overlapping by 10, and a last tile ending at the edge, 257 pixels long when ``extent`` is odd so
    that its 'same' pooling pads exactly as the whole image's does. A side up to 257 pixels is one tile."""
    if extent <= PNET_TILE + 1:
        return [(0, extent)]
    last = PNET_TILE + extent % 2
    spans, start = [], 0
    while start + PNET_TILE < extent:
        spans.append((start, PNET_TILE))
        start += PNET_TILE - PNET_OVERLAP
    spans.append((extent - last, last))
    return spans


def pnet_in_tiles(network: _Network, level: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P-Net's (offsets (h, w, 4), face probability (h, w)) for a whole pyramid level, computed on tiles.

    Every cell is computed from exactly the pixels it sees on the whole level, so the result equals one
    call on the level; the tiles keep interpreter shapes few and memory bounded, whatever the photo's size.
    Levels up to ``PNET_WHOLE_LEVEL`` pixels run in one call (no overlap; video frames reuse the shape)."""
    height, width = level.shape[:2]
    if height * width <= PNET_WHOLE_LEVEL:
        out = network(level[None])
        return out["offsets"][0], out["probabilities"][0, :, :, 1]
    offsets = np.empty((pnet_cells(height), pnet_cells(width), 4), np.float32)
    face = np.empty(offsets.shape[:2], np.float32)
    for y, tile_height in tile_spans(height):
        for x, tile_width in tile_spans(width):
            out = network(level[None, y : y + tile_height, x : x + tile_width])
            rows = slice(y // 2, y // 2 + pnet_cells(tile_height))
            cols = slice(x // 2, x // 2 + pnet_cells(tile_width))
            offsets[rows, cols] = out["offsets"][0]
            face[rows, cols] = out["probabilities"][0, :, :, 1]
    return offsets, face


def _bucket(count: int) -> int:
    """The batch size ``count`` (at most ``BATCH_LIMIT``) patches are padded to, so that R-/O-Net see few
    distinct shapes (20) and compute few padding patches (O-Net costs about 0.4 ms a patch): 1, 2, 4, then
    multiples of 4 up to 32, of 8 up to 64 and of 32 up to ``BATCH_LIMIT``."""
    if count <= 4:
        return 1 << max(count - 1, 0).bit_length()
    step = 4 if count <= 32 else 8 if count <= 64 else 32
    return min(-(-count // step) * step, BATCH_LIMIT)


class _Clock:
    """Adds the seconds spent in each named stage to ``timings`` (nothing when it is None)."""

    def __init__(self, timings: dict[str, float] | None):
        self.timings = timings
        self.last = time.perf_counter()

    def __call__(self, stage: str) -> None:
        """Charge the time since the previous call to ``stage``."""
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
        self.last = now


class MTCNN:
    """The three-stage MTCNN detector on LiteRT.

    Args:
        min_face: smallest face side searched, in pixels of the searched image (the package's
            ``min_face_size``); values below ``MIN_SEARCHED_FACE`` (12, P-Net's window) search from 12.
        max_side: photos whose longer side exceeds this are searched on a copy downscaled to it (None: never).
        thresholds: P-, R-, O-Net face-probability thresholds.
        threads: LiteRT threads per network (None: one per CPU core, at most 4).
        model_dir: folder with ``pnet.tflite``, ``rnet.tflite``, ``onet.tflite`` (None: the package's).
    """

    def __init__(
        self,
        min_face: float = MIN_FACE,
        max_side: int | None = DEFAULT_MAX_SIDE,
        thresholds: tuple[float, float, float] = THRESHOLDS,
        threads: int | None = None,
        model_dir: str | Path | None = None,
    ):
        if not float(min_face) > 0:
            raise UsageError(f"min_face must be positive, got {min_face}.")
        self.min_face = float(min_face)
        self.max_side = None if max_side is None else int(max_side)
        self.thresholds = tuple(float(t) for t in thresholds)
        threads = threads or default_threads()
        folder = Path(model_dir) if model_dir is not None else DETECTOR_DIR
        self.pnet, self.rnet, self.onet = (
            _Network(folder / NETWORK_FILES[n], threads) for n in NETWORK_FILES
        )

    def detect(self, image_bgr: np.ndarray, timings: dict[str, float] | None = None) -> np.ndarray:
        """Faces of an (H, W, 3) uint8 BGR image as float64 rows (x1, y1, x2, y2, score, lx1..lx5, ly1..ly5),
        in the image's pixels, most confident first (NMS order); (0, 15) when there is none.

        ``timings``, when given, gains the seconds of each stage: ``copy``, ``pyramid`` (waiting for the
        background resampling), ``pnet``, ``pnet_glue``, ``rnet_crops``, ``rnet``, ``rnet_glue``,
        ``onet_crops``, ``onet``, ``onet_glue``."""
        clock = _Clock(timings)
        image, factor = self._working_copy(image_bgr)
        clock("copy")
        # On a downscaled copy, faces of min_face photo pixels are smaller; the search still stops at
        # the package's 20 pixels (smaller faces would need the copy upscaled again).
        min_face = max(self.min_face * factor, min(self.min_face, MIN_FACE), MIN_SEARCHED_FACE)
        boxes = self._pnet(image, min_face, clock)
        boxes = self._rnet(image, boxes, clock)
        rows = self._onet(image, boxes, clock)
        if factor != 1.0 and len(rows):
            rows[:, :4] /= factor
            rows[:, 5:] /= factor
        return rows

    def _working_copy(self, image_bgr: np.ndarray) -> tuple[np.ndarray, float]:
        """The float32 image searched, and its scale: at most ``max_side`` long, and shrunk so that
        ``min_face`` above 20 becomes 20 pixels (the pyramid then reads a smaller image at every level)."""
        height, width = image_bgr.shape[:2]
        factor = min(1.0, MIN_FACE / self.min_face)
        if self.max_side and max(height, width) * factor > self.max_side:
            factor = self.max_side / max(height, width)
        if factor < 1.0:
            size = (max(round(width * factor), 1), max(round(height * factor), 1))
            image_bgr = cv2.resize(image_bgr, size, interpolation=cv2.INTER_AREA)
            factor = size[0] / width
        return image_bgr.astype(np.float32), factor

    # ------------------------------------------------------------------------------------------ stages
    def _pnet(self, image: np.ndarray, min_face: float, clock: _Clock) -> np.ndarray:
        height, width = image.shape[:2]
        cells = []  # per level: rows, columns, offsets, scores (descending), scale
        for scale, level in pyramid(image, pyramid_scales(width, height, min_face)):
            clock("pyramid")
            offsets, face = pnet_in_tiles(self.pnet, level)
            clock("pnet")
            ys, xs = np.nonzero(face > self.thresholds[0])
            order = np.argsort(face[ys, xs])[::-1]
            ys, xs = ys[order], xs[order]
            cells.append((ys, xs, offsets[ys, xs], face[ys, xs], np.full(len(ys), scale)))
            clock("pnet_glue")
        if not cells or not sum(len(level[0]) for level in cells):
            return np.empty((0, 5))
        ys, xs, offsets, scores, scales = (np.concatenate(parts) for parts in zip(*cells, strict=True))
        offsets = offsets.astype(np.float64)
        # The package's cell spans pixels 2x + 1 .. 2x + 12 (width 11) of the level.
        boxes = np.empty((len(ys), 5))
        side = CELL - 1
        boxes[:, 0] = xs * STRIDE + 1 + offsets[:, 0] * side
        boxes[:, 1] = ys * STRIDE + 1 + offsets[:, 1] * side
        boxes[:, 2] = xs * STRIDE + CELL + offsets[:, 2] * side
        boxes[:, 3] = ys * STRIDE + CELL + offsets[:, 3] * side
        boxes[:, 4] = scores
        boxes[:, :4] /= scales[:, None]
        boxes = nms(boxes, NMS_PNET_LEVEL, sort=False, groups=scales)  # each level on its own
        boxes = to_square(nms(boxes, NMS_PNET_ALL))
        clock("pnet_glue")
        return boxes

    def _rnet(self, image: np.ndarray, boxes: np.ndarray, clock: _Clock) -> np.ndarray:
        if len(boxes) == 0:
            return boxes
        patches = crop_and_resize(image, boxes, 24)
        clock("rnet_crops")
        out = self._run(self.rnet, patches)
        clock("rnet")
        boxes = boxes.copy()
        boxes[:, 4] = out["probabilities"][:, 1]
        boxes = refine(boxes, out["offsets"].astype(np.float64))
        boxes = to_square(nms(boxes[boxes[:, 4] > self.thresholds[1]], NMS_RNET))
        clock("rnet_glue")
        return boxes

    def _onet(self, image: np.ndarray, boxes: np.ndarray, clock: _Clock) -> np.ndarray:
        if len(boxes) == 0:
            return np.empty((0, 15))
        patches = crop_and_resize(image, boxes, 48)
        clock("onet_crops")
        out = self._run(self.onet, patches)
        clock("onet")
        width = boxes[:, 2:3] - boxes[:, 0:1] + 1
        height = boxes[:, 3:4] - boxes[:, 1:2] + 1
        points = out["landmarks"].astype(np.float64)
        xs = width * points[:, 0:5] + boxes[:, 0:1] - 1
        ys = height * points[:, 5:10] + boxes[:, 1:2] - 1
        boxes = boxes.copy()
        boxes[:, 4] = out["probabilities"][:, 1]
        rows = np.concatenate([refine(boxes, out["offsets"].astype(np.float64)), xs, ys], axis=1)
        rows = nms(rows[rows[:, 4] > self.thresholds[2]], NMS_ONET, method="min")
        clock("onet_glue")
        return rows

    @staticmethod
    def _run(network: _Network, patches: np.ndarray) -> dict[str, np.ndarray]:
        """The network's outputs for every patch: ``BATCH_LIMIT`` patches per call, each call padded to
        its bucket's size."""
        outputs: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(patches), BATCH_LIMIT):
            chunk = patches[start : start + BATCH_LIMIT]
            count = len(chunk)
            padded = np.zeros((_bucket(count), *patches.shape[1:]), np.float32)
            padded[:count] = chunk
            for name, value in network(padded).items():
                outputs.setdefault(name, []).append(value[:count])
        return {name: np.concatenate(values) for name, values in outputs.items()}


def profile_detection(
    images: list[np.ndarray],
    size: tuple[int, int] | None = (640, 360),
    min_face: float = MIN_FACE,
    runs: int = 5,
    detector: MTCNN | None = None,
) -> dict:
    """Median milliseconds of one detection over ``runs`` passes on ``images`` (BGR, each resized to
    ``size`` (width, height) with area resampling; None: as they are), interpreters warm, and the median
    milliseconds of each stage (``MTCNN.detect``'s ``timings``); stage medians need not add up to the
    total, and the pyramid is resampled in the background of P-Net (its row is the wait)."""
    import statistics

    detector = detector or MTCNN(min_face=min_face)
    if size is not None:
        images = [cv2.resize(image, tuple(size), interpolation=cv2.INTER_AREA) for image in images]
    for image in images:  # warm: one interpreter per level shape and batch bucket
        detector.detect(image)
    totals, stages, faces = [], {}, 0
    for _ in range(runs):
        for image in images:
            timings: dict[str, float] = {}
            start = time.perf_counter()
            rows = detector.detect(image, timings)
            totals.append(time.perf_counter() - start)
            for stage, seconds in timings.items():
                stages.setdefault(stage, []).append(seconds)
            faces += int((rows[:, 4] >= 0.9).sum())
    return {
        "images": len(images),
        "size": list(size) if size is not None else None,
        "min_face": detector.min_face,
        "runs": runs,
        "median_ms": round(1000 * statistics.median(totals), 2),
        "stages_median_ms": {stage: round(1000 * statistics.median(v), 2) for stage, v in stages.items()},
        "faces_per_image": round(faces / max(len(totals), 1), 2),
    }
