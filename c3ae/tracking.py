"""An IoU tracker for detect-every-N-frames video, and per-track exponential smoothing of age and gender.

Detections arrive on some frames only. :meth:`IoUTracker.update` matches them to the live tracks by IoU
(greedy, highest first), starts a track for each unmatched detection and drops tracks missed more than
``max_misses`` detection rounds in a row. Between detection frames :meth:`IoUTracker.advance` carries every
box along its track's velocity (measured between its last two detections). Boxes are (x1, y1, x2, y2).

Each track smooths its estimates with an exponential filter whose time constant is ``smooth`` seconds: an
estimate ``dt`` seconds after the previous one moves the smoothed value by ``1 - exp(-dt / smooth)`` of the
way towards it (``smooth=0`` switches smoothing off). Age and the probability of male are smoothed; the
gender label follows the smoothed probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from c3ae.errors import UsageError


def iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    inter_w = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    inter_h = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = inter_w * inter_h
    union = max(ax2 - ax1, 0.0) * max(ay2 - ay1, 0.0) + max(bx2 - bx1, 0.0) * max(by2 - by1, 0.0) - inter
    return inter / union if union > 0 else 0.0


class ExponentialSmoother:
    """Exponential smoothing with time constant ``tau`` seconds over irregularly spaced samples."""

    def __init__(self, tau: float):
        if not tau >= 0:
            raise UsageError(f"The smoothing time constant must be >= 0 seconds, got {tau}.")
        self.tau = float(tau)
        self.value: float | None = None
        self.time: float | None = None

    def update(self, value: float, time: float) -> float:
        if self.value is None or self.tau == 0:
            self.value = float(value)
        else:
            dt = max(float(time) - float(self.time), 0.0)
            alpha = 1.0 - math.exp(-dt / self.tau)
            self.value += alpha * (float(value) - self.value)
        self.time = float(time)
        return self.value


@dataclass
class Track:
    """One face followed across frames."""

    id: int
    box: np.ndarray  # (4,) float64 x1, y1, x2, y2, carried between detections
    detection_frame: int  # frame of the last matched detection
    smooth: float = 1.0
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))  # box change per frame
    hits: int = 1
    misses: int = 0
    detected_box: np.ndarray | None = None  # the last detected box, where the velocity is measured from
    detection_score: float = 0.0
    age_std: float | None = None
    _age: ExponentialSmoother | None = field(default=None, repr=False)
    _male: ExponentialSmoother | None = field(default=None, repr=False)

    def __post_init__(self):
        self.box = np.asarray(self.box, dtype=np.float64)
        self.detected_box = self.box.copy()
        self._age = ExponentialSmoother(self.smooth)
        self._male = ExponentialSmoother(self.smooth)

    @property
    def age(self) -> float | None:
        return self._age.value

    @property
    def male_prob(self) -> float | None:
        return self._male.value

    @property
    def gender(self) -> str | None:
        return None if self.male_prob is None else ("male" if self.male_prob >= 0.5 else "female")

    @property
    def gender_prob(self) -> float | None:
        """The probability of the stated gender (smoothed)."""
        if self.male_prob is None:
            return None
        return self.male_prob if self.male_prob >= 0.5 else 1.0 - self.male_prob

    @property
    def visible(self) -> bool:
        """Matched at the last detection round (missed tracks are kept, undrawn, for re-association)."""
        return self.misses == 0

    def observe(self, age: float | None, male_prob: float | None, time: float, age_std: float | None = None):
        """Feed one estimate made at ``time`` seconds into the smoothers."""
        if age is not None:
            self._age.update(age, time)
            self.age_std = age_std
        if male_prob is not None:
            self._male.update(male_prob, time)

    def xywh(self) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = (float(v) for v in self.box)
        return (x1, y1, x2 - x1, y2 - y1)


class IoUTracker:
    """Matches detections to tracks by IoU on detection frames; carries boxes by velocity in between."""

    def __init__(self, iou_threshold: float = 0.3, max_misses: int = 1, smooth: float = 1.0):
        if not 0 < iou_threshold <= 1:
            raise UsageError(f"iou_threshold must be in (0, 1], got {iou_threshold}.")
        self.iou_threshold = float(iou_threshold)
        self.max_misses = int(max_misses)
        self.smooth = float(smooth)
        ExponentialSmoother(self.smooth)  # validates
        self.tracks: list[Track] = []
        self.next_id = 1
        self.frame = -1

    def reset(self) -> None:
        """Forget every track (a scene cut); new detections start new tracks, with fresh smoothing."""
        self.tracks = []

    def advance(self, frame: int) -> None:
        """Move every track's box to ``frame`` along its velocity (frames without a detection)."""
        for track in self.tracks:
            track.box = track.detected_box + track.velocity * (frame - track.detection_frame)
        self.frame = frame

    def update(self, frame: int, boxes, scores=None) -> list[Track]:
        """Associate the detections of ``frame`` (a list of (x1, y1, x2, y2)) with tracks.

        Returns the track of each detection, in the order given (new tracks for unmatched detections).
        """
        boxes = [np.asarray(b, dtype=np.float64) for b in boxes]
        scores = [0.0] * len(boxes) if scores is None else [float(s) for s in scores]
        self.advance(frame)
        pairs = sorted(
            (
                (iou(track.box, box), t, d)
                for t, track in enumerate(self.tracks)
                for d, box in enumerate(boxes)
            ),
            reverse=True,
        )
        assigned: dict[int, Track] = {}
        used_tracks: set[int] = set()
        for overlap, t, d in pairs:
            if overlap < self.iou_threshold:
                break
            if t in used_tracks or d in assigned:
                continue
            used_tracks.add(t)
            assigned[d] = self._hit(self.tracks[t], boxes[d], frame, scores[d])
        survivors = []
        for t, track in enumerate(self.tracks):
            if t not in used_tracks:
                track.misses += 1
                if track.misses > self.max_misses:
                    continue
            survivors.append(track)
        self.tracks = survivors
        for d, box in enumerate(boxes):
            if d not in assigned:
                track = Track(self.next_id, box, frame, smooth=self.smooth, detection_score=scores[d])
                self.next_id += 1
                self.tracks.append(track)
                assigned[d] = track
        return [assigned[d] for d in range(len(boxes))]

    @staticmethod
    def _hit(track: Track, box: np.ndarray, frame: int, score: float) -> Track:
        frames = max(frame - track.detection_frame, 1)
        measured = (box - track.detected_box) / frames
        # After the first measurement, half-weight each new one: detector boxes jitter.
        track.velocity = 0.5 * track.velocity + 0.5 * measured if track.hits > 1 else measured
        track.box = box.copy()
        track.detected_box = box.copy()
        track.detection_frame = frame
        track.detection_score = score
        track.hits += 1
        track.misses = 0
        return track

    def visible(self) -> list[Track]:
        return [track for track in self.tracks if track.visible]
