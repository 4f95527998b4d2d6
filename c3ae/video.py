"""Age and gender on video files and webcams: detect every N frames, track in between, smooth per track.

:func:`process_video` reads frames with OpenCV, runs the face detector on every ``detect_every``-th frame
(MTCNN on LiteRT, see ``c3ae.detector``), estimates age and gender of the faces found
there in one batched call, and in between carries each face's box along with an IoU tracker
(``c3ae.tracking``). Each track smooths age and the probability of male exponentially with a time constant
of ``smooth`` seconds. Outputs: an annotated video (same frame count and frame rate as the input; written to
a temporary name and renamed when finished, also after Ctrl-C or a truncated input), a JSON-lines record per
frame with a summary as its last line, and per-stage timings.
"""

from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from c3ae.annotate import COLORS, draw_box, face_label
from c3ae.errors import C3AEError, UsageError
from c3ae.files import AtomicOutput, OutputError, check_output, probe_writable, stdout_gone
from c3ae.records import VideoSummary
from c3ae.signals import stop_requests
from c3ae.tracking import IoUTracker

STAGES = ("decode", "detect", "align", "estimate", "track", "draw", "encode")
MAX_CONSECUTIVE_FAILURES = 25  # unreadable frames in a row before the stream counts as ended
DEFAULT_FPS = 30.0  # when the container (or camera) reports none
THUMBNAIL = (32, 18)  # grayscale thumbnail compared between frames to find scene cuts
FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "mp4v"}


class VideoError(C3AEError, ValueError):
    """A video (or camera) that cannot be opened, or an output that cannot be written."""


class StageTimer:
    """Wall-clock seconds per named stage."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start
            self.calls[stage] += 1

    def summary(self, frames: int) -> dict:
        return {
            stage: {
                "seconds": round(self.seconds.get(stage, 0.0), 4),
                "ms_per_frame": round(1000 * self.seconds.get(stage, 0.0) / max(frames, 1), 3),
                "calls": int(self.calls.get(stage, 0)),
            }
            for stage in STAGES
        }


def open_capture(source) -> cv2.VideoCapture:
    """An opened ``cv2.VideoCapture`` for a file path or a camera index; raises :class:`VideoError`.

    FFmpeg's own messages about damaged frames are silenced (they are counted instead) unless the
    environment sets ``OPENCV_FFMPEG_LOGLEVEL``."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    if isinstance(source, int):
        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # no backend-by-backend warnings
        try:
            capture = cv2.VideoCapture(source)
        finally:
            cv2.utils.logging.setLogLevel(level)
        if not capture.isOpened():
            raise VideoError(f"Camera {source} cannot be opened (no such camera, or it is busy).")
        return capture
    path = Path(source)
    if not path.is_file():
        raise VideoError(f"{path} does not exist.")
    if path.stat().st_size == 0:
        raise VideoError(f"{path} is empty.")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise VideoError(f"{path} cannot be opened as a video (corrupt, truncated or not a video).")
    return capture


class _Output:
    """The annotated video: written to a temporary name, renamed by :meth:`close`. Frames are encoded on a
    thread of their own (OpenCV releases the GIL), so encoding overlaps detection on another core."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int]):
        suffix = path.suffix.lower()
        if suffix not in FOURCC:
            raise VideoError(
                f"output {path}: unsupported video type; use one of {', '.join(FOURCC)}.", parameter="output"
            )
        if not path.parent.is_dir():
            raise VideoError(f"output {path}: the folder {path.parent} does not exist.", parameter="output")
        self.path = path
        self.size = size
        self.staged = AtomicOutput(path)  # keeps the suffix: the muxer depends on it
        self.temporary = self.staged.path
        self.writer = cv2.VideoWriter(str(self.temporary), cv2.VideoWriter_fourcc(*FOURCC[suffix]), fps, size)
        if not self.writer.isOpened():
            self.staged.discard()
            probe_writable(path)  # a full or read-only disk is an environment error naming the file
            raise VideoError(f"output {path}: OpenCV cannot write this video type here.", parameter="output")
        self.frames = 0
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._encode, name="c3ae-video-encoder", daemon=True)
        self._thread.start()

    def _encode(self) -> None:
        while (frame := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.writer.write(frame)
                except BaseException as error:  # reported by close(), in the caller's thread
                    self._error = error

    def write(self, frame: np.ndarray) -> None:
        """Queue ``frame`` (not to be modified afterwards) for encoding."""
        if (frame.shape[1], frame.shape[0]) != self.size:
            frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
        self._queue.put(frame)
        self.frames += 1

    def close(self, keep: bool = True) -> None:
        self._queue.put(None)
        self._thread.join()
        self.writer.release()
        if self._error is not None:
            self.staged.discard()
            raise VideoError(
                f"output {self.path}: encoding failed: {self._error}", parameter="output"
            ) from self._error
        if keep and self.frames:
            readable = _frames_in(self.temporary)
            if readable < self.frames:  # OpenCV only logs "Failed to write frame" (a full disk, say)
                self.staged.discard()
                raise VideoError(
                    f"output {self.path}: only {readable} of {self.frames} frames could be written (is the "
                    "disk full?); nothing was kept.",
                    parameter="output",
                )
            self.staged.commit()
        else:
            self.staged.discard()


def _frames_in(path: Path) -> int:
    """Frames a written video holds, as its container says (0 when it cannot be opened)."""
    capture = cv2.VideoCapture(str(path))
    try:
        return int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if capture.isOpened() else 0
    finally:
        capture.release()


class _Prefetch:
    """``capture.read()`` on a thread of its own, a few frames ahead (OpenCV decodes without the GIL), so
    decoding overlaps detection; :meth:`read` returns the same (ok, frame) sequence as the capture would."""

    def __init__(self, capture: cv2.VideoCapture, depth: int = 4):
        self._capture = capture
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._run, name="c3ae-video-decoder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set() and failures <= MAX_CONSECUTIVE_FAILURES:
            ok, frame = self._capture.read()
            failures = 0 if ok and frame is not None else failures + 1
            self._put((ok, frame))
        self._put(None)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self._ended:
            return False, None
        item = self._queue.get()
        if item is None:
            self._ended = True
            return False, None
        return item

    def close(self) -> None:
        """Stop reading ahead; the capture is free to release afterwards."""
        self._stop.set()
        self._thread.join()


class _Lines:
    """JSON lines to a file (temporary name, renamed by :meth:`close`) or to stdout (``-``)."""

    def __init__(self, target: str | Path):
        self.stdout = str(target) == "-"
        if self.stdout:
            self.handle = sys.stdout
            return
        self.path = Path(target)
        if not self.path.parent.is_dir():
            raise VideoError(
                f"jsonl {self.path}: the folder {self.path.parent} does not exist.", parameter="jsonl"
            )
        self.staged = AtomicOutput(self.path)
        self.handle = open(self.staged.path, "w")

    def write(self, record: dict) -> None:
        try:
            self.handle.write(json.dumps(record) + "\n")
        except OSError as error:  # a full disk, when the buffer is flushed
            if not self.stdout:
                self.staged.named(error)
            raise
        if self.stdout:
            self.handle.flush()

    def close(self) -> None:
        """Publish the file (flush stdout); a file that cannot be written whole is deleted, not kept."""
        if self.stdout:
            self.handle.flush()
            return
        try:
            self.handle.close()  # a full disk shows here, when the last lines are flushed
        except BaseException as error:
            self.discard()
            self.staged.named(error)
            raise
        self.staged.commit()

    def discard(self) -> None:
        if self.stdout:
            return
        try:
            self.handle.close()
        except OSError:
            pass  # what could not be flushed is deleted anyway
        self.staged.discard()


def _track_record(track) -> dict:
    x, y, w, h = track.xywh()
    return {
        "id": track.id,
        "box": [round(x, 1), round(y, 1), round(w, 1), round(h, 1)],
        "age": None if track.age is None else round(track.age, 2),
        "age_std": None if track.age_std is None else round(track.age_std, 2),
        "gender": track.gender,
        "gender_prob": None if track.gender_prob is None else round(track.gender_prob, 4),
    }


def _male_prob(face) -> float | None:
    if face.gender is None:
        return None
    return face.gender_prob if face.gender == "male" else 1.0 - face.gender_prob


VIDEO_MIN_FACE = (
    40  # c3ae video's default smallest face: video faces are rarely smaller, detection is 2x faster
)


class _FrameSource:
    """The frames of a capture as ``(index, frame)``, starting with the already decoded ``first``. A frame
    that cannot be decoded is skipped and counted in ``broken`` (its index is kept, so the output's frame
    indices stay the input's); ``MAX_CONSECUTIVE_FAILURES`` in a row, or the frame count, end the stream."""

    def __init__(self, frames: _Prefetch, first, total: int | None, max_frames: int | None, timer):
        self.frames, self.first, self.total, self.max_frames, self.timer = (
            frames,
            first,
            total,
            max_frames,
            timer,
        )
        self.index = self.broken = self.pending = 0

    def __iter__(self):
        frame = self.first
        while True:
            if frame is None:
                if self.max_frames is not None and self.index + self.pending >= self.max_frames:
                    return
                with self.timer("decode"):
                    ok, frame = self.frames.read()
                if not ok or frame is None:
                    frame = None
                    more = self.total is None or self.index + self.pending + 1 < self.total
                    if more and self.pending < MAX_CONSECUTIVE_FAILURES:
                        self.pending += 1
                        continue
                    return
                if self.pending:  # frames that failed to decode before this good one: broken, skipped
                    self.broken += self.pending
                    self.index += self.pending
                    self.pending = 0
            yield self.index, frame
            self.index += 1
            frame = None


class _Annotator:
    """One frame's step: find scene cuts, detect (every ``detect_every`` frames, and at once after a cut)
    and estimate, or carry the tracks along in between; returns the visible tracks."""

    def __init__(self, estimator, tracker: IoUTracker, timer, detect_every: int, scene_cut: float):
        self.estimator, self.tracker, self.timer = estimator, tracker, timer
        self.detect_every, self.scene_cut = detect_every, scene_cut
        self.thumbnail = self.last_detection = None
        self.detections = self.cuts = self.face_boxes = 0

    def _is_cut(self, frame: np.ndarray) -> bool:
        # Every 4th pixel is plenty for a 32x18 thumbnail, and 16 times less to read on HD frames.
        small = cv2.resize(frame[::4, ::4], THUMBNAIL, interpolation=cv2.INTER_AREA)
        small = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY).astype(np.float32)
        previous, self.thumbnail = self.thumbnail, small
        return (
            self.scene_cut > 0
            and previous is not None
            and float(np.abs(small - previous).mean()) > self.scene_cut
        )

    def step(self, index: int, frame: np.ndarray, now: float) -> tuple[list, bool]:
        """(visible tracks, whether the detector ran) for frame ``index`` at stream time ``now`` seconds."""
        timer, estimator = self.timer, self.estimator
        with timer("track"):
            cut = self._is_cut(frame)
        detect_now = self.last_detection is None or cut or index - self.last_detection >= self.detect_every
        if detect_now:
            if cut:
                self.tracker.reset()
                self.cuts += 1
            with timer("detect"):
                found = estimator.detect(frame)
            with timer("track"):
                tracks = self.tracker.update(index, [d.box for d in found], [d.score for d in found])
            with timer("align"):
                aligned = estimator.align(frame, found)
            with timer("estimate"):
                faces = estimator.estimate_aligned(aligned)
            for track, face in zip(tracks, faces, strict=True):
                track.observe(face.age, _male_prob(face), now, face.age_std)
            self.detections += 1
            self.last_detection = index
        else:
            with timer("track"):
                self.tracker.advance(index)
        visible = self.tracker.visible()
        self.face_boxes += len(visible)
        return visible, detect_now


def _open_window(show: bool) -> None:
    if not show:
        return
    try:
        cv2.namedWindow("c3ae", cv2.WINDOW_NORMAL)
    except cv2.error as error:
        raise VideoError(
            "show needs OpenCV with GUI support (pip install opencv-python instead of "
            "opencv-python-headless).",
            parameter="show",
        ) from error


class _Sinks:
    """Where annotated frames go: the video file, the JSON lines, the window. :meth:`close` finalises each
    (a video with no frame is discarded) before raising the first failure."""

    def __init__(self, output, jsonl, show: bool, fps: float, size: tuple[int, int], timer):
        self.writer = _Output(output, fps, size) if output is not None else None
        self.lines = _Lines(jsonl) if jsonl is not None else None
        self.show, self.timer = show, timer

    def emit(self, index: int, now: float, detected: bool, visible: list, frame: np.ndarray) -> bool:
        """Send one frame on; True when the window asks to stop (q or Esc)."""
        if self.lines is not None:
            tracks = [_track_record(t) for t in visible]
            try:
                self.lines.write(
                    {"frame": index, "time": round(now, 4), "detected": detected, "tracks": tracks}
                )
            except BrokenPipeError:  # the reader of --jsonl - left (`| head`): the video still gets it all
                if self.writer is None and not self.show:
                    raise
                stdout_gone()
                self.lines = None
        if self.writer is not None or self.show:
            with self.timer("draw"):
                for track in visible:
                    color = COLORS.get(track.gender, COLORS[None])
                    draw_box(frame, track.xywh(), face_label(track.age, track.gender), color)
        if self.writer is not None:
            with self.timer("encode"):
                self.writer.write(frame)
        if self.show:
            cv2.imshow("c3ae", frame)
            return cv2.waitKey(1) & 0xFF in (ord("q"), 27)
        return False

    def close(self, written: int, summary_of) -> None:
        """Finalise every sink; ``summary_of(video_kept)`` makes the summary the JSON lines end with."""
        failures = []
        if self.writer is not None:
            try:
                self.writer.close(keep=written > 0)
            except BaseException as error:
                failures.append(error)
        summary = summary_of(self.writer is not None and written > 0 and not failures)
        if self.lines is not None:
            try:
                self.lines.write({"summary": summary.to_dict()})
                self.lines.close()
            except BaseException as error:
                self.lines.discard()
                failures.append(error)
        if failures:
            raise failures[0]


def _checked_outputs(source, output, jsonl):
    """The one rule for outputs (c3ae.files): never the input, never over a file of another kind."""
    inputs = [] if isinstance(source, int) else [source]
    try:
        if output is not None:
            output = check_output(output, "output", inputs, ("video",))
        if jsonl is not None and str(jsonl) != "-":
            check_output(jsonl, "jsonl", inputs, ("json", "text"))
    except OutputError as error:
        raise VideoError(str(error), parameter=error.parameter) from error
    return output


def _stream_facts(capture, is_camera: bool, max_frames: int | None) -> tuple[float, int | None]:
    """(frames per second, frames to expect or None) of an opened capture."""
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = float(fps) if fps and math.isfinite(fps) and 0 < fps < 1000 else DEFAULT_FPS
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    total = total if total > 0 and not is_camera else None
    if max_frames is not None:
        total = min(total, int(max_frames)) if total is not None else int(max_frames)
    return fps, total


def process_video(
    source,
    estimator,
    *,
    output: str | Path | None = None,
    jsonl: str | Path | None = None,
    detect_every: int = 5,
    smooth: float = 1.0,
    show: bool = False,
    progress: bool = True,
    max_frames: int | None = None,
    scene_cut: float = 20.0,
) -> VideoSummary:
    """Run ``estimator`` (an ``AgeGenderEstimator``) over a video file or a camera (an int index).

    Args:
        source: a video file, or a camera index.
        output: the annotated video (``.mp4``, ``.avi``, ...), same frame rate and frame count as the input
            (frames that cannot be decoded are skipped and counted). Never the input itself.
        jsonl: one JSON object per frame (``frame``, ``time``, ``detected``, ``tracks`` with ``id``, ``box``
            (x, y, w, h), ``age``, ``age_std``, ``gender``, ``gender_prob``), then ``{"summary": ...}``.
            ``"-"`` writes to stdout.
        detect_every: run the detector on every N-th frame; the tracker carries boxes in between.
        smooth: time constant in seconds of the per-track exponential smoothing (0 = none).
        show: display the annotated frames in a window (q or Esc stops).
        progress: a progress bar on stderr.
        max_frames: stop after this many input frames.
        scene_cut: a frame whose 32x18 grayscale thumbnail differs from the previous one's by more than this
            mean absolute difference (0-255) is a scene cut: tracks are dropped (a face after a cut is a new
            track, its estimates not mixed with the previous shot's) and the detector runs at once. 0 = off.

    Returns the :class:`c3ae.records.VideoSummary` (its ``str`` is the line ``c3ae video`` prints):
    ``frames`` (written), ``faces`` (distinct tracks), ``face_boxes`` (boxes over all
    frames), ``fps`` (processing only, not start-up), ``stages`` (seconds and ms per frame), and
    ``broken_frames``, ``missing_frames``, ``interrupted``. The end of the stream and Ctrl-C (or q in the
    window, or SIGTERM under the ``c3ae`` command) all finalise the output files; a signal is honoured
    between two frames (:func:`c3ae.signals.stop_requests`), never inside one.
    """
    if int(detect_every) < 1:
        raise UsageError(f"detect_every must be at least 1, got {detect_every}.")
    output = _checked_outputs(source, output, jsonl)
    is_camera = isinstance(source, int)
    capture = open_capture(source)
    timer = StageTimer()
    fps_in, total = _stream_facts(capture, is_camera, max_frames)
    tracker = IoUTracker(smooth=smooth)
    annotator = _Annotator(estimator, tracker, timer, int(detect_every), scene_cut)
    sinks = bar = frames = source_frames = start = None
    written, interrupted = 0, False
    with stop_requests() as asked:
        try:
            _open_window(show)
            # Start-up, not timed: the first frame, the outputs, one warm-up pass of detector and model.
            ok, first = capture.read()
            if not ok or first is None:
                raise VideoError(f"{source}: not a single frame could be decoded.")
            sinks = _Sinks(output, jsonl, show, fps_in, (first.shape[1], first.shape[0]), timer)
            estimator.estimate_aligned(estimator.align(first, estimator.detect(first)))
            bar = _progress_bar(total) if progress else None
            start = time.perf_counter()
            frames = _Prefetch(capture)
            source_frames = _FrameSource(frames, first, total, max_frames, timer)
            for index, frame in source_frames:
                if asked:  # Ctrl-C or SIGTERM: stop between two frames, every thread and queue intact
                    interrupted = True
                    break
                # Stream time: from the frame rate for files, the wall clock for cameras.
                now = time.perf_counter() - start if is_camera else index / fps_in
                visible, detected = annotator.step(index, frame, now)
                stop = sinks.emit(index, now, detected, visible, frame)
                written += 1
                _tick(bar, written, start)
                if stop:
                    interrupted = True
                    break
        except KeyboardInterrupt:  # outside the main thread's stop_requests
            interrupted = True
        finally:
            interrupted = interrupted or bool(asked)
            elapsed = time.perf_counter() - start if start is not None else 0.0
            if frames is not None:
                frames.close()
            capture.release()
            if bar is not None:
                bar.close()
            if show:
                try:
                    cv2.destroyAllWindows()
                except cv2.error:
                    pass
            summary_of = partial(
                _video_summary,
                output=output,
                written=written,
                total=total,
                frames=source_frames,
                interrupted=interrupted,
                annotator=annotator,
                elapsed=elapsed,
                fps_in=fps_in,
                timer=timer,
            )
            summary = summary_of(output is not None and written > 0)
            if sinks is not None:
                sinks.close(written, summary_of)
    return summary


def _video_summary(
    kept: bool, *, output, written, total, frames, interrupted, annotator, elapsed, fps_in, timer
) -> VideoSummary:
    """:func:`process_video`'s summary (``kept``: the annotated video was written)."""
    index = frames.index if frames is not None else 0
    return VideoSummary(
        frames=written,
        input_frames=total,
        broken_frames=frames.broken if frames is not None else 0,
        missing_frames=max(total - index, 0) if total is not None and not interrupted else 0,
        interrupted=interrupted,
        faces=annotator.tracker.next_id - 1,
        face_boxes=annotator.face_boxes,
        detection_frames=annotator.detections,
        scene_cuts=annotator.cuts,
        fps=round(written / elapsed, 2) if elapsed > 0 else None,
        input_fps=round(fps_in, 3),
        seconds=round(elapsed, 3),
        stages=timer.summary(written),
        output=str(output) if kept else None,
    )


def _tick(bar, written: int, start: float) -> None:
    if bar is not None:
        bar.update(1)
        if written % 10 == 0:
            bar.set_postfix(fps=f"{written / (time.perf_counter() - start):.1f}", refresh=False)


def _progress_bar(total: int | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="frame", file=sys.stderr, dynamic_ncols=True, leave=True)


def format_stages(summary: VideoSummary | dict) -> str:
    """A small table of the per-stage timings of a :func:`process_video` summary
    (:meth:`c3ae.records.VideoSummary.stage_table`)."""
    return VideoSummary.from_json(summary).stage_table()
