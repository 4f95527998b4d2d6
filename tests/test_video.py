"""``c3ae video``: the IoU tracker and the smoothing on a synthetic clip written here, the outputs, and bad
input (videos that cannot be opened, truncated files, broken frames, Ctrl-C)."""

import json
import math
import os

import cv2
import numpy as np
import pytest
from conftest import REPO

from c3ae.cli import main
from c3ae.estimator import AgeGenderEstimator
from c3ae.faces import read_image
from c3ae.tracking import ExponentialSmoother, IoUTracker, iou
from c3ae.video import VideoError, process_video

SIZE = (320, 240)
FPS = 10.0
CUT = 16  # frames 0..15: a face moving right 4 px per frame; from 16 on another shot
STEP = 4
WIDTH = 200  # of the moving portrait; its face is about 50 px wide


@pytest.fixture(scope="module")
def estimator(model):
    return AgeGenderEstimator(model, pad_retry=0.0)


def portrait(path, width):
    image = read_image(REPO / "assets" / path)
    return cv2.resize(
        image, (width, round(width * image.shape[0] / image.shape[1])), interpolation=cv2.INTER_AREA
    )


def synthetic_frames(count=24):
    """A face (Obama's portrait) moving right on a dark wall, then a cut to a bright wall with another face
    (the astronaut) standing still."""
    obama, astronaut = portrait("obama.jpg", WIDTH), portrait("astronaut.jpg", 150)
    frames = []
    for i in range(count):
        if i < CUT:
            frame = np.full((SIZE[1], SIZE[0], 3), 70, np.uint8)
            x = 10 + STEP * i
            frame[: min(obama.shape[0], SIZE[1]), x : x + WIDTH] = obama[: SIZE[1]]
        else:
            frame = np.full((SIZE[1], SIZE[0], 3), 200, np.uint8)
            frame[40 : 40 + 150, 100:250] = astronaut[:150]
        frames.append(frame)
    return frames


def write_clip(path, frames, fourcc="mp4v"):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, SIZE)
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def read_back(path):
    capture = cv2.VideoCapture(str(path))
    frames = 0
    while capture.read()[0]:
        frames += 1
    return frames, capture.get(cv2.CAP_PROP_FPS)


def read_lines(path):
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return lines[:-1], lines[-1]["summary"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", synthetic_frames())


@pytest.fixture(scope="module")
def raw_run(clip, estimator, tmp_path_factory):
    """The clip without smoothing, detecting every 3rd frame."""
    folder = tmp_path_factory.mktemp("raw")
    summary = process_video(
        clip,
        estimator,
        output=folder / "out.mp4",
        jsonl=folder / "frames.jsonl",
        detect_every=3,
        smooth=0.0,
        progress=False,
    )
    return folder, summary


# ------------------------------------------------------------------------------------------------ the clip
def test_output_has_the_input_frame_count_and_fps(raw_run, clip):
    folder, summary = raw_run
    assert read_back(folder / "out.mp4") == (24, FPS) == read_back(clip)
    assert summary["frames"] == 24 and summary["broken_frames"] == 0 and summary["missing_frames"] == 0
    assert not list(folder.glob(".*partial*"))  # temporary files renamed


def test_jsonl_has_one_line_per_frame_and_a_summary(raw_run):
    folder, summary = raw_run
    records, last = read_lines(folder / "frames.jsonl")
    assert last == summary
    assert [r["frame"] for r in records] == list(range(24))
    for record in records:
        assert set(record) == {"frame", "time", "detected", "tracks"}
        for track in record["tracks"]:
            assert set(track) == {"id", "box", "age", "age_std", "gender", "gender_prob"}
            assert len(track["box"]) == 4 and track["gender"] in ("male", "female")
    assert {"frames", "faces", "fps", "stages"} <= set(summary)
    assert set(summary["stages"]) >= {"decode", "detect", "align", "estimate", "draw", "encode"}
    assert summary["fps"] > 0 and summary["stages"]["detect"]["calls"] == summary["detection_frames"]


def test_one_track_follows_the_moving_face_and_a_cut_starts_a_new_one(raw_run):
    records, summary = read_lines(raw_run[0] / "frames.jsonl")
    first = [r for r in records[:CUT] if r["tracks"]]
    second = [r for r in records[CUT:] if r["tracks"]]
    assert len(first) >= CUT - 1 and len(second) >= len(records) - CUT - 1
    first_ids = {t["id"] for r in first for t in r["tracks"]}
    second_ids = {t["id"] for r in second for t in r["tracks"]}
    assert len(first_ids) == 1 and len(second_ids) == 1 and first_ids != second_ids
    assert summary["faces"] == 2 and summary["scene_cuts"] == 1
    assert records[CUT]["detected"]  # the cut triggers a detection at once
    # Between detections the box is carried along the track's velocity: once the velocity is measured
    # (second detection, frame 3) the carried box keeps up with the face, 4 px per frame.
    detected = {r["frame"]: r["tracks"][0]["box"] for r in first if r["detected"]}
    for record in first:
        frame = record["frame"]
        anchor = max(f for f in detected if f <= frame)
        if frame <= 3 or anchor == frame:
            continue
        centre = record["tracks"][0]["box"][0] + record["tracks"][0]["box"][2] / 2
        expected = detected[anchor][0] + detected[anchor][2] / 2 + STEP * (frame - anchor)
        assert abs(centre - expected) < 6, (frame, centre, expected)


def test_smoothing_is_exponential_with_the_given_time_constant(raw_run, clip, estimator, tmp_path):
    tau = 0.5
    summary = process_video(
        clip, estimator, jsonl=tmp_path / "s.jsonl", detect_every=3, smooth=tau, progress=False
    )
    raw, _ = read_lines(raw_run[0] / "frames.jsonl")
    smoothed, _ = read_lines(tmp_path / "s.jsonl")
    assert summary["frames"] == 24
    # On the detection frames of the first shot: an exponential moving average of the raw estimates.
    age = male = previous = None
    checked = 0
    for before, after in zip(raw[:CUT], smoothed[:CUT], strict=True):
        if not (before["detected"] and before["tracks"]):
            continue
        track, result = before["tracks"][0], after["tracks"][0]
        p_male = track["gender_prob"] if track["gender"] == "male" else 1 - track["gender_prob"]
        if age is None:
            age, male = track["age"], p_male
        else:
            alpha = 1 - math.exp(-(before["time"] - previous) / tau)
            age += alpha * (track["age"] - age)
            male += alpha * (p_male - male)
            checked += 1
        previous = before["time"]
        assert result["age"] == pytest.approx(age, abs=0.02)
        result_male = result["gender_prob"] if result["gender"] == "male" else 1 - result["gender_prob"]
        assert result_male == pytest.approx(male, abs=2e-3)
    assert checked >= 3


# ------------------------------------------------------------------------------------------------ tracker
def test_tracker_matches_by_iou_and_drops_lost_tracks():
    tracker = IoUTracker(iou_threshold=0.3, max_misses=1, smooth=0.0)
    a, b = (0, 0, 50, 60), (200, 0, 250, 60)
    first = tracker.update(0, [a, b])
    assert [t.id for t in first] == [1, 2]
    moved = tracker.update(5, [(205, 0, 255, 60), (10, 0, 60, 60)])  # order swapped, both moved
    assert [t.id for t in moved] == [2, 1]
    tracker.advance(7)  # carried along the measured velocity: 2 px per frame to the right
    np.testing.assert_allclose(tracker.tracks[0].box, (14, 0, 64, 60))
    tracker.update(10, [(20, 0, 70, 60)])  # track 2 missed once: kept but not visible
    assert [t.id for t in tracker.visible()] == [1] and len(tracker.tracks) == 2
    tracker.update(15, [(25, 0, 75, 60)])  # missed twice: dropped
    assert [t.id for t in tracker.tracks] == [1]
    assert tracker.update(20, [(300, 200, 340, 240)])[0].id == 3  # no overlap: a new track
    tracker.reset()
    assert tracker.tracks == [] and tracker.update(21, [a])[0].id == 4


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


def test_exponential_smoother():
    smoother = ExponentialSmoother(1.0)
    assert smoother.update(10.0, 0.0) == 10.0
    assert smoother.update(20.0, 1.0) == pytest.approx(10 + 10 * (1 - math.exp(-1)))
    assert ExponentialSmoother(0.0).update(5.0, 0.0) == 5.0
    off = ExponentialSmoother(0.0)
    off.update(1.0, 0.0)
    assert off.update(7.0, 0.1) == 7.0
    with pytest.raises(ValueError):
        ExponentialSmoother(-1.0)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def avi_frames():
    return synthetic_frames(30)[:CUT] * 2  # 32 frames, no cut in the middle of the stream matters here


def test_truncated_video_keeps_everything_decoded(estimator, avi_frames, tmp_path):
    path = write_clip(tmp_path / "full.avi", avi_frames, "MJPG")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(data[: len(data) // 2])
    decodable, _ = read_back(truncated)
    assert 0 < decodable < len(avi_frames)
    out = tmp_path / "out.mp4"
    summary = process_video(truncated, estimator, output=out, detect_every=50, progress=False)
    assert summary["frames"] == decodable and summary["missing_frames"] == len(avi_frames) - decodable
    assert read_back(out)[0] == decodable


def test_broken_frames_are_skipped_and_counted(estimator, avi_frames, tmp_path):
    path = write_clip(tmp_path / "clip.avi", avi_frames, "MJPG")
    data = bytearray(path.read_bytes())
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]
    assert len(starts) == len(avi_frames)
    for k in (8, 17):  # wipe two frames' JPEG data, keeping the AVI chunks intact
        end = data.index(b"\xff\xd9", starts[k]) + 2
        data[starts[k] : end] = bytes(end - starts[k])
    path.write_bytes(bytes(data))
    out, lines = tmp_path / "out.mp4", tmp_path / "frames.jsonl"
    summary = process_video(path, estimator, output=out, jsonl=lines, detect_every=50, progress=False)
    assert summary["broken_frames"] == 2 and summary["frames"] == len(avi_frames) - 2
    assert read_back(out)[0] == len(avi_frames) - 2
    records, _ = read_lines(lines)
    assert 8 not in {r["frame"] for r in records} and records[-1]["frame"] == len(avi_frames) - 1


def test_ctrl_c_finalises_the_outputs(clip, estimator, tmp_path):
    class Interrupting:
        """Forwards to the estimator; Ctrl-C during the 4th detection (warm-up, frames 0 and 3, then 6)."""

        def __init__(self):
            self.calls = 0

        def detect(self, frame):
            self.calls += 1
            if self.calls == 4:
                raise KeyboardInterrupt
            return estimator.detect(frame)

        def __getattr__(self, name):
            return getattr(estimator, name)

    out, lines = tmp_path / "out.mp4", tmp_path / "frames.jsonl"
    summary = process_video(clip, Interrupting(), output=out, jsonl=lines, detect_every=3, progress=False)
    assert summary["interrupted"] and summary["frames"] == 6
    assert read_back(out) == (6, FPS)
    records, last = read_lines(lines)
    assert len(records) == 6 and last == summary


@pytest.mark.parametrize("content", [b"", b"definitely not a video" * 50, None])
def test_videos_that_cannot_be_opened(estimator, tmp_path, content):
    path = tmp_path / "bad.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VideoError, match="bad.mp4"):
        process_video(path, estimator, progress=False)


def test_output_over_the_input_is_refused(clip, estimator):
    with pytest.raises(VideoError, match="is the input"):
        process_video(clip, estimator, output=clip, progress=False)


def test_show_without_a_display_build_is_a_clear_error(clip, estimator):
    if "GUI:                           NONE" not in cv2.getBuildInformation():
        pytest.skip("this OpenCV build has GUI support; --show would open a window")
    with pytest.raises(VideoError, match="show needs OpenCV with GUI support"):
        process_video(clip, estimator, show=True, progress=False)


# ------------------------------------------------------------------------------------------------ command
def test_cli_video_with_verbose_stage_timings(clip, model, tmp_path, capsys):
    out, lines = tmp_path / "out.mp4", tmp_path / "frames.jsonl"
    code = main(
        ["video", str(clip), "--output", str(out), "--jsonl", str(lines), "--verbose", "--model", model]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert "C3AE_VERBOSE" not in os.environ  # verbose for that command only, not for the program that ran it
    assert "24 frames at" in err and "fps" in err
    for stage in ("decode", "detect", "align", "estimate", "draw", "encode"):
        assert f"\n{stage} " in err
    assert read_back(out) == (24, FPS)
    assert read_lines(lines)[1]["frames"] == 24


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["video", "no/such/clip.mp4"], "no/such/clip.mp4 does not exist"),
        (["video"], "Give either a video file (INPUT) or --camera N"),
        (["video", "x.mp4", "--camera", "0"], "not both"),
        (["video", "--camera", "57"], "Camera 57 cannot be opened"),
        (["video", "CLIP", "--output", "out.gif"], "--output out.gif"),
    ],
)
def test_cli_video_mistakes_exit_2_with_one_line(args, message, clip, capsys):
    args = [str(clip) if a == "CLIP" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
